"""The Bayesian-LoRA linear layer: a frozen base layer plus ``(alpha / r) B A x``.

Each Bayesian factor (``A``: ``r x d_in``, ``B``: ``d_out x r``) is an
:class:`InducingFactor`, a small Pyro model with two sample sites::

    {layer}.lora_A.U ~ prior over the inducing matrix (models/priors.py)
    {layer}.lora_A.W ~ W | U  (models/conditional.py)

:meth:`BayesianLoRALinear.model` samples both factors and keeps the draw for the
next forward passes; the layer never knows whether a guide, a replayed trace or
the prior supplied the values. Factors of non-Bayesian targeted layers are plain
LoRA parameters (peft's initialisation: Kaiming-uniform ``A``, zero ``B``).

Weights may carry a leading sample dimension ``S``: then the input's batch is
read as ``S`` stacked copies (sample-major) and copy ``s`` uses sample ``s``,
which evaluates several posterior samples in one forward.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import pyro
import torch
from torch import Tensor, nn

from .batched import take_rows
from .conditional import InducingConditional, batch_conditionals
from .merging import can_merge_into, merge_pays, merged_weight
from .priors import InducingPrior, build_prior, inducing_matrices

if TYPE_CHECKING:
    from pyro_blora.config import BLoRAConfig

__all__ = ["InducingFactor", "BayesianLoRALinear", "linear_shape", "factor_conditionals"]


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(d_in, d_out)`` of an ``nn.Linear`` or transformers' GPT-2 ``Conv1D``; None otherwise."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        d_in, d_out = module.weight.shape  # Conv1D stores the weight transposed
        return int(d_in), int(d_out)
    return None


class InducingFactor(nn.Module):
    """One Bayesian LoRA factor ``W`` (``rows x cols``) generated from an inducing matrix.

    The output scale is ``s = prior_sd / sqrt(cols)``: ``cols`` is the factor's
    fan-in, so ``W x`` keeps the prior's scale whatever the width.
    """

    def __init__(self, name: str, rows: int, cols: int, config: "BLoRAConfig"):
        super().__init__()
        self.site_name = name
        self.shape = (rows, cols)
        self.prior: InducingPrior = build_prior(config.prior, rows, cols, config, name)
        self.scale = config.prior_sd / math.sqrt(cols)
        self.lambda_prior = config.conditional_prior_scale

    @property
    def site_u(self) -> str:
        return f"{self.site_name}.U"

    @property
    def site_w(self) -> str:
        return f"{self.site_name}.W"

    @property
    def site_dim(self) -> int:
        return self.prior.site_dim

    def conditional(self, u_value: Tensor, lam: Tensor | float) -> InducingConditional:
        """The distribution of ``W`` given the ``U`` site's value and noise scale ``lambda``."""
        geometry = self.prior.geometry()
        inducing = self.prior.inducing_matrix(u_value, geometry)
        return InducingConditional(geometry, inducing, self.scale, lam, source=u_value)

    def model(self) -> Tensor:
        """Sample ``U`` from the prior and ``W | U`` (``lambda = lambda_p``, ``lambda_max`` by default); return ``W``."""
        geometry = self.prior.geometry()
        u_value = pyro.sample(self.site_u, self.prior.site_distribution(geometry))
        # U and the mean are built lazily: a replayed ELBO evaluation needs neither.
        inducing = lambda: self.prior.inducing_matrix(u_value, geometry)  # noqa: E731
        return pyro.sample(self.site_w, InducingConditional(geometry, inducing, self.scale, self.lambda_prior, source=u_value))

    @torch.no_grad()
    def mean_share(self, draws: int = 32) -> float:
        """Per-entry ``E_p[(T_r U T_c)_{ij}^2]``: the share of the unit prior variance that ``U`` carries.

        For the whitened GP prior it is ``tr(Q_r) tr(Q_c) / (rows cols)``, ``Q = Z^T K^{-1} Z``, about
        ``m_r m_c / (4 rows cols)`` at initialisation; estimated from ``draws`` prior draws (seeded, the
        global RNG untouched) so that it holds for any :class:`InducingPrior`.
        """
        geometry = self.prior.geometry()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            values = self.prior.site_distribution(geometry).sample((draws,))
        mean = geometry.conditional_mean(self.prior.inducing_matrix(values, geometry))
        return float(mean.pow(2).mean())


RowRef = Optional[tuple[Tensor, int]]
"""Where a per-factor value sits in a stacked tensor: ``(stack, position)``, or None if it stands alone."""


def _stack(values: Sequence[Tensor], refs: Sequence[RowRef] | None) -> Tensor:
    """``torch.stack(values)``, or the rows of the one stack they were taken from (no split and re-stack)."""
    if refs is not None and all(r is not None for r in refs) and all(r[0] is refs[0][0] for r in refs):  # type: ignore[index]
        return take_rows(refs[0][0], [r[1] for r in refs])  # type: ignore[index]
    return torch.stack(list(values))


