"""Validation-only search over Bayesian-LoRA (flow) settings, for when flow does not beat MAP.

Each variant is a set of :class:`~pyro_blora.experiments.pipeline.ExperimentConfig` overrides
(posterior width caps, KL weight, ...). Every variant trains ``flow`` with seed 0
on each task (``calibration.py --tag <variant>``), and the variants are ranked by
their mean *validation* NLL over the tasks (ECE breaks ties); the test split is
never read. The winner is written to ``<output>/best.json`` so that::

    python benchmarks/calibration.py --methods flow --tag tuned --set $(jq -r '.set | join(" ")' runs/sweep/best.json)

runs it with every seed next to the other methods.

Usage::

    python benchmarks/calibration_sweep.py --tasks drug_reviews_binary arc_easy openbookqa --output runs/sweep
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {},
    "wide": {"scale_max": 1.0},
    "wide-lambda": {"scale_max": 1.0, "lambda_max": 0.3},
    "prior-conditional": {"scale_max": 1.0, "lambda_max": 1.0},
}
"""Overrides per variant. ``paper`` is the default flow (sigma cap 0.1, lambda cap 0.03, as the
paper's code); the others let q(U_w) and q(W | U) widen towards the prior (lambda = 1 is the
prior's conditional), which the demo pointed at: every sigma and lambda ended at its cap."""


def _set_args(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def rank(output: Path, tasks: list[str], variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Variants ordered by mean validation NLL (then ECE) over the tasks they finished."""
    rows = []
    for name, overrides in variants.items():
        per_task = {}
        for task in tasks:
            file = output / task / f"flow-{name}" / "seed0.json"
            if file.exists():
                per_task[task] = json.loads(file.read_text())["metrics"]["validation"]
        if len(per_task) == len(tasks):
            rows.append({
                "variant": name, "overrides": overrides, "set": _set_args(overrides),
                "val_nll": statistics.fmean(m["nll"] for m in per_task.values()),
                "val_ece": statistics.fmean(m["ece"] for m in per_task.values()),
                "per_task": {t: {"nll": m["nll"], "ece": m["ece"], "acc": m["acc"]} for t, m in per_task.items()},
            })
    return sorted(rows, key=lambda r: (r["val_nll"], r["val_ece"]))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["drug_reviews_binary", "arc_easy", "openbookqa"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--output", default="runs/sweep")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--parallel", type=int, default=1, help="variants trained at the same time")
    args = parser.parse_args(argv)
    output = Path(args.output)
    script = Path(__file__).resolve().parent / "calibration.py"
    commands = []
    for name in args.variants:
        command = [sys.executable, str(script), "--tasks", *args.tasks, "--methods", "flow", "--seeds", "0",
                   "--tag", name, "--output", str(output), "--device", args.device, "--no-report"]
        if args.data_dir:
            command += ["--data-dir", args.data_dir]
        if VARIANTS[name]:
            command += ["--set", *_set_args(VARIANTS[name])]
        commands.append(command)
    running: list[subprocess.Popen] = []
    while commands or running:
        while commands and len(running) < args.parallel:
            running.append(subprocess.Popen(commands.pop(0)))
        time.sleep(1)
        running = [p for p in running if p.poll() is None]
    ranked = rank(output, args.tasks, {v: VARIANTS[v] for v in args.variants})
    if not ranked:
        print("no variant finished on every task", file=sys.stderr)
        return 1
    (output / "ranking.json").write_text(json.dumps(ranked, indent=2))
    (output / "best.json").write_text(json.dumps(ranked[0], indent=2))
    print("| variant | overrides | mean val NLL | mean val ECE % |\n|---|---|---|---|")
    for row in ranked:
        print(f"| {row['variant']} | {row['overrides'] or 'defaults'} | {row['val_nll']:.3f} | {100 * row['val_ece']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
