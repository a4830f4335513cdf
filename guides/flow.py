"""``"flow"``: a Gaussian base pushed through a chain of Pyro normalizing-flow transforms.

.. math::

    u_0 \\sim \\mathcal N(\\mu, \\mathrm{diag}(\\sigma^2)),\\qquad
    U_w = f_K \\circ \\pi \\circ f_{K-1} \\circ \\dots \\circ f_1(u_0),

with ``log q(U_w) = log N(u_0) - sum_k log |det J_{f_k}|``. Each ``f_k`` comes
from :data:`FLOW_TRANSFORMS` by name (Pyro's lower-case factories) or from a
callable ``factory(dim) -> TransformModule``; ``pi`` reverses the coordinates
between layers so autoregressive and coupling transforms see every ordering.

Bayesian-LoRA uses one masked affine autoregressive transform (16 hidden units)
applied to each row of ``U_w`` (``m_c`` features, rows as a batch) and a base
with ``sigma`` initialised at 1e-3, capped at 0.1; that is the default here
(``rowwise=True``). ``rowwise=False`` lets the flow couple all ``m_r * m_c``
entries, at the price of wider networks (hidden sizes must be at least the
input size for autoregressive transforms).
``TraceMeanField_ELBO`` has no analytic KL for a flow, so the ``U`` sites use a
one-sample Monte Carlo estimate; samples are scored through the transforms'
caches, so non-invertible-in-closed-form flows (neural autoregressive) work.
"""

from __future__ import annotations

import math
from typing import Callable, Hashable, Optional, Sequence, Union

import pyro.distributions.transforms as T
import torch
from pyro.distributions import Normal, TransformedDistribution
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.transforms.utils import clamp_preserve_gradients
from pyro.nn import AutoRegressiveNN
from torch import Tensor, nn
from torch.distributions import Distribution
from torch.distributions.transforms import ReshapeTransform

from pyro_blora.models.packing import stack_parameters

from .base import InducingGuide, InducingSite, bounded_param, bounded_value, init_scale_check, initial_loc
from .batch import SiteBatch

