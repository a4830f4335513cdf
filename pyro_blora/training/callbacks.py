"""Callbacks of the SVI loop, and the two it always installs: validation with early stopping, and checkpoints.

A callback is any ``callable(state) -> Optional[bool]`` called after every
optimiser step with the :class:`~pyro_blora.result.TrainingState`; returning
True stops training. The built-in ones also carry state across a checkpoint
(:meth:`ValidationMonitor.state_dict`), so a resumed run stops, and restores
its best weights, exactly as the uninterrupted one would.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional, Sequence

from torch import Tensor

from pyro_blora.result import DEFAULT_PREDICT_SEED, TrainingState
from pyro_blora.training.checkpoint import save_checkpoint

__all__ = ["Callback", "CheckpointWriter", "EvaluationSchedule", "ValidationMonitor", "fraction_steps"]

Callback = Callable[[TrainingState], Optional[bool]]


class ValidationMonitor:
    """Evaluate ``val_data`` every ``every`` steps; keep the best (lowest NLL) weights; stop after ``patience`` misses.

    Args:
        val_data: labelled validation examples (never the test split).
        every: steps between evaluations (0: never).
        patience: evaluations without a new best before stopping (None: never stop,
            and keep the last weights rather than the best).
        num_samples: posterior samples per evaluation.
    """

    def __init__(self, val_data: Any, every: int, patience: Optional[int], num_samples: int = 4):
        self.val_data = val_data
        self.every = every
        self.patience = patience
        self.num_samples = num_samples
        self.best_nll = math.inf
        self.best_state: Optional[dict[str, Tensor]] = None
        self.stale = 0

    def __call__(self, state: TrainingState) -> bool:
        if self.val_data is None or not self.every or state.step % self.every:
            return False
        metrics = state.result.evaluate(self.val_data, num_samples=self.num_samples)
        state.record_validation(metrics)
        if metrics["nll"] < self.best_nll:
            self.best_nll, self.best_state, self.stale = metrics["nll"], state.result.state_dict_copy(), 0
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (JSON; the best weights travel separately as tensors)."""
        return {"stale": self.stale, "best_nll": None if math.isinf(self.best_nll) else self.best_nll}

    def load_state_dict(self, saved: dict[str, Any], best_state: Optional[dict[str, Tensor]]) -> None:
        self.stale = saved["stale"]
        self.best_nll = math.inf if saved["best_nll"] is None else saved["best_nll"]
        self.best_state = best_state

    def finish(self, state: TrainingState) -> None:
        """With early stopping on, leave the best weights in place."""
        if self.best_state is not None and self.patience is not None:
            state.result.load_state_dict_copy(self.best_state)


class CheckpointWriter:
    """Write a checkpoint every ``every`` steps, and after the step in which Ctrl-C arrived.

    ``position`` and ``interrupted`` of the :class:`TrainingState` say where the
    data loader stands and whether to write now; ``monitor`` contributes its state.
    """

    def __init__(
        self,
        directory: "str | os.PathLike[str]",
        every: Optional[int],
        optimizer: Any,
        scheduler: Any,
        run: dict[str, Any],
        monitor: ValidationMonitor,
        enabled: bool = True,
    ):
        self.directory = directory
        self.every = every
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.run = run
        self.monitor = monitor
        self.enabled = enabled  # False on every process but the main one

    def __call__(self, state: TrainingState) -> bool:
        due = state.interrupted or (self.every and state.step % self.every == 0)
        if self.enabled and due:
            self.write(state)
        return False

    def write(self, state: TrainingState) -> None:
        state.flush()  # the checkpoint's history must hold every step up to this one
        epoch, batch_index = state.position
        extra = {"history": state.history, "validation": state.validation, **self.monitor.state_dict()}
        save_checkpoint(
            self.directory, state.result, self.optimizer, self.scheduler, step=state.step, epoch=epoch,
            batch_index=batch_index, run=self.run, extra=extra, best=self.monitor.best_state,
        )


def run_callbacks(callbacks: Sequence[Callback], state: TrainingState) -> bool:
    """Call every callback (all of them, even after one asked to stop); True if any asked to stop."""
    stop = False
    for callback in callbacks:
        stop = bool(callback(state)) or stop
    return stop


class EvaluationSchedule:
    """Score labelled data sets at fixed steps along training: the long-training protocol's checkpoints.

    At each step in ``steps`` (and never at others) the posterior predictive of every set in
    ``data`` is computed with ``num_samples`` draws and the prediction's seed, and its metrics go
    into :attr:`records` as ``{"step": t, "<set>": metrics, ...}``. The predictions of the last
    scored step, and of the step with the lowest NLL on ``select_on`` (validation only, never test),
    are kept in :attr:`last` and :attr:`selected` for a caller that needs their probabilities.

    Args:
        data: set name -> labelled examples (e.g. ``{"validation": ..., "test": ...}``).
        steps: optimiser steps (1-based, as :attr:`TrainingState.step` after a step) to score at.
        select_on: the set whose NLL picks :attr:`selected` (None: no selection).
        num_samples: posterior draws per prediction.
        seed: the predictions' seed (:meth:`FitResult.predict`'s), so that the last checkpoint's
            predictions are those of the finished fit with the same seed.
    """

    def __init__(self, data: dict[str, Any], steps: Sequence[int], select_on: Optional[str] = "validation",
                 num_samples: int = 4, seed: Optional[int] = DEFAULT_PREDICT_SEED):
        if select_on is not None and select_on not in data:
            raise ValueError(f"select_on={select_on!r} is not one of the data sets {sorted(data)}")
        self.data, self.steps, self.select_on = data, set(int(s) for s in steps), select_on
        self.num_samples, self.seed = num_samples, seed
        self.records: list[dict[str, Any]] = []
        self.last: dict[str, Any] = {}
        self.selected: dict[str, Any] = {}
        self.selected_step: Optional[int] = None
        self._best = math.inf

    def __call__(self, state: TrainingState) -> bool:
        if state.step not in self.steps:
            return False
        predictions = {name: state.result.predict(examples, num_samples=self.num_samples, seed=self.seed)
                       for name, examples in self.data.items()}
        record: dict[str, Any] = {"step": state.step}
        record.update({name: prediction.metrics() for name, prediction in predictions.items()})
        self.records.append(record)
        self.last = predictions
        if self.select_on is not None and record[self.select_on]["nll"] < self._best:
            self._best, self.selected, self.selected_step = record[self.select_on]["nll"], predictions, state.step
        return False


def fraction_steps(total: int, fraction: float = 0.1) -> list[int]:
    """Steps ``round(k * fraction * total)`` for ``k = 1 .. 1 / fraction``: every 10 % of a budget by default."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    count = max(1, round(1 / fraction))
    return sorted({max(1, round(total * k / count)) for k in range(1, count + 1)})
