"""Priors over the inducing matrix ``U`` of one LoRA factor.

A prior is an :class:`InducingPrior`: an ``nn.Module`` that owns the
inducing inputs ``Z_r``, ``Z_c`` and diagonals ``D_r``, ``D_c`` of its factor
(learned by maximising the ELBO, i.e. type-II maximum likelihood) and says

* :meth:`~InducingPrior.site_distribution`: the distribution of the value
  sampled at the ``U`` site (a vector of length ``m_r * m_c``), and
* :meth:`~InducingPrior.inducing_matrix`: how that value becomes ``U``.

Built in:

``"gp"`` (:class:`GPPrior`, the default)
    The matrix-normal prior of Bayesian-LoRA, ``U ~ MN(0, K_r, K_c)``. Whitened
    (default): the site holds ``U_w ~ N(0, I)`` and ``U = L_r U_w L_c^T``, which
    decouples the guide from the kernel's scale (Hensman et al., 2015).
    Non-whitened: the site holds ``vec(U) ~ N(0, K_r (x) K_c)`` directly.
``"normal"`` (:class:`NormalPrior`)
    An isotropic ``U ~ N(0, sd^2 I)`` that ignores the kernel; ``W | U`` keeps the
    inducing conditional. A baseline for the value of the GP prior.

Your own prior: subclass :class:`InducingPrior` (or :class:`GPPrior` to keep its
parameters), override the two methods, and pass the class, or any callable
``factory(rows, cols, config, name) -> InducingPrior``, as ``BLoRAConfig.prior``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from pyro.distributions import Delta, MultivariateNormal
from torch import Tensor, nn
from torch.distributions import Distribution, Independent, Normal, register_kl

from .batched import batch_geometries, gather
from .geometry import InducingGeometry

if TYPE_CHECKING:
    from pyro_blora.config import BLoRAConfig

__all__ = [
    "InducingPrior",
    "GPPrior",
    "NormalPrior",
    "IsotropicNormal",
    "PRIORS",
    "PriorSpec",
    "build_prior",
    "inducing_matrices",
    "shared_geometry",
]

_GEOMETRY_CACHE: contextvars.ContextVar[Optional["_GeometryCache"]] = contextvars.ContextVar(
    "pyro_blora_geometry", default=None
)


class _GeometryCache:
    """Geometries of one block of :func:`shared_geometry`, per prior and grad mode.

    Registered priors are computed together (:func:`batch_geometries`) the first
    time any of them is asked for its geometry; others one by one.
    """

    def __init__(self) -> None:
        self.geometries: dict[tuple[int, bool], InducingGeometry] = {}
        self.batched: dict[int, "InducingPrior"] = {}

    def register(self, priors: Iterable["InducingPrior"]) -> None:
        for prior in priors:
            # a prior that builds its own geometry keeps doing so
            if type(prior).geometry is InducingPrior.geometry:
                self.batched.setdefault(id(prior), prior)

    def get(self, prior: "InducingPrior") -> InducingGeometry:
        grad = torch.is_grad_enabled()
        key = (id(prior), grad)
        if key not in self.geometries:
            if id(prior) in self.batched:
                todo = [p for p in self.batched.values() if (id(p), grad) not in self.geometries]
                for p, geometry in zip(todo, _batch(todo)):
                    self.geometries[(id(p), grad)] = geometry
            else:
                self.geometries[key] = prior._build_geometry()
        return self.geometries[key]


def _batch(priors: list["InducingPrior"]) -> list[InducingGeometry]:
    return batch_geometries(
        [p.z_rows for p in priors],
        [p.z_cols for p in priors],
        [p.log_d_rows for p in priors],
        [p.log_d_cols for p in priors],
        [p.jitter for p in priors],
        [p.factor_name for p in priors],
    )


@contextlib.contextmanager
def shared_geometry(priors: Iterable["InducingPrior"] = ()) -> Iterator[None]:
    """Within this block each prior computes its kernel geometry once; ``priors`` all at once.

    The guide and the model of one ELBO evaluation both need every factor's
    Cholesky factors and projections; sharing them halves that work and keeps
    one autograd graph, and computing the given ``priors`` together
    (:func:`~pyro_blora.models.geometry.batch_geometries`) turns a few dozen
    small ops per factor into a few dozen per step. Open one block per
    evaluation (``fit`` does, per step): parameters must not change inside it.
    A block opened inside another shares the outer one's geometries.
    """
    cache = _GEOMETRY_CACHE.get()
    if cache is not None:
        cache.register(priors)
        yield
        return
    cache = _GeometryCache()
    cache.register(priors)
    token = _GEOMETRY_CACHE.set(cache)
    try:
        yield
    finally:
        _GEOMETRY_CACHE.reset(token)


class IsotropicNormal(MultivariateNormal):
    """``N(0, sd^2 I)`` over vectors of length ``dim``: a :class:`MultivariateNormal` with an O(dim) ``log_prob``.

    .. math:: \\log p(u) = -\\tfrac{1}{2 sd^2} \\lVert u \\rVert^2 - dim \\log sd - \\tfrac{dim}{2} \\log 2\\pi

    Every KL registered for a multivariate normal applies to it; the ones it is
    used with most (a mean-field Gaussian guide, :mod:`pyro_blora.guides.batch`)
    have an O(dim) form registered here too.
    """

    def __init__(self, dim: int, sd: float = 1.0, dtype: torch.dtype = torch.float32, device=None, validate_args=None):
        if sd <= 0:
            raise ValueError(f"IsotropicNormal sd must be positive, got {sd}")
        loc = torch.zeros(dim, dtype=dtype, device=device)
        super().__init__(loc, scale_tril=sd * torch.eye(dim, dtype=dtype, device=device), validate_args=validate_args)
        self.sd = float(sd)

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, _instance)
        new.sd = self.sd
        return new

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        dim = self.event_shape[0]
        quad = (value - self.loc).pow(2).sum(-1) / self.sd**2
        return -0.5 * quad - dim * (math.log(self.sd) + 0.5 * math.log(2 * math.pi))


@register_kl(Independent, IsotropicNormal)
def _kl_independent_isotropic(q: Independent, p: IsotropicNormal) -> Tensor:
    """Mean-field Gaussian: ``0.5 sum((sigma^2 + (mu - m)^2) / sd^2 - 1 - 2 log(sigma / sd))``; point mass: ``-log p``."""
    base = q.base_dist
    if q.reinterpreted_batch_ndims == 1 and isinstance(base, Delta):
        return -p.log_prob(base.v)
    if q.reinterpreted_batch_ndims == 1 and isinstance(base, Normal):
        var = (base.scale.pow(2) + (base.loc - p.loc).pow(2)) / p.sd**2
        return 0.5 * (var - 1 - 2 * (base.scale.log() - math.log(p.sd))).sum(-1)
    raise NotImplementedError


@functools.lru_cache(maxsize=64)
def _isotropic(dim: int, sd: float, dtype: torch.dtype, device: torch.device) -> IsotropicNormal:
    """One parameter-free prior object per shape, scale, dtype and device, shared by every factor:
    not rebuilt every step, and the ELBO scores all sites of one such object in one call."""
    return IsotropicNormal(dim, sd, dtype=dtype, device=device)


def inducing_matrices(priors: Sequence["InducingPrior"], values: Tensor, geometries: Sequence[InducingGeometry]) -> Tensor:
    """``[prior.inducing_matrix(v, g)]`` of ``n`` priors of one inducing shape, stacked ``(n, m_r, m_c)``.

    The built-in priors map all values with one batched product (whitened GP:
    ``U = L_r U_w L_c^T``); any other prior maps its own value.
    """
    count = len(priors)
    shape = (count, *priors[0].inducing_shape)
    kinds = {(type(p).inducing_matrix, getattr(p, "whitened", None)) for p in priors}
    if len(kinds) == 1:
        method, whitened = kinds.pop()
        if method is NormalPrior.inducing_matrix or (method is GPPrior.inducing_matrix and not whitened):
            return values.reshape(shape)
        if method is GPPrior.inducing_matrix:
            lr = gather(geometries, "chol_rows").to(values.dtype)
            lc = gather(geometries, "chol_cols").to(values.dtype)
            return lr @ values.reshape(shape) @ lc.transpose(-1, -2)
    return torch.stack([p.inducing_matrix(v, g) for p, v, g in zip(priors, values.unbind(0), geometries)])


class InducingPrior(nn.Module):
    """Base class: inducing inputs and diagonals of one ``rows x cols`` factor.

    ``Z`` is initialised ``N(0, 1/fan)`` so that ``Z Z^T`` is of order one whatever
    the layer width, and ``D = 1``; that keeps the kernels well conditioned
    (``P = Z^T K^{-1} Z`` has eigenvalues near 1/2 at initialisation).
    """

    def __init__(self, rows: int, cols: int, config: "BLoRAConfig", name: str = ""):
        super().__init__()
        m_r, m_c = config.inducing_rows, config.inducing_cols
        self.factor_name = name
        self.jitter = config.jitter
        self.z_rows = nn.Parameter(torch.randn(m_r, rows) / math.sqrt(rows))
        self.z_cols = nn.Parameter(torch.randn(m_c, cols) / math.sqrt(cols))
        self.log_d_rows = nn.Parameter(torch.zeros(m_r))
        self.log_d_cols = nn.Parameter(torch.zeros(m_c))

    @property
    def inducing_shape(self) -> tuple[int, int]:
        return self.z_rows.shape[0], self.z_cols.shape[0]

    @property
    def site_dim(self) -> int:
        """Length of the value sampled at the ``U`` site."""
        m_r, m_c = self.inducing_shape
        return m_r * m_c

    def geometry(self) -> InducingGeometry:
        """Kernel quantities from the current parameters (shared inside :func:`shared_geometry`)."""
        cache = _GEOMETRY_CACHE.get()
        return self._build_geometry() if cache is None else cache.get(self)

    def _build_geometry(self) -> InducingGeometry:
        return InducingGeometry(
            self.z_rows, self.z_cols, self.log_d_rows.exp(), self.log_d_cols.exp(), self.jitter, self.factor_name
        )

    def site_distribution(self, geometry: InducingGeometry) -> Distribution:
        """Distribution of the ``U`` site's value, event shape ``(m_r * m_c,)``."""
        raise NotImplementedError

    def inducing_matrix(self, value: Tensor, geometry: InducingGeometry) -> Tensor:
        """Map the ``U`` site's value to the ``m_r x m_c`` inducing matrix."""
        raise NotImplementedError

    def _isotropic(self, sd: float) -> "IsotropicNormal":
        return _isotropic(self.site_dim, float(sd), self.z_rows.dtype, self.z_rows.device)


