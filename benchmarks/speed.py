"""Speed and memory of pyro_blora against plain peft LoRA, side by side.

For each model (the real SmolLM2-135M and a random Llama-shaped model with 2x
its width, i.e. 4x the parameters per matrix):

* **training step**: (a) peft LoRA (``get_peft_model``, r=8 on q_proj, v_proj,
  AdamW, a hand-written loop), (b) ``pyro_blora.fit(guide="delta")``, (c)
  ``"normal"``, (d) ``"flow"``, with the same rank, targets, batch (4), sequence
  length (128) and loss head. All four train **side by side in one process, one
  step each in turn** (``interleave.py``), so drifting load from other jobs hits
  them alike. Each step is timed on its own thread: wall time and the thread's
  CPU time. The ratio to peft is the median over rounds of (method step / peft
  step in the same round), on CPU time with one thread (other processes' load
  inflates it least), on wall time otherwise;
* **adapter overhead**: the same methods and hand-written LoRA on the model's
  adapted layers alone (``skeleton.py``), 40 steps side by side: the median extra
  per step over LoRA, precise where the real model's step varies by more than
  the difference; ``1 + extra / peft step`` estimates the ratio;
* **peak memory**: each method alone in a fresh process, peak resident set above
  the resident set after loading the model (``VmHWM`` reset by
  ``/proc/self/clear_refs``; CUDA: ``max_memory_allocated``);
* **prediction**: ``result.predict(batch, num_samples=N)`` of the flow posterior
  for N = 1, 4, 10 (the library's default, and with the samples stacked into one
  forward or one forward per sample) against one no-grad forward of the peft
  model on the same batch, in turn, median of paired ratios;
* **per-layer overhead**: a stack of L ``nn.Linear(64, 64)`` (L = 8, 32, 128),
  every layer adapted, delta and flow through ``fit`` against a hand-written
  plain-torch LoRA, side by side; time per layer and its growth from 8 to 128.

Prints the tables with ratios to peft LoRA and the targets met, and writes JSON.

    python benchmarks/speed.py --output runs/bench/speed.json              # full (about 15 min on 2 cores)
    python benchmarks/speed.py --tiny --models random --output /tmp/s.json  # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
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
    "train_step_ratio_stretch": 1.02,
    "peak_memory_ratio_max": 1.05,
    "predict_4_samples_ratio_max": 4.0,
    "per_layer_growth_max": 1.25,  # extra time per layer at the most layers / at the fewest ("flat")
}
HERE = Path(__file__).resolve().parent


# glibc's malloc serves large blocks with mmap below a threshold it raises as it goes; a step that
# frees and re-allocates its activations can then fault their pages in again every step. Pinning the
# thresholds (as PyTorch's CPU tuning guides do, or jemalloc / tcmalloc) keeps freed memory for reuse.
PINNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**28), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def run_children(specs: list[dict[str, Any]], env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Measurements of ``measure.py``, each in a fresh interpreter, all at once (use for memory only)."""
    with tempfile.TemporaryDirectory(prefix="pyro_blora_speed_") as tmp:
        outputs = [os.path.join(tmp, f"result{i}.json") for i in range(len(specs))]
        child_env = {**os.environ, **(env or {})}
        procs = [subprocess.Popen([sys.executable, str(HERE / "measure.py"), json.dumps(spec), output],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env)
                 for spec, output in zip(specs, outputs)]
        logs = [proc.communicate()[0] for proc in procs]
        for spec, proc, output, log in zip(specs, procs, outputs, logs):
            if proc.returncode != 0 or not os.path.exists(output):
                raise RuntimeError(f"benchmark child {spec['kind']} {spec.get('model', '')} {spec.get('method', '')} "
                                   f"failed (exit {proc.returncode}):\n{log[-4000:]}")
        return [json.loads(Path(output).read_text()) for output in outputs]


