"""Checkpoints of a :func:`pyro_blora.fit` run, and resuming from them.

A checkpoint is everything the next step depends on, so that a resumed run
takes exactly the steps an uninterrupted one would have taken:

* ``trainable.safetensors``: adapter and guide tensors
  (:meth:`FitResult.trainable_state`), plus the early-stopping best state
  under ``best.*`` when there is one;
* ``optimizer.safetensors``: every AdamW state tensor as ``optim.<param_index>.<name>``;
* ``rng.safetensors``: the torch CPU generator state (``uint8``), CUDA states,
  and the numpy Mersenne-Twister keys;
* ``state.json``: step, data position (epoch and batches consumed in it),
  optimizer hyper-parameters, scheduler state, the rest of the RNG states
  (python ``random``, numpy scalars), training history, and the run's shape
  (total steps, steps per epoch, seed, data size, processes, gradient
  accumulation) to refuse an incompatible resume.

Under ``accelerate launch`` the main process writes the checkpoint and every
process reads it back: all processes share one random state and one data
order (:mod:`pyro_blora.training.distributed`), so the main process's state is theirs.

Only safetensors and JSON, never pickle. A checkpoint is written into a
temporary folder that is renamed to ``step-<N>`` once complete; then
``latest.json`` is replaced atomically (``os.replace``) to point at it and older
checkpoints are removed. A kill at any moment therefore leaves the previous
checkpoint usable. The data order of epoch ``e`` is drawn from a generator
seeded with ``seed + e`` (:func:`seed_epoch`), so a resumed run skips the
batches already consumed in its epoch and sees the same batches afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import DataLoader

from pyro_blora.io import read_json, with_user_mode

if TYPE_CHECKING:
    from pyro_blora.result import FitResult

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "restore_checkpoint",
    "latest_checkpoint",
    "seed_epoch",
    "deferred_interrupt",
    "LATEST_NAME",
]

LATEST_NAME = "latest.json"
TRAINABLE, OPTIMIZER, RNG, STATE = "trainable.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"
PathLike = Union[str, "os.PathLike[str]"]


@dataclass
class Checkpoint:
    """A checkpoint read back from disk (see the module docstring for the files)."""

    path: Path
    meta: dict[str, Any]
    trainable: dict[str, Tensor]
    optimizer: dict[str, Tensor]
    rng: dict[str, Tensor]
    best: Optional[dict[str, Tensor]] = field(default=None)

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, batches of that epoch already consumed)``."""
        return int(self.meta["epoch"]), int(self.meta["batch_index"])


def seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Re-seed the loader's generator with ``seed + epoch``: the order of each epoch is then reproducible."""
    generator = getattr(loader, "generator", None)
    if generator is not None:
        generator.manual_seed(seed + epoch)


@contextlib.contextmanager
def deferred_interrupt(enabled: bool = True) -> Iterator[threading.Event]:
    """Turn the first Ctrl-C (SIGINT) into a flag checked at step boundaries.

    The training loop polls the yielded event after each finished step, writes a
    consistent checkpoint and raises ``KeyboardInterrupt``; a second Ctrl-C
    interrupts at once. Off the main thread (where signals cannot be handled)
    this does nothing.
    """
    event = threading.Event()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if event.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        event.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------- writing


def _rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Torch CPU/CUDA, numpy and python RNG states as tensors plus JSON."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "random": {"version": version, "state": list(internal), "gauss_next": gauss_next},
    }
    return tensors, meta


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """AdamW ``state_dict`` split into tensors ``optim.<index>.<name>`` and JSON for the rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()} for group in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _write(folder: Path, name: str, tensors: Optional[dict[str, Tensor]] = None, meta: Any = None) -> None:
    target = folder / name
    if tensors is not None:
        # clone: during fit, parameters are views of packed rows (models/packing.py), which safetensors refuses
        save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, str(target), metadata={"format": "pt"})
    else:
        target.write_text(json.dumps(meta, indent=1, sort_keys=True))
    with_user_mode(target)  # safetensors writes 0600
    with open(target, "rb") as handle:
        os.fsync(handle.fileno())


def save_checkpoint(
    directory: PathLike,
    result: "FitResult",
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    step: int,
    epoch: int,
    batch_index: int,
    run: dict[str, Any],
    extra: Optional[dict[str, Any]] = None,
    best: Optional[dict[str, Tensor]] = None,
) -> Path:
    """Write a checkpoint of the state after ``step`` finished steps; returns its folder.

    Args:
        directory: the checkpoint folder (``TrainConfig.checkpoint_dir``).
        result, optimizer, scheduler: what :func:`pyro_blora.fit` trains.
        step: finished optimiser steps.
        epoch, batch_index: the next batch to draw is batch ``batch_index`` of epoch ``epoch``.
        run: the run's shape (total steps, batch size, seed, data size), checked on resume.
        extra: JSON-ready training state (history, validation, early-stopping counters).
        best: the early-stopping best trainable state, if any.

    Raises:
        FloatingPointError: a trainable tensor is not finite; nothing is written,
            so the last good checkpoint stays.
    """
    state = result.trainable_state()
    bad = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise FloatingPointError(f"not writing a checkpoint at step {step}: non-finite tensors {bad[:5]}")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    if (final / STATE).is_file():
        return final  # already written (e.g. a periodic checkpoint, then Ctrl-C at the same step)
    optim_tensors, optim_meta = _optimizer_state(optimizer)
    rng_tensors, rng_meta = _rng_state()
    meta = {
        "step": step,
        "epoch": epoch,
        "batch_index": batch_index,
        "run": run,
        "optimizer": optim_meta,
        "scheduler": scheduler.state_dict(),
        "rng": rng_meta,
        "extra": extra or {},
        "has_best": best is not None,
    }
    trainable = dict(state)
    if best is not None:
        trainable.update({f"best.{k}": v for k, v in best.items()})
    tmp = with_user_mode(Path(tempfile.mkdtemp(dir=root, prefix=".tmp-step-")))
    try:
        _write(tmp, TRAINABLE, trainable)
        _write(tmp, OPTIMIZER, optim_tensors)
        _write(tmp, RNG, rng_tensors)
        _write(tmp, STATE, meta=meta)  # last: a folder with state.json is complete
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    pointer = root / f".{LATEST_NAME}.tmp"
    pointer.write_text(json.dumps({"step": step, "path": final.name}))
    os.replace(pointer, root / LATEST_NAME)
    for old in root.glob("step-*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


# ------------------------------------------------------------------- reading


def latest_checkpoint(directory: PathLike) -> Path:
    """The checkpoint folder ``directory`` points at: itself if it holds ``state.json``, else ``latest.json``'s target."""
    root = Path(directory)
    if (root / STATE).is_file():
        return root
    pointer = root / LATEST_NAME
    if not pointer.is_file():
        raise FileNotFoundError(f"no checkpoint in {root}: neither {STATE} nor {LATEST_NAME} found")
    target = root / _read_json(pointer)["path"]
    if not (target / STATE).is_file():
        raise FileNotFoundError(f"{pointer} points at {target}, which holds no {STATE}")
    return target


