"""The guide contract: a variational family ``q(U_w)`` for one inducing site.

Every guide family is an :class:`InducingGuide`: an ``nn.Module``
built from an :class:`InducingSite` (what the site looks like) that returns

* :meth:`~InducingGuide.distribution`: ``q(U_w)`` over the flattened inducing
  value (event shape ``(m_r * m_c,)``), reparameterised, and
* :meth:`~InducingGuide.conditional_scale`: ``lambda`` of ``q(W | U) = N(s T_r U T_c, s^2 lambda^2 Sigma)``.

The family never sees the network or the kernel; the mapping from ``U`` to the
LoRA weights belongs to the layer (``models/``), as GPyTorch keeps the
variational distribution apart from the variational strategy.

``lambda`` is ``lambda_max * sigmoid(rho)``: a smooth cap (Bayesian-LoRA clamps it
at 0.03) that keeps gradients alive at the bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

if TYPE_CHECKING:
    from .batch import SiteBatch

__all__ = ["InducingSite", "InducingGuide", "bounded_param", "bounded_value"]


@dataclass(frozen=True)
class InducingSite:
    """What a guide family may know about the site it approximates."""

    name: str
    dim: int
    factor_shape: tuple[int, int]
    inducing_shape: tuple[int, int]
    lambda_init: float = 1e-3
    lambda_max: float = 0.03
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    zero_init: bool = False


def bounded_param(init: float, upper: float, site: InducingSite, shape: tuple[int, ...] = ()) -> nn.Parameter:
    """Unconstrained ``rho`` (dtype and device of ``site``) with ``upper * sigmoid(rho) = init``."""
    if not 0 < init < upper:
        raise ValueError(f"initial value {init} must lie strictly between 0 and its bound {upper}")
    rho = torch.full(shape, math.log(init / (upper - init)), dtype=site.dtype, device=site.device)
    return nn.Parameter(rho)


def bounded_value(rho: Tensor, upper: float) -> Tensor:
    return upper * torch.sigmoid(rho)


class InducingGuide(nn.Module):
    """Base class of the per-site variational families; see the module docstring.

    Args:
        site: the site to approximate.
        learn_lambda: keep a learnable ``lambda`` (False fixes ``lambda = 0``, the MAP limit).
    """

    point_mass: bool = False
    """True for a family without entropy (MAP): the empirical-Bayes prior gain is then not learned, since
    ``log p(U_w)`` alone is maximised by ``g -> infinity``, ``U_w -> 0``."""

    def __init__(self, site: InducingSite, learn_lambda: bool = True):
        super().__init__()
        self.site = site
        self.learn_lambda = learn_lambda
        if learn_lambda:
            self.lambda_max = site.lambda_max
            self.lambda_rho = bounded_param(site.lambda_init, site.lambda_max, site)

    def distribution(self) -> Distribution:
        """``q(U_w)``, event shape ``(site.dim,)``."""
        raise NotImplementedError

    def conditional_scale(self) -> Tensor | float:
        """``lambda`` of ``q(W | U)``: a positive tensor, or the number 0 for the MAP limit."""
        if not self.learn_lambda:
            return 0.0
        return bounded_value(self.lambda_rho, self.lambda_max)

    def mean(self, num_samples: int = 256) -> Tensor:
        """``E_q[U_w]``: exact where the family has it, else a Monte Carlo estimate."""
        with torch.no_grad():
            return self.distribution().rsample((num_samples,)).mean(0)

    def batch_key(self) -> Hashable | None:
        """Sites whose families return equal keys (not None) are drawn together by :meth:`draw_batch`.

        None (the default, and what a subclass that changes ``distribution`` should
        return) draws the site on its own. See :mod:`pyro_blora.guides.batch`.
        """
        return None

    @classmethod
    def draw_batch(cls, families: Sequence["InducingGuide"]) -> "SiteBatch":
        """One reparameterised draw of every family in ``families`` (all with the same :meth:`batch_key`)."""
        raise NotImplementedError(f"{cls.__name__} has no batched draw; its batch_key() must return None")


def initial_loc(site: InducingSite) -> nn.Parameter:
    """Location of q(U_w) at the start: a standard normal draw (Bayesian-LoRA), or zero for ``site.zero_init``.

    :class:`BayesianLoRAGuide` zero-initialises the B factors, so the adapted
    network starts as the pretrained one and B receives gradient through a
    random A, as peft's LoRA initialisation does.
    """
    if site.zero_init:
        return nn.Parameter(torch.zeros(site.dim, dtype=site.dtype, device=site.device))
    return nn.Parameter(torch.randn(site.dim, dtype=site.dtype, device=site.device))


def init_scale_check(scale_init: float, scale_max: float) -> None:
    if not 0 < scale_init < scale_max:
        raise ValueError(f"scale_init must be in (0, scale_max={scale_max}), got {scale_init}")
    if not math.isfinite(scale_max):
        raise ValueError("scale_max must be finite")
