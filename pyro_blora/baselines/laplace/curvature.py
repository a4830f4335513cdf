"""Curvature and linearised predictive of a last-layer Laplace posterior over a softmax head.

The head computes class logits ``f(x) = W phi(x)`` with ``W`` (``C x H``) and
``phi(x)`` the head's input (a trailing 1 is appended when the head has a
bias, so ``W`` then holds the bias as its last column). With ``vec`` stacking
the rows of ``W``, the Jacobian of ``f`` is ``J(x) = I_C (x) phi(x)^T`` and the
generalised Gauss-Newton (GGN) of the training NLL is

.. math::

    \\mathrm{GGN} = \\sum_n \\Lambda_n \\otimes \\phi_n \\phi_n^\\top,
    \\qquad \\Lambda_n = \\mathrm{diag}(p_n) - p_n p_n^\\top,

the Hessian of the cross-entropy in the logits (Martens, 2020). Two structures:

* ``"diag"``: the exact diagonal, ``d_{ch} = \\sum_n \\Lambda_{n,cc} \\phi_{nh}^2``;
* ``"kron"`` (KFAC): ``GGN ~ G (x) A / N`` with ``G = sum_n Lambda_n`` and
  ``A = sum_n phi_n phi_n^T`` (the expectation of a Kronecker product replaced by
  the product of expectations, Martens & Grosse, 2015; exact for one example).

The posterior precision is ``P = GGN + tau I`` (isotropic Gaussian prior of
precision ``tau``). For KFAC, with ``G / N = Q_G L_G Q_G^T`` and ``A = Q_A L_A
Q_A^T``, ``P = (Q_G (x) Q_A)(L_G (x) L_A + tau)(Q_G (x) Q_A)^T`` (as laplace-torch's
``KronDecomposed``), so the functional covariance of the linearised (GLM)
predictive ``f ~ N(W_MAP phi, J P^{-1} J^T)`` is, with ``v = Q_A^T phi``,

.. math::

    \\Sigma_f(x) = Q_G\\, \\mathrm{diag}_g\\Big(\\sum_a \\frac{v_a^2}{\\lambda_g \\lambda_a + \\tau}\\Big) Q_G^\\top,

``O(C H)`` per example; for ``"diag"``, ``Sigma_f(x) = diag_c(sum_h phi_h^2 / (d_ch + tau))``.

References: Daxberger et al., *Laplace Redux: Effortless Bayesian Deep Learning*
(NeurIPS 2021); Ritter et al., *A Scalable Laplace Approximation for Neural
Networks* (ICLR 2018); Yang et al., *Bayesian Low-rank Adaptation for Large
Language Models* (ICLR 2024).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["STRUCTURES", "LINKS", "HeadCurvature", "softmax_hessian", "predictive_sample_probs", "check_prior_precision"]

STRUCTURES = ("kron", "diag")
LINKS = ("mc", "probit")


def softmax_hessian(logits: Tensor) -> Tensor:
    """``diag(p) - p p^T`` per row of ``logits`` (``(N, C)`` -> ``(N, C, C)``): the Hessian of
    ``-log softmax(f)_y`` in ``f``, which does not depend on the label ``y``."""
    p = torch.softmax(logits.to(torch.float64), dim=-1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


class HeadCurvature:
    """The GGN of a softmax head's training NLL in its weights, in ``"kron"`` or ``"diag"`` form.

    Accumulate with :meth:`update` over the training set, then ask for
    :meth:`functional_covariance` / :meth:`functional_root` at any prior
    precision ``tau``; the eigendecompositions are computed once and reused
    across ``tau`` (the grid search costs no further eigendecompositions).
    All algebra runs in float64.

    Args:
        structure: ``"kron"`` or ``"diag"``.
        num_classes: ``C``.
        num_features: ``H`` (including the bias's 1 when there is one).
    """

    def __init__(self, structure: str, num_classes: int, num_features: int):
        if structure not in STRUCTURES:
            raise ValueError(f"unknown Laplace structure {structure!r}; choose one of {list(STRUCTURES)}")
        self.structure = structure
        self.num_classes = int(num_classes)
        self.num_features = int(num_features)
        self.num_data = 0
        zeros = dict(dtype=torch.float64)
        if structure == "kron":
            self.factors = {
                "A": torch.zeros(num_features, num_features, **zeros),
                "G": torch.zeros(num_classes, num_classes, **zeros),
            }
        else:
            self.factors = {"diag": torch.zeros(num_classes, num_features, **zeros)}
        self._eig: Optional[tuple[Tensor, Tensor, Tensor, Tensor]] = None

    def update(self, phi: Tensor, logits: Tensor) -> None:
        """Add the GGN of ``N`` examples: head inputs ``phi`` ``(N, H)`` and MAP logits ``(N, C)``."""
        if phi.dim() != 2 or phi.shape[1] != self.num_features:
            raise ValueError(f"phi must have shape (N, {self.num_features}), got {tuple(phi.shape)}")
        if logits.shape != (phi.shape[0], self.num_classes):
            raise ValueError(f"logits must have shape ({phi.shape[0]}, {self.num_classes}), got {tuple(logits.shape)}")
        phi = phi.to(torch.float64).cpu()
        lam = softmax_hessian(logits.cpu())
        if self.structure == "kron":
            self.factors["A"] += phi.T @ phi
            self.factors["G"] += lam.sum(0)
        else:
            self.factors["diag"] += torch.diagonal(lam, dim1=-2, dim2=-1).T @ phi.square()
        self.num_data += phi.shape[0]
        self._eig = None

    def _eigen(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(L_G, Q_G, L_A, Q_A)`` of ``G / N`` and ``A``, eigenvalues clipped at 0 (round-off)."""
        if self._eig is None:
            if self.num_data < 1:
                raise RuntimeError("the curvature holds no data: call update() with the training set first")
            g_vals, g_vecs = torch.linalg.eigh(self.factors["G"] / self.num_data)
            a_vals, a_vecs = torch.linalg.eigh(self.factors["A"])
            self._eig = (g_vals.clamp(min=0.0), g_vecs, a_vals.clamp(min=0.0), a_vecs)
        return self._eig

    def ggn(self) -> Tensor:
        """The (approximate) GGN as a dense ``(C H, C H)`` matrix, rows of ``W`` stacked (small heads only)."""
        if self.structure == "kron":
            return torch.kron(self.factors["G"] / max(self.num_data, 1), self.factors["A"])
        return torch.diag(self.factors["diag"].reshape(-1))

    def precision(self, tau: float) -> Tensor:
        """Dense posterior precision ``GGN + tau I`` (small heads only; for tests and inspection)."""
        ggn = self.ggn()
        return ggn + tau * torch.eye(ggn.shape[0], dtype=ggn.dtype)

    def _variances(self, phi: Tensor, tau: float) -> tuple[Tensor, Optional[Tensor]]:
        """``(D, Q)`` with ``Sigma_f = Q diag(D) Q^T`` (kron) or ``diag(D)`` (diag, ``Q`` None); ``D`` is ``(N, C)``."""
        check_prior_precision(tau)
        phi = phi.to(torch.float64).cpu()
        if self.structure == "kron":
            g_vals, g_vecs, a_vals, a_vecs = self._eigen()
            v2 = (phi @ a_vecs).square()  # (N, H)
            inv = 1.0 / (a_vals.unsqueeze(1) * g_vals.unsqueeze(0) + tau)  # (H, C)
            return v2 @ inv, g_vecs
        if self.num_data < 1:
            raise RuntimeError("the curvature holds no data: call update() with the training set first")
        return phi.square() @ (1.0 / (self.factors["diag"] + tau)).T, None

    def functional_covariance(self, phi: Tensor, tau: float) -> Tensor:
        """``Sigma_f(x) = J P^{-1} J^T`` for each row of ``phi``: ``(N, C, C)``, float64."""
        var, vecs = self._variances(phi, tau)
        if vecs is None:
            return torch.diag_embed(var)
        return (vecs * var.unsqueeze(1)) @ vecs.T

    def functional_root(self, phi: Tensor, tau: float) -> Tensor:
        """``R(x)`` with ``R R^T = Sigma_f(x)``: ``(N, C, C)``, float64 (``f = mean + R z``)."""
        var, vecs = self._variances(phi, tau)
        if vecs is None:
            return torch.diag_embed(var.sqrt())
        return vecs * var.sqrt().unsqueeze(1)

    def functional_variance(self, phi: Tensor, tau: float) -> Tensor:
        """The diagonal of ``Sigma_f(x)``: ``(N, C)``, float64."""
        var, vecs = self._variances(phi, tau)
        return var if vecs is None else var @ vecs.square().T

    def state(self) -> dict[str, Tensor]:
        """Tensors to save (safetensors): the factors and ``num_data``."""
        return {**self.factors, "num_data": torch.tensor(self.num_data, dtype=torch.int64)}

    @classmethod
    def from_state(cls, structure: str, state: dict[str, Tensor]) -> "HeadCurvature":
        """Rebuild from :meth:`state`; a clear error when the tensors do not fit ``structure``."""
        keys = {"kron": {"A", "G", "num_data"}, "diag": {"diag", "num_data"}}.get(structure)
        if keys is None:
            raise ValueError(f"unknown Laplace structure {structure!r}; choose one of {list(STRUCTURES)}")
        if set(state) != keys:
            raise ValueError(f"a {structure!r} Laplace posterior needs tensors {sorted(keys)}, got {sorted(state)}")
        if structure == "kron":
            num_classes, num_features = state["G"].shape[0], state["A"].shape[0]
        else:
            num_classes, num_features = state["diag"].shape
        out = cls(structure, num_classes, num_features)
        out.factors = {k: v.to(torch.float64) for k, v in state.items() if k != "num_data"}
        out.num_data = int(state["num_data"])
        return out


def check_prior_precision(tau: float) -> None:
    """Raise a ValueError unless ``tau`` is a finite number > 0."""
    if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"the prior precision tau must be a finite number > 0, got {tau!r}")


