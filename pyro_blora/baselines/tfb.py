"""Training-free Bayesianization (TFB) of a MAP LoRA fit: the ``fit(..., guide="tfb")`` baseline.

Shi et al. (2025, "Training-Free Bayesianization for Low-Rank Adapters of Large
Language Models") turn a trained LoRA adapter ``Delta W = B A`` into a Gaussian
posterior without any training. With the thin SVD ``B = U diag(d) V^T`` the
posterior over ``A`` is

.. math::

    A \\sim \\mathcal{N}\\big(A_{MAP},\\ \\sigma^2\\, V \\mathrm{diag}(d)^{-2} V^T \\otimes I\\big)
    \\quad\\Longleftrightarrow\\quad
    B A = B A_{MAP} + U Z,\\qquad Z_{ij} \\sim \\mathcal{N}(0, \\sigma^2),

i.e. isotropic noise of sd ``sigma`` on the LoRA product inside the column
space of ``B`` (low-rank noise; ``B`` stays a point estimate). ``sigma`` is the
largest value whose anchor-set NLL (validation data only) stays within
``tolerance`` nats of MAP's,

.. math::

    \\sigma^* = \\max\\{\\sigma \\in [\\sigma_{lo}, \\sigma_{hi}] :
        \\mathrm{NLL}_{val}(\\sigma) - \\mathrm{NLL}_{val}(0) \\le \\varepsilon\\},

found by binary search, every candidate scored with the same seeded noise
(common random numbers). One ``sigma`` is shared by every adapted module (as in
the paper) and recorded per module; ``per_module=True`` searches one per module
in turn, the ones already found in place. ``tolerance = 0`` gives ``sigma = 0``: the MAP.
Every adapted layer is perturbed: plain LoRA layers (a MAP run's default) through the layer's factor
override (``set_adapter_weights``), Bayesian layers around their posterior mean.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pyro_blora.io import read_method_file, write_method_file
from pyro_blora.io import save as save_adapter
from pyro_blora.methods import FitRequest, Method, register_method
from pyro_blora.metrics import negative_log_likelihood
from pyro_blora.restore import load_fit_result
from pyro_blora.result import DEFAULT_PREDICT_SEED, FitResult, Prediction, WrappedPosterior, _repeat_batch, make_loader
from pyro_blora.tasks.base import Task
from pyro_blora.training.svi import fit_svi

__all__ = ["TFBOptions", "TFBResult", "fit_tfb", "load_tfb", "search_sigma", "tfb_from_map"]

Data = Union[Dataset, DataLoader, Sequence[Any]]
_FORMAT = 1


@dataclass
class _Factors:
    """A layer's MAP factors and ``V diag(1/d)``, which maps ``Z`` to the noise on ``A``."""

    a: Tensor
    b: Tensor
    lift: Tensor


def map_factors(map_result: FitResult) -> dict[str, _Factors]:
    """``A``, ``B`` and ``V diag(d)^{-1}`` (zero where ``d = 0``) of every adapted layer at the MAP.

    Plain LoRA layers (what a MAP run trains by default) and Bayesian layers at their posterior mean alike.
    """
    map_result.use_posterior_mean()
    out = {}
    for layer in map_result.model.layers:
        a, b = (t.detach().clone() for t in layer.adapter_weights())
        _, d, vh = torch.linalg.svd(b.double(), full_matrices=False)
        keep = d > (d.max() * 1e-8 if d.numel() else 0.0)
        inverse = torch.where(keep, 1.0 / d.clamp_min(1e-300), torch.zeros_like(d))
        out[layer.layer_name] = _Factors(a, b, vh.T * inverse)  # float64: 1/d can be large
    if not out:
        raise ValueError("TFB perturbs the A factors of LoRA layers, and this fit has none")
    return out


def _directions(factors: dict[str, _Factors], num_samples: int, seed: Optional[int]) -> dict[str, Tensor]:
    """``V diag(1/d) Z_s`` for ``S`` standard-normal ``Z_s`` per layer, from a private stream when ``seed`` is given."""
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    out = {}
    for name, f in factors.items():
        z = torch.randn((num_samples, *f.a.shape), generator=generator, dtype=torch.float64)
        out[name] = (f.lift.to(f.a.device) @ z.to(f.a.device)).to(f.a.dtype)
    return out


