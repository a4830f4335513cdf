"""Last-layer Laplace's curvature and linearised predictive, on laplace-torch.

The head computes class logits ``f(x) = W phi(x)`` with ``W`` (``C x H``) and ``phi(x)``
the head's input (a trailing 1 is appended when the head has a bias, so ``W`` then
holds the bias as its last column). :class:`HeadLaplace` hands laplace-torch
(``Laplace(..., "classification", subset_of_weights="all")``) exactly that
classifier, :class:`MaskedHead`: a bias-free ``nn.Linear`` over ``phi`` whose
task-masked classes are set to the task's masked logit. laplace-torch then fits the
generalised Gauss-Newton of the training NLL in ``W``,

.. math::

    \\mathrm{GGN} = \\sum_n J_n^\\top \\Lambda_n J_n, \\qquad \\Lambda_n = \\mathrm{diag}(p_n) - p_n p_n^\\top,

in Kronecker form (``"kron"``, K-FAC: ``G (x) A / N`` with ``G = sum_n Lambda_n``,
``A = sum_n phi_n phi_n^T``; Martens & Grosse, 2015) or diagonal form (``"diag"``),
and gives the GLM predictive ``f ~ N(W_MAP phi, J (GGN + tau I)^{-1} J^T)``. The
Jacobians do not depend on ``tau``: :meth:`HeadLaplace.functional_covariance` takes
them once, so a grid over ``tau`` costs one ``J Sigma(tau) J^T`` per value.

References: Daxberger et al., *Laplace Redux: Effortless Bayesian Deep Learning*
(NeurIPS 2021; laplace-torch); Ritter et al., *A Scalable Laplace Approximation for
Neural Networks* (ICLR 2018); Kristiadi et al., *Being Bayesian, Even Just a Bit,
Fixes Overconfidence in ReLU Networks* (ICML 2020).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from pyro_blora.baselines.laplace.glm import LINKS, glm_probs, require_laplace_torch
from pyro_blora.baselines.laplace.lora import kron_factors, set_kron_factors
from pyro_blora.tasks.scoring import MASKED_LOGIT

__all__ = ["STRUCTURES", "LINKS", "MaskedHead", "HeadLaplace", "check_prior_precision"]

STRUCTURES = ("kron", "diag")


class MaskedHead(nn.Module):
    """``f(x) = W phi`` for inputs ``[phi, keep]`` (``keep`` 1 for a class the task scores, 0 for a masked one)."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.linear.weight.copy_(weight.to(torch.float64))

    @property
    def num_features(self) -> int:
        return self.linear.in_features

    def forward(self, inputs: Tensor) -> Tensor:
        phi, keep = inputs[:, : self.num_features], inputs[:, self.num_features:]
        return self.linear(phi).masked_fill(keep < 0.5, MASKED_LOGIT)


def head_inputs(phi: Tensor, keep: Optional[Tensor], num_classes: int) -> Tensor:
    """``[phi, keep]`` rows (float64) for :class:`MaskedHead`; every class kept when ``keep`` is None."""
    phi = phi.to(torch.float64).cpu()
    keep = torch.ones(phi.shape[0], num_classes, dtype=torch.float64) if keep is None else keep.to(torch.float64).cpu()
    return torch.cat([phi, keep], dim=1)


def check_prior_precision(tau: float) -> None:
    """Raise a ValueError unless ``tau`` is a finite number > 0."""
    if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"the prior precision tau must be a finite number > 0, got {tau!r}")


