"""Speed and memory of pyro_blora against plain peft LoRA, side by side.

Measures, for each model (the real SmolLM2-135M and a random Llama-shaped model
with 2x its width, i.e. 4x the parameters per matrix):

* **training step**: median wall time of one optimiser step after warm-up steps,
  for (a) peft LoRA (``get_peft_model``, r=8 on q_proj, v_proj, AdamW, a hand-written
  loop), (b) ``pyro_blora.fit(guide="delta")``, (c) ``"normal"``, (d) ``"flow"``, all
  with the same rank, targets, batch (4), sequence length (128) and loss head (the
  last position's logits at 3 answer token ids). pyro_blora steps are timed by a
  ``fit`` callback that stamps ``time.perf_counter()`` after every step;
* **peak memory**: each method runs in a fresh subprocess; the peak resident set
  above the process's resident set right after loading the model (``VmHWM``
  reset via ``/proc/self/clear_refs``, falling back to ``ru_maxrss``);
* **prediction**: ``result.predict(batch, num_samples=N, stack_samples=True)`` of the
  flow posterior for N = 1, 4, 10 against one no-grad forward of the peft model on
  the same batch;
* **per-layer overhead**: step time of a stack of L ``nn.Linear(64, 64)`` (L = 8, 32,
  128), every layer adapted, for delta, flow and a hand-written plain-torch LoRA,
  per layer.

Prints tables with ratios to peft LoRA and writes everything to ``--output`` (JSON).

    python benchmarks/speed.py --output runs/bench/speed.json          # full (minutes)
    python benchmarks/speed.py --tiny --models random --output /tmp/s.json   # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

# run as scripts: their own folder is sys.path[0], so ``import common`` finds benchmarks/common.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PYRO_METHODS = ("delta", "normal", "flow")
ALL_METHODS = ("peft",) + PYRO_METHODS
TARGETS = {
    "train_step_ratio_max": 1.05,
    "peak_memory_ratio_max": 1.05,
    "predict_4_samples_ratio_max": 4.2,
    "per_layer_growth_max": 1.25,  # step time per layer at the most layers / at the fewest ("flat")
}


# --------------------------------------------------------------------------- one measurement (child side)


def run_training(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one method on one model; return step times, peak memory and (optionally) prediction times."""
    import torch

    import common

    common.set_threads(spec["threads"])
    device = spec.get("device", "cpu")
    torch.manual_seed(0)
    model, answer_ids, vocab = common.build_model(spec["model"], device=device)
    task = common.AnswerLogitsTask(answer_ids, device=device)
    batch_size, seq_len = spec["batch_size"], spec["seq_len"]
    data = common.make_examples(batch_size * 4, seq_len, vocab, task.num_classes)
    warmup, steps = spec["warmup"], spec["steps"]
    num_steps = 1 + warmup + steps  # the first stamp has no predecessor

    memory = common.PeakMemory(device)
    memory.start()
    timer = common.StepTimer(device)
    method = spec["method"]
    out: dict[str, Any] = {"model": spec["model"], "method": method}
    if method == "peft":
        net = common.peft_model(model)
        out["trainable_params"] = common.count_params(net)
        common.train_loop(net, task, data, num_steps, batch_size, timer)
    else:
        result = common.blora_fit(model, task, data, method, num_steps, batch_size, timer)
        out["trainable_params"] = common.count_params(result.net) + common.count_params(result.guide)
    out["peak_memory_mb"] = memory.peak_mb()
    out["baseline_memory_mb"] = memory.baseline_mb()
    out["memory_method"] = memory.method
    times = timer.step_times(warmup)
    out["step_times_s"] = times
    out["median_step_s"] = common.median(times)

    samples = spec.get("predict_samples") or []
    repeats = spec.get("predict_repeats", 3)
    if samples:
        batch_examples = data[:batch_size]
        if method == "peft":
            batch = task.collate(batch_examples)
            net.eval()
            with torch.no_grad():
                task.class_logits(net, batch)  # warm-up
                forward = []
                for _ in range(repeats):
                    common.sync(device)
                    t0 = time.perf_counter()
                    task.class_logits(net, batch)
                    common.sync(device)
                    forward.append(time.perf_counter() - t0)
            out["forward_s"] = common.median(forward)
        else:
            predict: dict[str, float] = {}
            for n in samples:
                result.predict(batch_examples, num_samples=n, batch_size=batch_size, stack_samples=True)  # warm-up
                runs = []
                for _ in range(repeats):
                    common.sync(device)
                    t0 = time.perf_counter()
                    result.predict(batch_examples, num_samples=n, batch_size=batch_size, stack_samples=True)
                    common.sync(device)
                    runs.append(time.perf_counter() - t0)
                predict[str(n)] = common.median(runs)
            out["predict_s"] = predict
    return out


