"""Drawing ``q(U_w)`` of many sites at once, while every site stays its own Pyro site.

A network has one inducing site per LoRA factor, often hundreds. Drawn one by
one, each costs a few dozen small tensor ops and as many autograd nodes, which
on small factors is more work than the factor's matrix products. Families that
can, draw all their sites of one shape together (:meth:`InducingGuide.batch_key`,
:meth:`InducingGuide.draw_batch`) into a :class:`SiteBatch`: one ``(n, dim)``
draw, one ``(n,)`` log-density, one ``(n,)`` closed-form KL.

Each site's Pyro statement then gets a :class:`SiteMember`, the site's own
distribution seen through the batch: its first ``rsample()`` returns the
batched draw, ``log_prob`` of that draw returns the batched log-density, its KL
to an isotropic Gaussian prior is the batched KL; anything else (another value,
another sample shape, another prior) goes to the family's own
``distribution()``. So ``poutine.trace``, replay, conditioning and any ELBO see
the same distribution per site as before, only cheaper.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor
from torch.distributions import Distribution, kl_divergence, register_kl

from pyro_blora.models.packing import stack_parameters
from pyro_blora.models.priors import IsotropicNormal

__all__ = [
    "SiteBatch",
    "SiteMember",
    "SingleSite",
    "DeltaBatch",
    "NormalBatch",
    "site_distributions",
    "conditional_scales",
]


class SiteBatch:
    """``q(U_w)`` of ``n`` sites with the same event size, drawn once.

    ``has_rsample`` says whether the draws are reparameterised (always, for the
    batched families).

    Subclasses set :attr:`values` (``n x dim``, one reparameterised draw per site)
    and may override :meth:`log_prob_all` and :meth:`kl_isotropic`.

    Args:
        families: the sites' :class:`~pyro_blora.guides.InducingGuide` objects.
    """

    values: Tensor
    has_rsample: bool = True

    def __init__(self, families: Sequence):
        self.families = list(families)
        self._rows: list[Tensor] | None = None
        self._log_prob: Tensor | None = None
        self._kl: dict[float, Tensor | None] = {}

    def rows(self) -> list[Tensor]:
        """The draw of each site: views of :attr:`values`, so a site's value is recognised by identity."""
        if self._rows is None:
            self._rows = list(self.values.unbind(0))
        return self._rows

    def members(self) -> list["SiteMember"]:
        return [SiteMember(self, i) for i in range(len(self.families))]

    def site_distribution(self, index: int) -> Distribution:
        """The exact per-site ``q(U_w)`` (what the family's ``distribution()`` returns)."""
        return self.families[index].distribution()

    def log_prob_all(self) -> Tensor | None:
        """``log q(u_i)`` of every site at its batched draw, ``(n,)``; None to score site by site."""
        return None

    def kl_isotropic(self, sd: float) -> Tensor | None:
        """``KL(q_i || N(0, sd^2 I))`` of every site in closed form, ``(n,)``; None where there is none."""
        return None

    #: False when no KL of these sites' family is registered at all (flows): the KL
    #: then fails at once instead of building each site's distribution to find out.
    has_kl: bool = True

    def log_prob_tensor(self) -> Tensor | None:
        """:meth:`log_prob_all`, computed once."""
        if self._log_prob is None:
            self._log_prob = self.log_prob_all()
        return self._log_prob

    def kl_tensor(self, sd: float) -> Tensor | None:
        """:meth:`kl_isotropic`, computed once per ``sd``."""
        if sd not in self._kl:
            self._kl[sd] = self.kl_isotropic(sd)
        return self._kl[sd]


class SiteMember(TorchDistribution):
    """One site's ``q(U_w)``, its first draw and its densities taken from a :class:`SiteBatch`."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, batch: SiteBatch, index: int):
        self.batch = batch
        self.index = index
        self._fresh = True  # the batched draw is handed out once; later draws are new
        self.has_rsample = batch.has_rsample
        super().__init__(torch.Size(), batch.values.shape[1:], validate_args=False)

    def site_distribution(self) -> Distribution:
        return self.batch.site_distribution(self.index)

    @property
    def mean(self) -> Tensor:
        return self.site_distribution().mean

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        if self._fresh and tuple(sample_shape) == ():
            self._fresh = False
            return self.batch.rows()[self.index]
        return self.site_distribution().rsample(sample_shape)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        if self.has_rsample:
            with torch.no_grad():
                return self.rsample(sample_shape)
        if self._fresh and tuple(sample_shape) == ():
            self._fresh = False
            return self.batch.rows()[self.index]
        return self.site_distribution().sample(sample_shape)

    def _is_draw(self, value: Tensor) -> bool:
        return self.batch._rows is not None and value is self.batch._rows[self.index]

    def log_prob(self, value: Tensor) -> Tensor:
        if self._is_draw(value):
            log_prob = self.batch.log_prob_tensor()
            if log_prob is not None:
                return log_prob[self.index]
        return self.site_distribution().log_prob(value)

    # -- batched terms for pyro_blora.training.elbo.MeanFieldELBO: (stacked tensor, row) or None

    def stacked_value(self, value: Tensor) -> tuple[Tensor, int] | None:
        """``(values, i)`` when ``value`` is this site's batched draw ``values[i]``."""
        return (self.batch.values, self.index) if self._is_draw(value) else None

    def batched_log_prob(self, value: Tensor) -> tuple[Tensor, int] | None:
        """``(log_q, i)`` with ``log q(value) = log_q[i]`` when ``value`` is the batched draw."""
        if not self._is_draw(value):
            return None
        log_prob = self.batch.log_prob_tensor()
        return None if log_prob is None else (log_prob, self.index)

    def batched_kl(self, p: Distribution) -> tuple[Tensor, int] | None:
        """``(kls, i)`` with ``KL(self || p) = kls[i]``; None to ask ``kl_divergence``; raises if there is no KL."""
        if isinstance(p, IsotropicNormal):
            kl = self.batch.kl_tensor(p.sd)
            if kl is not None:
                return kl, self.index
        if not self.batch.has_kl:
            raise NotImplementedError(f"no closed-form KL for {type(self.batch).__name__} sites")
        return None

    def expand(self, batch_shape, _instance=None):
        if torch.Size(batch_shape) != self.batch_shape:
            raise NotImplementedError("an inducing site has no batch dimensions; sample it outside plates")
        return self


