"""``docs/results/speed.json``: the figures of docs/performance.md as a file, from the last full runs.

Collects, per variant (``delta``, ``normal``, ``flow``), the step-time, peak-memory and 4-sample
prediction ratios to peft LoRA of two ``speed.py`` runs (glibc's default allocator, the headline, and
pinned thresholds), the aten-op ratio of ``step_counts.py``, and optionally the GPU table of
``gpu_check.py``::

    python benchmarks/speed.py --models smollm2 --methods peft delta normal flow --steps 10 \\
        --malloc default --predict-samples 4 --predict-guides delta normal flow --layer-counts \\
        --overhead-steps 0 --output runs/bench/speed_default.json
    python benchmarks/speed.py ... --malloc pinned --output runs/bench/speed_pinned.json
    python benchmarks/step_counts.py --model smollm2 --output runs/bench/counts.json
    python benchmarks/speed_results.py --default runs/bench/speed_default.json \\
        --pinned runs/bench/speed_pinned.json --counts runs/bench/counts.json --output docs/results/speed.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any, Optional

VARIANTS = ("delta", "normal", "flow")


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                          text=True)
    return done.stdout.strip() or "unknown"


def cpu_table(speed: dict[str, Any], model: str = "smollm2") -> dict[str, dict[str, Optional[float]]]:
    """``{variant: {step_ratio, memory_ratio, predict4_ratio}}`` of one ``speed.py`` JSON."""
    if model not in speed["models"]:
        raise ValueError(f"the speed run has no {model!r} model (it has {sorted(speed['models'])})")
    res = speed["models"][model]
    guides = res.get("prediction", {}).get("guides", {})
    table = {}
    for variant in VARIANTS:
        row = res["methods"].get(variant)
        if row is None:
            raise ValueError(f"the speed run of {model} has no {variant!r} row")
        predict = guides.get(variant, {}).get("4")
        table[variant] = {"step_ratio": row.get("step_ratio"), "step_ratio_quartiles": row.get("step_ratio_quartiles"),
                          "memory_ratio": row.get("memory_ratio"), "minor_faults_per_step": row.get("median_page_faults"),
                          "predict4_ratio": None if predict is None else predict["ratio"]}
    return table


def _load_average(speed: dict[str, Any], model: str) -> float:
    res = speed["models"][model]
    return max(res["loadavg_before"][0], res["loadavg_after"][0])


def collect(default: dict[str, Any], pinned: Optional[dict[str, Any]], counts: dict[str, Any],
            gpu: Optional[dict[str, Any]] = None, model: str = "smollm2") -> dict[str, Any]:
    """The ``speed.json`` document (see the module docstring)."""
    if default["settings"].get("malloc") != "default":
        raise ValueError("--default must be a speed.py run with --malloc default")
    if pinned is not None and pinned["settings"].get("malloc") != "pinned":
        raise ValueError("--pinned must be a speed.py run with --malloc pinned")
    missing = [v for v in ("peft", *VARIANTS) if v not in counts["variants"]]
    if missing:
        raise ValueError(f"the step_counts run lacks {missing}")
    runs = [r for r in (default, pinned) if r is not None]
    return {
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "load_average": max(_load_average(r, model) for r in runs),
        "settings": {k: default["settings"].get(k) for k in ("batch_size", "seq_len", "steps", "threads", "rank",
                                                             "target_modules", "clock")} | {"model": model},
        "cpu": {"default": cpu_table(default, model), "pinned": None if pinned is None else cpu_table(pinned, model)},
        "aten_ops_ratio": {v: counts["variants"][v]["aten_ops_ratio"] for v in VARIANTS},
        "aten_ops_per_step": {v: counts["variants"][v]["aten_ops_per_step"] for v in ("peft", *VARIANTS)},
        "gpu": gpu,
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--default", required=True, help="speed.py JSON, --malloc default")
    parser.add_argument("--pinned", default=None, help="speed.py JSON, --malloc pinned")
    parser.add_argument("--counts", required=True, help="step_counts.py JSON")
    parser.add_argument("--gpu", default=None, help="gpu_check.py JSON, when a GPU ran it")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--output", default="docs/results/speed.json")
    args = parser.parse_args(argv)
    paths = {"default": args.default, "pinned": args.pinned, "counts": args.counts, "gpu": args.gpu}
    for name, path in paths.items():
        if path is not None and not Path(path).is_file():
            parser.error(f"--{name} {path}: no such file")
    read = {name: None if path is None else json.loads(Path(path).read_text()) for name, path in paths.items()}
    doc = collect(read["default"], read["pinned"], read["counts"], read["gpu"], args.model)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.output}")
    return doc


if __name__ == "__main__":
    main()