class GPPrior(InducingPrior):
    """Matrix-normal GP prior ``U ~ MN(0, K_r, K_c)`` (Bayesian-LoRA's prior).

    Args:
        whitened: sample ``U_w ~ N(0, I)`` and map ``U = L_r U_w L_c^T`` (default),
            or sample ``vec(U) ~ N(0, K_r (x) K_c)`` directly.
    """

    def __init__(self, rows: int, cols: int, config: "BLoRAConfig", name: str = "", whitened: bool | None = None):
        super().__init__(rows, cols, config, name)
        self.whitened = config.whitened if whitened is None else whitened

    def site_distribution(self, geometry: InducingGeometry) -> Distribution:
        if self.whitened:
            return self._isotropic(1.0)
        dim = self.site_dim
        loc = self.z_rows.new_zeros(dim)
        lr, lc = geometry.cholesky
        return MultivariateNormal(loc, scale_tril=torch.kron(lr, lc).to(loc.dtype))

    def inducing_matrix(self, value: Tensor, geometry: InducingGeometry) -> Tensor:
        matrix = value.reshape(*value.shape[:-1], *self.inducing_shape)
        if not self.whitened:
            return matrix
        lr, lc = geometry.cholesky
        return lr.to(matrix.dtype) @ matrix @ lc.T.to(matrix.dtype)


