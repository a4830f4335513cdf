"""Does ``torch.compile`` of the adapter path pay on this machine? Eager against compiled, side by side.

The network is the model's adapted layers alone (``skeleton.py``: ``q_proj`` and ``v_proj`` of every
SmolLM2 block, batch x hidden inputs), so a step costs about what the adapters cost. Four variants train
one forward + backward each in turn (``interleave``-style rounds, median of per-round times):

* ``plain``: hand-written peft LoRA (``PlainLoRALinear``), eager;
* ``plain_compiled``: the same network through ``torch.compile`` (inductor);
* ``ours``: :class:`~pyro_blora.models.BayesianLoRALinear` with a fixed draw of both factors (what the
  network runs after the guide's draw), eager;
* ``ours_compiled``: the same through ``torch.compile``.

The guide's draw (Pyro) stays eager in every case. Compile time is reported apart from the steps.

    python benchmarks/compile_check.py --output runs/bench/compile.json        # about 3 min on 2 cores
    python benchmarks/compile_check.py --tiny --output /tmp/compile.json       # seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

import common
from skeleton import AdapterSkeleton, plain_lora, skeleton_shape

from pyro_blora import BLoRAConfig, inject_adapters


def build(variant: str, blocks: int, hidden: int, kv: int, tokens: int) -> tuple[Callable[[], None], float]:
    """A training step of ``variant`` (forward + backward on a fixed input) and its compile seconds."""
    torch.manual_seed(0)
    net = AdapterSkeleton(blocks, hidden, kv)
    if variant.startswith("plain"):
        plain_lora(net)
        params = [p for p in net.parameters() if p.requires_grad]
    else:
        config = BLoRAConfig(target_modules=list(common.TARGET_MODULES), r=common.RANK, alpha=common.ALPHA,
                             dropout=common.DROPOUT, bayesian_modules=[])
        layers = inject_adapters(net, config)
        params = []
        for layer in layers:  # fixed draws that carry gradients, as the guide's would
            a = torch.randn(layer.r, layer.in_features, requires_grad=True)
            b = torch.randn(layer.out_features, layer.r, requires_grad=True)
            layer.set_adapter_weights(a, b)
            params += [a, b]
    x = torch.randn(tokens, hidden)
    forward = torch.compile(net) if variant.endswith("compiled") else net

    def step() -> None:
        for p in params:
            p.grad = None
        forward(x).sum().backward()

    t0 = time.perf_counter()
    step()  # compiles the compiled variants
    return step, time.perf_counter() - t0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    common.set_threads(args.threads)
    blocks, hidden, kv = (2, 32, 16) if args.tiny else skeleton_shape("smollm2")
    variants = ["plain", "plain_compiled", "ours", "ours_compiled"]
    steps, compile_s = {}, {}
    for variant in variants:
        steps[variant], compile_s[variant] = build(variant, blocks, hidden, kv, args.tokens)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(args.warmup + args.steps):
        for variant in variants:
            t0 = time.thread_time() if args.threads == 1 else time.perf_counter()
            steps[variant]()
            t1 = time.thread_time() if args.threads == 1 else time.perf_counter()
            if round_ >= args.warmup:
                times[variant].append(t1 - t0)
    med = {v: common.median(t) for v, t in times.items()}
    return {
        "settings": {"blocks": blocks, "hidden": hidden, "kv": kv, "tokens": args.tokens, "threads": args.threads,
                     "steps": args.steps, "clock": "cpu" if args.threads == 1 else "wall",
                     "torch": torch.__version__},
        "median_step_s": med,
        "first_step_s": compile_s,
        "compiled_over_eager": {"plain": med["plain_compiled"] / med["plain"], "ours": med["ours_compiled"] / med["ours"]},
        "ours_over_plain": {"eager": med["ours"] / med["plain"], "compiled": med["ours_compiled"] / med["plain_compiled"]},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a 2-block toy (smoke test)")
    p.add_argument("--tokens", type=int, default=512, help="rows of the input (default 512 = 4 x 128)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    out = measure(args)
    for variant, seconds in out["median_step_s"].items():
        print(f"{variant:<15} step {1e3 * seconds:8.2f} ms   first step {out['first_step_s'][variant]:7.2f} s")
    print("compiled / eager:", {k: round(v, 3) for k, v in out["compiled_over_eager"].items()},
          "  ours / plain:", {k: round(v, 3) for k, v in out["ours_over_plain"].items()})
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