@torch.no_grad()
def _sample_probs(
    map_result: FitResult, factors: dict[str, _Factors], directions: dict[str, Tensor], sigma: dict[str, float],
    data: Data, batch_size: int,
) -> tuple[Tensor, Optional[Tensor]]:
    """``(S, N, C)`` class probabilities with ``A_s = A + sigma V diag(1/d) Z_s``, and the labels."""
    samples = next(iter(directions.values())).shape[0]
    loader = make_loader(data, map_result.task, batch_size, shuffle=False)
    probs, labels = [], []
    try:
        with map_result._eval_mode():
            for layer in map_result.model.layers:
                if layer.layer_name in factors:
                    f = factors[layer.layer_name]
                    layer.set_adapter_weights(f.a + sigma[layer.layer_name] * directions[layer.layer_name], f.b)
            for batch in loader:
                logits = map_result.task.class_logits(map_result.net, _repeat_batch(batch, samples))
                probs.append(torch.softmax(logits.float().reshape(samples, -1, logits.shape[-1]), dim=-1).cpu())
                if "labels" in batch:
                    labels.append(torch.as_tensor(batch["labels"]).cpu())
    finally:
        map_result.use_posterior_mean()
    return torch.cat(probs, dim=1), (torch.cat(labels) if labels else None)


def _check_search(tolerance: float, bounds: Sequence[float], iterations: int, num_samples: int) -> None:
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0 and tolerance < float("inf")):
        raise ValueError(f"tolerance must be a finite number >= 0 (nats), got {tolerance!r}")
    if len(bounds) != 2 or not (0 <= float(bounds[0]) < float(bounds[1]) < float("inf")):
        raise ValueError(f"search_bounds must be (low, high) with 0 <= low < high < inf, got {tuple(bounds)!r}")
    if not (isinstance(iterations, int) and iterations >= 1):
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")


def _bisect(feasible: Any, low: float, high: float, iterations: int) -> float:
    """The largest feasible value bisection finds in ``[low, high]`` (``high`` itself when it is feasible)."""
    if feasible(high):
        return high
    if low > 0 and not feasible(low):
        raise ValueError(f"even sigma = {low} (the low search bound) raises the anchor NLL beyond the tolerance; lower it")
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if feasible(mid) else (low, mid)
    return low


def search_sigma(
    map_result: FitResult, val_data: Data, tolerance: float = 0.01, search_bounds: Sequence[float] = (0.0, 1.0),
    iterations: int = 12, num_samples: int = 8, seed: int = 0, batch_size: int = 8, per_module: bool = False,
) -> tuple[dict[str, float], float, list[dict[str, Any]]]:
    """Binary search for the largest ``sigma`` with ``NLL_val(sigma) - NLL_val(0) <= tolerance``.

    One ``sigma`` for every module (the paper), or with ``per_module`` one per module,
    searched module by module in layer order with the ones already found in place
    (so the final joint setting is feasible too). Returns ``(sigma per module,
    map_nll, table)``; ``table`` lists every value tried (``module``: the module
    searched, ``"*"`` for all) with its anchor NLL and feasibility.
    """
    _check_search(tolerance, search_bounds, iterations, num_samples)
    factors = map_factors(map_result)
    sigma = {name: 0.0 for name in factors}
    probs, labels = _sample_probs(map_result, factors, _directions(factors, 1, seed), sigma, val_data, batch_size)
    if labels is None:
        raise ValueError("TFB's search scores the anchor NLL: val_data needs labels")
    map_nll = negative_log_likelihood(probs.mean(0), labels)
    table: list[dict[str, Any]] = [{"module": "*", "sigma": 0.0, "nll": map_nll, "feasible": True}]
    if tolerance == 0:
        return sigma, map_nll, table
    directions = _directions(factors, num_samples, seed)
    for group in ([[name] for name in factors] if per_module else [list(factors)]):

        def feasible(value: float, group: list[str] = group) -> bool:
            trial = {**sigma, **{name: value for name in group}}
            p, _ = _sample_probs(map_result, factors, directions, trial, val_data, batch_size)
            nll = negative_log_likelihood(p.mean(0), labels)
            table.append({"module": group[0] if per_module else "*", "sigma": value, "nll": nll,
                          "feasible": nll - map_nll <= tolerance})
            return bool(table[-1]["feasible"])

        found = _bisect(feasible, float(search_bounds[0]), float(search_bounds[1]), iterations)
        sigma.update({name: found for name in group})
    return sigma, map_nll, table


