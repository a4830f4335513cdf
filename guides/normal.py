"""``"normal"``: a mean-field Gaussian ``q(U_w) = N(mu, diag(sigma^2))``.

Its KL to the Gaussian prior is analytic, so ``TraceMeanField_ELBO`` needs no
Monte Carlo for the ``U`` sites. ``sigma = scale_max * sigmoid(rho)`` starts at
``scale_init`` (Bayesian-LoRA: 1e-3, capped at 0.1).
"""

from __future__ import annotations

from typing import Hashable, Sequence

from pyro.distributions import Normal
from torch import Tensor
from torch.distributions import Distribution

from .base import InducingGuide, InducingSite, bounded_param, bounded_value, init_scale_check, initial_loc
from .batch import NormalBatch, SiteBatch

__all__ = ["NormalGuide"]


class NormalGuide(InducingGuide):
    """Mean-field Gaussian over the inducing site."""

    def __init__(self, site: InducingSite, scale_init: float = 1e-3, scale_max: float = 0.1):
        super().__init__(site)
        init_scale_check(scale_init, scale_max)
        self.scale_max = scale_max
        self.loc = initial_loc(site)
        self.scale_rho = bounded_param(scale_init, scale_max, site, (site.dim,))

    def scale(self) -> Tensor:
        return bounded_value(self.scale_rho, self.scale_max)

    def distribution(self) -> Distribution:
        return Normal(self.loc, self.scale()).to_event(1)

    def mean(self, num_samples: int = 256) -> Tensor:
        return self.loc.detach()

    def batch_key(self) -> Hashable | None:
        if type(self).distribution is not NormalGuide.distribution or type(self).scale is not NormalGuide.scale:
            return None
        return ("normal", tuple(self.loc.shape), self.scale_max, self.loc.dtype, self.loc.device)

    @classmethod
    def draw_batch(cls, families: Sequence[InducingGuide]) -> SiteBatch:
        return NormalBatch(families)