def _read_json(file: Path) -> Any:
    return read_json(file, "checkpoint file ")


def _read_tensors(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file {file} is missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"checkpoint file {file} could not be read (truncated or corrupted?): {err}") from err


def load_checkpoint(directory: PathLike) -> Checkpoint:
    """Read the latest checkpoint under ``directory`` (or the checkpoint folder itself)."""
    folder = latest_checkpoint(directory)
    meta = _read_json(folder / STATE)
    trainable = _read_tensors(folder / TRAINABLE)
    best = {k[len("best."):]: trainable.pop(k) for k in list(trainable) if k.startswith("best.")}
    return Checkpoint(
        folder, meta, trainable, _read_tensors(folder / OPTIMIZER), _read_tensors(folder / RNG),
        best if meta.get("has_best") else None,
    )


def restore_checkpoint(
    checkpoint: Checkpoint, result: "FitResult", optimizer: torch.optim.Optimizer, scheduler: Any, run: dict[str, Any]
) -> None:
    """Put the checkpoint's tensors, optimiser, scheduler and RNG states back.

    Raises ``ValueError`` when the run (steps, batch size, seed, data size) or
    the trainable tensors differ from the checkpointed ones.
    """
    saved_run = checkpoint.meta["run"]
    # a setting an older checkpoint did not record (batch_size) cannot be compared, so it is not
    changed = {k: (saved_run.get(k), v) for k, v in run.items() if k in saved_run and saved_run[k] != v}
    if changed:
        names = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        hint = ""
        if "steps_per_epoch" in changed and "batch_size" not in changed and "num_data" not in changed:
            hint = " (steps_per_epoch follows batch_size and the number of processes: was one of them changed?)"
        raise ValueError(
            f"cannot resume from {checkpoint.path}: this run differs from the checkpointed one in {names}{hint}; "
            "resume with the same data and TrainConfig"
        )
    current = result.trainable_state()
    missing, unexpected = sorted(set(current) - set(checkpoint.trainable)), sorted(set(checkpoint.trainable) - set(current))
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint.path / TRAINABLE} does not match this model and guide: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for key, value in checkpoint.trainable.items():
            if current[key].shape != value.shape:
                raise ValueError(f"{checkpoint.path / TRAINABLE}: {key} has shape {tuple(value.shape)}, model {tuple(current[key].shape)}")
            current[key].copy_(value)
    optimizer.load_state_dict(_optimizer_state_dict(checkpoint, optimizer))
    scheduler.load_state_dict(checkpoint.meta["scheduler"])
    _set_rng_state(checkpoint)


def _optimizer_state_dict(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    meta = checkpoint.meta["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for key, value in checkpoint.optimizer.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in meta["param_groups"]]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if [len(g["params"]) for g in groups] != sizes:
        raise ValueError(f"{checkpoint.path / STATE}: the optimizer had other parameter groups than this run's {sizes}")
    return {"state": state, "param_groups": groups}


def _set_rng_state(checkpoint: Checkpoint) -> None:
    rng, meta = checkpoint.rng, checkpoint.meta["rng"]
    torch.set_rng_state(rng["torch"])
    cuda = [rng[f"cuda.{i}"] for i in range(len(rng)) if f"cuda.{i}" in rng]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    numpy = meta["numpy"]
    np.random.set_state(
        (numpy["kind"], rng["numpy.keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    py = meta["random"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
