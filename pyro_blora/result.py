"""What :func:`pyro_blora.fit` returns: the fitted posterior and its predictive."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .tasks.base import Task

if TYPE_CHECKING:
    from pyro_blora.guides import BayesianLoRAGuide

    from .config import BLoRAConfig, TrainConfig
    from .model import BayesianLoRAModel

DEFAULT_PREDICT_SEED = 0
"""Predictions draw their posterior samples from a private stream seeded with this by default, so a
saved adapter gives the same numbers every time it is evaluated; ``seed=None`` draws from torch's global RNG."""

__all__ = [
    "DEFAULT_PREDICT_SEED", "FitResult", "Posterior", "Prediction", "TrainingState", "WrappedPosterior",
    "combine_predictions", "make_loader",
]


def make_loader(
    data: Union[Dataset, DataLoader, Sequence[Any]], task: Task, batch_size: int, shuffle: bool, seed: int = 0
) -> DataLoader:
    """A DataLoader over ``data`` collated by ``task``; a given DataLoader is used as is."""
    if isinstance(data, DataLoader):
        if len(data.dataset) == 0:
            raise ValueError("the DataLoader's dataset is empty")
        return data
    try:
        size = len(data)  # type: ignore[arg-type]
    except TypeError as err:
        raise TypeError(f"data must be a Dataset, a DataLoader or a sequence of examples, got {type(data).__name__}") from err
    if size == 0:
        raise ValueError("the dataset is empty: nothing to train or evaluate on")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=task.collate, generator=generator)  # type: ignore[arg-type]


@dataclass
class Prediction:
    """Posterior predictive of a classifier.

    Attributes:
        probs: ``(N, C)`` class probabilities averaged over the posterior samples.
        sample_probs: ``(S, N, C)`` class probabilities of each posterior sample.
        labels: ``(N,)`` gold labels when the data had them.
    """

    probs: Tensor
    sample_probs: Tensor
    labels: Optional[Tensor] = None

    @property
    def num_samples(self) -> int:
        return self.sample_probs.shape[0]

    def metrics(self, n_bins: int = 15) -> dict[str, float]:
        """ACC, ECE, MCE, NLL, Brier and the uncertainty split, as a JSON-ready dict."""
        from .metrics import classification_metrics

        if self.labels is None:
            raise ValueError("metrics need labelled data: the batches carry no 'labels'")
        out = classification_metrics(self.probs, self.labels, n_bins=n_bins, sample_probs=self.sample_probs)
        out["num_samples"] = self.num_samples
        out["num_examples"] = int(self.labels.numel())
        return out


