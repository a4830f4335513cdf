"""``"delta"``: a point mass ``q(U_w) = delta(mu)`` and ``lambda = 0``: plain LoRA (MAP).

The factor is then the deterministic conditional mean ``W = s T_r U T_c`` and the
objective is ``log p(D | W) + log p(U_w)``: the prior on ``U_w`` acts as weight
decay on the inducing values (``TraceMeanField_ELBO`` has no KL for a point
mass, so it scores ``log p(U_w)`` at ``mu``). See ``models/conditional.py`` for
why the conditional KL is dropped at ``lambda = 0``.
"""

from __future__ import annotations

from typing import Hashable, Sequence

from pyro.distributions import Delta
from torch import Tensor
from torch.distributions import Distribution

from .base import InducingGuide, InducingSite, initial_loc
from .batch import DeltaBatch, SiteBatch

__all__ = ["DeltaGuide"]


class DeltaGuide(InducingGuide):
    """MAP point mass over the inducing site."""

    point_mass = True

    def __init__(self, site: InducingSite):
        super().__init__(site, learn_lambda=False)
        self.loc = initial_loc(site)

    def distribution(self) -> Distribution:
        return Delta(self.loc, event_dim=1)

    def mean(self, num_samples: int = 256) -> Tensor:
        return self.loc.detach()

    def batch_key(self) -> Hashable | None:
        if type(self).distribution is not DeltaGuide.distribution:
            return None
        return ("delta", tuple(self.loc.shape), self.loc.dtype, self.loc.device)

    @classmethod
    def draw_batch(cls, families: Sequence[InducingGuide]) -> SiteBatch:
        return DeltaBatch(families)
