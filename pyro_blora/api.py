"""The user's surface: :func:`fit`, :func:`load` and :func:`evaluate`, dispatching through :mod:`pyro_blora.methods`.

This module sits above every method (it imports the baselines so that they
register themselves); nothing in the library imports it but ``pyro_blora``
itself.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

from torch import nn
from torch.utils.data import DataLoader, Dataset

import pyro_blora.baselines  # noqa: F401  (registers the baselines)
from pyro_blora.config import BLoRAConfig
from pyro_blora.guides.network import GuideSpec
from pyro_blora.methods import METHODS, FitRequest, load_saved
from pyro_blora.result import Posterior
from pyro_blora.tasks.base import Task
from pyro_blora.training.callbacks import Callback
from pyro_blora.training.svi import fit_svi

__all__ = ["evaluate", "fit", "load"]

Data = Union[Dataset, DataLoader, Sequence[Any]]


def fit(
    model: nn.Module,
    data: Data,
    guide: Union[GuideSpec, nn.Module] = "flow",
    *,
    method: Optional[str] = None,
    task: Optional[Task] = None,
    config: Union[BLoRAConfig, dict, None] = None,
    guide_options: Any = None,
    val_data: Optional[Data] = None,
    callbacks: Sequence[Callback] = (),
    resume_from: Union[str, "os.PathLike[str]", None] = None,
    **options: Any,
) -> Posterior:
    """Fit ``model`` on ``data`` with a method of the registry (Bayesian-LoRA by default).

    Args:
        model: any ``nn.Module``; adapters are injected in place per ``config``
            unless it already carries them (e.g. from :func:`load`).
        data: training examples (a ``Dataset``, ``datasets.Dataset`` or list,
            collated by ``task``) or a ``DataLoader`` of collated batches.
        guide: a method of :data:`pyro_blora.methods.METHODS`: the Bayesian-LoRA
            families ``"flow"`` (default), ``"normal"``, ``"mvn"``, ``"delta"`` (MAP,
            plain LoRA) or a baseline (``"mc_dropout"``, ``"ensemble"``, ``"blob"``,
            ``"laplace"``, ...); or an :class:`~pyro_blora.guides.InducingGuide`
            subclass, a ``factory(site)``, or a ready guide module.
        method: the same as ``guide`` for a registered method, under the name that fits
            the baselines (which are not guides); give one of the two.
        task: turns batches into class logits; default :class:`~pyro_blora.tasks.TensorTask`.
        config: where the adapters go and their prior (:class:`BLoRAConfig` or dict).
        guide_options: the method's options: its options dataclass
            (``Method.options``, e.g. :class:`~pyro_blora.guides.options.FlowOptions`)
            or a dict of its fields (unknown keys are named in the error).
        val_data: validation examples, evaluated every ``eval_every`` steps
            (validation NLL drives early stopping; never pass the test split).
        callbacks: called after each step with a :class:`~pyro_blora.result.TrainingState`;
            return True to stop.
        resume_from: a checkpoint folder of an earlier run (``TrainConfig.checkpoint_dir``):
            continue that run where it stopped, with the same data and options.
        **options: any :class:`~pyro_blora.config.TrainConfig` field (``num_steps``, ``lr``, ``kl_weight``, ...).

    Returns:
        The method's result (a :class:`~pyro_blora.result.Posterior`: ``predict``, ``evaluate``, ``save``).
    """
    if method is not None:
        if guide != "flow":
            raise ValueError(f"give the method once: guide={guide!r} and method={method!r}")
        guide = method
    request = FitRequest(task, config, val_data, tuple(callbacks), resume_from, options)
    if isinstance(guide, str) and guide in METHODS:
        method = METHODS[guide]
        if method.fit is None:
            raise ValueError(f"{guide!r} is applied to a fitted result, not trained: see pyro_blora.{guide}_scale")
        return method.fit(model, data, request, method.parse_options(guide_options))
    # a guide class, factory or module of the user's (or an unknown name, which fit_svi names)
    return fit_svi(model, data, guide, guide_options=guide_options, **request.svi_arguments())


def load(
    path: Union[str, "os.PathLike[str]"],
    model: nn.Module,
    task: Optional[Task] = None,
    guide: Optional[GuideSpec] = None,
    check_base: bool = True,
) -> Posterior:
    """Rebuild a fitted result from a folder written by its ``save``, as its own type.

    Args:
        path: the folder.
        model: a fresh copy of the base model (adapters are injected in place).
        task: the task used for prediction (default :class:`~pyro_blora.tasks.TensorTask`).
        guide: the guide family, needed only when it was a custom class or factory.
        check_base: refuse a base model whose adapted weights differ from the
            one the adapter was trained on.
    """
    return load_saved(path, model, task=task, guide=guide, check_base=check_base)


def evaluate(result: Posterior, data: Data, num_samples: int = 4, n_bins: int = 15) -> dict[str, float]:
    """Metrics (ACC, ECE, MCE, NLL, Brier, uncertainty) of ``result``'s posterior predictive on ``data``."""
    return result.evaluate(data, num_samples=num_samples, n_bins=n_bins)