class HeadLaplace:
    """laplace-torch's ``Laplace`` over a softmax head's weights ``W`` (``C x H``), ``"kron"`` or ``"diag"``.

    Args:
        weight: ``W_MAP`` (``C x H``; the bias as last column where the head has one).
        structure: ``"kron"`` or ``"diag"``.
    """

    def __init__(self, weight: Tensor, structure: str):
        if structure not in STRUCTURES:
            raise ValueError(f"unknown Laplace structure {structure!r}; choose one of {list(STRUCTURES)}")
        require_laplace_torch("last-layer Laplace")
        from laplace import Laplace

        self.structure = structure
        self.head = MaskedHead(weight)
        self.la = Laplace(self.head, "classification", subset_of_weights="all", hessian_structure=structure)

    @property
    def num_classes(self) -> int:
        return self.head.linear.out_features

    @property
    def num_features(self) -> int:
        return self.head.num_features

    def fit(self, phi: Tensor, keep: Optional[Tensor], labels: Tensor, batch_size: int = 256) -> None:
        """The GGN over the training set: head inputs ``phi`` ``(N, H)``, class mask or None, labels ``(N,)``."""
        if phi.dim() != 2 or phi.shape[1] != self.num_features:
            raise ValueError(f"phi must have shape (N, {self.num_features}), got {tuple(phi.shape)}")
        data = TensorDataset(head_inputs(phi, keep, self.num_classes), labels.long().cpu())
        self.la.fit(DataLoader(data, batch_size=batch_size))

    def jacobians(self, phi: Tensor, keep: Optional[Tensor]) -> Tensor:
        """``J(x)`` of the logits in ``W``, ``(N, C, C H)`` (zero rows for masked classes); independent of ``tau``."""
        js, _ = self.la.backend.jacobians(head_inputs(phi, keep, self.num_classes), enable_backprop=False)
        return js.detach()

    def functional_covariance(self, jacobians: Tensor, tau: float) -> Tensor:
        """``J (GGN + tau I)^{-1} J^T`` per example, ``(N, C, C)`` float64."""
        check_prior_precision(tau)
        self.la.prior_precision = float(tau)
        return self.la.functional_variance(jacobians).detach().double()

    def sample_probs(self, mean: Tensor, jacobians: Tensor, tau: float, link_approx: str, num_samples: int = 1,
                     generator: Optional[torch.Generator] = None) -> Tensor:
        """``(S, N, C)`` probabilities of ``f ~ N(mean, Sigma_f(x))`` (``mean``: the MAP logits, masking included)."""
        return glm_probs(mean.double().cpu(), self.functional_covariance(jacobians, tau), link_approx, num_samples,
                         generator)

    def ggn(self) -> Tensor:
        """The fitted GGN as a dense ``(C H, C H)`` matrix, rows of ``W`` stacked (small heads; tests, inspection)."""
        if self.structure == "kron":
            return self.la.H_facs.to_matrix().double()
        return torch.diag(self.la.H.double())

    def state(self) -> dict[str, Tensor]:
        """Tensors to save (safetensors): the un-decomposed factors (``kron``) or the diagonal, and the data size."""
        out = {"n_data": torch.tensor(int(self.la.n_data)), "loss": torch.tensor(float(self.la.loss))}
        if self.structure == "kron":
            return {**out, **{f"kron.{k}": v for k, v in kron_factors(self.la).items()}}
        return {**out, "diag": self.la.H.detach().cpu().contiguous()}

    @classmethod
    def from_state(cls, weight: Tensor, structure: str, state: dict[str, Tensor]) -> "HeadLaplace":
        """Rebuild around ``W_MAP`` from :meth:`state`; a clear error when the tensors do not fit ``structure``."""
        out = cls(weight, structure)
        want = {"kron": {"kron.0.0", "kron.0.1"}, "diag": {"diag"}}[structure] | {"n_data", "loss"}
        if set(state) != want:
            raise ValueError(f"a {structure!r} Laplace posterior needs tensors {sorted(want)}, got {sorted(state)}")
        la, n_data, loss = out.la, int(state["n_data"]), float(state["loss"])
        if structure == "kron":
            factors = {k[len("kron."):]: v.double() for k, v in state.items() if k.startswith("kron.")}
            set_kron_factors(la, factors, n_data, out.num_classes, loss)
        else:
            la.H, la.n_data, la.n_outputs, la.loss = state["diag"].double(), n_data, out.num_classes, loss
            setattr(la.model, "output_size", out.num_classes)
        return out
