"""The distribution of a LoRA factor given its inducing matrix, ``W | U``.

.. math::

    W \\mid U \\sim \\mathcal N\\big(s\\, T_r U T_c,\\; s^2 \\lambda^2 \\Sigma\\big),
    \\qquad \\Sigma = I - P_r \\otimes P_c,

with the output scale ``s = prior_sd / sqrt(fan_in)`` and ``lambda = 1`` for the
prior ``p(W | U)``. The variational ``q(W | U)`` of Bayesian-LoRA (Lin et al.,
2026, Sec. 3.2) is the same family with a learnable ``lambda``, so the KL between
the two is available in closed form (:func:`_kl_inducing_conditional`)::

    KL(q || p) = (pq / 2) (lambda_q^2 / lambda_p^2 - 1 - 2 log(lambda_q / lambda_p))
                 + delta^T Sigma^{-1} delta / (2 lambda_p^2),

where ``delta`` is the difference of the two means in units of ``s`` (zero when
model and guide condition on the same ``U``).

``lambda = 0`` is the MAP limit: the distribution is a point mass at the mean,
``rsample`` returns the mean, ``log_prob`` is 0 as for :class:`pyro.distributions.Delta`
and the KL to the prior is defined as 0. The true value is an infinite constant
that no trainable parameter touches, so dropping it turns the ELBO into the MAP
objective ``log p(D | W) + log p(U)``: plain LoRA.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor
from torch.distributions import register_kl

from .batched import batch_matheron_parts, gather
from .geometry import InducingGeometry

__all__ = ["InducingConditional", "batch_conditionals"]


class InducingConditional(TorchDistribution):
    """``N(s T_r U T_c, s^2 lambda^2 Sigma)`` over a ``p x q`` factor; see the module docstring.

    ``U`` and the mean are computed on first use: the model's conditional of a
    replayed ELBO evaluation needs neither (its KL to the guide's conditional on
    the same ``U`` is the closed-form ``lambda`` term alone).

    Args:
        geometry: kernel quantities of the factor.
        inducing: the inducing matrix ``U`` (``m_r x m_c``), or a function of no
            arguments that returns it.
        scale: the output scale ``s``.
        lam: the conditional noise scale ``lambda >= 0``; the Python number 0 gives the
            point mass (MAP), a tensor is taken to be positive.
        source: the ``U`` site's value this was built from, to recognise model and
            guide conditionals on the same draw (defaults to ``inducing``).
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(
        self,
        geometry: InducingGeometry,
        inducing: Tensor | Callable[[], Tensor],
        scale: float,
        lam: Tensor | float,
        validate_args=None,
        source: Tensor | None = None,
    ):
        self.geometry = geometry
        self._inducing = inducing
        if source is None and not isinstance(inducing, Tensor):
            raise ValueError("InducingConditional needs `source` (the U site's value) when `inducing` is a function")
        self.source = inducing if source is None else source
        self.scale = float(scale)
        # Decided once, on the host: a tensor lambda is a learnable cap * sigmoid(rho) > 0.
        self.is_point_mass = not isinstance(lam, Tensor) and float(lam) == 0.0
        self._lam = lam
        self._unit_mean: Tensor | Callable[[], Tensor] | None = None
        self._draw: Tensor | None = None  # a draw made ahead, batched with other factors
        self._unit_kl: tuple[Tensor, int] | None = None  # KL to the lambda = 1 conditional, batched
        super().__init__(torch.Size(), torch.Size(geometry.shape), validate_args=False)

    @property
    def inducing(self) -> Tensor:
        """The inducing matrix ``U``."""
        if not isinstance(self._inducing, Tensor):
            self._inducing = self._inducing()
        return self._inducing

    @property
    def lam(self) -> Tensor:
        """``lambda`` as a tensor of the geometry's dtype."""
        if not isinstance(self._lam, Tensor) or self._lam.dtype != self.geometry.dtype:
            self._lam = torch.as_tensor(self._lam, dtype=self.geometry.dtype, device=self.geometry.z_rows.device)
        return self._lam

    @property
    def unit_mean(self) -> Tensor:
        """``T_r U T_c``, the mean in units of ``s``."""
        if self._unit_mean is None:
            self._unit_mean = self.geometry.conditional_mean(self.inducing)
        elif not isinstance(self._unit_mean, Tensor):
            self._unit_mean = self._unit_mean()
        return self._unit_mean

    def batched_kl(self, p: "InducingConditional") -> tuple[Tensor, int] | None:
        """``(kls, i)`` with ``KL(self || p) = kls[i]`` when it was computed batched (see
        :func:`batch_conditionals`): ``p`` is the ``lambda = 1`` conditional on the same draw."""
        if (
            self._unit_kl is not None
            and isinstance(p, InducingConditional)
            and p.geometry is self.geometry
            and p.source is self.source
            and p.scale == self.scale
            and not isinstance(p._lam, Tensor)
            and float(p._lam) == 1.0
        ):
            return self._unit_kl
        return None

    @property
    def mean(self) -> Tensor:
        return self.scale * self.unit_mean

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        if self._draw is not None and tuple(sample_shape) == ():
            draw, self._draw = self._draw, None  # handed out once; later draws are new
            return draw
        mean = self.unit_mean.expand(*sample_shape, *self.unit_mean.shape)
        if self.is_point_mass:
            return self.scale * mean
        return self.scale * (mean + self.lam * self.geometry.matheron_noise(torch.Size(sample_shape)))

    def log_prob(self, value: Tensor) -> Tensor:
        if self.is_point_mass:
            # Delta convention: log density 0 on the support point (the MAP limit).
            return value.new_zeros(value.shape[:-2])
        p, q = self.geometry.shape
        lam = self.lam.double()
        quad = self.geometry.mahalanobis(value / self.scale - self.unit_mean)
        log_norm = 0.5 * p * q * math.log(2 * math.pi) + p * q * (math.log(self.scale) + lam.log())
        out = -log_norm - 0.5 * self.geometry.logdet_sigma - 0.5 * quad / lam**2
        return out.to(value.dtype)

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != self.batch_shape:
            raise NotImplementedError("InducingConditional has no batch dimensions; sample it outside plates")
        return self


