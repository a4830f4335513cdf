"""Last-layer Laplace on the answer head: the ``fit(..., guide="laplace")`` baseline.

MAP LoRA is trained first (``guide="delta"``); then the answer head's class
weights ``W_ans`` (``C x H``: rows of ``W0 + (alpha / r) B A`` at the answer token
ids, see :mod:`pyro_blora.baselines.laplace.head`) get a Gaussian posterior

.. math::

    q(W_{ans}) = \\mathcal{N}\\big(W_{MAP},\\ (\\mathrm{GGN} + \\tau I)^{-1}\\big),

with the GGN of the training NLL in Kronecker (KFAC, default) or diagonal form, fitted by
laplace-torch on the head alone (:mod:`pyro_blora.baselines.laplace.curvature`). Predictions use the linearised (GLM)
predictive ``f(x) ~ N(W_MAP phi(x), Sigma_f(x))`` in closed form, averaged over
Monte Carlo draws of ``f`` (``link_approx="mc"``) or by the probit approximation.
The prior precision ``tau`` is picked on a log grid by validation NLL (the same
predictive, with common random numbers across the grid) unless it is given.

Options go in ``guide_options``: ``structure`` (``"kron"`` | ``"diag"``),
``prior_precision`` (``tau``, None to tune), ``link_approx`` (``"mc"`` | ``"probit"``),
``prior_precision_grid``, ``tune_samples``, ``tune_seed``.

References: Daxberger et al., *Laplace Redux* (NeurIPS 2021, laplace-torch);
Yang et al., *Bayesian Low-rank Adaptation for Large Language Models* (ICLR 2024);
Kristiadi et al., *Being Bayesian, Even Just a Bit, Fixes Overconfidence* (ICML 2020).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from pyro_blora.baselines.laplace.curvature import LINKS, STRUCTURES, HeadLaplace, check_prior_precision
from pyro_blora.baselines.laplace.glm import require_laplace_torch
from pyro_blora.baselines.laplace.head import AnswerHead, HeadFeatures, collect_features, find_head, head_weight
from pyro_blora.io import METHOD_FILE, atomic_write, read_method_file, write_method_file
from pyro_blora.io import save as save_adapter
from pyro_blora.methods import FitRequest, Method, register_method
from pyro_blora.restore import load_fit_result
from pyro_blora.metrics import negative_log_likelihood
from pyro_blora.result import DEFAULT_PREDICT_SEED, FitResult, Prediction, WrappedPosterior
from pyro_blora.tasks.base import Task, TensorTask
from pyro_blora.training.svi import fit_svi

__all__ = ["LaplaceOptions", "LaplaceResult", "fit_laplace", "laplace_from_map", "load_laplace", "tune_prior_precision", "DEFAULT_GRID"]

Data = Union[Dataset, DataLoader, Sequence[Any]]
POSTERIOR_NAME = "laplace_posterior.safetensors"
DEFAULT_GRID = tuple(float(t) for t in torch.logspace(-4, 6, 41, dtype=torch.float64))
"""Prior precisions tried by default: 1e-4 .. 1e6, four per decade (the top end is nearly the MAP)."""
_FORMAT = 2  # 2: laplace-torch's factors (1 was our own K-FAC code)


def _generator(seed: Optional[int]) -> Optional[torch.Generator]:
    """A private stream when ``seed`` is given, else None (torch's global RNG)."""
    return None if seed is None else torch.Generator().manual_seed(int(seed))


def tune_prior_precision(
    curvature: HeadLaplace,
    features: HeadFeatures,
    grid: Sequence[float],
    link_approx: str = "mc",
    num_samples: int = 64,
    seed: int = 0,
) -> tuple[float, list[dict[str, float]]]:
    """The ``tau`` of ``grid`` with the lowest validation NLL, and the NLL of every grid value.

    The Jacobians are computed once; every ``tau`` sees the same ``num_samples``
    standard-normal draws (common random numbers), so the comparison is not
    blurred by Monte Carlo noise; ties go to the first grid value.
    """
    if features.labels is None:
        raise ValueError("tuning the prior precision needs labelled validation data")
    jacobians = curvature.jacobians(features.phi, features.keep)
    table = []
    for tau in grid:
        probs = curvature.sample_probs(features.mean, jacobians, float(tau), link_approx, num_samples,
                                       _generator(seed)).mean(0).float()
        table.append({"prior_precision": float(tau), "nll": negative_log_likelihood(probs, features.labels)})
    best = min(range(len(table)), key=lambda i: table[i]["nll"])
    return table[best]["prior_precision"], table


class LaplaceResult(WrappedPosterior):
    """A MAP LoRA fit plus a Gaussian posterior over its answer head, with the ``FitResult`` surface.

    Attributes:
        map_result: the MAP :class:`FitResult` (the adapters, the task, the training history).
        head: the answer head (:class:`~pyro_blora.baselines.laplace.head.AnswerHead`).
        curvature: laplace-torch's posterior over the head (:class:`~pyro_blora.baselines.laplace.curvature.HeadLaplace`).
        prior_precision: ``tau``.
        link_approx: ``"mc"`` or ``"probit"``.
        tuning: the validation NLL of each grid value when ``tau`` was tuned, else ``[]``.
    """

    method = "laplace"
    is_deterministic = False

    def __init__(
        self,
        map_result: FitResult,
        head: AnswerHead,
        curvature: HeadLaplace,
        prior_precision: float,
        link_approx: str = "mc",
        tuning: Optional[list[dict[str, float]]] = None,
    ):
        check_prior_precision(prior_precision)
        if link_approx not in LINKS:
            raise ValueError(f"unknown link_approx {link_approx!r}; choose one of {list(LINKS)}")
        if (curvature.num_classes, curvature.num_features) != (len(head.ids), head.num_features):
            raise ValueError(
                f"the Laplace posterior is over a {curvature.num_classes} x {curvature.num_features} head but "
                f"{head.name} gives {len(head.ids)} classes of {head.num_features} features"
            )
        self.map_result = map_result
        self.head = head
        self.curvature = curvature
        self.prior_precision = float(prior_precision)
        self.link_approx = link_approx
        self.tuning = list(tuning or [])

    @property
    def inner(self) -> FitResult:
        """The MAP fit the posterior is built on (:class:`WrappedPosterior`'s delegate)."""
        return self.map_result

    @property
    def structure(self) -> str:
        return self.curvature.structure

    def with_prior_precision(self, tau: float) -> "LaplaceResult":
        """The same posterior at another ``tau`` (shares the network and the factors)."""
        return LaplaceResult(self.map_result, self.head, self.curvature, tau, self.link_approx)

    def features(self, data: Data, batch_size: int = 8) -> HeadFeatures:
        """MAP logits and head inputs of ``data``, with the MAP adapters in place."""
        self.map_result.use_posterior_mean()
        return collect_features(self.net, self.task, self.head, data, batch_size)

    def predict(
        self, data: Data, num_samples: int = 4, batch_size: int = 8, seed: Optional[int] = DEFAULT_PREDICT_SEED
    ) -> Prediction:
        """Linearised predictive: ``softmax`` of ``num_samples`` draws ``f ~ N(W_MAP phi, Sigma_f(x))``.

        With ``link_approx="probit"`` the prediction is deterministic (one "sample").
        ``seed`` draws from a private stream; the global RNG is left as it was.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        features = self.features(data, batch_size)
        jacobians = self.curvature.jacobians(features.phi, features.keep)
        sample_probs = self.curvature.sample_probs(features.mean, jacobians, self.prior_precision, self.link_approx,
                                                   num_samples, _generator(seed)).float()
        return Prediction(sample_probs.mean(0), sample_probs, features.labels)

    def use_posterior_mean(self) -> None:
        """Put the MAP adapters in place: the Laplace posterior's mean network."""
        self.map_result.use_posterior_mean()

    def save(self, path: Union[str, "os.PathLike[str]"]) -> Path:
        """The MAP adapter (:func:`pyro_blora.io.save`), the factors (safetensors) and ``method.json``."""
        folder = save_adapter(self.map_result, path)
        tensors = self.curvature.state()
        atomic_write(folder / POSTERIOR_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
        meta = {
            "method": self.method, "format_version": _FORMAT, "structure": self.structure,
            "prior_precision": self.prior_precision, "link_approx": self.link_approx,
            "head": {"name": self.head.name, "kind": self.head.kind, "ids": self.head.ids, "bias": self.head.has_bias},
            "num_classes": len(self.head.ids), "tuning": self.tuning,
        }
        write_method_file(folder, meta)
        return folder


def _check_options(
    structure: str, prior_precision: Optional[float], link_approx: str, grid: Sequence[float], tune_samples: int, val_data: Any
) -> None:
    if structure not in STRUCTURES:
        raise ValueError(f"unknown Laplace structure {structure!r}; choose one of {list(STRUCTURES)}")
    if link_approx not in LINKS:
        raise ValueError(f"unknown link_approx {link_approx!r}; choose one of {list(LINKS)}")
    if prior_precision is not None:
        check_prior_precision(prior_precision)
        return
    if val_data is None:
        raise ValueError(
            "last-layer Laplace tunes the prior precision on validation NLL: pass val_data (a validation split, "
            "never the test split), or fix it with guide_options={'prior_precision': tau}"
        )
    if not grid:
        raise ValueError("prior_precision_grid is empty")
    for tau in grid:
        check_prior_precision(float(tau))
    if not (isinstance(tune_samples, int) and tune_samples >= 1):
        raise ValueError(f"tune_samples must be an integer >= 1, got {tune_samples!r}")


def laplace_from_map(
    map_result: FitResult,
    train_data: Data,
    val_data: Optional[Data] = None,
    *,
    structure: str = "kron",
    prior_precision: Optional[float] = None,
    link_approx: str = "mc",
    prior_precision_grid: Sequence[float] = DEFAULT_GRID,
    tune_samples: int = 64,
    tune_seed: int = 0,
    batch_size: Optional[int] = None,
) -> LaplaceResult:
    """Fit a last-layer Laplace posterior around an already trained MAP LoRA result (no retraining).

    Args:
        map_result: a MAP fit (``guide="delta"``) whose task has an answer head.
        train_data: the data the MAP was trained on; the GGN sums over it.
        val_data: labelled validation data, to tune ``tau`` when it is not given.
        structure: ``"kron"`` (KFAC) or ``"diag"``.
        prior_precision: ``tau``; None tunes it on ``prior_precision_grid``.
        link_approx: predictive by ``"mc"`` samples of ``f`` or the ``"probit"`` approximation.
        tune_samples: draws of ``f`` per example when tuning with ``"mc"``.
        tune_seed: seed of those draws.
        batch_size: examples per forward (default: the MAP run's batch size).
    """
    if not isinstance(map_result, FitResult):
        raise TypeError(f"laplace_from_map needs a FitResult of a MAP fit, got {type(map_result).__name__}")
    if not map_result.is_deterministic:
        raise ValueError("last-layer Laplace expands around the MAP: fit the adapters with guide='delta' first")
    require_laplace_torch("last-layer Laplace")
    grid = tuple(float(t) for t in prior_precision_grid)
    _check_options(structure, prior_precision, link_approx, grid, tune_samples, val_data)
    head = find_head(map_result.net, map_result.task)
    batch_size = batch_size or map_result.train_config.batch_size
    map_result.use_posterior_mean()
    train = collect_features(map_result.net, map_result.task, head, train_data, batch_size)
    if train.labels is None:
        raise ValueError("last-layer Laplace fits the GGN of the training NLL: train_data needs labels")
    curvature = HeadLaplace(head_weight(head), structure)
    curvature.fit(train.phi, train.keep, train.labels)
    tuning: list[dict[str, float]] = []
    if prior_precision is None:
        val = collect_features(map_result.net, map_result.task, head, val_data, batch_size)  # type: ignore[arg-type]
        prior_precision, tuning = tune_prior_precision(curvature, val, grid, link_approx, tune_samples, tune_seed)
    return LaplaceResult(map_result, head, curvature, prior_precision, link_approx, tuning)


@dataclass(frozen=True)
class LaplaceOptions:
    """Options of ``fit(guide="laplace")`` (see :func:`laplace_from_map`)."""

    structure: str = field(default="kron", metadata={"help": "GGN structure: kron (KFAC) or diag."})
    prior_precision: Optional[float] = field(default=None, metadata={"help": "Prior precision tau (None: tuned on validation NLL)."})
    link_approx: str = field(default="mc", metadata={"help": "Predictive: mc samples of f, or probit."})
    prior_precision_grid: Sequence[float] = field(default=DEFAULT_GRID, metadata={"help": "Values of tau tried when tuning."})
    tune_samples: int = field(default=64, metadata={"help": "Draws of f per example when tuning with mc."})
    tune_seed: int = field(default=0, metadata={"help": "Seed of those draws."})

    def __post_init__(self) -> None:
        grid = tuple(float(v) for v in self.prior_precision_grid)
        _check_options(self.structure, self.prior_precision, self.link_approx, grid, self.tune_samples, val_data=True)


def fit_laplace(model: Any, data: Data, request: FitRequest, options: LaplaceOptions) -> LaplaceResult:
    """``fit(model, data, guide="laplace", ...)``: MAP LoRA, then last-layer Laplace on the answer head.

    Every argument of the request goes to the MAP run (the ``delta`` family).
    Options, validation data and the task are checked before training.
    """
    require_laplace_torch("last-layer Laplace (guide='laplace')")
    grid = tuple(float(v) for v in options.prior_precision_grid)
    _check_options(options.structure, options.prior_precision, options.link_approx, grid, options.tune_samples, request.val_data)
    find_head(model, request.task)  # a task without an answer head fails now, not after training
    map_result = fit_svi(model, data, "delta", **request.svi_arguments())
    return laplace_from_map(map_result, data, request.val_data, **dataclasses.asdict(options))


def load_laplace(
    path: Union[str, "os.PathLike[str]"],
    model: Any,
    task: Optional[Task] = None,
    guide: Any = None,
    check_base: bool = True,
) -> LaplaceResult:
    """Rebuild a :class:`LaplaceResult` from a folder written by its ``save`` (``pyro_blora.load`` calls this)."""
    folder = Path(path)
    meta = read_method_file(folder, "laplace")
    if meta.get("format_version") != _FORMAT:
        old = " (format 1 held our own K-FAC factors: refit it with laplace_from_map on the saved MAP)"
        raise ValueError(f"{folder / METHOD_FILE} is not a last-layer Laplace result of format {_FORMAT}"
                         f"{old if meta.get('format_version') == 1 else ''}")
    saved = meta["head"]
    if task is None:
        if saved["kind"] == "answer_token":
            raise ValueError("this Laplace result reads answer-token logits: pass task= (the task it was fitted with)")
        task = TensorTask(meta["num_classes"])
    file = folder / POSTERIOR_NAME
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError, FileNotFoundError) as err:
        raise ValueError(f"{file} could not be read (missing, truncated or corrupted?): {err}") from err
    if meta.get("structure") not in STRUCTURES:
        raise ValueError(f"{folder / METHOD_FILE}: unknown Laplace structure {meta.get('structure')!r}")
    ids = find_head(model, task).ids  # checked before load_fit_result injects adapters into the model
    if ids != saved["ids"]:
        raise ValueError(
            f"the task's answer ids {ids} differ from those the Laplace posterior was fitted on {saved['ids']}; "
            "pass the same task"
        )
    map_result = load_fit_result(folder, model, task=task, guide=guide, check_base=check_base)
    head = find_head(map_result.net, task)
    map_result.use_posterior_mean()
    curvature = HeadLaplace.from_state(head_weight(head), meta["structure"], state)
    return LaplaceResult(map_result, head, curvature, meta["prior_precision"], meta["link_approx"], meta.get("tuning"))


register_method(Method(
    "laplace", fit_laplace, LaplaceOptions, load=load_laplace, display_name="last-layer Laplace",
    needs_validation=True, point_estimate=True,
))
