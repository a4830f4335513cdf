"""A short accelerator check: bf16-autocast training step of pyro_blora's flow guide vs peft LoRA.

Builds a random Llama-shaped model of about 1.1B parameters (TinyLlama-1.1B's
shape; ``--tiny``: a few-thousand-parameter one), then, for each method in a fresh
copy of that model, times the median training step after warm-up (LoRA r = 8 on
q_proj, v_proj; batch 4; the same answer-token loss head as ``speed.py``) with the
network's forward under ``torch.autocast(dtype=bfloat16)``, and reads the peak
memory above the loaded model (``torch.cuda.max_memory_allocated`` on a GPU, the
resident set on the CPU). Device: ``cuda`` when available, else ``cpu``.

    python benchmarks/gpu_check.py --output runs/bench/gpu.json
    python benchmarks/gpu_check.py --tiny --output /tmp/gpu.json      # seconds, on any machine
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

# run as scripts: their own folder is sys.path[0], so ``import common`` finds benchmarks/common.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_method(method: str, args: argparse.Namespace, device: str, autocast) -> dict[str, Any]:
    import torch

    import common

    model, answer_ids, vocab = common.build_model(args.model, device=device)
    task = common.AnswerLogitsTask(answer_ids, device=device, autocast=autocast)
    data = common.make_examples(args.batch_size * 4, args.seq_len, vocab, task.num_classes)
    num_steps = 1 + args.warmup + args.steps
    memory = common.PeakMemory(device)
    memory.start()
    timer = common.StepTimer(device)
    t0 = time.perf_counter()
    if method == "peft":
        net = common.peft_model(model)
        common.train_loop(net, task, data, num_steps, args.batch_size, timer)
    else:
        common.blora_fit(model, task, data, method, num_steps, args.batch_size, timer)
    out = {
        "median_step_s": common.median(timer.step_times(args.warmup)),
        "step_times_s": timer.step_times(args.warmup),
        "peak_memory_mb": memory.peak_mb(),
        "baseline_memory_mb": memory.baseline_mb(),
        "memory_method": memory.method,
        "wall_s": time.perf_counter() - t0,
    }
    del model, task
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", default=os.environ.get("PYRO_BLORA_BENCH_TINY", "") not in ("", "0"),
                   help="seconds-long run on a tiny random model (also: PYRO_BLORA_BENCH_TINY=1)")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cuda or cpu")
    p.add_argument("--model", default=None, help="a random model of benchmarks/common.py (default llama1b; tiny with --tiny)")
    p.add_argument("--methods", nargs="+", default=["peft", "flow"], choices=["peft", "delta", "normal", "flow"])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=None, help="default 256 (16 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (1 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="default 10 (3 with --tiny)")
    p.add_argument("--autocast", choices=["bf16", "none"], default="bf16")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads; default 1)")
    p.add_argument("--output", default=None, help="JSON file to write")
    args = p.parse_args(argv)
    args.model = args.model or ("tiny" if args.tiny else "llama1b")
    args.seq_len = args.seq_len or (16 if args.tiny else 256)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps or (3 if args.tiny else 10)

    import torch

    import common

    common.set_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    autocast = torch.bfloat16 if args.autocast == "bf16" else None
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in args.methods:
            results[method] = run_method(method, args, device, autocast)
            print(f"  {method}: {1e3 * results[method]['median_step_s']:.2f} ms/step, "
                  f"peak {results[method]['peak_memory_mb']:.1f} MiB", file=sys.stderr, flush=True)
    ratios = {}
    if "peft" in results:
        base = results["peft"]
        for method, res in results.items():
            ratios[method] = {
                "step": res["median_step_s"] / base["median_step_s"],
                "memory": res["peak_memory_mb"] / base["peak_memory_mb"] if base["peak_memory_mb"] > 0 else float("nan"),
            }
    summary = {
        "settings": {
            "tiny": args.tiny, "model": args.model, "device": device, "autocast": args.autocast,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "warmup": args.warmup, "steps": args.steps,
            "rank": common.RANK, "target_modules": common.TARGET_MODULES,
            "model_params": _param_count(args.model),
        },
        "env": common.env_info(device),
        "results": results,
        "ratios": ratios,
    }
    header = f"{'method':<7} {'step ms':>9} {'x peft':>7} {'peak MiB':>10} {'x peft':>7}"
    print(f"{args.model} ({summary['settings']['model_params'] / 1e6:.1f} M params) on {device}, "
          f"autocast {args.autocast}, batch {args.batch_size} x seq {args.seq_len}")
    print(header + "\n" + "-" * len(header))
    for method, res in results.items():
        r = ratios.get(method, {})
        print(f"{method:<7} {1e3 * res['median_step_s']:>9.2f} {r.get('step', float('nan')):>7.3f} "
              f"{res['peak_memory_mb']:>10.1f} {r.get('memory', float('nan')):>7.3f}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(summary, indent=2))
        print(f"wrote {args.output}")
    return summary


def _param_count(name: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import common

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**common.RANDOM_MODELS[name]))
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
