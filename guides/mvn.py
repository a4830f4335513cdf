"""``"mvn"``: a correlated Gaussian ``q(U_w) = N(mu, C)``, full or low rank.

Full rank: ``C = L L^T`` with a learnable lower-triangular ``L`` whose diagonal is
positive and bounded (``scale_max * sigmoid``), as Pyro's ``AutoMultivariateNormal``.
Low rank (``rank=k``): ``C = W W^T + diag(d^2)``, as ``AutoLowRankMultivariateNormal``.
Both have an analytic KL to the Gaussian prior.
"""

from __future__ import annotations

from typing import Optional

import torch
from pyro.distributions import LowRankMultivariateNormal, MultivariateNormal
from torch import Tensor, nn
from torch.distributions import Distribution

from .base import InducingGuide, InducingSite, bounded_param, bounded_value, init_scale_check, initial_loc

__all__ = ["MultivariateNormalGuide"]


class MultivariateNormalGuide(InducingGuide):
    """Full-rank (``rank=None``) or low-rank Gaussian over the inducing site."""

    def __init__(
        self,
        site: InducingSite,
        rank: Optional[int] = None,
        scale_init: float = 1e-3,
        scale_max: float = 0.1,
    ):
        super().__init__(site)
        init_scale_check(scale_init, scale_max)
        if rank is not None and not 1 <= rank <= site.dim:
            raise ValueError(f"mvn guide rank must be in [1, {site.dim}] or None (full), got {rank}")
        self.rank = rank
        self.scale_max = scale_max
        self.loc = initial_loc(site)
        self.diag_rho = bounded_param(scale_init, scale_max, site, (site.dim,))
        if rank is None:
            self.off_diag = nn.Parameter(torch.zeros(site.dim, site.dim, dtype=site.dtype, device=site.device))
        else:
            self.cov_factor = nn.Parameter(scale_init * torch.randn(site.dim, rank, dtype=site.dtype, device=site.device) / rank**0.5)

    def distribution(self) -> Distribution:
        diag = bounded_value(self.diag_rho, self.scale_max)
        if self.rank is None:
            tril = torch.tril(self.off_diag, diagonal=-1) + torch.diag(diag)
            return MultivariateNormal(self.loc, scale_tril=tril)
        return LowRankMultivariateNormal(self.loc, self.cov_factor, diag**2)

    def mean(self, num_samples: int = 256) -> Tensor:
        return self.loc.detach()
