"""Post-hoc temperature scaling of any method's predictive.

Guo et al. (2017, "On calibration of modern neural networks", ICML) divide the
logits of a trained classifier by one scalar ``T > 0`` fitted to minimise the
negative log-likelihood on held-out data. For a posterior predictive with ``S``
samples, each sample's log-probabilities ``log p_s`` play the logits' part and
the scaled samples are averaged:

.. math::

    p_s^{(T)} = \\mathrm{softmax}(\\log p_s / T), \\qquad
    p^{(T)}(y \\mid x) = \\frac{1}{S} \\sum_s p_s^{(T)}(y \\mid x),

    T^\\star = \\arg\\min_{T > 0} -\\frac{1}{N} \\sum_{i} \\log p^{(T)}(y_i \\mid x_i).

``log p_s`` equals the logits up to a per-example constant, which the softmax
ignores, so for ``S = 1`` this is Guo et al.'s method exactly. ``T > 1``
softens over-confident predictions, ``T < 1`` sharpens under-confident ones;
the argmax (accuracy) never changes for ``S = 1``.

**Fit T on the validation split only.** A temperature fitted on the test split
reads the test labels, and the test metrics that follow are no longer an
honest estimate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from pyro_blora.io import read_method_file, write_method_file
from pyro_blora.methods import Method, load_saved, register_method
from pyro_blora.model import check_labels
from pyro_blora.result import Posterior, Prediction, WrappedPosterior
from pyro_blora.tasks.base import Task

__all__ = ["TemperatureScaledResult", "apply_temperature", "fit_temperature", "load_temperature_scaled", "temperature_scale"]

Data = Union[Dataset, DataLoader, Sequence[Any]]

# A probability that underflowed to 0 in float32 had a logit gap beyond ~87 nats;
# flooring at float32's smallest normal keeps log p finite (and its gradient) without
# changing any probability a float32 softmax can represent.
_FLOOR = torch.finfo(torch.float32).tiny
_INNER = "inner"


def _check_temperature(temperature: Any) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


def _log_probs(prediction: Prediction) -> Tensor:
    sample_probs = prediction.sample_probs
    if sample_probs.dim() != 3:
        raise ValueError(f"sample_probs must have shape (S, N, C), got {tuple(sample_probs.shape)}")
    if not torch.isfinite(sample_probs).all() or (sample_probs < 0).any():
        raise ValueError("sample_probs holds NaN, infinite or negative values: not probabilities")
    return torch.log(sample_probs.detach().to(torch.float64).clamp_min(_FLOOR))


def _scaled_nll(log_probs: Tensor, labels: Tensor, temperature: float) -> float:
    """``-mean_i log mean_s softmax(log p_s / T)[y_i]``, through logsumexp for stability."""
    scaled = torch.log_softmax(log_probs / temperature, dim=-1)
    index = labels.view(1, -1, 1).expand(scaled.shape[0], -1, 1)
    picked = scaled.gather(-1, index).squeeze(-1)  # (S, N)
    return float(-(torch.logsumexp(picked, dim=0) - math.log(scaled.shape[0])).mean())


def fit_temperature(prediction: Prediction, bounds: tuple[float, float] = (1e-2, 1e2)) -> float:
    """The temperature ``T`` in ``bounds`` that minimises the NLL of the scaled predictive on ``prediction``.

    ``prediction`` must be a *validation* prediction with labels (never the test
    split). The search runs on ``log T``: a grid of 49 points over ``bounds``,
    then a golden-section search between the best point's neighbours. The NLL of
    one sample is convex in ``1 / T``; for a mixture of samples the grid guards
    against a local minimum. Zero probabilities are floored at float32's
    smallest normal number.
    """
    if prediction.labels is None:
        raise ValueError("fit_temperature needs a labelled validation Prediction; this one has no labels")
    lo, hi = (float(b) for b in bounds)
    if not (0 < lo < hi and math.isfinite(hi)):
        raise ValueError(f"bounds must satisfy 0 < low < high < inf, got {bounds!r}")
    log_probs = _log_probs(prediction)
    if log_probs.shape[1] == 0:
        raise ValueError("fit_temperature got an empty validation Prediction (no examples)")
    labels = check_labels(prediction.labels.cpu(), log_probs.shape[-1]).to(log_probs.device)
    if labels.numel() != log_probs.shape[1]:
        raise ValueError(f"{labels.numel()} labels for {log_probs.shape[1]} predicted examples")

    def nll(log_t: float) -> float:
        return _scaled_nll(log_probs, labels, math.exp(log_t))

    grid = torch.linspace(math.log(lo), math.log(hi), 49, dtype=torch.float64).tolist()
    values = [nll(x) for x in grid]
    best = min(range(len(grid)), key=values.__getitem__)
    a, b = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    while b - a > 1e-6:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    candidates = [(values[best], grid[best]), (fc, c), (fd, d)]
    return math.exp(min(candidates)[1])


def apply_temperature(prediction: Prediction, temperature: float) -> Prediction:
    """``prediction`` with every sample scaled, ``p_s' = softmax(log p_s / T)``, and re-averaged (labels kept)."""
    temperature = _check_temperature(temperature)
    scaled = torch.softmax(_log_probs(prediction) / temperature, dim=-1).to(prediction.sample_probs.dtype)
    return Prediction(scaled.mean(0), scaled, prediction.labels)