def factor_conditionals(
    factors: Sequence[InducingFactor],
    u_values: Sequence[Tensor],
    lams: Sequence[Tensor | float],
    u_rows: Sequence[RowRef] | None = None,
    lam_rows: Sequence[RowRef] | None = None,
) -> list[InducingConditional]:
    """``[f.conditional(u, lam)]`` for many factors, each with one draw made ahead, batched per factor shape.

    Factors that share their shape, inducing shape, output scale, dtype and
    device, and are all point masses (``lam`` the number 0) or all not, go
    through one :func:`~pyro_blora.models.conditional.batch_conditionals`.
    Geometries come from :meth:`InducingPrior.geometry` (batched and shared
    inside :func:`~pyro_blora.models.priors.shared_geometry`). ``u_rows`` and
    ``lam_rows`` say where the values sit in stacked tensors, if they do.
    """
    groups: dict[tuple, list[int]] = {}
    for index, (factor, lam) in enumerate(zip(factors, lams)):
        param = factor.prior.z_rows
        point_mass = not isinstance(lam, Tensor) and float(lam) == 0.0
        key = (factor.shape, factor.prior.inducing_shape, factor.scale, param.dtype, param.device, point_mass)
        groups.setdefault(key, []).append(index)
    out: list = [None] * len(factors)
    for key, indices in groups.items():
        members = [factors[i] for i in indices]
        geometries = [f.prior.geometry() for f in members]
        sources = [u_values[i] for i in indices]
        stacked = _stack(sources, None if u_rows is None else [u_rows[i] for i in indices])
        inducing = inducing_matrices([f.prior for f in members], stacked, geometries)
        lam = None
        if not key[-1]:
            values = [torch.as_tensor(lams[i], dtype=key[3], device=key[4]) for i in indices]
            lam = _stack(values, None if lam_rows is None else [lam_rows[i] for i in indices])
        for index, conditional in zip(indices, batch_conditionals(geometries, inducing, key[2], lam, sources)):
            out[index] = conditional
    return out


class BayesianLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` / ``Conv1D`` plus a (Bayesian) low-rank update.

    Args:
        base: the layer to adapt; its parameters are frozen, not copied.
        name: the layer's module path, used to name the sample sites.
        config: rank, scaling, dropout, inducing sizes and prior.
        bayesian: Bayesian factors (True) or plain LoRA parameters (False).
    """

    def __init__(self, base: nn.Module, name: str, config: "BLoRAConfig", bayesian: bool = True):
        super().__init__()
        shape = linear_shape(base)
        if shape is None:
            raise TypeError(f"{name}: can only adapt nn.Linear or transformers Conv1D, got {type(base).__name__}")
        self.in_features, self.out_features = shape
        for param in base.parameters():
            param.requires_grad_(False)
        self.layer_name = name
        self.config = config  # what fit() records for a network that already carries adapters
        self.r = config.r
        self.scaling = config.alpha / config.r
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.bayesian = bayesian
        # Adapters live in float32 (float64 for a float64 base) on the base's device;
        # the base keeps its own dtype, which may be half precision or quantised.
        weight = base.weight
        kw = {"device": weight.device, "dtype": torch.float64 if weight.dtype == torch.float64 else torch.float32}
        if bayesian:
            self.lora_A = InducingFactor(f"{name}.lora_A", config.r, self.in_features, config).to(**kw)
            self.lora_B = InducingFactor(f"{name}.lora_B", self.out_features, config.r, config).to(**kw)
            if config.prior_scale == "empirical_bayes":
                # log g, a hyperparameter of the prior fitted by the ELBO. It starts where U's part of the
                # prior has the variance s^2 of the full prior per entry (in each factor): the inducing
                # subspace alone carries a share m_r m_c / (4 rows cols) of it, so with g = 1 the mean
                # that a few hundred examples can afford stays near zero (the inert-adapter failure).
                meta = weight.device.type == "meta"  # shape-only models (parameter counts) have no values
                share = 1.0 if meta else self.lora_A.mean_share() * self.lora_B.mean_share()
                self.lora_prior_log_gain = nn.Parameter(torch.tensor(-0.5 * math.log(share), **kw))
        else:
            self.lora_A_weight = nn.Parameter(torch.empty(config.r, self.in_features, **kw))
            nn.init.kaiming_uniform_(self.lora_A_weight, a=math.sqrt(5))
            self.lora_B_weight = nn.Parameter(torch.zeros(self.out_features, config.r, **kw))
        self.base = base
        self._sampled: tuple[Tensor, Tensor] | None = None

    @property
    def factors(self) -> list[InducingFactor]:
        """The Bayesian factors, ``[A, B]``, or ``[]`` for a plain LoRA layer."""
        return [self.lora_A, self.lora_B] if self.bayesian else []

    def model(self) -> tuple[Tensor, Tensor]:
        """Sample both factors (Pyro sites) and use them in the following forwards."""
        if self.bayesian:
            self.set_adapter_weights(self.lora_A.model(), self.lora_B.model())
        return self.adapter_weights()

    def set_adapter_weights(self, a: Tensor, b: Tensor) -> None:
        """Fix ``A`` (``[S,] r x d_in``) and ``B`` (``[S,] d_out x r``) for the next forwards."""
        if a.shape[-2:] != (self.r, self.in_features) or b.shape[-2:] != (self.out_features, self.r):
            raise ValueError(
                f"{self.layer_name}: adapter weights of shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit "
                f"A ({self.r}, {self.in_features}) and B ({self.out_features}, {self.r})"
            )
        self._sampled = (a, b)

    def set_draws(self, weights: Mapping[str, Tensor]) -> None:
        """Fix this layer's factors from joint draws keyed by Pyro site name (``*.W``).

        A point layer has no draws: its factors go back to its parameters (dropping any override).
        """
        if self.bayesian:
            self.set_adapter_weights(weights[self.lora_A.site_w], weights[self.lora_B.site_w])
        else:
            self._sampled = None

    def clear_adapter_weights(self) -> None:
        self._sampled = None

    def prior_gain(self) -> Tensor | float:
        """``g``, the empirical-Bayes gain of the prior's output scale (1.0 for ``prior_scale="fixed"``)."""
        log_gain = getattr(self, "lora_prior_log_gain", None)
        return 1.0 if log_gain is None else log_gain.exp()

    @property
    def update_scale(self) -> Tensor | float:
        """The factor of ``B A x`` in the forward: ``(alpha / r) g``, with ``g`` = :meth:`prior_gain`."""
        gain = self.prior_gain()
        return self.scaling if isinstance(gain, float) else self.scaling * gain

    def effective_weights(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Factors ``(g A, B)`` whose product times ``alpha / r`` is the update of draws ``(A, B)`` (peft's view)."""
        gain = self.prior_gain()
        return (a, b) if isinstance(gain, float) else (a * gain.to(a.dtype), b)

    def adapter_weights(self) -> tuple[Tensor, Tensor]:
        """``(A, B)`` of the next forwards: the factors set last (:meth:`set_adapter_weights`), else a point
        layer's parameters. Post-hoc methods (TFB, Laplace-LoRA) override a point layer's factors this way;
        :meth:`set_draws` (``FitResult.use_posterior_mean``) puts its parameters back."""
        if self._sampled is not None:
            return self._sampled
        if not self.bayesian:
            return self.lora_A_weight, self.lora_B_weight
        raise RuntimeError(
            f"{self.layer_name} has no sampled adapter weights: run the network through "
            "pyro_blora (FitResult.predict, BayesianLoRAModel), or call FitResult.use_posterior_mean()"
        )

    #: Merge a fixed draw into ``W0`` for no-grad forwards where that is exact and cheaper
    #: (:mod:`pyro_blora.models.merging`); research code may set it False on a layer or the class.
    merge_for_inference: bool = True

    def _merges(self, x: Tensor, a: Tensor) -> bool:
        return (
            self.merge_for_inference and a.dim() == 2 and not torch.is_grad_enabled()
            and can_merge_into(self.base, a.dtype)  # checked per call: .to(dtype) may have changed either
            and not (self.dropout.training and isinstance(self.dropout, nn.Dropout))
            and type(self)._project is BayesianLoRALinear._project
            and merge_pays(x.numel() // self.in_features, self.in_features, self.out_features)
        )

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.adapter_weights()
        if self._merges(x, a):
            weight = merged_weight(self.base.weight, a, b, self.update_scale)
            return nn.functional.linear(x, weight, self.base.bias)
        out = self.base(x)
        h = self.dropout(x).to(a.dtype)
        if a.dim() == 2:
            delta = self._project(h, a) @ b.T
        else:
            samples = a.shape[0]
            if x.shape[0] % samples:
                raise ValueError(
                    f"{self.layer_name}: batch of {x.shape[0]} rows cannot hold {samples} stacked posterior samples"
                )
            projected = torch.bmm(h.reshape(samples, -1, self.in_features), a.transpose(1, 2))
            # B is stacked with A, except where only A is random (BLoB keeps B a point estimate)
            delta = torch.bmm(projected, b.transpose(1, 2)) if b.dim() == 3 else projected @ b.T
            delta = delta.reshape(*x.shape[:-1], self.out_features)
        return out + (self.update_scale * delta).to(out.dtype)

    def _project(self, h: Tensor, a: Tensor) -> Tensor:
        """``h A^T`` for one (unstacked) draw of A; subclasses may estimate it otherwise (BLoB: Flipout)."""
        return h @ a.T

    def extra_repr(self) -> str:
        kind = "bayesian" if self.bayesian else "point"
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}, {kind}"
