"""Inference with one fixed draw merged into the frozen weight: ``W0 + (alpha / r) B A`` in one GEMM.

A LoRA forward computes ``W0 x + s B (A x)``: the base GEMM plus two thin GEMMs of rank ``r`` and two
passes over the output (scale, add). With the draw fixed and no gradient wanted, the same map is
``(W0 + s B A) x`` (peft's ``merge_adapter``, done per posterior draw here): one ``addmm`` builds the
merged weight, then one GEMM. It pays when the batch holds more tokens than the merge costs, in
multiply-adds::

    tokens * r * (d_in + d_out)  >=  d_out * r * d_in,   i.e.   tokens >= d_in d_out / (d_in + d_out)

(288 tokens for a 576 x 576 projection, 570 for a 576 -> 49,152 head). On a CPU the saving is the
adapter path of every adapted layer, which is what makes ``predict(num_samples=S)`` cost less than
``S`` unmerged LoRA forwards (``docs/performance.md``).

The merge is exact in real arithmetic; in float32 the two orders of summation differ by rounding
(relative 1e-6). It is skipped wherever it would change the result more than that or not pay:
half-precision or quantised bases (``W0 + s B A`` rounded to bf16 loses most of the update),
gradients enabled (training, Laplace's Jacobians), active dropout (MC dropout), stacked draws, and
layers that compute ``A x`` in their own way (BLoB's Flipout).

References: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022, sec. 4.1
(merging for inference); peft ``LoraLayer.merge``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

__all__ = ["merged_weight", "merge_pays", "can_merge_into", "adapter_path"]


def merge_pays(tokens: int, in_features: int, out_features: int) -> bool:
    """Whether merging one draw into ``W0`` costs fewer multiply-adds than the adapter path on ``tokens`` rows."""
    return tokens * (in_features + out_features) >= in_features * out_features


def can_merge_into(base: nn.Module, adapter_dtype: torch.dtype) -> bool:
    """A plain ``nn.Linear`` whose weight has the adapter's (full) precision: the merge keeps the update exact."""
    return type(base) is nn.Linear and base.weight.dtype == adapter_dtype and adapter_dtype in (torch.float32, torch.float64)


def merged_weight(base_weight: Tensor, a: Tensor, b: Tensor, scale: Tensor | float) -> Tensor:
    """``W0 + scale B A`` (``d_out x d_in``) by one ``addmm``; ``scale`` is the layer's ``update_scale``.

    Built afresh for every forward and freed after it: a cache would hit only for repeated forwards with
    one draw, and would hold a copy of every adapted weight (4 GiB for a 7B float32 model's q/v) after
    prediction ends.
    """
    if isinstance(scale, Tensor):
        return torch.addmm(base_weight, b * scale.to(b.dtype), a)
    return torch.addmm(base_weight, b, a, alpha=scale)


@contextlib.contextmanager
def adapter_path(layers: Iterable[Any]) -> Iterator[None]:
    """Run ``layers`` (:class:`~pyro_blora.models.BayesianLoRALinear`) unmerged: ``W0 x`` and the update apart.

    For code that watches the base layer's own output (forward hooks on ``layer.base``, as
    :mod:`pyro_blora.diagnostics` does), which a merged forward never calls.
    """
    layers = list(layers)
    saved = [layer.__dict__.get("merge_for_inference") for layer in layers]
    for layer in layers:
        layer.merge_for_inference = False
    try:
        yield
    finally:
        for layer, value in zip(layers, saved):
            if value is None:
                del layer.merge_for_inference  # back to the class's setting
            else:
                layer.merge_for_inference = value