__all__ = ["FlowGuide", "FlowBatch", "FLOW_TRANSFORMS", "TransformSpec"]

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
        hidden_dims: hidden sizes of the transforms' networks (default: one
            layer of ``max(16, input size)`` units).
        rowwise: apply the flow to each row of ``U_w`` (``m_c`` features), as the
            paper does, or to the whole flattened matrix.
        scale_init, scale_max: initial value and cap of the base's ``sigma``.
    """

    def __init__(
        self,
        site: InducingSite,
        transforms: Sequence[TransformSpec] = ("affine_autoregressive",),
        hidden_dims: Optional[Sequence[int]] = None,
        rowwise: bool = True,
        scale_init: float = 1e-3,
        scale_max: float = 0.1,
    ):
        super().__init__(site)
        init_scale_check(scale_init, scale_max)
        if isinstance(transforms, str):
            transforms = [transforms]
        if len(transforms) == 0:
            raise ValueError("a flow guide needs at least one transform; use guide='normal' for a plain Gaussian")
        self.rowwise = rowwise
        self.event_shape = tuple(site.inducing_shape) if rowwise else (site.dim,)
        width = self.event_shape[-1]
        hidden = [max(16, width)] if hidden_dims is None else list(hidden_dims)
        if not all(isinstance(h, int) and h >= 1 for h in hidden):
            raise ValueError(f"hidden_dims must be positive integers, got {hidden}")
        autoregressive = any(isinstance(t, str) and t.endswith(("autoregressive", "coupling")) for t in transforms)
        if autoregressive and width < 2:
            raise ValueError(
                f"autoregressive and coupling flows need at least 2 features, but {'a row of U' if rowwise else 'U'} "
                f"has {width}; use rowwise=False, more inducing columns, or guide='normal'"
            )
        if autoregressive and min(hidden) < width:
            raise ValueError(
                f"autoregressive flows need hidden_dims >= their input size {width} "
                f"({'a row of U' if rowwise else 'the flattened U'}), got {hidden}"
            )
        self.scale_max = scale_max
        self.loc = initial_loc(site)
        self.scale_rho = bounded_param(scale_init, scale_max, site, (site.dim,))
        self.transforms = nn.ModuleList([_make_transform(spec, width, hidden) for spec in transforms]).to(
            device=site.device, dtype=site.dtype
        )
        self.register_buffer("reversal", torch.arange(width - 1, -1, -1, device=site.device), persistent=False)

    def _chain(self) -> list:
        chain = []
        for index, transform in enumerate(self.transforms):
            if index:
                chain.append(T.Permute(self.reversal))
            chain.append(transform)
        return chain

    def distribution(self) -> Distribution:
        shape = self.event_shape
        loc = self.loc.reshape(shape)
        scale = bounded_value(self.scale_rho, self.scale_max).reshape(shape)
        base = Normal(loc, scale).to_event(len(shape))
        chain = self._chain()
        if self.rowwise:
            # cache_size=1: scoring a draw must hand the flow back its own output tensor,
            # or transforms without a closed-form inverse (planar, radial, NAF) cannot score it.
            chain.append(ReshapeTransform(torch.Size(shape), torch.Size([self.site.dim]), cache_size=1))
        return TransformedDistribution(base, chain)

    def batch_key(self) -> Hashable | None:
        """Equal for flows that :class:`FlowBatch` can run together: chains of plain MAFs of one shape."""
        # the structure is fixed at construction; dtype and device follow .to()
        cached = self.__dict__.get("_batch_key")
        if cached is not None and cached[0] == (self.loc.dtype, self.loc.device):
            return cached[1]
        key = self._compute_batch_key()
        self.__dict__["_batch_key"] = ((self.loc.dtype, self.loc.device), key)
        return key

    def _compute_batch_key(self) -> Hashable | None:
        if type(self).distribution is not FlowGuide.distribution or type(self)._chain is not FlowGuide._chain:
            return None
        layout = []
        for transform in self.transforms:
            arn = getattr(transform, "arn", None)
            if (
                type(transform) is not T.AffineAutoregressive
                or transform.stable
                or type(arn) is not AutoRegressiveNN
                or arn.skip_layer is not None
                or arn.param_dims != [1, 1]
                or type(arn.f) is not nn.ReLU
            ):
                return None
            layout.append((tuple(arn.hidden_dims), transform.log_scale_min_clip, transform.log_scale_max_clip))
        return ("flow", self.event_shape, tuple(layout), self.scale_max, self.loc.dtype, self.loc.device)

    @classmethod
    def draw_batch(cls, families: Sequence[InducingGuide]) -> SiteBatch:
        return FlowBatch(families)


class FlowBatch(SiteBatch):
    """Flows of one :meth:`FlowGuide.batch_key`, run together with batched matrix products.

    Each masked autoregressive transform ``y = exp(s(x)) * x + m(x)`` is evaluated
    for all ``n`` sites at once: the sites' masked weights are stacked into
    ``(n, out, in)`` and applied with ``baddbmm``, the clamp and the
    log-determinant ``sum log_scale`` are those of Pyro's ``AffineAutoregressive``.
    The log-density of the draw follows from the base noise and the log-determinants::

        log q(u) = log N(u_0; mu, sigma^2) - sum_k sum log_scale_k.
    """

    has_kl = False  # no KL is registered for a TransformedDistribution: the ELBO scores the draw

    def __init__(self, families: Sequence[FlowGuide]):
        super().__init__(families)
        first = families[0]
        count = len(families)
        width = first.event_shape[-1]
        loc = stack_parameters([f.loc for f in families]).reshape(count, -1, width)
        self.scale = first.scale_max * torch.sigmoid(stack_parameters([f.scale_rho for f in families])).reshape(loc.shape)
        self.eps = torch.randn_like(loc)
        x = loc + self.eps * self.scale
        log_det = x.new_zeros(count)
        for index in range(len(first.transforms)):
            if index:
                x = x[..., first.reversal]
            x, log_scale = _masked_autoregressive([f.transforms[index] for f in families], x)
            log_det = log_det + log_scale.sum((-2, -1))
        self.log_det = log_det
        self.values = x.reshape(count, -1)

    def log_prob_all(self) -> Tensor:
        dim = self.values.shape[-1]
        base = -0.5 * self.eps.pow(2).sum((-2, -1)) - self.scale.log().sum((-2, -1)) - 0.5 * dim * math.log(2 * math.pi)
        return base - self.log_det


def _masked_autoregressive(transforms: Sequence[T.AffineAutoregressive], x: Tensor) -> tuple[Tensor, Tensor]:
    """``AffineAutoregressive._call`` of ``n`` transforms on ``x`` (``n x rows x d``); returns y and log_scale."""
    arns = [t.arn for t in transforms]
    h = x
    depth = len(arns[0].layers)
    for index in range(depth):
        layers = [arn.layers[index] for arn in arns]
        weight = stack_parameters([layer.weight for layer in layers]) * torch.stack([layer.mask for layer in layers])
        bias = stack_parameters([layer.bias for layer in layers]).unsqueeze(1)
        h = torch.baddbmm(bias, h, weight.transpose(1, 2))
        if index < depth - 1:
            h = torch.relu(h)
    mean, log_scale = h.reshape(*x.shape[:-1], 2, x.shape[-1]).unbind(-2)
    first = transforms[0]
    log_scale = clamp_preserve_gradients(log_scale, first.log_scale_min_clip, first.log_scale_max_clip)
    return torch.exp(log_scale) * x + mean, log_scale
