"""What Bayesian-LoRA adds over plain LoRA at 7B, 13B and 30B scale: parameters and fp32 bytes.

Each model is instantiated on the ``meta`` device (no memory, no weights) from its
``LlamaConfig``; adapters go on ``q_proj``, ``v_proj`` and ``lm_head`` with r = 8,
Bayesian on ``q_proj`` and ``lm_head`` (the paper's setting) through
``pyro_blora.inject_adapters``, with a ``BayesianLoRAGuide(factors, "flow")``
(the default row-wise MAF). Counted:

* plain LoRA parameters: ``r (d_in + d_out)`` per targeted layer (what peft trains);
* Bayesian-LoRA parameters: every trainable tensor of the adapted network (plain
  factors of ``v_proj``; inducing inputs ``Z`` and diagonals ``D`` of the Bayesian
  factors) plus the guide's (flow, base ``loc``/``sigma``, ``lambda``);
* bytes: fp32 adapters plus AdamW's two moments, 12 bytes per parameter (gradients
  add 4 more per parameter while a step runs), for plain LoRA and for the extra.

    python benchmarks/scale.py --output runs/bench/scale   # writes scale.json and scale.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# LlamaConfig sizes. "30B-class" is LLaMA-1 30B (32.5B parameters).
CONFIGS: dict[str, dict[str, Any]] = {
    "Llama-2-7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "Llama-2-13B": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
    "LLaMA-30B": dict(vocab_size=32000, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                      num_attention_heads=52, num_key_value_heads=52),
    # for smoke tests: seconds to build even off the meta device
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}
DEFAULT_MODELS = ["Llama-2-7B", "Llama-2-13B", "LLaMA-30B"]
TARGETS = ["q_proj", "v_proj", "lm_head"]
BAYESIAN = ["q_proj", "lm_head"]
RANK = 8
BYTES_ADAM = 12  # fp32 parameter + 2 fp32 AdamW moments
BYTES_WITH_GRAD = 16


def measure(name: str, guide: str = "flow", rank: int = RANK) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import pyro_blora
    from pyro_blora.guides import BayesianLoRAGuide
    from pyro_blora.inject import matches

    t0 = time.perf_counter()
    config = LlamaConfig(tie_word_embeddings=False, **CONFIGS[name])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
        base_params = sum(p.numel() for p in model.parameters())
        shapes = {
            n: (m.in_features, m.out_features)
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and matches(n, TARGETS)
        }
        plain = sum(rank * (d_in + d_out) for d_in, d_out in shapes.values())
        plain_bayesian_part = sum(rank * (d_in + d_out) for n, (d_in, d_out) in shapes.items() if matches(n, BAYESIAN))
        blora_config = pyro_blora.BLoRAConfig(target_modules=TARGETS, bayesian_modules=BAYESIAN, r=rank)
        layers = pyro_blora.inject_adapters(model, blora_config)
        factors = [f for layer in layers for f in layer.factors]
    # outside the meta context: Pyro's AutoRegressiveNN calls .item() while building its masks;
    # the guide still lands on the factors' (meta) device
    bayes_guide = BayesianLoRAGuide(factors, guide, blora_config.lambda_init, blora_config.lambda_max)
    adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    prior_params = sum(p.numel() for f in factors for p in f.parameters() if p.requires_grad)
    point_params = adapter_params - prior_params
    guide_params = sum(p.numel() for p in bayes_guide.parameters() if p.requires_grad)
    total = adapter_params + guide_params
    extra = total - plain
    seconds = time.perf_counter() - t0
    return {
        "model": name,
        "config": CONFIGS[name],
        "base_params": base_params,
        "targeted_layers": len(shapes),
        "bayesian_layers": sum(1 for layer in layers if layer.bayesian),
        "bayesian_factors": len(factors),
        "guide": guide,
        "rank": rank,
        "plain_lora_params": plain,
        "plain_lora_params_of_bayesian_layers": plain_bayesian_part,
        "blora_params": total,
        "blora_point_factor_params": point_params,
        "blora_prior_params": prior_params,
        "blora_guide_params": guide_params,
        "extra_params": extra,
        "extra_params_ratio": extra / plain,
        "blora_to_plain_ratio": total / plain,
        "plain_lora_bytes_adamw": plain * BYTES_ADAM,
        "extra_bytes_adamw": extra * BYTES_ADAM,
        "plain_lora_bytes_adamw_grad": plain * BYTES_WITH_GRAD,
        "extra_bytes_adamw_grad": extra * BYTES_WITH_GRAD,
        "base_bytes_bf16": base_params * 2,
        "extra_bytes_adamw_to_base_bf16": extra * BYTES_ADAM / (base_params * 2),
        "seconds": seconds,
    }


def _millions(n: float) -> str:
    return f"{n / 1e6:,.2f} M"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"LoRA r = {rows[0]['rank']} on {', '.join(TARGETS)}; Bayesian ({rows[0]['guide']} guide) on "
        f"{', '.join(BAYESIAN)}. Bytes: fp32 adapters + 2 AdamW moments (12 B/parameter).",
        "",
        "| model | base params | plain LoRA params | Bayesian-LoRA params | extra params | extra / LoRA "
        "| LoRA + AdamW | extra + AdamW | extra / base bf16 weights |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['base_params'] / 1e9:.2f} B | {_millions(r['plain_lora_params'])} "
            f"| {_millions(r['blora_params'])} | {_millions(r['extra_params'])} | {100 * r['extra_params_ratio']:.1f} % "
            f"| {_mib(r['plain_lora_bytes_adamw'])} | {_mib(r['extra_bytes_adamw'])} "
            f"| {100 * r['extra_bytes_adamw_to_base_bf16']:.3f} % |"
        )
    lines += [
        "",
        "Where the Bayesian-LoRA parameters sit:",
        "",
        "| model | plain factors (v_proj) | prior Z, D (Bayesian factors) | guide | LoRA params these Bayesian factors replace |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {_millions(r['blora_point_factor_params'])} | {_millions(r['blora_prior_params'])} "
            f"| {_millions(r['blora_guide_params'])} | {_millions(r['plain_lora_params_of_bayesian_layers'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(CONFIGS))
    p.add_argument("--guide", default="flow", help="guide family of the Bayesian factors (default flow)")
    p.add_argument("--rank", type=int, default=RANK)
    p.add_argument("--output", default=None, help="output stem: writes STEM.json and STEM.md (a .json/.md suffix is dropped)")
    args = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = [measure(name, args.guide, args.rank) for name in args.models]
    table = markdown(rows)
    print(table)
    if args.output:
        stem = Path(args.output)
        if stem.suffix in (".json", ".md"):
            stem = stem.with_suffix("")
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps({"rows": rows, "targets": TARGETS, "bayesian": BAYESIAN}, indent=2))
        stem.with_suffix(".md").write_text(table)
        print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