@dataclass
class TrainingState:
    """Progress of a :func:`fit` run, handed to callbacks after every step."""

    result: "FitResult"
    step: int
    total_steps: int
    stop: bool = False
    history: dict[str, list[float]] = field(default_factory=lambda: {
        "step": [], "loss": [], "elbo": [], "nll": [], "kl": [], "beta": [], "lr": []
    })
    validation: list[dict[str, float]] = field(default_factory=list)
    num_data: int = 0
    position: tuple[int, int] = (0, 0)
    """Where the data stands after this step: ``(epoch, batches of it consumed)``, for checkpoints."""
    interrupted: bool = False
    """Ctrl-C arrived during this step: checkpoint now and stop."""

    sync_every: int = 1  # steps kept on the device before the host reads them (TrainConfig.host_sync_every)
    pending: list[tuple[int, Any, Any, float, float]] = field(default_factory=list, repr=False)  # (step, loss, ...)
    deferred_checks: list[tuple[int, str, Tensor]] = field(default_factory=list, repr=False)  # (step, what, failed)

    def record(self, loss: Union[Tensor, float], nll: Union[Tensor, float], beta: float, lr: float) -> bool:
        """Count the step and keep its statistics; every ``sync_every`` steps :meth:`flush` them. True if flushed."""
        self.step += 1
        self.pending.append((self.step, loss, nll, float(beta), float(lr)))
        if len(self.pending) >= self.sync_every:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        """Read the pending steps in one host transfer, check them, and append them to ``history``.

        Splits each loss ``N * nll + beta * KL`` into its parts and logs the unweighted ELBO. Raises
        ``FloatingPointError`` at the first failed step (counted from 0, as the other training errors; ``history["step"]``
        counts from 1): the factor whose Cholesky failed, else the non-finite loss.
        """
        pending, checks = self.pending, self.deferred_checks
        self.pending, self.deferred_checks = [], []
        if not pending and not checks:
            return
        raw = [v for _, loss, nll, _, _ in pending for v in (loss, nll)]
        device = next((v.device for v in raw if isinstance(v, Tensor)),
                      checks[0][2].device if checks else torch.device("cpu"))
        values = torch.stack([torch.as_tensor(v).detach().to(device, torch.float64).reshape(()) for v in raw]
                             + [flag.reshape(()).to(device, torch.float64) for _, _, flag in checks]).tolist()
        flagged = [(step, what) for (step, what, _), value in zip(checks, values[len(raw):]) if value]
        failed = dict(reversed(flagged))  # the first failing factor of each step
        for index, (step, _, _, beta, lr) in enumerate(pending):
            loss, nll = values[2 * index], values[2 * index + 1]
            if step in failed:
                raise FloatingPointError(f"{failed[step]} failed at step {step - 1}; raise BLoRAConfig.jitter or lower lr")
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"the loss became {loss} at step {step - 1}; lower lr, raise jitter, or check the inputs for NaN"
                )
            kl = (loss - self.num_data * nll) / beta if beta > 0 else float("nan")
            for key, value in (("step", step), ("loss", loss), ("nll", nll), ("kl", kl), ("beta", beta), ("lr", lr)):
                self.history[key].append(float(value))
            self.history["elbo"].append(-(self.num_data * nll + kl))
        self.result.history = self.history

    def record_validation(self, metrics: dict[str, float]) -> None:
        self.validation.append({"step": self.step, **metrics})
        self.result.validation = self.validation

    def postfix(self) -> dict[str, str]:
        """The progress bar's numbers: the per-example NLL, and the KL per training example (none for MAP, which has no q)."""
        h, out = self.history, {"nll": f"{self.history['nll'][-1]:.3f}"}
        if not self.result.is_deterministic and self.num_data and math.isfinite(h["kl"][-1]):
            out["kl/N"] = f"{h['kl'][-1] / self.num_data:.4g}"
        return out


@runtime_checkable
class Posterior(Protocol):
    """What every method's result offers: :class:`FitResult`, the baselines' results and the post-hoc wrappers.

    Reports, plots and the benchmark runner read only these; ``pyro_blora.load``
    returns one and ``temperature_scale`` wraps one.
    """

    task: Task
    config: Any
    history: Any
    validation: Any

    @property
    def net(self) -> nn.Module: ...

    @property
    def is_deterministic(self) -> bool: ...

    def predict(self, data: Any, num_samples: int = 4, **options: Any) -> Prediction: ...

    def evaluate(self, data: Any, num_samples: int = 4, n_bins: int = 15, batch_size: int = 8) -> dict[str, float]: ...

    def save(self, path: Any) -> Any: ...


class WrappedPosterior:
    """A posterior built on another one (``inner``): its modules, settings and training log are the inner's.

    Subclasses (temperature scaling, ensembles, Laplace) override ``predict``
    and ``save``; ``evaluate`` scores whatever ``predict`` returns.
    """

    inner: Any

    task = property(lambda self: self.inner.task)
    net = property(lambda self: self.inner.net)
    model = property(lambda self: self.inner.model)
    guide = property(lambda self: self.inner.guide)
    config = property(lambda self: self.inner.config)
    train_config = property(lambda self: self.inner.train_config)
    history = property(lambda self: self.inner.history)
    validation = property(lambda self: self.inner.validation)
    is_deterministic = property(lambda self: self.inner.is_deterministic)

    def predict(self, data: Any, num_samples: int = 4, **options: Any) -> Prediction:
        raise NotImplementedError

    def evaluate(self, data: Any, num_samples: int = 4, n_bins: int = 15, batch_size: int = 8) -> dict[str, float]:
        """Metrics of :meth:`predict` on labelled ``data`` (a JSON-ready dict)."""
        return self.predict(data, num_samples=num_samples, batch_size=batch_size).metrics(n_bins)