class NormalPrior(InducingPrior):
    """Isotropic ``vec(U) ~ N(0, sd^2 I)``, ignoring the kernel (a baseline)."""

    def __init__(self, rows: int, cols: int, config: "BLoRAConfig", name: str = "", sd: float = 1.0):
        super().__init__(rows, cols, config, name)
        if sd <= 0:
            raise ValueError(f"NormalPrior sd must be positive, got {sd}")
        self.sd = sd

    def site_distribution(self, geometry: InducingGeometry) -> Distribution:
        return self._isotropic(self.sd)

    def inducing_matrix(self, value: Tensor, geometry: InducingGeometry) -> Tensor:
        return value.reshape(*value.shape[:-1], *self.inducing_shape)


PRIORS: dict[str, type[InducingPrior]] = {"gp": GPPrior, "normal": NormalPrior}
"""Priors by name. Add yours with ``PRIORS["mine"] = MyPrior`` or pass the class itself."""

PriorSpec = Union[str, type, Callable[..., InducingPrior]]


def build_prior(spec: PriorSpec, rows: int, cols: int, config: "BLoRAConfig", name: str = "") -> InducingPrior:
    """Instantiate a prior from a name in :data:`PRIORS`, a class, or a factory."""
    if isinstance(spec, str):
        if spec not in PRIORS:
            raise ValueError(f"unknown prior {spec!r}; choose one of {sorted(PRIORS)} or pass an InducingPrior subclass")
        spec = PRIORS[spec]
    if not callable(spec):
        raise TypeError(f"prior must be a name, an InducingPrior subclass or a factory, got {type(spec).__name__}")
    prior = spec(rows, cols, config, name)
    if not isinstance(prior, InducingPrior):
        raise TypeError(f"prior factory returned {type(prior).__name__}, not an InducingPrior")
    return prior