def run_child(spec: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """One measurement of ``measure.py`` in a fresh interpreter."""
    return run_children([spec], env)[0]


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def paired_ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of ``times[i] / base[i]``: both measured in the same round, under the same load."""
    return median([a / b for a, b in zip(times, base) if b > 0])


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


def quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [float("nan"), float("nan")]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def summarise_model(timing: dict[str, Any], memory: dict[str, dict], overhead: dict[str, Any] | None,
                    clock: str) -> dict[str, Any]:
    """Medians and ratios to peft of one model's timing, memory and adapter-overhead runs."""
    methods = timing["methods"]
    base = methods.get("peft")
    rows: dict[str, Any] = {}
    extra = {}
    if overhead is not None and "plain" in overhead["methods"]:
        plain = overhead["methods"]["plain"][clock]
        for method, times in overhead["methods"].items():
            if method != "plain":
                diffs = [a - b for a, b in zip(times[clock], plain)]
                extra[method] = {"adapter_extra_s": median(diffs), "adapter_extra_quartiles_s": quartiles(diffs),
                                 "adapter_step_s": median(times[clock]), "adapter_plain_step_s": median(plain)}
    for method, res in methods.items():
        row = {"median_step_s": median(res[f"{clock}_s"]), "median_wall_s": median(res["wall_s"]),
               "median_cpu_s": median(res["cpu_s"]), "step_times_s": res[f"{clock}_s"],
               "median_page_faults": median(res.get("faults", [])), "trainable_params": res["trainable_params"]}
        if base is not None:
            row["step_ratio"] = paired_ratio(res[f"{clock}_s"], base[f"{clock}_s"])
            row["step_ratio_quartiles"] = quartiles([a / b for a, b in zip(res[f"{clock}_s"], base[f"{clock}_s"])])
            row["step_ratio_wall"] = paired_ratio(res["wall_s"], base["wall_s"])
            row["step_ratio_cpu"] = paired_ratio(res["cpu_s"], base["cpu_s"])
        if method in extra and base is not None:
            row.update(extra[method])
            row["step_ratio_adapters"] = 1 + extra[method]["adapter_extra_s"] / median(base[f"{clock}_s"])
        if method in memory:
            row.update(memory[method])
            if "peft" in memory and memory["peft"]["peak_memory_mb"] > 0:
                row["memory_ratio"] = memory[method]["peak_memory_mb"] / memory["peft"]["peak_memory_mb"]
        rows[method] = row
    out: dict[str, Any] = {"methods": rows, "loadavg_before": timing["loadavg_before"],
                           "loadavg_after": timing["loadavg_after"]}
    prediction = timing.get("prediction")
    if prediction:
        forward = prediction.pop("forward")
        pred: dict[str, Any] = {"lora_forward_s": median(forward[clock]), "guides": {}}
        for name, times in prediction.items():
            method, n, mode = name.split("/")
            entry = {"seconds": median(times[clock]), "ratio": paired_ratio(times[clock], forward[clock])}
            if mode == "default":
                pred["guides"].setdefault(method, {})[n] = entry
            pred.setdefault("modes", {}).setdefault(method, {}).setdefault(n, {})[mode] = entry
        out["prediction"] = pred
    return out


def summarise_layers(layers: dict[str, Any], clock: str) -> dict[str, Any]:
    counts = [str(c) for c in layers["counts"]]
    results = layers["results"]
    out: dict[str, Any] = {"width": layers["width"], "batch_size": layers["batch_size"], "counts": layers["counts"],
                           "results": {}, "growth": {}}
    plain = results.get("plain")
    for method, per in results.items():
        rows = {}
        for c in counts:
            step = median(per[c][f"{clock}_s"])
            row = {"median_step_s": step, "per_layer_s": step / int(c)}
            if plain is not None and method != "plain":
                base = median(plain[c][f"{clock}_s"])
                row["ratio_to_plain"] = paired_ratio(per[c][f"{clock}_s"], plain[c][f"{clock}_s"])
                row["extra_per_layer_s"] = (step - base) / int(c)
            rows[c] = row
        out["results"][method] = rows
        key = "extra_per_layer_s" if method != "plain" and plain is not None else "per_layer_s"
        first, last = rows[counts[0]][key], rows[counts[-1]][key]
        out["growth"][method] = last / first if first > 0 else float("nan")
    return out


def checks(summary: dict[str, Any]) -> dict[str, bool]:
    out: dict[str, bool] = {}
    for model, res in summary["models"].items():
        for method, row in res["methods"].items():
            if method == "peft":
                continue
            if "step_ratio" in row:
                out[f"{model}/{method}/step"] = row["step_ratio"] <= TARGETS["train_step_ratio_max"]
            if "step_ratio_adapters" in row:
                out[f"{model}/{method}/step_adapters"] = row["step_ratio_adapters"] <= TARGETS["train_step_ratio_max"]
            if "memory_ratio" in row:
                out[f"{model}/{method}/memory"] = row["memory_ratio"] <= TARGETS["peak_memory_ratio_max"]
        for method, per_n in res.get("prediction", {}).get("guides", {}).items():
            if "4" in per_n:
                out[f"{model}/{method}/predict4"] = per_n["4"]["ratio"] <= TARGETS["predict_4_samples_ratio_max"]
    layers = summary.get("layers")
    if layers:
        for method, growth in layers["growth"].items():
            if method != "plain":
                out[f"layers/{method}/flat"] = growth <= TARGETS["per_layer_growth_max"]
    return out


def format_tables(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    clock = "CPU" if s["clock"] == "cpu" else "wall"
    lines = [
        f"training step (batch {s['batch_size']}, seq {s['seq_len']}, r={s['rank']} on {','.join(s['target_modules'])}, "
        f"{s['steps']} steps each after {s['warmup']} warm-up, side by side; {s['threads']} thread(s); "
        f"ratio = median of per-round ratios, {clock} time; '+ms adapt': median extra per step over hand-written "
        f"LoRA on the model's adapted layers alone, 'x peft est' = 1 + that / peft's step; faults: minor page "
        f"faults per step; malloc {s['malloc']})"
    ]
    header = (f"{'model':<9} {'method':<7} {'step ms':>9} {'x peft':>7} {'q1-q3':>11} {'(wall)':>7} {'faults':>7} "
              f"{'+ms adapt':>9} {'x peft est':>10} {'peak MiB':>9} {'x peft':>7} {'trainable':>10}")
    lines += [header, "-" * len(header)]
    nan = float("nan")
    for model, res in summary["models"].items():
        for method, row in res["methods"].items():
            q = row.get("step_ratio_quartiles", [nan, nan])
            lines.append(
                f"{model:<9} {method:<7} {1e3 * row['median_step_s']:>9.1f} {row.get('step_ratio', nan):>7.3f} "
                f"{q[0]:>5.2f}-{q[1]:<5.2f} {row.get('step_ratio_wall', nan):>7.3f} {row['median_page_faults']:>7.0f} "
                f"{1e3 * row.get('adapter_extra_s', nan):>9.1f} {row.get('step_ratio_adapters', nan):>10.3f} "
                f"{row.get('peak_memory_mb', nan):>9.1f} {row.get('memory_ratio', nan):>7.3f} {row['trainable_params']:>10,}"
            )
        lines.append(f"{'':<9} load average before / after: {res['loadavg_before'][0]:.2f} / {res['loadavg_after'][0]:.2f}")
    predictions = {m: r["prediction"] for m, r in summary["models"].items() if "prediction" in r}
    if predictions:
        lines += ["", "prediction (one batch; the default, samples stacked, one forward per sample) vs one no-grad "
                      "forward of the peft model"]
        header = f"{'model':<9} {'guide':<7} {'N':>3} {'ms':>9} {'x LoRA fwd':>11}"
        lines += [header, "-" * len(header)]
        for model, pred in predictions.items():
            lines.append(f"{model:<9} {'peft':<7} {'-':>3} {1e3 * pred['lora_forward_s']:>9.1f} {1.0:>11.3f}")
            for guide, per_n in pred.get("modes", {}).items():
                for n, modes in per_n.items():
                    for mode, v in modes.items():
                        lines.append(f"{model:<9} {guide:<7} {n:>3} {1e3 * v['seconds']:>9.1f} {v['ratio']:>11.3f}  {mode}")
    layers = summary.get("layers")
    if layers:
        lines += ["", f"per-layer overhead: stack of nn.Linear({layers['width']}, {layers['width']}), batch "
                      f"{layers['batch_size']}, every layer adapted, side by side"]
        header = f"{'layers':>6} {'method':<7} {'step ms':>9} {'us/layer':>9} {'x plain':>8} {'extra us/layer':>15}"
        lines += [header, "-" * len(header)]
        for count in layers["counts"]:
            for method, per in layers["results"].items():
                v = per[str(count)]
                lines.append(
                    f"{count:>6} {method:<7} {1e3 * v['median_step_s']:>9.2f} {1e6 * v['per_layer_s']:>9.1f} "
                    f"{v.get('ratio_to_plain', 1.0):>8.2f} {1e6 * v.get('extra_per_layer_s', 0.0):>15.1f}"
                )
        growth = ", ".join(f"{m} {g:.2f}" for m, g in layers["growth"].items())
        lines.append(f"growth from {layers['counts'][0]} to {layers['counts'][-1]} layers "
                     f"(extra time per layer; plain: time per layer): {growth}")
    if summary["checks"]:
        failed = [k for k, ok in summary["checks"].items() if not ok]
        lines += ["", f"targets: {len(summary['checks']) - len(failed)}/{len(summary['checks'])} met"
                      + (f"; missed: {', '.join(failed)}" if failed else "")]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="seconds-long run (tiny models and shapes) for smoke tests")
    p.add_argument("--models", nargs="+", default=None,
                   help="smollm2, wide, tiny, llama1b, 'random' (wide; tiny with --tiny) or 'all' (smollm2 + wide). "
                        "Default: all (random with --tiny)")
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    p.add_argument("--output", default=None, help="JSON file to write")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in every measurement (default 1)")
    p.add_argument("--batch-size", type=int, default=None, help="default 4")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (16 with --tiny)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps, not timed (default 2; 1 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed steps of each method (default 12; 3 with --tiny)")
    p.add_argument("--memory-steps", type=int, default=None, help="steps of the memory runs (default 3; 2 with --tiny)")
    p.add_argument("--predict-samples", type=int, nargs="*", default=[1, 4, 10])
    p.add_argument("--predict-guides", nargs="*", default=["flow"], choices=PYRO_METHODS)
    p.add_argument("--predict-repeats", type=int, default=None, help="default 5 (2 with --tiny)")
    p.add_argument("--layer-counts", type=int, nargs="*", default=None, help="default 8 32 128 (2 4 8 with --tiny); none to skip")
    p.add_argument("--layer-methods", nargs="+", default=["plain", "delta", "flow"], choices=["plain", "delta", "normal", "flow"])
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory processes")
    p.add_argument("--malloc", choices=["default", "pinned"], default="default",
                   help="glibc malloc as the environment has it, or with pinned mmap/trim thresholds (PINNED_MALLOC)")
    p.add_argument("--overhead-steps", type=int, default=None,
                   help="steps of the adapter-overhead run (default 40; 3 with --tiny; 0 to skip)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    tiny = args.tiny
    return {
        "tiny": tiny,
        "batch_size": args.batch_size or 4,
        "seq_len": args.seq_len or (16 if tiny else 128),
        "warmup": args.warmup if args.warmup is not None else (1 if tiny else 2),
        "steps": args.steps or (3 if tiny else 12),
        "memory_steps": args.memory_steps or (2 if tiny else 3),
        "overhead_steps": args.overhead_steps if args.overhead_steps is not None else (3 if tiny else 40),
        "malloc": args.malloc,
        "malloc_env": PINNED_MALLOC if args.malloc == "pinned" else {},
        "threads": args.threads,
        "clock": "cpu" if args.threads == 1 and args.device == "cpu" else "wall",
        "rank": 8,
        "target_modules": ["q_proj", "v_proj"],
        "device": args.device,
        "models": resolve_models(args.models or (["random"] if tiny else ["all"]), tiny),
        "methods": ["peft"] + [m for m in args.methods if m != "peft"],
        "predict_samples": list(args.predict_samples),
        "predict_guides": list(args.predict_guides),
        "predict_repeats": args.predict_repeats or (2 if tiny else 5),
        "layer_counts": sorted(args.layer_counts if args.layer_counts is not None else ([2, 4, 8] if tiny else [8, 32, 128])),
        "layer_methods": list(args.layer_methods),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    settings = settings_from(args)
    common_spec = {k: settings[k] for k in ("threads", "batch_size", "seq_len", "device")}
    models: dict[str, Any] = {}
    for model in settings["models"]:
        t0 = time.perf_counter()
        timing = run_child({**common_spec, "kind": "timing", "model": model, "methods": settings["methods"],
                            "warmup": settings["warmup"], "steps": settings["steps"],
                            "predict_samples": settings["predict_samples"], "predict_guides": settings["predict_guides"],
                            "predict_repeats": settings["predict_repeats"], "overhead_steps": settings["overhead_steps"]},
                           env=settings["malloc_env"])
        memory = {}
        if not args.no_memory:  # peak memory only: the processes may run at once
            specs = [{**common_spec, "kind": "memory", "model": model, "method": method, "warmup": 1,
                      "steps": settings["memory_steps"]} for method in settings["methods"]]
            memory = dict(zip(settings["methods"], run_children(specs, env=settings["malloc_env"])))
        models[model] = summarise_model(timing, memory, timing.get("overhead"), settings["clock"])
        print(f"  {model}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    summary: dict[str, Any] = {"settings": settings, "models": models, "targets": TARGETS, "layers": None}
    if settings["layer_counts"]:
        t0 = time.perf_counter()
        layers = run_child({"kind": "layers", "counts": settings["layer_counts"], "methods": settings["layer_methods"],
                            "threads": args.threads, "width": 64, "batch_size": 32,
                            "warmup": 1 if args.tiny else 2, "steps": 2 if args.tiny else 7}, env=settings["malloc_env"])
        summary["layers"] = summarise_layers(layers, settings["clock"])
        print(f"  layers: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    summary["checks"] = checks(summary)
    import common  # imports torch: after the children, so --help is instant

    summary["env"] = common.env_info(args.device)
    print(format_tables(summary))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(summary, indent=2, default=float))
        print(f"wrote {args.output}")
    return summary


if __name__ == "__main__":
    main()