@register_kl(SiteMember, IsotropicNormal)
def _kl_member_isotropic(q: SiteMember, p: IsotropicNormal) -> Tensor:
    kl = q.batch.kl_tensor(p.sd)
    return kl[q.index] if kl is not None else _kl_member_any(q, p)


@register_kl(SiteMember, Distribution)
def _kl_member_any(q: SiteMember, p: Distribution) -> Tensor:
    if not q.batch.has_kl:
        raise NotImplementedError(f"no closed-form KL for {type(q.batch).__name__} sites")
    return kl_divergence(q.site_distribution(), p)


def _isotropic_log_prob(values: Tensor, sd: float) -> Tensor:
    dim = values.shape[-1]
    return -0.5 * values.pow(2).sum(-1) / sd**2 - dim * (math.log(sd) + 0.5 * math.log(2 * math.pi))


class SingleSite(SiteBatch):
    """A family without a batched draw: its own ``distribution()``, drawn once ahead.

    The draw and the distribution object are kept as they are, so a flow scores
    its own output through its transforms' caches (planar, radial and neural
    autoregressive flows have no closed-form inverse).
    """

    def __init__(self, family):
        super().__init__([family])
        self.dist = family.distribution()
        self.has_rsample = bool(self.dist.has_rsample)
        self.draw = self.dist.rsample() if self.has_rsample else self.dist.sample()
        self.values = self.draw.unsqueeze(0)
        self._rows = [self.draw]

    def site_distribution(self, index: int) -> Distribution:
        return self.dist


def site_distributions(families: Sequence) -> list[SiteMember]:
    """A :class:`SiteMember` per family, each drawn once: together where :meth:`batch_key` allows."""
    groups: dict = {}
    for index, family in enumerate(families):
        key = family.batch_key()
        groups.setdefault(("single", index) if key is None else (type(family).draw_batch, key), []).append(index)
    members: list = [None] * len(families)
    for key, indices in groups.items():
        if key[0] == "single":
            batch: SiteBatch = SingleSite(families[indices[0]])
        else:
            batch = key[0]([families[i] for i in indices])
        for member, index in zip(batch.members(), indices):
            members[index] = member
    return members


def conditional_scales(families: Sequence) -> tuple[list[Tensor | float], list[tuple[Tensor, int] | None]]:
    """``family.conditional_scale()`` of every family; the built-in ``lambda_max * sigmoid(rho)`` in one op per cap.

    Returns the values and, for those computed together, ``(stack, position)``.
    """
    from .base import InducingGuide

    out: list = [None] * len(families)
    refs: list = [None] * len(families)
    groups: dict = {}
    for index, family in enumerate(families):
        if type(family).conditional_scale is InducingGuide.conditional_scale and family.learn_lambda:
            key = (family.lambda_max, family.lambda_rho.dtype, family.lambda_rho.device)
            groups.setdefault(key, []).append(index)
        else:
            out[index] = family.conditional_scale()
    for (cap, _, _), indices in groups.items():
        lams = cap * torch.sigmoid(stack_parameters([families[i].lambda_rho for i in indices]))
        for position, (index, lam) in enumerate(zip(indices, lams.unbind(0))):
            out[index] = lam
            refs[index] = (lams, position)
    return out, refs


class DeltaBatch(SiteBatch):
    """Point masses: the draw is the stacked locations; ``KL(delta(mu) || p) = -log p(mu)``."""

    def __init__(self, families: Sequence):
        super().__init__(families)
        self.values = stack_parameters([f.loc for f in families])

    def kl_isotropic(self, sd: float) -> Tensor:
        return -_isotropic_log_prob(self.values, sd)


class NormalBatch(SiteBatch):
    """Mean-field Gaussians ``N(mu_i, diag(sigma_i^2))``, drawn as one ``(n, dim)`` Gaussian.

    .. math::

        \\mathrm{KL}(\\mathcal N(\\mu, \\sigma^2) \\,\\|\\, \\mathcal N(0, s^2 I))
        = \\tfrac12 \\sum_j \\Big(\\frac{\\sigma_j^2 + \\mu_j^2}{s^2} - 1 - 2 \\log\\frac{\\sigma_j}{s}\\Big).
    """

    def __init__(self, families: Sequence):
        super().__init__(families)
        first = families[0]
        self.loc = stack_parameters([f.loc for f in families])
        self.scale = first.scale_max * torch.sigmoid(stack_parameters([f.scale_rho for f in families]))
        self.eps = torch.randn_like(self.loc)
        self.values = self.loc + self.eps * self.scale

    def log_prob_all(self) -> Tensor:
        dim = self.loc.shape[-1]
        return -0.5 * self.eps.pow(2).sum(-1) - self.scale.log().sum(-1) - 0.5 * dim * math.log(2 * math.pi)

    def kl_isotropic(self, sd: float) -> Tensor:
        var = (self.scale.pow(2) + self.loc.pow(2)) / sd**2
        return 0.5 * (var - 1 - 2 * (self.scale.log() - math.log(sd))).sum(-1)
