"""Laplace-LoRA on laplace-torch: the ``fit(..., guide="laplace_lora")`` baseline.

Yang et al. (ICLR 2024, "Bayesian Low-rank Adaptation for Large Language Models")
put a Laplace posterior over all LoRA weights ``theta = {A_l, B_l}`` of a MAP fit,

.. math::

    q(\\theta) = \\mathcal{N}\\big(\\theta_{MAP},\\ (\\mathrm{GGN}_{KFAC} + \\tau I)^{-1}\\big),

and predict with the linearised (GLM) predictive
``f(x) ~ N(f_MAP(x), J(x) Sigma J(x)^T)`` through the probit approximation or
Monte Carlo samples of ``f``. ``tau`` is chosen by maximising the Laplace
marginal likelihood (``prior_method="marglik"``) or by validation NLL on a grid
(``"val_nll"``). The curvature, the Jacobians and the marginal likelihood come
from laplace-torch (Daxberger et al., NeurIPS 2021, "Laplace Redux"):
``Laplace(wrapper, "classification", subset_of_weights="all", hessian_structure="kron")``.

K-FAC needs each LoRA factor as an ``nn.Linear``: :class:`LoRAClassifier` holds
``A_l`` (``Linear(d_in, r)``) and ``B_l`` (``Linear(r, d_out)``) of every Bayesian
layer, zeroes the layer's own update and adds ``(alpha / r) B_l A_l x`` by a
forward hook, so the network computes the MAP function with only these weights
requiring grad. Layers outside ``modules`` stay at MAP. Needs the
``baselines`` extra (``pip install pyro-blora[baselines]``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from pyro_blora.baselines.laplace.glm import require_laplace_torch
from pyro_blora.inject import matches
from pyro_blora.result import FitResult
from pyro_blora.tasks.base import Task

__all__ = ["LoRAClassifier", "build_laplace", "check_kfac_size", "kfac_bytes", "kron_factors", "set_kron_factors"]

Data = Union[Dataset, DataLoader, Sequence[Any]]


class LoRAPath(nn.Module):
    """``x -> scaling * B (A x)`` with ``A``, ``B`` as ``nn.Linear`` (what K-FAC backends handle)."""

    def __init__(self, a: Tensor, b: Tensor, scaling: float):
        super().__init__()
        self.lora_A = nn.Linear(a.shape[1], a.shape[0], bias=False, device=a.device, dtype=a.dtype)
        self.lora_B = nn.Linear(b.shape[1], b.shape[0], bias=False, device=b.device, dtype=b.dtype)
        with torch.no_grad():
            self.lora_A.weight.copy_(a)
            self.lora_B.weight.copy_(b)
        self.scaling = float(scaling)

    def forward(self, x: Tensor) -> Tensor:
        return self.scaling * self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype)))


class LoRAClassifier(nn.Module):
    """``batch -> task.class_logits(net, batch)`` with the MAP LoRA weights as this module's only parameters.

    The network is kept outside the module tree (a plain attribute), so
    ``parameters()`` are exactly the LoRA factors of the chosen layers (``modules``,
    matched like ``target_modules``; None: every adapted layer, plain or Bayesian);
    the base model never enters laplace-torch's Jacobians or curvature, and the
    layers left out stay at MAP.
    """

    def __init__(self, map_result: FitResult, modules: Optional[Sequence[str]] = None):
        super().__init__()
        object.__setattr__(self, "_map", map_result)
        map_result.use_posterior_mean()
        layers = [layer for layer in map_result.model.layers if modules is None or matches(layer.layer_name, modules)]
        if not layers:
            names = [layer.layer_name for layer in map_result.model.layers]
            raise ValueError(f"Laplace-LoRA modules {list(modules or [])} match none of the fit's adapted layers {names}")
        object.__setattr__(self, "_layers", layers)
        self.paths = nn.ModuleList(LoRAPath(*(t.detach() for t in layer.adapter_weights()), float(layer.update_scale)) for layer in layers)

    @property
    def task(self) -> Task:
        return self._map.task

    @contextlib.contextmanager
    def _paths_active(self) -> Iterator[None]:
        """Zero each layer's own update and add this module's path by a forward hook; restore the MAP after."""
        handles = []
        try:
            for layer, path in zip(self._layers, self.paths):
                a, b = layer.adapter_weights()
                layer.set_adapter_weights(torch.zeros_like(a), torch.zeros_like(b))
                handles.append(layer.register_forward_hook(
                    lambda module, args, out, path=path: out + path(module.dropout(args[0])).to(out.dtype)))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._map.use_posterior_mean()

    def forward(self, batch: Any) -> Tensor:
        with self._paths_active():
            return self.task.class_logits(self._map.net, batch).float()


def build_laplace(wrapper: LoRAClassifier) -> Any:
    """``Laplace(wrapper, "classification", subset_of_weights="all", hessian_structure="kron")``."""
    require_laplace_torch("Laplace-LoRA")
    from laplace import Laplace

    for param in wrapper.parameters():
        param.requires_grad_(True)
    # laplace-torch reads the batch size (and device) off ``batch[dict_key_x]``: cached batches carry
    # ``inputs_embeds`` instead of ``input_ids``, and every task's batches carry an ``attention_mask``
    return Laplace(wrapper, "classification", subset_of_weights="all", hessian_structure="kron",
                   dict_key_x="attention_mask")


def kron_factors(la: Any) -> dict[str, Tensor]:
    """The un-decomposed K-FAC factors of a fitted ``KronLaplace``, keyed ``"{block}.{factor}"``."""
    out = {}
    for i, block in enumerate(la.H_facs.kfacs):
        for j, factor in enumerate(block if isinstance(block, (list, tuple)) else [block]):
            out[f"{i}.{j}"] = factor.detach().cpu().contiguous()
    return out


def set_kron_factors(la: Any, factors: dict[str, Tensor], n_data: int, n_outputs: int, loss: float) -> None:
    """Put saved K-FAC factors (:func:`kron_factors`) into an unfitted ``KronLaplace``, as its ``fit`` would."""
    from laplace.utils.matrix import Kron

    blocks: dict[int, dict[int, Tensor]] = {}
    for key, value in factors.items():
        i, j = (int(part) for part in key.split("."))
        blocks.setdefault(i, {})[j] = value.to(la._device)
    kfacs = [[blocks[i][j] for j in sorted(blocks[i])] for i in sorted(blocks)]
    if len(kfacs) != len(la.params):
        raise ValueError(f"the saved K-FAC has {len(kfacs)} blocks but the LoRA wrapper has {len(la.params)} weights")
    la.H_facs = Kron(kfacs)
    la.H = la.H_facs.decompose(damping=la.damping)
    la.n_data, la.n_outputs, la.loss = int(n_data), int(n_outputs), float(loss)
    setattr(la.model, "output_size", int(n_outputs))


def kfac_bytes(la: Any) -> int:
    """Bytes the K-FAC factors of ``la`` hold (the curvature's memory; eigendecompositions double it)."""
    return sum(t.numel() * t.element_size() for t in kron_factors(la).values())


def check_kfac_size(wrapper: LoRAClassifier, max_gib: float) -> int:
    """Bytes the K-FAC factors will take (``d_in^2 + r^2`` for ``A``, ``r^2 + d_out^2`` for ``B``, per layer);
    an error naming the largest layer when they exceed ``max_gib`` (an ``lm_head`` over a vocabulary, say)."""
    sizes = {}
    for layer, path in zip(wrapper._layers, wrapper.paths):
        (r, d_in), d_out = path.lora_A.weight.shape, path.lora_B.weight.shape[0]
        sizes[layer.layer_name] = (d_in ** 2 + 2 * r ** 2 + d_out ** 2) * path.lora_A.weight.element_size()
    total = sum(sizes.values())
    if total > max_gib * 2 ** 30:
        worst = max(sizes, key=sizes.__getitem__)
        raise ValueError(
            f"the K-FAC factors would take {total / 2 ** 30:.1f} GiB (> max_kfac_gib = {max_gib}), "
            f"{sizes[worst] / 2 ** 30:.1f} GiB of it for {worst}; leave such layers out of target_modules or raise the limit"
        )
    return total
