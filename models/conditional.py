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

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor
from torch.distributions import register_kl

from .geometry import InducingGeometry

__all__ = ["InducingConditional"]


class InducingConditional(TorchDistribution):
    """``N(s T_r U T_c, s^2 lambda^2 Sigma)`` over a ``p x q`` factor; see the module docstring.

    Args:
        geometry: kernel quantities of the factor.
        inducing: the inducing matrix ``U`` (``m_r x m_c``).
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
        inducing: Tensor,
        scale: float,
        lam: Tensor | float,
        validate_args=None,
        source: Tensor | None = None,
    ):
        self.geometry = geometry
        self.inducing = inducing
        self.source = inducing if source is None else source
        self.scale = float(scale)
        # Decided once, on the host: a tensor lambda is a learnable cap * sigmoid(rho) > 0.
        self.is_point_mass = not isinstance(lam, Tensor) and float(lam) == 0.0
        self.lam = torch.as_tensor(lam, dtype=geometry.dtype, device=inducing.device)
        self.unit_mean = geometry.conditional_mean(inducing)
        super().__init__(torch.Size(), torch.Size(geometry.shape), validate_args=False)

    @property
    def mean(self) -> Tensor:
        return self.scale * self.unit_mean

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
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
    if q.is_point_mass:
        return q.unit_mean.new_zeros(())
    if p.is_point_mass:
        return q.unit_mean.new_full((), math.inf)
    p_rows, q_cols = q.geometry.shape
    size = p_rows * q_cols
    ratio = (q.lam / p.lam).double()
    kl = 0.5 * size * (ratio**2 - 1 - 2 * ratio.log())
    # Model and guide condition on the same U-site value through the same shared
    # geometry in an ELBO evaluation: then the means agree exactly and the term vanishes.
    if not (q.geometry is p.geometry and q.source is p.source):
        delta = q.unit_mean - p.unit_mean
        kl = kl + 0.5 * p.geometry.mahalanobis(delta) / p.lam.double() ** 2
    return kl.to(q.unit_mean.dtype)
