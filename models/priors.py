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
import math
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Union

import torch
from pyro.distributions import MultivariateNormal
from torch import Tensor, nn
from torch.distributions import Distribution

from .geometry import InducingGeometry

if TYPE_CHECKING:
    from pyro_blora.config import BLoRAConfig

__all__ = ["InducingPrior", "GPPrior", "NormalPrior", "PRIORS", "PriorSpec", "build_prior", "shared_geometry"]

_GEOMETRY_CACHE: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar("pyro_blora_geometry", default=None)


@contextlib.contextmanager
def shared_geometry() -> Iterator[None]:
    """Within this block each prior computes its kernel geometry once.

    The guide and the model of one ELBO evaluation both need every factor's
    Cholesky factors and projections; sharing them halves that work and keeps
    one autograd graph. Open one block per evaluation (``fit`` does, per step):
    parameters must not change inside it.
    """
    token = _GEOMETRY_CACHE.set({})
    try:
        yield
    finally:
        _GEOMETRY_CACHE.reset(token)


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
        key = (id(self), torch.is_grad_enabled())
        if cache is not None and key in cache:
            return cache[key]
        geometry = InducingGeometry(
            self.z_rows, self.z_cols, self.log_d_rows.exp(), self.log_d_cols.exp(), self.jitter, self.factor_name
        )
        if cache is not None:
            cache[key] = geometry
        return geometry

    def site_distribution(self, geometry: InducingGeometry) -> Distribution:
        """Distribution of the ``U`` site's value, event shape ``(m_r * m_c,)``."""
        raise NotImplementedError

    def inducing_matrix(self, value: Tensor, geometry: InducingGeometry) -> Tensor:
        """Map the ``U`` site's value to the ``m_r x m_c`` inducing matrix."""
        raise NotImplementedError


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
        dim = self.site_dim
        loc = self.z_rows.new_zeros(dim)
        if self.whitened:
            return MultivariateNormal(loc, scale_tril=torch.eye(dim, dtype=loc.dtype, device=loc.device))
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
        dim = self.site_dim
        loc = self.z_rows.new_zeros(dim)
        return MultivariateNormal(loc, scale_tril=self.sd * torch.eye(dim, dtype=loc.dtype, device=loc.device))

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
