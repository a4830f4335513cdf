"""Counts per training step that do not depend on the machine's load: aten ops and minor page faults.

* **aten ops**: every ``aten::`` op ``torch.profiler`` records in a steady-state step
  (forward, backward, clipping, optimiser, guide and ELBO), a CPU-measurable proxy of the
  kernel launches a GPU step pays for; the ratio to peft LoRA's step is the launch overhead.
* **minor page faults**: ``/proc/self/stat`` field ``minflt`` around each step with the
  allocator as the process has it (``--malloc default``, glibc's own thresholds) or pinned
  (``speed.PINNED_MALLOC``). A step that faults is handing its activation memory back to the
  kernel and touching it in again.

Each variant runs in a fresh interpreter (the allocator's state is per process):

    python benchmarks/step_counts.py --model smollm2 --variants peft delta normal flow
    python benchmarks/step_counts.py --model tiny --steps 2 --output /tmp/counts.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VARIANTS = ("peft", "delta", "normal", "flow")
HERE = Path(__file__).resolve().parent


def minor_faults() -> int:
    """This process's minor page faults so far (``/proc/self/stat``, field 10)."""
    with open("/proc/self/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[7])


class StepCounter:
    """A ``fit`` callback (and the peft loop's timer): faults per step, and (``profile``) aten ops of steps
    ``[start, stop)``. The profiler allocates too, so faults are counted in runs without it."""

    def __init__(self, start: int, stop: int, profile: bool):
        self.start, self.stop = (start, stop) if profile else (-1, -1)
        self.faults: list[int] = []
        self.aten_ops: Optional[int] = None
        self._last = minor_faults()
        self._step = 0
        self._profile: Any = None

    def __call__(self, state: Any = None) -> bool:
        from torch.profiler import ProfilerActivity, profile

        now = minor_faults()
        self.faults.append(now - self._last)
        self._step += 1
        if self._step == self.start:
            self._profile = profile(activities=[ProfilerActivity.CPU])
            self._profile.__enter__()
        elif self._step == self.stop and self._profile is not None:
            self._profile.__exit__(None, None, None)
            events = [e for e in self._profile.events() if e.name.startswith("aten::")]
            self.aten_ops = len(events)
            self._profile = None
        self._last = minor_faults()
        return False


def measure(variant: str, model_name: str, steps: int, batch_size: int, seq_len: int, count: str) -> dict[str, Any]:
    """One variant in this process, over the steps after 2 warm-up ones: aten ops per step (``count="ops"``)
    or the minor faults of each step (``"faults"``)."""
    import torch

    import common

    torch.set_num_threads(1)
    model, answer_ids, vocab = common.build_model(model_name)
    task = common.AnswerLogitsTask(answer_ids)
    data = common.make_examples(batch_size * 4, seq_len, vocab, task.num_classes)
    counter = StepCounter(start=2, stop=2 + steps, profile=count == "ops")
    total = 2 + steps
    if variant == "peft":
        common.train_loop(common.peft_model(model), task, data, total, batch_size, counter)
    else:
        common.blora_fit(model, task, data, variant, total, batch_size, counter)
    if count == "ops":
        return {"aten_ops_per_step": (counter.aten_ops or 0) / steps}
    steady = counter.faults[2:]
    return {"minor_faults_per_step": steady, "minor_faults_median": statistics.median(steady) if steady else 0}


def run(variants: list[str], model_name: str, steps: int, batch_size: int, seq_len: int,
        env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Every variant in its own interpreter; the aten-op ratios against peft's step when peft is among them."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="pyro_blora_counts_") as tmp:
        for variant in variants:
            out[variant] = {}
            for count in ("ops", "faults"):
                path = Path(tmp) / f"{variant}-{count}.json"
                command = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--count", count,
                           "--model", model_name, "--steps", str(steps), "--batch-size", str(batch_size),
                           "--seq-len", str(seq_len), "--output", str(path)]
                done = subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(f"step_counts child {variant} ({count}) failed:\n{done.stderr[-2000:]}")
                out[variant].update(json.loads(path.read_text()))
    if "peft" in out and out["peft"]["aten_ops_per_step"]:
        for variant in out:
            out[variant]["aten_ops_ratio"] = out[variant]["aten_ops_per_step"] / out["peft"]["aten_ops_per_step"]
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 or a random model of common.py (tiny, wide, ...)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=4, help="steady-state steps counted, after 2 warm-up steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--malloc", choices=["default", "pinned"], default="default")
    parser.add_argument("--output", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--count", choices=["ops", "faults"], default="ops", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = measure(args.child, args.model, args.steps, args.batch_size, args.seq_len, args.count)
        Path(args.output).write_text(json.dumps(result))
        return result
    from speed import PINNED_MALLOC

    result = run(args.variants, args.model, args.steps, args.batch_size, args.seq_len,
                 env=PINNED_MALLOC if args.malloc == "pinned" else None)
    for variant, row in result.items():
        ratio = f" ({row['aten_ops_ratio']:.2f}x peft)" if "aten_ops_ratio" in row else ""
        print(f"{variant:7s} aten ops/step {row['aten_ops_per_step']:8.0f}{ratio}  "
              f"minor faults/step median {row['minor_faults_median']:.0f} of {row['minor_faults_per_step']}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"model": args.model, "malloc": args.malloc, "variants": result},
                                                indent=2))
    return result


if __name__ == "__main__":
    main()