@register_kl(InducingConditional, InducingConditional)
def _kl_inducing_conditional(q: InducingConditional, p: InducingConditional) -> Tensor:
    if q.geometry.shape != p.geometry.shape or q.scale != p.scale:
        raise NotImplementedError("closed-form KL needs conditionals of the same factor")
    zero = q.geometry.z_rows.new_zeros(())
    if q.is_point_mass:
        return zero
    if p.is_point_mass:
        return zero + math.inf
    batched = q.batched_kl(p)
    if batched is not None:
        return batched[0][batched[1]]
    same_draw = q.geometry is p.geometry and q.source is p.source
    p_rows, q_cols = q.geometry.shape
    size = p_rows * q_cols
    ratio = (q.lam / p.lam).double()
    kl = 0.5 * size * (ratio**2 - 1 - 2 * ratio.log())
    # Model and guide condition on the same U-site value through the same shared
    # geometry in an ELBO evaluation: then the means agree exactly and the term vanishes.
    if not same_draw:
        delta = q.unit_mean - p.unit_mean
        kl = kl + 0.5 * p.geometry.mahalanobis(delta) / p.lam.double() ** 2
    return kl.to(q.geometry.dtype)


def batch_conditionals(
    geometries: Sequence[InducingGeometry],
    inducing: Tensor,
    scale: float,
    lams: Tensor | None,
    sources: Sequence[Tensor],
) -> list[InducingConditional]:
    """The conditionals ``W_i | U_i`` of ``n`` factors of one shape, each with a draw made batched.

    One batched ``T_r U T_c``, one batched Matheron noise and one batched
    ``W = s (T_r U T_c + lambda * noise)``; each returned conditional hands out
    its draw on its first ``rsample()`` and knows its closed-form KL to the
    ``lambda = 1`` prior conditional on the same ``U``,
    ``(pq / 2) (lambda^2 - 1 - 2 log lambda)``, also computed batched.

    Args:
        geometries: the factors' geometries (same ``p x q`` and ``m_r x m_c``).
        inducing: the inducing matrices, ``(n, m_r, m_c)``.
        scale: the output scale ``s`` shared by the factors.
        lams: ``lambda`` per factor, ``(n,)``, or None for point masses (MAP).
        sources: each factor's ``U`` site value (see :class:`InducingConditional`).
    """
    t_rows, t_cols = gather(geometries, "t_rows"), gather(geometries, "t_cols")
    if lams is None:
        means = t_rows @ inducing @ t_cols
        draws = scale * means
        lam_values: list = [0.0] * len(geometries)
        kls = None
    else:
        # T_r U T_c + lambda (E - T_r U_bar T_c) = lambda E + T_r (U - lambda U_bar) T_c: one product, not two
        lam3 = lams.reshape(-1, 1, 1)
        e, u_bar = batch_matheron_parts(geometries)
        draws = scale * (lam3 * e + t_rows @ (inducing - lam3 * u_bar) @ t_cols)
        means = None
        lam_values = list(lams.unbind(0))
        p, q = geometries[0].shape
        ratio = lams.double()
        kls = (0.5 * p * q * (ratio**2 - 1 - 2 * ratio.log())).to(geometries[0].dtype)
    out = []
    for index, (geometry, draw, lam, source) in enumerate(zip(geometries, draws.unbind(0), lam_values, sources)):
        # U and the mean are rows taken only if asked for (a KL between different draws, .mean)
        conditional = InducingConditional(geometry, lambda i=index: inducing[i], scale, lam, source=source)
        conditional._unit_mean = (lambda i=index: means[i]) if means is not None else None
        conditional._draw = draw
        if kls is not None:
            conditional._unit_kl = (kls, index)
        out.append(conditional)
    return out