class FitResult:
    """A fitted Bayesian-LoRA posterior: the model, its guide and their settings."""

    def __init__(
        self,
        model: "BayesianLoRAModel",
        guide: "BayesianLoRAGuide",
        config: "BLoRAConfig",
        train_config: "TrainConfig",
        task: Task,
    ):
        self.model = model
        self.guide = guide
        self.config = config
        self.train_config = train_config
        self.task = task
        self.history: dict[str, list[float]] = {}
        self.validation: list[dict[str, float]] = []

    @property
    def net(self) -> nn.Module:
        return self.model.net

    @property
    def is_deterministic(self) -> bool:
        """True for a MAP (``delta``) guide: every posterior sample is the same."""
        from pyro_blora.guides import DeltaGuide

        return all(isinstance(family, DeltaGuide) for family in self.guide.sites.values())

    @torch.no_grad()
    def sample_weights(self, num_samples: int) -> dict[str, Tensor]:
        """``num_samples`` joint draws of every Bayesian factor, stacked: site ``*.W`` -> ``(S, rows, cols)``."""
        from pyro_blora.models.priors import shared_geometry

        batched = getattr(self.guide, "sample_weights", None)
        if batched is not None:  # BayesianLoRAGuide: all samples in one batched pass
            return batched(num_samples)
        with shared_geometry():
            draws = [self.guide() for _ in range(num_samples)]
        return {name: torch.stack([d[name] for d in draws]) for name in draws[0]}

    def use_posterior_mean(self) -> None:
        """Fix every Bayesian layer at ``E_q[W]`` so the network runs without Pyro (``generate``, serving)."""
        self.model.set_adapter_weights(self.guide.mean_weights())

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.net.training
        self.net.eval()
        try:
            yield
        finally:
            self.net.train(was_training)

    def stacks_samples(self, stack_samples: Optional[bool] = None) -> bool:
        """``stack_samples`` of :meth:`predict`, None resolved: stacked on an accelerator, looped on a CPU."""
        return stack_samples if stack_samples is not None else any(p.device.type != "cpu" for p in self.net.parameters())

    @torch.no_grad()
    def predict(
        self,
        data: Union[Dataset, DataLoader, Sequence[Any]],
        num_samples: int = 4,
        batch_size: int = 8,
        stack_samples: Optional[bool] = None,
        seed: Optional[int] = DEFAULT_PREDICT_SEED,
    ) -> Prediction:
        """Posterior predictive: average the class probabilities of ``num_samples`` posterior draws.

        The same ``num_samples`` joint weight draws are used for every example. With ``stack_samples`` the draws
        share one forward per batch (the batch repeated ``S`` times), else one forward per draw; None
        (:meth:`stacks_samples`): stacked on an accelerator, looped on a CPU (``docs/performance.md``). A MAP guide
        has one draw whatever ``num_samples`` says. ``seed`` (default :data:`DEFAULT_PREDICT_SEED`) seeds a private
        stream for everything random in the prediction; ``None`` draws from the global RNG.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if seed is not None:
            # a private stream for everything random in the prediction (weight draws, dropout masks,
            # Flipout signs): the caller's global RNG state is left as it was
            devices = sorted({p.device.index or 0 for p in self.net.parameters() if p.device.type == "cuda"})
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                return self.predict(data, num_samples, batch_size, stack_samples, seed=None)
        samples = 1 if self.is_deterministic else num_samples
        stack_samples = self.stacks_samples(stack_samples)
        weights = self.sample_weights(samples)
        loader = make_loader(data, self.task, batch_size, shuffle=False)
        all_probs, all_labels = [], []
        with self._eval_mode():
            if stack_samples:
                self.model.set_adapter_weights(weights)
            # a bar on a terminal only (tqdm's disable=None): long predictions show progress and an estimate
            for batch in tqdm(loader, desc="predict", leave=False, disable=None, dynamic_ncols=True):
                if stack_samples:
                    logits = self.task.class_logits(self.net, _repeat_batch(batch, samples))
                    logits = logits.reshape(samples, -1, logits.shape[-1])
                else:
                    per_sample = []
                    for s in range(samples):
                        self.model.set_adapter_weights({k: v[s] for k, v in weights.items()})
                        per_sample.append(self.task.class_logits(self.net, batch))
                    logits = torch.stack(per_sample)
                all_probs.append(torch.softmax(logits.float(), dim=-1).cpu())
                if "labels" in batch:
                    all_labels.append(torch.as_tensor(batch["labels"]).cpu())
        sample_probs = torch.cat(all_probs, dim=1)
        labels = torch.cat(all_labels) if all_labels else None
        return Prediction(sample_probs.mean(0), sample_probs, labels)

    def evaluate(
        self,
        data: Union[Dataset, DataLoader, Sequence[Any]],
        num_samples: int = 4,
        n_bins: int = 15,
        batch_size: int = 8,
    ) -> dict[str, float]:
        """Metrics of the posterior predictive on labelled ``data`` (a JSON-ready dict)."""
        return self.predict(data, num_samples=num_samples, batch_size=batch_size).metrics(n_bins)

    def trainable_state(self) -> dict[str, Tensor]:
        """Every learned tensor: adapter parameters (``net.*``) and guide state (``guide.*``)."""
        state = {}
        for layer in self.model.layers:
            for key, value in layer.state_dict().items():
                if not key.startswith("base."):
                    state[f"net.{layer.layer_name}.{key}"] = value
        for key, value in self.guide.state_dict().items():
            state[f"guide.{key}"] = value
        return state

    @classmethod
    def from_fit_result(cls, result: "FitResult") -> "FitResult":
        """The same modules, guide, settings and history, as an instance of ``cls`` (a method's own result type)."""
        out = cls(result.model, result.guide, result.config, result.train_config, result.task)
        out.history, out.validation = result.history, result.validation
        return out

    def state_dict_copy(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.trainable_state().items()}

    def load_state_dict_copy(self, state: dict[str, Tensor]) -> None:
        current = self.trainable_state()
        with torch.no_grad():
            for key, value in state.items():
                current[key].copy_(value)

    def save(self, path: str) -> None:
        """Write the adapters and guide as safetensors plus a JSON config (see :mod:`pyro_blora.io`)."""
        from .io import save

        save(self, path)


def _repeat_batch(batch: dict[str, Any], times: int) -> dict[str, Any]:
    """Stack ``times`` copies of every tensor along the batch dimension (sample-major)."""
    if times == 1:
        return batch
    return {
        k: v.repeat(times, *([1] * (v.dim() - 1))) if isinstance(v, Tensor) and v.dim() > 0 else v
        for k, v in batch.items()
    }


def combine_predictions(predictions: Sequence[Prediction]) -> Prediction:
    """The equally weighted mixture of several predictives of the same examples.

    ``probs = mean_m probs_m`` and ``sample_probs`` concatenates the members'
    samples (``k * S`` slices), so the uncertainty split of
    :func:`pyro_blora.metrics.uncertainty_decomposition` counts the spread
    between members as epistemic. Every prediction must have the same number of
    samples (each member then weighs the same), examples, classes and labels.
    """
    predictions = list(predictions)
    if not predictions:
        raise ValueError("combine_predictions needs at least one Prediction, got an empty list")
    first = predictions[0]
    for i, other in enumerate(predictions[1:], start=1):
        if other.sample_probs.shape != first.sample_probs.shape:
            raise ValueError(
                f"prediction {i} has sample_probs of shape {tuple(other.sample_probs.shape)}, prediction 0 "
                f"{tuple(first.sample_probs.shape)}: combine predictions of the same examples and classes with the "
                "same num_samples"
            )
        if (first.labels is None) != (other.labels is None) or (
            first.labels is not None and not torch.equal(first.labels.cpu(), other.labels.cpu())
        ):
            raise ValueError(f"prediction {i} has other labels than prediction 0: they are not of the same examples")
    sample_probs = torch.cat([p.sample_probs for p in predictions])
    probs = torch.stack([p.probs for p in predictions]).mean(0)
    return Prediction(probs, sample_probs, first.labels)
