"""``"flow"``: a Gaussian base pushed through a chain of Pyro normalizing-flow transforms.

.. math::

    u_0 \\sim \\mathcal N(\\mu, \\mathrm{diag}(\\sigma^2)),\\qquad
    U_w = f_K \\circ \\pi \\circ f_{K-1} \\circ \\dots \\circ f_1(u_0),

with ``log q(U_w) = log N(u_0) - sum_k log |det J_{f_k}|``. Each ``f_k`` comes
from :data:`FLOW_TRANSFORMS` by name (Pyro's lower-case factories) or from a
callable ``factory(dim) -> TransformModule``; ``pi`` reverses the coordinates
between layers so autoregressive and coupling transforms see every ordering.

Bayesian-LoRA uses one masked affine autoregressive transform (16 hidden units)
and a base with ``sigma`` initialised at 1e-3, capped at 0.1. Here the flow acts
on the whole flattened ``m_r * m_c`` inducing value rather than row by row.
``TraceMeanField_ELBO`` has no analytic KL for a flow, so the ``U`` sites use a
one-sample Monte Carlo estimate; samples are scored through the transforms'
caches, so non-invertible-in-closed-form flows (neural autoregressive) work.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import pyro.distributions.transforms as T
import torch
from pyro.distributions import Normal, TransformedDistribution
from pyro.distributions.torch_transform import TransformModule
from torch import nn
from torch.distributions import Distribution

from .base import InducingGuide, InducingSite, bounded_param, bounded_value, init_scale_check, randn_loc

__all__ = ["FlowGuide", "FLOW_TRANSFORMS", "TransformSpec"]

TransformSpec = Union[str, Callable[[int], TransformModule]]

FLOW_TRANSFORMS: dict[str, Callable[[int, list[int]], TransformModule]] = {
    "affine_autoregressive": lambda dim, hidden: T.affine_autoregressive(dim, hidden_dims=hidden),
    "affine_coupling": lambda dim, hidden: T.affine_coupling(dim, hidden_dims=hidden),
    "neural_autoregressive": lambda dim, hidden: T.neural_autoregressive(dim, hidden_dims=hidden),
    "spline_autoregressive": lambda dim, hidden: T.spline_autoregressive(dim, hidden_dims=hidden),
    "spline_coupling": lambda dim, hidden: T.spline_coupling(dim, hidden_dims=hidden),
    "planar": lambda dim, hidden: T.planar(dim),
    "radial": lambda dim, hidden: T.radial(dim),
}
"""Flow transforms by name; add yours with ``FLOW_TRANSFORMS["mine"] = lambda dim, hidden: ...``."""


def _make_transform(spec: TransformSpec, dim: int, hidden: list[int]) -> TransformModule:
    if isinstance(spec, str):
        if spec not in FLOW_TRANSFORMS:
            raise ValueError(f"unknown flow transform {spec!r}; choose from {sorted(FLOW_TRANSFORMS)} or pass a factory")
        return FLOW_TRANSFORMS[spec](dim, list(hidden))
    if not callable(spec):
        raise TypeError(f"a flow transform must be a name or a factory(dim), got {type(spec).__name__}")
    transform = spec(dim)
    if not isinstance(transform, nn.Module):
        raise TypeError(f"flow transform factory returned {type(transform).__name__}, not a TransformModule")
    return transform


class FlowGuide(InducingGuide):
    """Normalizing-flow posterior over the inducing site.

    Args:
        site: the site to approximate.
        transforms: transform names or factories, first applied first (default:
            one affine autoregressive transform, as Bayesian-LoRA's MAF).
        hidden_dims: hidden sizes of the transforms' networks.
        scale_init, scale_max: initial value and cap of the base's ``sigma``.
    """

    def __init__(
        self,
        site: InducingSite,
        transforms: Sequence[TransformSpec] = ("affine_autoregressive",),
        hidden_dims: Sequence[int] = (16,),
        scale_init: float = 1e-3,
        scale_max: float = 0.1,
    ):
        super().__init__(site)
        init_scale_check(scale_init, scale_max)
        if isinstance(transforms, str):
            transforms = [transforms]
        if len(transforms) == 0:
            raise ValueError("a flow guide needs at least one transform; use guide='normal' for a plain Gaussian")
        if not all(isinstance(h, int) and h >= 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims must be positive integers, got {list(hidden_dims)}")
        self.scale_max = scale_max
        self.loc = randn_loc(site)
        self.scale_rho = bounded_param(scale_init, scale_max, site, (site.dim,))
        self.transforms = nn.ModuleList(
            [_make_transform(spec, site.dim, list(hidden_dims)) for spec in transforms]
        ).to(device=site.device, dtype=site.dtype)
        self.register_buffer("reversal", torch.arange(site.dim - 1, -1, -1, device=site.device), persistent=False)

    def _chain(self) -> list:
        chain = []
        for index, transform in enumerate(self.transforms):
            if index:
                chain.append(T.Permute(self.reversal))
            chain.append(transform)
        return chain

    def distribution(self) -> Distribution:
        base = Normal(self.loc, bounded_value(self.scale_rho, self.scale_max)).to_event(1)
        return TransformedDistribution(base, self._chain())
