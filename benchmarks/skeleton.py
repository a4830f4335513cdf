"""Networks that are only their adapted layers: what LoRA and Bayesian-LoRA add, without the frozen model.

The cost of a training step is the frozen model's forward and backward, the same
for every method, plus what each method adds per adapted layer. On a busy machine
a real model's step time varies by several per cent from step to step, more than
the difference we want to see. :class:`AdapterSkeleton` keeps a model's adapted
layers (same names, shapes and count: ``q_proj`` and ``v_proj`` of every block)
and drops the rest: a step of it costs about what the adapters cost, so the
difference between two methods on it (``speed.py``'s "adapter overhead") is
measured precisely and adds to the real model's step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

import common

__all__ = ["AdapterSkeleton", "PlainLoRALinear", "plain_lora", "skeleton_shape"]


def skeleton_shape(model: str) -> tuple[int, int, int]:
    """``(blocks, hidden, kv width)`` of a model of ``common.py`` (``smollm2``: SmolLM2-135M's)."""
    config = common.RANDOM_MODELS["smollm2_random" if model == "smollm2" else model]
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    return config["num_hidden_layers"], hidden, hidden // heads * kv_heads


class _Block(nn.Module):
    def __init__(self, hidden: int, kv: int):
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, kv, bias=False)


class AdapterSkeleton(nn.Module):
    """``blocks`` pairs of ``q_proj`` (``hidden x hidden``) and ``v_proj`` (``hidden -> kv``), inputs ``(B, hidden)``.

    Class logits are the sum over blocks of the first ``num_classes`` outputs of
    each projection of the same input: every adapter is on the loss's path.
    """

    def __init__(self, blocks: int, hidden: int, kv: int, num_classes: int = 3):
        super().__init__()
        self.layers = nn.ModuleList([_Block(hidden, kv) for _ in range(blocks)])
        self.num_classes = num_classes

    @classmethod
    def like(cls, model: str, seed: int = 0) -> "AdapterSkeleton":
        torch.manual_seed(seed)
        return cls(*skeleton_shape(model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.num_classes
        out = x.new_zeros(x.shape[0], c)
        for block in self.layers:
            out = out + block.q_proj(x)[:, :c] + block.v_proj(x)[:, :c]
        return out


class PlainLoRALinear(nn.Module):
    """peft's LoRA, by hand: ``base(x) + scaling * B(A(dropout(x)))`` with the benchmarks' rank, alpha, dropout."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        base.requires_grad_(False)
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(common.RANK, base.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, common.RANK))
        self.dropout = nn.Dropout(common.DROPOUT)
        self.scaling = common.ALPHA / common.RANK

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling


def plain_lora(net: nn.Module, targets: Any = tuple(common.TARGET_MODULES)) -> nn.Module:
    """Wrap every ``nn.Linear`` of ``net`` whose name ends in one of ``targets`` (all if None) in :class:`PlainLoRALinear`."""
    for _, module in list(net.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and (targets is None or child_name in targets):
                setattr(module, child_name, PlainLoRALinear(child))
    return net
