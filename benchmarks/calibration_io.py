"""Where the calibration runner keeps its runs, and how one run is written and predicted.

A run is ``<output>/<task>/<method>/seed<k>.json`` (metrics and settings) next to
``seed<k>.safetensors`` (per-sample class probabilities of every scored split, and of the
validation-selected checkpoint's validation and test splits where it has one); a
MAP run also keeps its adapter in ``seed<k>.adapter/`` so that post-hoc peers can be
fitted on it later, in another process, without retraining it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file

from pyro_blora.result import Prediction


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def label(method: str, tag: Optional[str]) -> str:
    """The folder and table name of ``method``'s runs: ``flow``, or ``flow-<tag>`` for a tagged variant."""
    return f"{method}-{tag}" if tag else method


def method_of(name: str) -> str:
    """The registry method behind a run's :func:`label`: ``flow-top6`` -> ``flow``, ``mc_dropout`` -> itself."""
    return name.split("-", 1)[0]


def run_path(out: Path, task: str, method: str, seed: int) -> Path:
    return out / task / method / f"seed{seed}.json"


def adapter_path(out: Path, task: str, seed: int) -> Path:
    """The saved MAP adapter of ``seed`` (what the post-hoc peers are fitted on)."""
    return out / task / "delta" / f"seed{seed}.adapter"


def predict_all(result: Any, prepared: Any, shifted: dict[str, list], samples: int, seed: int,
                done: Optional[dict[str, Prediction]] = None) -> dict[str, Prediction]:
    """Predictions of validation, test and the shift sets; those in ``done`` (same fit, same seed) are kept."""
    parts = {"validation": prepared.validation, "test": prepared.test, **{f"shift.{k}": v for k, v in shifted.items()}}
    done = done or {}
    return {name: done[name] if name in done else result.predict(data, num_samples=samples, seed=seed)
            for name, data in parts.items()}


SELECTED = "selected."
"""Prefix of the validation-selected checkpoint's splits in a run's safetensors (``selected.test``)."""


def write_run(path: Path, record: dict[str, Any], predictions: dict[str, Prediction],
              selected: Optional[dict[str, Prediction]] = None) -> None:
    """Probabilities first, the JSON last: a JSON on disk means the run finished.

    ``selected`` (the checkpoint with the lowest validation NLL, per split) is stored as ``selected.<split>``,
    so that an ensemble of early-stopped members can be averaged later from the members' own probabilities.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    parts = {**predictions, **{SELECTED + name: p for name, p in (selected or {}).items()}}
    for name, prediction in parts.items():  # copies: the selected checkpoint may be the last one, sharing storage
        tensors[f"{name}.sample_probs"] = prediction.sample_probs.clone(memory_format=torch.contiguous_format)
        tensors[f"{name}.labels"] = prediction.labels.clone(memory_format=torch.contiguous_format)
    save_file(tensors, str(path.with_suffix(".safetensors")))
    record["metrics"] = {name: prediction.metrics() for name, prediction in predictions.items()}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


def brief(prediction: Prediction) -> str:
    m = prediction.metrics()
    return f"acc {m['acc']:.3f} ece {m['ece']:.3f} nll {m['nll']:.3f}"
