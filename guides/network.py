"""The network-level guide: one per-site family for every Bayesian factor.

:class:`BayesianLoRAGuide` walks the Bayesian factors in a fixed order (the
order in which the model samples them) and, for each, samples ``U_w`` from its
family and ``W | U`` from the factor's conditional with the family's ``lambda``.
It knows the factors only through their site names, dimensions and
``conditional``: it never sees the network.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Mapping, Union

import pyro
import torch
from torch import Tensor, nn

from pyro_blora.models.layer import factor_conditionals
from pyro_blora.models.priors import shared_geometry

from .base import InducingGuide, InducingSite
from .batch import conditional_scales, site_distributions
from .delta import DeltaGuide
from .flow import FlowGuide
from .mvn import MultivariateNormalGuide
from .normal import NormalGuide

__all__ = ["GUIDES", "GuideSpec", "BayesianLoRAGuide", "guide_factory"]

GUIDES: dict[str, type[InducingGuide]] = {
    "flow": FlowGuide,
    "normal": NormalGuide,
    "mvn": MultivariateNormalGuide,
    "delta": DeltaGuide,
}
"""Guide families by name; register yours with ``GUIDES["mine"] = MyGuide``."""

GuideSpec = Union[str, type, Callable[[InducingSite], InducingGuide]]


def guide_factory(spec: GuideSpec, **options: Any) -> Callable[[InducingSite], InducingGuide]:
    """Turn a name, an :class:`InducingGuide` subclass or a ``factory(site)`` into a factory."""
    if isinstance(spec, str):
        if spec not in GUIDES:
            raise ValueError(
                f"unknown guide {spec!r}; choose one of {sorted(GUIDES)}, pass an InducingGuide subclass, "
                "a factory(site) -> InducingGuide, or a BayesianLoRAGuide"
            )
        spec = GUIDES[spec]
    if not callable(spec):
        raise TypeError(f"guide must be a name, an InducingGuide subclass or a factory, got {type(spec).__name__}")
    if options and inspect.isclass(spec):
        params = inspect.signature(spec.__init__).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            valid = sorted(set(params) - {"self", "site"})
            unknown = sorted(set(options) - set(valid))
            if unknown:
                raise ValueError(f"unknown option(s) {unknown} for guide {spec.__name__}; valid options: {valid}")

    def build(site: InducingSite) -> InducingGuide:
        family = spec(site, **options)
        if not isinstance(family, InducingGuide):
            raise TypeError(f"guide factory returned {type(family).__name__}, not an InducingGuide")
        return family

    return build


def _key(site_name: str) -> str:
    # nn.ModuleDict keys cannot contain dots.
    return site_name.replace(".", "__")


class BayesianLoRAGuide(nn.Module):
    """``q(U, W) = prod_factors q(U_w) q(W | U)`` over all Bayesian factors.

    Args:
        factors: the model's :class:`~pyro_blora.models.InducingFactor` objects, in sampling order.
        family: a guide name (``"flow"``, ``"normal"``, ``"mvn"``, ``"delta"``), class or factory.
        lambda_init, lambda_max: initial value and cap of each site's ``lambda``.
        zero_init_b: start the B factors' locations at zero (the network starts
            as the pretrained one, as with peft's LoRA init); False draws every
            location from N(0, I) as the released Bayesian-LoRA code does.
        options: keyword arguments for the family (``transforms``, ``hidden_dims``, ``rank``, ...).
    """

    def __init__(
        self,
        factors: Iterable[Any],
        family: GuideSpec = "flow",
        lambda_init: float = 1e-3,
        lambda_max: float = 0.03,
        zero_init_b: bool = True,
        **options: Any,
    ):
        super().__init__()
        # no factors (bayesian_modules=[]): a guide of nothing, so that plain LoRA trains by the same loop
        factors = list(factors)
        build = guide_factory(family, **options)
        self.family_name = family if isinstance(family, str) else getattr(family, "__name__", type(family).__name__)
        self.options = dict(options)
        self.sites = nn.ModuleDict()
        for factor in factors:
            param = factor.prior.z_rows
            site = InducingSite(
                factor.site_name,
                factor.site_dim,
                tuple(factor.shape),
                tuple(factor.prior.inducing_shape),
                lambda_init,
                lambda_max,
                param.dtype,
                param.device,
                zero_init=zero_init_b and factor.site_name.endswith("lora_B"),
            )
            self.sites[_key(factor.site_name)] = build(site)
        # A plain list: the factors' parameters belong to the model, not to the guide.
        self._factors = factors

    @property
    def point_mass(self) -> bool:
        """Whether any site's family is a point mass (see :attr:`InducingGuide.point_mass`)."""
        return any(family.point_mass for family in self.sites.values())

    def site_guide(self, factor_name: str) -> InducingGuide:
        return self.sites[_key(factor_name)]

    def _families(self) -> list[InducingGuide]:
        """The site families in factor order (the ModuleDict keeps the order they were added in)."""
        families = list(self.sites.values())
        if len(families) != len(self._factors):
            raise RuntimeError("the guide's sites no longer match its factors")
        return families

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Sample every ``U`` and ``W`` site; return the ``W`` draws by site name."""
        factors = self._factors
        families = self._families()
        draws: dict[str, Tensor] = {}
        if not factors:
            return draws
        # Everything is drawn ahead, batched across factors (kernel geometry, q(U), lambda,
        # W | U), then handed to one Pyro site per factor; the geometry is shared with the
        # model inside fit's block. A site whose U a handler replaced (replay, condition)
        # gets its W | U from that value instead.
        with shared_geometry(f.prior for f in factors):
            u_dists = site_distributions(families)
            u_drawn = [d.batch.rows()[d.index] for d in u_dists]
            u_rows = [(d.batch.values, d.index) for d in u_dists]
            lams, lam_rows = conditional_scales(families)
            conditionals = factor_conditionals(factors, u_drawn, lams, u_rows, lam_rows)
            for factor, u_dist, drawn, lam, conditional in zip(factors, u_dists, u_drawn, lams, conditionals):
                u_value = pyro.sample(factor.site_u, u_dist)
                if u_value is not drawn:
                    conditional = factor.conditional(u_value, lam)
                draws[factor.site_w] = pyro.sample(factor.site_w, conditional)
        return draws

    @torch.no_grad()
    def sample_weights(self, num_samples: int) -> dict[str, Tensor]:
        """``num_samples`` joint draws of every ``W``, stacked: site ``*.W`` -> ``(S, rows, cols)``.

        The same distribution as ``num_samples`` calls of the guide, drawn in one
        batched pass over all factors and samples, without Pyro sites (prediction).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not self._factors:
            return {}
        factors = self._factors * num_samples
        families = self._families() * num_samples
        with shared_geometry(f.prior for f in self._factors):
            members = site_distributions(families)
            u_values = [m.rsample() for m in members]
            lams, lam_rows = conditional_scales(families)
            rows = [(m.batch.values, m.index) for m in members]
            draws = [c.rsample() for c in factor_conditionals(factors, u_values, lams, rows, lam_rows)]
        count = len(self._factors)
        return {
            f.site_w: torch.stack(draws[i::count]) for i, f in enumerate(self._factors)
        }

    @torch.no_grad()
    def sample_inducing(self, num_samples: int) -> dict[str, Tensor]:
        """``num_samples`` draws of every ``U_w`` (for plots of q(U))."""
        return {f.site_u: self.sites[_key(f.site_name)].distribution().rsample((num_samples,)) for f in self._factors}

    @torch.no_grad()
    def mean_weights(self, num_samples: int = 256) -> dict[str, Tensor]:
        """Posterior-mean factors ``E_q[W] = s T_r E_q[U] T_c`` (the noise has mean zero, U enters linearly)."""
        out = {}
        with shared_geometry(f.prior for f in self._factors):
            for factor in self._factors:
                family = self.sites[_key(factor.site_name)]
                out[factor.site_w] = factor.conditional(family.mean(num_samples), 0.0).mean
        return out

    def spec(self) -> Mapping[str, Any]:
        """JSON description used to rebuild the guide on load."""
        return {"family": self.family_name, "options": _jsonable(self.options)}


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        if isinstance(value, (list, tuple)):
            value = [v if isinstance(v, (str, int, float, bool)) or v is None else _qualname(v) for v in value]
        elif not (isinstance(value, (str, int, float, bool)) or value is None):
            value = _qualname(value)
        out[key] = value
    return out


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
