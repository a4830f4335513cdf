"""Checks on bitsandbytes-quantized base layers, made before any adapter is injected.

bitsandbytes (0.50.2 tested) runs 4-bit layers on an AVX-512 BF16 CPU by repacking the
weight for its AVX-512 BF16 kernel the first time the layer runs in inference
mode. That repacking needs ``out_features`` divisible by 32 and ``in_features``
divisible by the quantization blocksize (64 by default); smaller or odd layers
fail deep inside bitsandbytes with a reshape error (``shape '[32, 0]' is
invalid``), and only after training has run. The check here refuses them up front.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional

from torch import nn

__all__ = ["CPU_4BIT_BLOCK_N", "check_quantized_layers", "quantized_layer_problem"]

# bitsandbytes' ``_convert_weight_packed_for_cpu`` packs rows in blocks of 32.
CPU_4BIT_BLOCK_N = 32


def quantized_layer_problem(name: str, module: nn.Module) -> Optional[str]:
    """Why ``module`` (a target named ``name``) cannot run on the CPU, or None when it can or is not 4-bit."""
    # Only look where bitsandbytes is already imported: a model cannot hold its layers otherwise,
    # and importing it here would slow every injection down.
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or not isinstance(module, bnb.nn.Linear4bit):
        return None
    weight = module.weight
    if weight.device.type != "cpu":
        return None  # the constraint is the CPU kernel's; CUDA/XPU kernels take any shape
    state = getattr(weight, "quant_state", None)
    blocksize = int(getattr(state, "blocksize", None) or getattr(weight, "blocksize", 64))
    in_features, out_features = int(module.in_features), int(module.out_features)
    if out_features % CPU_4BIT_BLOCK_N == 0 and in_features % blocksize == 0:
        return None
    return (
        f"quantized layer {name!r} (bitsandbytes Linear4bit, in_features={in_features}, "
        f"out_features={out_features}, blocksize={blocksize}) cannot run on the CPU: bitsandbytes needs "
        f"out_features divisible by {CPU_4BIT_BLOCK_N} and in_features divisible by the blocksize {blocksize}"
    )


def check_quantized_layers(model: nn.Module, names: Iterable[str]) -> None:
    """Raise a one-line ``ValueError`` for the first target in ``names`` whose quantized base is unsupported."""
    for name in names:
        problem = quantized_layer_problem(name, model.get_submodule(name))
        if problem is not None:
            raise ValueError(problem)
