"""What one calibration run costs: seconds per training step and per predicted example, per task and method.

Sizing a task so that one run fits a budget (the calibration grid aims at about
ten minutes per run on two CPU cores) needs two numbers: the time of one training
step and the time to predict one example with the posterior samples. This script
measures both on a small subset under the runner's own settings
(:data:`calibration.SETTINGS`, :data:`calibration.COMMON`, ``--set`` overrides),
then multiplies by the full run's step and example counts::

    minutes = (step_s * ceil(train / batch) * epochs + example_s * (validation + test + shifted)) / 60

Loading the model and caching the frozen blocks is paid once per task and
process; ``prepare_seconds`` reports it for the small subset. Usage::

    python benchmarks/task_cost.py --tasks openbookqa arc_easy --methods delta flow
    python benchmarks/task_cost.py --tasks drug_reviews_binary --set trainable_layers=1 --output runs/cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from calibration import COMMON, SETTINGS, SHIFT, _overrides, available_tasks, experiment_config
from pyro_blora.experiments.pipeline import fit_method, load_splits, prepare
from pyro_blora.inject import remove_adapters


def measure(task: str, methods: list[str], steps: int, examples: int, data_dir: Optional[str], device: str,
            overrides: dict[str, Any]) -> dict[str, Any]:
    """Step and per-example prediction seconds of each method on ``task``, and the full run they imply."""
    full = experiment_config(task, data_dir, device, overrides)
    sizes = load_splits(full)
    small = {**overrides, "train_size": max(steps * full.batch_size, full.batch_size), "validation_size": 4,
             "test_size": examples}
    cfg = experiment_config(task, data_dir, device, small)
    started = time.perf_counter()
    prepared = prepare(cfg, log=lambda message: None)
    cache_seconds = time.perf_counter() - started
    full_steps = math.ceil(len(sizes.train) / full.batch_size) * full.epochs
    # the shifted test sets (OpenBookQA -> ARC) are subsampled to the task's test size
    full_examples = len(sizes.validation) + len(sizes.test) * (1 + len(SHIFT.get(task, [])))
    out: dict[str, Any] = {"task": task, "settings": {"batch_size": full.batch_size, "epochs": full.epochs,
                                                      "max_length": full.max_length, "num_samples": full.num_samples},
                           "run_steps": full_steps, "run_predicted_examples": full_examples,
                           "prepare_seconds": cache_seconds, "prepared_examples": len(prepared.train) + len(prepared.validation) + len(prepared.test),
                           "methods": {}}
    for method in methods:
        timed = dataclasses.replace(cfg, num_steps=steps, epochs=1)
        fit_method(dataclasses.replace(timed, num_steps=1), prepared, method, seed=0, progress=False)  # warm-up
        remove_adapters(prepared.net)
        started = time.perf_counter()
        result = fit_method(timed, prepared, method, seed=0, progress=False)
        step = (time.perf_counter() - started) / steps
        started = time.perf_counter()
        result.predict(prepared.test, num_samples=cfg.num_samples, seed=0)
        per_example = (time.perf_counter() - started) / len(prepared.test)
        remove_adapters(prepared.net)
        out["methods"][method] = {"step_seconds": step, "predict_seconds_per_example": per_example,
                                  "run_minutes": (step * full_steps + per_example * full_examples) / 60}
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["drug_reviews_binary"], choices=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", default=["delta", "flow"])
    parser.add_argument("--steps", type=int, default=6, help="timed training steps (after one warm-up step)")
    parser.add_argument("--examples", type=int, default=32, help="timed test examples")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the runner's processes use one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="ExperimentConfig overrides")
    parser.add_argument("--output", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.examples < 1:
        parser.error("--steps and --examples must be >= 1")
    torch.set_num_threads(args.threads)
    rows = [measure(task, args.methods, args.steps, args.examples, args.data_dir, args.device, _overrides(args.set))
            for task in available_tasks(args.tasks, args.data_dir)]
    for row in rows:
        for method, m in row["methods"].items():
            print(f"{row['task']:<22} {method:<11} step {m['step_seconds']:.2f} s  predict {m['predict_seconds_per_example']:.3f} s/example"
                  f"  run ~{m['run_minutes']:.1f} min ({row['run_steps']} steps, {row['run_predicted_examples']} examples)")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"threads": args.threads, "common": COMMON, "tasks": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