class TFBResult(WrappedPosterior):
    """A MAP LoRA fit with TFB's low-rank Gaussian over each adapted layer's ``A`` factor.

    Attributes:
        map_result: the MAP :class:`FitResult`.
        sigma: the noise sd per adapted module.
        tolerance: the allowed anchor-NLL increase (nats) the search ran with.
        map_nll: MAP's anchor NLL.
        search: every ``sigma`` the search tried, with its anchor NLL and feasibility.
    """

    method = "tfb"

    def __init__(self, map_result: FitResult, sigma: dict[str, float], tolerance: float = 0.0,
                 map_nll: float = float("nan"), search: Optional[list[dict[str, float]]] = None):
        self.map_result = map_result
        self.factors = map_factors(map_result)
        if set(sigma) != set(self.factors):
            raise ValueError(f"sigma names modules {sorted(sigma)}, but the fit's adapted layers are {sorted(self.factors)}")
        if any(not (0 <= float(s) < float("inf")) for s in sigma.values()):
            raise ValueError(f"every sigma must be a finite number >= 0, got {sigma}")
        self.sigma = {k: float(v) for k, v in sigma.items()}
        self.tolerance, self.map_nll, self.search = float(tolerance), float(map_nll), list(search or [])

    @property
    def inner(self) -> FitResult:
        """The MAP fit (:class:`WrappedPosterior`'s delegate)."""
        return self.map_result

    @property
    def is_deterministic(self) -> bool:
        """True when every ``sigma`` is 0 (the MAP)."""
        return all(s == 0 for s in self.sigma.values())

    def use_posterior_mean(self) -> None:
        """Put the MAP adapters in place: the TFB posterior's mean."""
        self.map_result.use_posterior_mean()

    def predict(self, data: Data, num_samples: int = 4, batch_size: int = 8,
                seed: Optional[int] = DEFAULT_PREDICT_SEED) -> Prediction:
        """Average the class probabilities of ``num_samples`` draws of ``A`` (seeded: deterministic given ``seed``)."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        directions = _directions(self.factors, num_samples, seed)
        sample_probs, labels = _sample_probs(self.map_result, self.factors, directions, self.sigma, data, batch_size)
        return Prediction(sample_probs.mean(0), sample_probs, labels)

    def anchor_nll(self, data: Data, sigma: Union[float, dict[str, float]], num_samples: int = 8, seed: int = 0,
                   batch_size: int = 8) -> float:
        """NLL of the predictive mean on labelled ``data`` with the sd ``sigma`` (one for all, or per module)."""
        directions = _directions(self.factors, num_samples, seed)
        values = sigma if isinstance(sigma, dict) else {n: float(sigma) for n in self.factors}
        probs, labels = _sample_probs(self.map_result, self.factors, directions, values, data, batch_size)
        if labels is None:
            raise ValueError("the anchor NLL needs labelled data")
        return negative_log_likelihood(probs.mean(0), labels)

    def save(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        """The MAP adapter (safetensors + JSON, :func:`pyro_blora.io.save`) and ``method.json`` with the ``sigma``s."""
        folder = save_adapter(self.map_result, path)
        write_method_file(folder, {
            "method": self.method, "format_version": _FORMAT, "sigma": self.sigma, "tolerance": self.tolerance,
            "map_nll": self.map_nll, "search": self.search,
        })
        return folder


def tfb_from_map(
    map_result: FitResult, val_data: Data, *, tolerance: float = 0.01, search_bounds: Sequence[float] = (0.0, 1.0),
    iterations: int = 12, num_samples: int = 8, seed: int = 0, per_module: bool = False, batch_size: Optional[int] = None,
) -> TFBResult:
    """TFB around a finished MAP run: search ``sigma`` on ``val_data`` (never the test split); no retraining.

    Args:
        map_result: a MAP fit (``guide="delta"``).
        val_data: labelled anchor data.
        tolerance: the allowed anchor-NLL increase over MAP, in nats per example.
        search_bounds: ``(low, high)`` of ``sigma``.
        iterations: bisection steps.
        num_samples: draws of ``A`` per candidate ``sigma`` (the same draws for all).
        seed: seed of those draws.
        per_module: one sd per module, searched module by module (default: one shared sd, as the paper).
        batch_size: examples per forward (default: the MAP run's batch size).
    """
    if not isinstance(map_result, FitResult) or not map_result.is_deterministic:
        raise ValueError(f"TFB Bayesianizes a MAP fit (guide='delta'), got {type(map_result).__name__}")
    batch_size = batch_size or map_result.train_config.batch_size
    sigma, map_nll, table = search_sigma(map_result, val_data, tolerance, search_bounds, iterations, num_samples, seed,
                                         batch_size, per_module)
    return TFBResult(map_result, sigma, tolerance, map_nll, table)


@dataclass(frozen=True)
class TFBOptions:
    """Options of ``fit(guide="tfb")`` (see :func:`tfb_from_map`)."""

    tolerance: float = field(default=0.01, metadata={"help": "Allowed anchor (validation) NLL increase over MAP, nats."})
    search_bounds: Sequence[float] = field(default=(0.0, 1.0), metadata={"help": "(low, high) of the sd search."})
    iterations: int = field(default=12, metadata={"help": "Binary-search steps."})
    num_samples: int = field(default=8, metadata={"help": "Draws of A per candidate sd (common random numbers)."})
    seed: int = field(default=0, metadata={"help": "Seed of the search's draws."})
    per_module: bool = field(default=False, metadata={"help": "One sd per module, searched in turn (default: one shared)."})

    def __post_init__(self) -> None:
        _check_search(self.tolerance, tuple(self.search_bounds), self.iterations, self.num_samples)


def fit_tfb(model: Any, data: Data, request: FitRequest, options: TFBOptions) -> TFBResult:
    """``fit(model, data, guide="tfb", ...)``: MAP LoRA (``delta``), then TFB's sd search on ``val_data``."""
    if request.val_data is None:
        raise ValueError("TFB searches its sd on anchor data: pass val_data (a validation split, never the test split)")
    map_result = fit_svi(model, data, "delta", **request.svi_arguments())
    return tfb_from_map(map_result, request.val_data, tolerance=options.tolerance, search_bounds=tuple(options.search_bounds),
                        iterations=options.iterations, num_samples=options.num_samples, seed=options.seed,
                        per_module=options.per_module)


def load_tfb(path: Union[str, "os.PathLike[str]"], model: Any, task: Optional[Task] = None, guide: Any = None,
             check_base: bool = True) -> TFBResult:
    """Rebuild a :class:`TFBResult` from a folder its ``save`` wrote (``pyro_blora.load`` calls this)."""
    folder = Path(path)
    meta = read_method_file(folder, "tfb", required=("sigma", "format_version"))
    if meta["format_version"] != _FORMAT:
        raise ValueError(f"{folder} holds a TFB result of format {meta['format_version']!r}; this pyro_blora reads {_FORMAT}")
    map_result = load_fit_result(folder, model, task=task, guide=guide, check_base=check_base)
    return TFBResult(map_result, meta["sigma"], meta.get("tolerance", 0.0), meta.get("map_nll", float("nan")),
                     meta.get("search"))


register_method(Method(
    "tfb", fit_tfb, TFBOptions, load=load_tfb, display_name="TFB",
    needs_validation=True, point_estimate=True,
))
