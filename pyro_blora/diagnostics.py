"""Is the posterior doing any work? Per-module and per-factor health numbers of a fitted Bayesian-LoRA result.

:func:`diagnose` runs one batch of data through the network, once with the
posterior-mean factors and once with ``num_samples`` posterior draws, and reads
what each adapted layer adds to its frozen base (forward hooks on the
:class:`~pyro_blora.models.BayesianLoRALinear` layers and their ``base``). On the
whole data it measures the mutual information of the posterior predictive.

How to read the numbers (all are ratios of mean row norms over the batch's rows,
tokens included; "adapter output" is ``(alpha / r) B A x``, "base output" ``W0 x``):

* ``mean_ratio``: adapter output / base output with the posterior-mean factors.
  Below ``inert_threshold`` (1e-3) the fit leaves the module's base unchanged:
  the module is *inert*.
* ``sample_ratio``: the same, averaged over posterior samples (a wide posterior
  around zero has a small ``mean_ratio`` but not a small ``sample_ratio``).
* ``spread``: the posterior samples' standard deviation of the adapter output,
  relative to the samples' mean adapter output. Below ``spread_threshold``
  (1e-2) every sample adds the same thing: the posterior is *collapsed*, a
  point in disguise.
* ``spread_to_base``: that standard deviation relative to the base output:
  how much the posterior moves the layer's output at all. For an inert module
  this, not ``spread``, is held against ``spread_threshold`` (next to a tiny
  adapter output any noise looks large).
* per factor (``A``, ``B``): ``u_mean_rms``, the root mean square of ``E_q[U_w]``;
  ``u_sd``, the guide's standard deviation of ``U_w`` measured from draws (root
  mean square over the coordinates; for a flow this is the output, not the base,
  whose log-scale Pyro clips); ``base_sd`` and ``sd_cap``, the family's own
  ``sigma`` (its mean) and its cap where it has one; ``lam``, the ``lambda`` of
  ``q(W | U)`` (0 for a point mass).
* ``mutual_information``: the epistemic part of the predictive entropy (nats,
  mean over examples). Below ``mi_threshold`` (0.005) the samples agree on every
  prediction: the predictive is that of a point estimate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from pyro_blora.metrics import uncertainty_decomposition
from pyro_blora.models.merging import adapter_path
from pyro_blora.result import make_loader

__all__ = ["Diagnostics", "Flag", "Row", "diagnose", "supports"]

INERT_THRESHOLD = 1e-3
SPREAD_THRESHOLD = 1e-2
MI_THRESHOLD = 5e-3


@dataclass
class Row:
    """One factor (``A`` or ``B``) of one adapted module; a plain LoRA module has one row, factor ``"-"``.

    The module columns (``mean_ratio`` .. ``spread_to_base``) repeat on both factor rows of a module.
    """

    module: str
    factor: str
    bayesian: bool
    mean_ratio: float
    sample_ratio: float
    spread: float
    spread_to_base: float
    u_mean_rms: Optional[float] = None
    u_sd: Optional[float] = None
    base_sd: Optional[float] = None
    sd_cap: Optional[float] = None
    lam: Optional[float] = None


@dataclass
class Flag:
    """A finding in words: ``kind`` is ``"inert"``, ``"collapsed"`` or ``"point_mass"``; ``module`` None for the whole posterior."""

    kind: str
    message: str
    module: Optional[str] = None


@dataclass
class Diagnostics:
    """What :func:`diagnose` found: the rows, the predictive's mutual information and the flags."""

    rows: list[Row]
    mutual_information: float
    predictive_entropy: float
    num_samples: int
    num_examples: int
    family: str
    deterministic: bool = False
    """The guide is a point mass (MAP): one sample, no spread by construction."""
    flags: list[Flag] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        """No flag was raised."""
        return not self.flags

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (non-finite numbers become None)."""
        return _finite(asdict(self))

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format(self) -> str:
        """A readable table, one line per factor, then the predictive's numbers and the flags."""
        header = ["module", "factor", "adapter/base", "sampled/base", "spread", "spread/base",
                  "U mean rms", "U sd", "base sd", "sd cap", "lambda"]
        lines = [[r.module, r.factor, *(_num(v) for v in (
            r.mean_ratio, r.sample_ratio, r.spread, r.spread_to_base, r.u_mean_rms, r.u_sd, r.base_sd, r.sd_cap, r.lam))] for r in self.rows]
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        table = [" ".join(h.ljust(w) for h, w in zip(header, widths))]
        table.append(" ".join("-" * w for w in widths))
        table += [" ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
        table.append("")
        table.append(f"guide: {self.family}; {self.num_samples} posterior samples; {self.num_examples} examples")
        table.append(f"mutual information (epistemic): {_num(self.mutual_information)} nats of "
                     f"{_num(self.predictive_entropy)} predictive entropy")
        table.append("flags:" if self.flags else "flags: none (the posterior is live)")
        table += [f"  [{f.kind}] {f.message}" for f in self.flags]
        return "\n".join(table)


def _num(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3g}"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def supports(result: Any) -> bool:
    """Whether :func:`diagnose` can read ``result``: Bayesian-LoRA layers (``model.layers``) and a guide with sites."""
    layers = getattr(getattr(result, "model", None), "layers", None)
    return bool(layers) and getattr(getattr(result, "guide", None), "sites", None) is not None


def _layers(result: Any) -> list[nn.Module]:
    layers = getattr(getattr(result, "model", None), "layers", None)
    if not supports(result):
        raise TypeError(
            f"diagnose needs a Bayesian-LoRA result (model.layers and a guide with sites), got {type(result).__name__}"
        )
    return list(layers)


def _repeat(batch: dict[str, Any], times: int) -> dict[str, Any]:
    """``times`` sample-major copies of every tensor of ``batch`` along its first dimension."""
    return {k: v.repeat(times, *([1] * (v.dim() - 1))) if isinstance(v, Tensor) and v.dim() > 0 else v
            for k, v in batch.items()}


@dataclass
class _LayerPass:
    """One layer in one forward of ``S`` stacked samples: mean row norms (floats), never the outputs themselves."""

    delta: list[float]
    """Per sample: the adapter output's mean row norm."""
    base: list[float]
    """Per sample: the base output's mean row norm."""
    mean_delta: float
    """The mean row norm of the adapter output averaged over the samples."""
    spread: float
    """The mean row norm of the adapter output's standard deviation over the samples (0 for one sample)."""


def _row_norm(x: Tensor) -> float:
    """Mean over rows of the Euclidean norm along the last dimension."""
    return float(x.norm(dim=-1).mean())


def _summarise(total: Tensor, base: Tensor, samples: int) -> _LayerPass:
    width = total.shape[-1]
    base = base.detach().float().reshape(samples, -1, width)
    delta = total.detach().float().reshape(samples, -1, width) - base
    spread = _row_norm(delta.std(0, unbiased=False)) if samples > 1 else 0.0
    return _LayerPass([_row_norm(d) for d in delta], [_row_norm(b) for b in base], _row_norm(delta.mean(0)), spread)


@torch.no_grad()
def _layer_passes(result: Any, batch: dict[str, Any], weights: dict[str, Tensor], samples: int) -> dict[str, _LayerPass]:
    """Per layer name: the norms of one forward of the batch with ``weights`` (``samples`` stacked copies).

    The adapter output is the layer's output minus its base's (forward hooks on
    both), i.e. exactly what the adapter adds; each layer is summarised as soon
    as it has run, so no activations are kept.
    """
    base_out: dict[str, Tensor] = {}
    passes: dict[str, _LayerPass] = {}
    handles = []

    def on_base(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Tensor) -> None:
            base_out[name] = output
        return record

    def on_layer(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: Any, output: Tensor) -> None:
            passes[name] = _summarise(output, base_out.pop(name), samples)
        return record

    for layer in _layers(result):
        handles.append(layer.base.register_forward_hook(on_base(layer.layer_name)))
        handles.append(layer.register_forward_hook(on_layer(layer.layer_name)))
    net = result.net
    was_training = net.training
    net.eval()
    try:
        result.model.set_adapter_weights(weights)
        with adapter_path(_layers(result)):  # the base's own output is hooked: no merged forward
            result.task.class_logits(net, _repeat(batch, samples))
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    return passes


def _ratio(top: float, bottom: float) -> float:
    if bottom > 0:
        return top / bottom
    return 0.0 if top == 0 else math.inf


def _module_numbers(at_mean: Optional[_LayerPass], sampled: Optional[_LayerPass]) -> dict[str, float]:
    """``mean_ratio``, ``sample_ratio``, ``spread`` and ``spread_to_base`` of one layer (see the module docstring).

    NaN for a layer the forward did not run through.
    """
    if at_mean is None or sampled is None:
        return dict.fromkeys(("mean_ratio", "sample_ratio", "spread", "spread_to_base"), math.nan)
    base = at_mean.base[0]
    per_sample = [_ratio(d, b) for d, b in zip(sampled.delta, sampled.base)]
    return {
        "mean_ratio": _ratio(at_mean.delta[0], base),
        "sample_ratio": sum(per_sample) / len(per_sample),
        "spread": _ratio(sampled.spread, sampled.mean_delta),
        "spread_to_base": _ratio(sampled.spread, base),
    }


def _rms(x: Tensor) -> float:
    return float(x.detach().float().pow(2).mean().sqrt())


@torch.no_grad()
def _factor_numbers(family: nn.Module, u_samples: int) -> dict[str, Optional[float]]:
    """``u_mean_rms``, ``u_sd`` (from ``u_samples`` draws), ``base_sd``, ``sd_cap`` and ``lam`` of one site's family."""
    draws = family.distribution().rsample((u_samples,)).float()
    rho = getattr(family, "scale_rho", getattr(family, "diag_rho", None))
    cap = getattr(family, "scale_max", None)
    base_sd = float((cap * torch.sigmoid(rho)).mean()) if rho is not None and cap is not None else None
    lam = family.conditional_scale()
    return {
        "u_mean_rms": _rms(family.mean()),
        "u_sd": float(draws.var(0, unbiased=False).mean().sqrt()),
        "base_sd": base_sd,
        "sd_cap": float(cap) if base_sd is not None else None,
        "lam": float(lam.mean()) if isinstance(lam, Tensor) else float(lam),
    }


def _first_batch(result: Any, data: Any, batch_size: int) -> dict[str, Any]:
    """The first ``batch_size`` examples of ``data``, collated by the result's task."""
    return next(iter(make_loader(data, result.task, batch_size, shuffle=False)))


def _rows(result: Any, data: Any, num_samples: int, batch_size: int, u_samples: int) -> list[Row]:
    """The table's rows: the layers' numbers on the first batch, with the posterior mean and with samples."""
    batch = _first_batch(result, data, batch_size)
    samples = 1 if result.is_deterministic else num_samples
    devices = sorted({p.device.index or 0 for p in result.net.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):  # leave the caller's RNG as it was
        torch.manual_seed(0)
        at_mean = _layer_passes(result, batch, result.guide.mean_weights(), 1)
        draw = getattr(result, "sample_weights", None) or result.guide.sample_weights
        sampled = _layer_passes(result, batch, draw(samples), samples)
        rows = []
        for layer in _layers(result):
            numbers = _module_numbers(at_mean.get(layer.layer_name), sampled.get(layer.layer_name))
            if not layer.bayesian:
                rows.append(Row(layer.layer_name, "-", False, **numbers))
                continue
            for letter, factor in zip("AB", layer.factors):
                family = result.guide.site_guide(factor.site_name)
                rows.append(Row(layer.layer_name, letter, True, **numbers, **_factor_numbers(family, u_samples)))
    return rows


def _flags(diag: Diagnostics, inert: float, spread: float, mi: float) -> list[Flag]:
    """The findings in words, from the rows and the mutual information."""
    modules = {r.module: r for r in diag.rows}
    carriers = [r for r in modules.values() if not r.bayesian and r.mean_ratio >= inert]
    flags = []
    for r in modules.values():
        if not r.bayesian:
            continue
        dormant = r.mean_ratio < inert
        if dormant:
            where = (f"while plain module(s) {', '.join(repr(c.module) for c in carriers)} carry the fit "
                     f"(adapter/base {', '.join(_num(c.mean_ratio) for c in carriers)})" if carriers
                     else "and no adapter of the network carries any fit")
            flags.append(Flag("inert", f"Bayesian module {r.module!r} adds {_num(r.mean_ratio)} of its base output "
                                       f"(samples: {_num(r.sample_ratio)}; threshold {inert:g}) {where}: "
                                       "its posterior has nothing to do", r.module))
        # next to an inert adapter output any noise looks large: the base output is the yardstick then
        measured, against = (r.spread_to_base, "base") if dormant else (r.spread, "adapter")
        if not diag.deterministic and measured < spread:
            flags.append(Flag("collapsed", f"the posterior samples of module {r.module!r} differ by "
                                           f"{_num(measured)} of its {against} output (threshold {spread:g}): "
                                           "q is close to a point mass there", r.module))
    if diag.deterministic:
        flags.append(Flag("point_mass", "the guide is a point mass (MAP, delta): every sample is the posterior mean, "
                                        "so there is no epistemic uncertainty by construction"))
    elif diag.mutual_information < mi:
        flags.append(Flag("collapsed", f"mutual information {_num(diag.mutual_information)} nats < {mi:g}: the "
                                       "posterior samples agree on every prediction; the predictive is that of a "
                                       "point estimate"))
    return flags


def diagnose(
    result: Any,
    data: Any,
    num_samples: int = 8,
    batch_size: int = 8,
    *,
    u_samples: int = 64,
    inert_threshold: float = INERT_THRESHOLD,
    spread_threshold: float = SPREAD_THRESHOLD,
    mi_threshold: float = MI_THRESHOLD,
) -> Diagnostics:
    """Tell a dead posterior from a live one (see the module docstring for what each number means).

    Args:
        result: a fitted Bayesian-LoRA result (:class:`~pyro_blora.result.FitResult`, or a
            wrapper of one that exposes ``model``, ``guide`` and ``predict``).
        data: examples (or a DataLoader) the result's task collates; the layer numbers
            use its first batch, the mutual information all of it.
        num_samples: posterior samples for the layer spread and the predictive.
        batch_size: examples in the batch the layers are measured on.
        u_samples: draws of each ``q(U_w)`` behind ``u_sd``.
        inert_threshold, spread_threshold, mi_threshold: where the flags are raised.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 to measure a spread, got {num_samples}")
    _layers(result)  # refuse a result without Bayesian-LoRA layers before any forward
    rows = _rows(result, data, num_samples, batch_size, u_samples)
    prediction = result.predict(data, num_samples=num_samples, batch_size=batch_size)
    split = uncertainty_decomposition(prediction.sample_probs)
    family = getattr(result.guide, "family_name", type(result.guide).__name__)
    diag = Diagnostics(
        rows=rows,
        mutual_information=float(split["mutual_information"].mean()),
        predictive_entropy=float(split["predictive_entropy"].mean()),
        num_samples=prediction.num_samples,
        num_examples=int(prediction.probs.shape[0]),
        family=str(family),
        deterministic=bool(result.is_deterministic),
    )
    diag.flags = _flags(diag, inert_threshold, spread_threshold, mi_threshold)
    return diag
