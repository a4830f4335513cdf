"""Class probabilities of a linearised (GLM) predictive ``f ~ N(f_mu, f_var)``, shared by the Laplace methods.

laplace-torch computes ``f_mu`` and ``f_var = J Sigma J^T``; its own sampler takes a Cholesky factor of
``f_var``, which fails ("linalg.cholesky: ... not positive-definite") where a masked class has zero variance,
and draws from the global RNG, so a grid search over the prior precision could not reuse the same draws
for every value. This module does both from a clamped eigendecomposition and a caller's generator.
"""

from __future__ import annotations

import math
from importlib.util import find_spec
from typing import Optional

import torch
from torch import Tensor

__all__ = ["LINKS", "glm_probs", "require_laplace_torch"]

LINKS = ("probit", "mc")


def glm_probs(f_mu: Tensor, f_var: Tensor, link_approx: str, num_samples: int,
              generator: Optional[torch.Generator] = None) -> Tensor:
    """``(S, B, C)`` class probabilities of ``N(f_mu, f_var)`` (``f_mu`` ``(B, C)``, ``f_var`` ``(B, C, C)``).

    ``"probit"``: ``softmax(f_mu / sqrt(1 + pi/8 diag f_var))`` (MacKay, 1992; laplace-torch's formula), ``S = 1``.
    ``"mc"``: ``softmax(f_mu + R z)`` for ``num_samples`` standard normals ``z`` from ``generator``, ``R R^T = f_var``.
    """
    if link_approx not in LINKS:
        raise ValueError(f"unknown link_approx {link_approx!r}; choose one of {list(LINKS)}")
    f_mu, f_var = f_mu.detach().double(), f_var.detach().double()
    if link_approx == "probit":
        kappa = 1 / torch.sqrt(1.0 + math.pi / 8 * f_var.diagonal(dim1=1, dim2=2))
        return torch.softmax(kappa * f_mu, dim=-1)[None]
    values, vectors = torch.linalg.eigh(f_var)
    root = vectors * values.clamp_min(0).sqrt().unsqueeze(-2)
    z = torch.randn((num_samples, *f_mu.shape), generator=generator, dtype=torch.float64, device=f_mu.device)
    return torch.softmax(f_mu + torch.einsum("bij,sbj->sbi", root, z), dim=-1)


def require_laplace_torch(method: str) -> None:
    """An ImportError naming ``method`` and the extra to install when laplace-torch is missing (before any training)."""
    if find_spec("laplace") is None:
        raise ImportError(f"{method} needs laplace-torch: pip install 'pyro-blora[baselines]' (or laplace-torch)")