def _plain_lora_stack(num_layers: int, width: int, seed: int):
    import torch
    from torch import nn

    import common

    class _PlainLoRALinear(nn.Module):
        """peft's LoRA, by hand: ``base(x) + scaling * B(A(dropout(x)))``."""

        def __init__(self, base: nn.Linear):
            super().__init__()
            base.requires_grad_(False)
            self.base = base
            self.lora_A = nn.Parameter(torch.empty(common.RANK, base.in_features))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, common.RANK))
            self.dropout = nn.Dropout(common.DROPOUT)
            self.scaling = common.ALPHA / common.RANK

        def forward(self, x):
            return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    stack = _linear_stack(num_layers, width, seed)
    return nn.Sequential(*[_PlainLoRALinear(layer) for layer in stack])


def _linear_stack(num_layers: int, width: int, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = []
    for _ in range(num_layers):
        layer = nn.Linear(width, width)
        nn.init.orthogonal_(layer.weight)  # keeps activations O(1) through 128 layers (no denormals)
        nn.init.zeros_(layer.bias)
        layers.append(layer)
    return nn.Sequential(*layers)


def run_layers(spec: dict[str, Any]) -> dict[str, Any]:
    """Step time of a stack of adapted nn.Linear(width, width) for each layer count and method."""
    import torch

    import common
    from pyro_blora.tasks import TensorTask

    common.set_threads(spec["threads"])
    torch.set_flush_denormal(True)
    width, batch_size = spec["width"], spec["batch_size"]
    warmup, steps = spec["warmup"], spec["steps"]
    num_steps = 1 + warmup + steps
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size * 4, width, generator=g)
    y = torch.randint(0, width, (batch_size * 4,), generator=g)
    data = [{"inputs": x[i], "labels": y[i]} for i in range(len(x))]
    task = TensorTask(num_classes=width)
    results: dict[str, dict[str, Any]] = {}
    for method in spec["methods"]:
        results[method] = {}
        for count in spec["counts"]:
            timer = common.StepTimer()
            if method == "plain":
                net = _plain_lora_stack(count, width, seed=0)
                common.train_loop(net, task, data, num_steps, batch_size, timer)
            else:
                net = _linear_stack(count, width, seed=0)
                config = common.blora_config(target_modules=r"\d+")
                common.blora_fit(net, task, data, method, num_steps, batch_size, timer, config=config)
            step = common.median(timer.step_times(warmup))
            results[method][str(count)] = {"median_step_s": step, "per_layer_s": step / count}
    return {"width": width, "batch_size": batch_size, "counts": spec["counts"], "results": results}


def child_main(spec_json: str, output: str) -> None:
    warnings.simplefilter("ignore")
    spec = json.loads(spec_json)
    result = run_layers(spec) if spec["kind"] == "layers" else run_training(spec)
    Path(output).write_text(json.dumps(result))


# --------------------------------------------------------------------------- orchestration (parent side)