def predictive_sample_probs(
    mean: Tensor,
    phi: Tensor,
    curvature: HeadCurvature,
    tau: float,
    link_approx: str,
    noise: Optional[Tensor] = None,
    keep: Optional[Tensor] = None,
) -> Tensor:
    """Class probabilities of the linearised predictive ``f ~ N(mean, Sigma_f(x))``.

    ``"mc"``: ``softmax(mean + R(x) z)`` for each ``z`` of ``noise`` (``(S, N, C)``
    standard normals), ``(S, N, C)``. ``"probit"``: the multiclass probit
    approximation ``softmax(mean / sqrt(1 + pi/8 diag Sigma_f))`` (MacKay, 1992; as
    laplace-torch), ``(1, N, C)``. Entries where ``keep`` (``(N, C)`` bool) is False
    keep their ``mean`` (the task's masked-out classes stay at zero probability).
    """
    if link_approx not in LINKS:
        raise ValueError(f"unknown link_approx {link_approx!r}; choose one of {list(LINKS)}")
    mean64 = mean.to(torch.float64).cpu()
    if link_approx == "probit":
        kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * curvature.functional_variance(phi, tau))
        logits = (mean64 * kappa).unsqueeze(0)
    else:
        if noise is None:
            raise ValueError("link_approx='mc' needs noise: an (S, N, C) tensor of standard normals")
        root = curvature.functional_root(phi, tau)
        logits = mean64 + torch.einsum("ncg,sng->snc", root, noise.to(torch.float64).cpu())
    if keep is not None:
        logits = torch.where(keep.cpu().bool(), logits, mean64)
    return torch.softmax(logits, dim=-1).to(torch.float32)