class TemperatureScaledResult(WrappedPosterior):
    """Any fitted result (FitResult, MC dropout, ensemble, ...) with its predictive scaled by ``temperature``."""

    method = "temperature"

    def __init__(self, inner: Posterior, temperature: float):
        self.inner = inner
        self.temperature = _check_temperature(temperature)

    @property
    def inner_method(self) -> Optional[str]:
        return getattr(self.inner, "method", None)

    def predict(self, data: Data, num_samples: int = 4, **options: Any) -> Prediction:
        """The inner result's prediction (same options: ``batch_size``, ``seed``, ...) scaled by ``temperature``."""
        return apply_temperature(self.inner.predict(data, num_samples=num_samples, **options), self.temperature)

    def evaluate(self, data: Data, num_samples: int = 4, n_bins: int = 15, batch_size: int = 8) -> dict[str, float]:
        """Metrics of the scaled predictive on labelled ``data`` (a JSON-ready dict), with ``T``."""
        out = super().evaluate(data, num_samples=num_samples, n_bins=n_bins, batch_size=batch_size)
        out["temperature"] = self.temperature
        return out

    def save(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        """The inner result into ``<path>/inner`` (its own format) and ``method.json`` with ``T``."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.inner.save(folder / _INNER)
        meta = {"method": self.method, "temperature": self.temperature, "inner": _INNER, "inner_method": self.inner_method}
        write_method_file(folder, meta)
        return folder


def temperature_scale(result: Posterior, val_data: Data, num_samples: int = 4, **predict_options: Any) -> TemperatureScaledResult:
    """Fit ``T`` on ``result``'s predictive of the labelled *validation* ``val_data`` and wrap ``result`` with it.

    ``predict_options`` (``batch_size``, ``seed``, ...) go to ``result.predict``.
    Never pass the test split: ``T`` is fitted to the labels it sees.
    """
    if val_data is None:
        raise ValueError("temperature_scale needs val_data, a labelled validation split (never the test split)")
    if not isinstance(val_data, DataLoader) and hasattr(val_data, "__len__") and len(val_data) == 0:
        raise ValueError("temperature_scale got an empty val_data: T needs labelled validation examples")
    prediction = result.predict(val_data, num_samples=num_samples, **predict_options)
    return TemperatureScaledResult(result, fit_temperature(prediction))


def load_temperature_scaled(
    path: Union[str, "os.PathLike[str]"],
    model: nn.Module,
    task: Optional[Task] = None,
    guide: Any = None,
    check_base: bool = True,
) -> TemperatureScaledResult:
    """Rebuild a saved :class:`TemperatureScaledResult`; the inner result comes back through :func:`pyro_blora.load`."""
    folder = Path(path)
    meta = read_method_file(folder, "temperature", required=("temperature",))
    inner = load_saved(folder / meta.get("inner", _INNER), model, task=task, guide=guide, check_base=check_base)
    return TemperatureScaledResult(inner, meta["temperature"])


@dataclass(frozen=True)
class TemperatureOptions:
    """Options of post-hoc temperature scaling (:func:`temperature_scale`)."""

    bounds: tuple[float, float] = field(default=(1e-2, 1e2), metadata={"help": "Search interval of T (validation NLL)."})


register_method(Method(
    "temperature", None, TemperatureOptions, load=load_temperature_scaled, display_name="temperature scaling",
))