def run_spec(spec: dict[str, Any], isolation: str) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter (``process``) or in this one (``inline``)."""
    if isolation == "inline":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return run_layers(spec) if spec["kind"] == "layers" else run_training(spec)
    with tempfile.TemporaryDirectory(prefix="pyro_blora_speed_") as tmp:
        output = os.path.join(tmp, "result.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--child-output", output]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(output):
            tail = (proc.stdout + proc.stderr)[-4000:]
            raise RuntimeError(f"benchmark child {spec.get('model', spec['kind'])}/{spec.get('method', '')} "
                               f"failed (exit {proc.returncode}):\n{tail}")
        return json.loads(Path(output).read_text())


def resolve_models(names: list[str], tiny: bool) -> list[str]:
    out: list[str] = []
    for name in names:
        if name == "all":
            out += ["tiny"] if tiny else ["smollm2", "wide"]
        elif name == "random":
            out += ["tiny"] if tiny else ["wide"]
        else:
            out.append(name)
    return list(dict.fromkeys(out))


def _ratio(a: float, b: float) -> float:
    return a / b if b and math.isfinite(a) and math.isfinite(b) and b > 0 else float("nan")


def summarise(training: dict, layers: dict | None, settings: dict) -> dict[str, Any]:
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    prediction: dict[str, Any] = {}
    for model, methods in training.items():
        base = methods.get("peft")
        ratios[model] = {}
        for method, res in methods.items():
            if base is None:
                continue
            ratios[model][method] = {
                "step": _ratio(res["median_step_s"], base["median_step_s"]),
                "memory": _ratio(res["peak_memory_mb"], base["peak_memory_mb"]),
            }
        if base is not None and "forward_s" in base:
            pred = {"lora_forward_s": base["forward_s"], "guides": {}}
            for method, res in methods.items():
                if "predict_s" in res:
                    pred["guides"][method] = {
                        n: {"seconds": s, "ratio": _ratio(s, base["forward_s"])} for n, s in res["predict_s"].items()
                    }
            prediction[model] = pred
    checks: dict[str, Any] = {}
    for model, methods in ratios.items():
        for method, r in methods.items():
            if method == "peft":
                continue
            checks[f"{model}/{method}/step"] = r["step"] <= TARGETS["train_step_ratio_max"]
            checks[f"{model}/{method}/memory"] = r["memory"] <= TARGETS["peak_memory_ratio_max"]
    for model, pred in prediction.items():
        for method, per_n in pred["guides"].items():
            if "4" in per_n:
                checks[f"{model}/{method}/predict4"] = per_n["4"]["ratio"] <= TARGETS["predict_4_samples_ratio_max"]
    if layers:
        counts = [str(c) for c in layers["counts"]]
        growth = {}
        for method, per in layers["results"].items():
            growth[method] = _ratio(per[counts[-1]]["per_layer_s"], per[counts[0]]["per_layer_s"])
            if method != "plain" and "plain" in layers["results"]:
                plain = layers["results"]["plain"]
                for c in counts:
                    per[c]["ratio_to_plain"] = _ratio(per[c]["median_step_s"], plain[c]["median_step_s"])
                    per[c]["extra_per_layer_s"] = (per[c]["median_step_s"] - plain[c]["median_step_s"]) / int(c)
                checks[f"layers/{method}/flat"] = growth[method] <= TARGETS["per_layer_growth_max"]
        layers["per_layer_growth"] = growth
    return {
        "settings": settings,
        "training": training,
        "ratios": ratios,
        "prediction": prediction,
        "layers": layers,
        "targets": TARGETS,
        "checks": checks,
    }


def format_tables(summary: dict[str, Any]) -> str:
    lines = []
    s = summary["settings"]
    lines.append(
        f"training step (batch {s['batch_size']}, seq {s['seq_len']}, r={s['rank']} on {','.join(s['target_modules'])}, "
        f"median of {s['steps']} steps after {s['warmup']} warm-up, {s['threads']} thread(s), {s['isolation']} isolation)"
    )
    header = f"{'model':<9} {'method':<7} {'step ms':>9} {'x peft':>7} {'peak MiB':>9} {'x peft':>7} {'trainable':>10}"
    lines += [header, "-" * len(header)]
    for model, methods in summary["training"].items():
        for method, res in methods.items():
            r = summary["ratios"].get(model, {}).get(method, {})
            lines.append(
                f"{model:<9} {method:<7} {1e3 * res['median_step_s']:>9.2f} {r.get('step', float('nan')):>7.3f} "
                f"{res['peak_memory_mb']:>9.1f} {r.get('memory', float('nan')):>7.3f} {res['trainable_params']:>10,}"
            )
    if summary["prediction"]:
        lines.append("")
        lines.append("prediction (one batch, posterior samples stacked) vs one no-grad forward of the peft model")
        header = f"{'model':<9} {'guide':<7} {'N':>3} {'ms':>9} {'x LoRA fwd':>11}"
        lines += [header, "-" * len(header)]
        for model, pred in summary["prediction"].items():
            lines.append(f"{model:<9} {'peft':<7} {'-':>3} {1e3 * pred['lora_forward_s']:>9.2f} {1.0:>11.3f}")
            for guide, per_n in pred["guides"].items():
                for n, v in per_n.items():
                    lines.append(f"{model:<9} {guide:<7} {n:>3} {1e3 * v['seconds']:>9.2f} {v['ratio']:>11.3f}")
    layers = summary.get("layers")
    if layers:
        lines.append("")
        lines.append(f"per-layer overhead: stack of nn.Linear({layers['width']}, {layers['width']}), batch {layers['batch_size']}, every layer adapted")
        header = f"{'layers':>6} {'method':<7} {'step ms':>9} {'us/layer':>9} {'x plain':>8} {'extra us/layer':>15}"
        lines += [header, "-" * len(header)]
        for count in layers["counts"]:
            for method, per in layers["results"].items():
                v = per[str(count)]
                lines.append(
                    f"{count:>6} {method:<7} {1e3 * v['median_step_s']:>9.2f} {1e6 * v['per_layer_s']:>9.1f} "
                    f"{v.get('ratio_to_plain', 1.0):>8.2f} {1e6 * v.get('extra_per_layer_s', 0.0):>15.1f}"
                )
        growth = ", ".join(f"{m} {g:.2f}" for m, g in layers.get("per_layer_growth", {}).items())
        lines.append(f"per-layer time at {layers['counts'][-1]} / at {layers['counts'][0]} layers: {growth}")
    if summary["checks"]:
        lines.append("")
        failed = [k for k, ok in summary["checks"].items() if not ok]
        lines.append(f"targets: {len(summary['checks']) - len(failed)}/{len(summary['checks'])} met"
                     + (f"; missed: {', '.join(failed)}" if failed else ""))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="seconds-long run (tiny models and shapes, inline) for smoke tests")
    p.add_argument("--models", nargs="+", default=None,
                   help="smollm2, wide, tiny, llama1b, 'random' (wide; tiny with --tiny) or 'all' (smollm2 + wide). "
                        "Default: all (random with --tiny)")
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--output", default=None, help="JSON file to write")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every measurement (default 1)")
    p.add_argument("--batch-size", type=int, default=None, help="default 4")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (16 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps, not timed (default 3; 1 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 with --tiny)")
    p.add_argument("--predict-samples", type=int, nargs="*", default=[1, 4, 10])
    p.add_argument("--predict-guides", nargs="*", default=["flow"], choices=PYRO_METHODS)
    p.add_argument("--predict-repeats", type=int, default=None, help="default 3 (2 with --tiny)")
    p.add_argument("--layer-counts", type=int, nargs="*", default=None, help="default 8 32 128 (2 4 8 with --tiny); none to skip")
    p.add_argument("--layer-methods", nargs="+", default=["plain", "delta", "flow"], choices=["plain", "delta", "normal", "flow"])
    p.add_argument("--isolation", choices=["process", "inline"], default=None,
                   help="fresh subprocess per measurement (default; needed for honest peak memory) or all in this "
                        "process (default with --tiny; memory numbers then only indicative)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-output", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.child_output)
        return None
    tiny = args.tiny
    settings = {
        "tiny": tiny,
        "batch_size": args.batch_size or 4,
        "seq_len": args.seq_len or (16 if tiny else 128),
        "warmup": args.warmup if args.warmup is not None else (1 if tiny else 3),
        "steps": args.steps or (3 if tiny else 10),
        "threads": args.threads,
        "isolation": args.isolation or ("inline" if tiny else "process"),
        "rank": 8,
        "target_modules": ["q_proj", "v_proj"],
        "device": args.device,
        "models": resolve_models(args.models or (["random"] if tiny else ["all"]), tiny),
        "methods": list(args.methods),
        "predict_samples": list(args.predict_samples),
        "predict_guides": list(args.predict_guides),
        "predict_repeats": args.predict_repeats or (2 if tiny else 3),
        "layer_counts": args.layer_counts if args.layer_counts is not None else ([2, 4, 8] if tiny else [8, 32, 128]),
        "layer_methods": list(args.layer_methods),
    }
    import common  # imports torch: after argparse, so --help is instant

    common.set_threads(args.threads)
    training: dict[str, dict[str, Any]] = {}
    predicting = bool(settings["predict_samples"])
    for model in settings["models"]:
        training[model] = {}
        for method in settings["methods"]:
            spec = {
                "kind": "train", "model": model, "method": method, "device": args.device,
                "threads": args.threads, "batch_size": settings["batch_size"], "seq_len": settings["seq_len"],
                "warmup": settings["warmup"], "steps": settings["steps"],
                "predict_repeats": settings["predict_repeats"],
                "predict_samples": settings["predict_samples"]
                if predicting and (method == "peft" or method in settings["predict_guides"]) else [],
            }
            t0 = time.perf_counter()
            training[model][method] = run_spec(spec, settings["isolation"])
            print(f"  {model}/{method}: {1e3 * training[model][method]['median_step_s']:.1f} ms/step "
                  f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    layers = None
    if settings["layer_counts"]:
        spec = {
            "kind": "layers", "counts": sorted(settings["layer_counts"]), "methods": settings["layer_methods"],
            "threads": args.threads, "width": 64, "batch_size": 32,
            "warmup": 1 if tiny else 2, "steps": 2 if tiny else 5,
        }
        t0 = time.perf_counter()
        layers = run_spec(spec, settings["isolation"])
        print(f"  layers: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    summary = summarise(training, layers, settings)
    summary["env"] = common.env_info(args.device)
    print(format_tables(summary))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(summary, indent=2, default=float))
        print(f"wrote {args.output}")
    return summary


if __name__ == "__main__":
    main()
