"""Rebuilding a :class:`~pyro_blora.result.FitResult` from a saved Bayesian-LoRA adapter folder.

The folder format is :mod:`pyro_blora.io`'s; :func:`pyro_blora.load` dispatches
a folder of another method to that method's loader (:mod:`pyro_blora.methods`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from pyro_blora.config import BLoRAConfig, TrainConfig, config_from_dict
from pyro_blora.guides import GUIDES, BayesianLoRAGuide
from pyro_blora.guides.network import GuideSpec
from pyro_blora.inject import adapted_layers, inject_adapters, restored_on_failure
from pyro_blora.io import WEIGHTS_NAME, fingerprint, read_config
from pyro_blora.model import BayesianLoRAModel
from pyro_blora.result import FitResult
from pyro_blora.tasks.base import Task, TensorTask

__all__ = ["load_fit_result"]


_LEGACY_DEFAULTS = {"prior_scale": "fixed", "lambda_prior": 1.0}
"""Settings of adapters saved before these options existed: what the code that wrote them did."""


def load_fit_result(
    path: str | os.PathLike,
    model: nn.Module,
    task: Optional[Task] = None,
    guide: Optional[GuideSpec] = None,
    check_base: bool = True,
    *,
    layer_factory: Optional[Callable[..., Any]] = None,
    build_guide: Optional[Callable[[BayesianLoRAModel, dict[str, Any]], nn.Module]] = None,
) -> FitResult:
    """The :class:`FitResult` (model, guide, settings) of an adapter folder; arguments as :func:`load`.

    A baseline trained by the same loop (BLoB) rebuilds its layers with ``layer_factory``
    (see :func:`~pyro_blora.inject.inject_adapters`) and its guide with
    ``build_guide(bayes_model, saved_guide_spec)``.
    """
    meta = read_config(path)
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: the adapter folder {path} is incomplete")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file} could not be read (truncated or corrupted?): {err}") from err

    config = config_from_dict(BLoRAConfig, {**_LEGACY_DEFAULTS, **meta["blora_config"]})
    if not isinstance(config.prior, str) or "." in config.prior:
        raise ValueError(f"the adapter used a custom prior {config.prior!r}; pass BLoRAConfig.prior to inject it yourself")
    if adapted_layers(model):
        raise ValueError("load() needs a base model without adapters; it injects them itself")
    # on failure the caller's model is left as it was, so that load() can be retried (e.g. with check_base=False)
    with restored_on_failure(model):
        inject_adapters(model, config, layer_factory)
        if check_base:
            _check_base(meta, model)
        task = task or TensorTask(meta.get("num_classes"))
        bayes_model = BayesianLoRAModel(model, task, meta["num_data"])
        spec = meta["guide"]
        family = guide if guide is not None else spec["family"]
        if build_guide is not None:
            bayes_guide = build_guide(bayes_model, spec)
        elif isinstance(family, str) and family not in GUIDES:
            raise ValueError(f"the adapter was trained with a custom guide {family!r}; pass guide= with its class or factory")
        else:
            bayes_guide = BayesianLoRAGuide(bayes_model.factors, family, config.lambda_init, config.lambda_max, **spec["options"])
        result = FitResult(bayes_model, bayes_guide, config, config_from_dict(TrainConfig, meta["train_config"]), task)
        current = result.trainable_state()
        missing, unexpected = sorted(set(current) - set(tensors)), sorted(set(tensors) - set(current))
        if missing or unexpected:
            raise ValueError(
                f"{file} does not match this model and guide: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for key, value in tensors.items():
                if current[key].shape != value.shape:
                    raise ValueError(
                        f"{file}: {key}: saved shape {tuple(value.shape)} != model shape {tuple(current[key].shape)} "
                        "built from adapter_config.json: the config and the tensors disagree (was r, an inducing size "
                        "or target_modules edited?)" + ("" if check_base else ", or the base model differs")
                    )
                current[key].copy_(value)
    model.eval()
    return result


def _check_base(meta: dict[str, Any], model: nn.Module) -> None:
    saved = meta["base_fingerprint"]
    now = fingerprint(model)
    if saved["shapes"] != now["shapes"]:
        only_saved = sorted(set(saved["shapes"]) - set(now["shapes"]))[:3]
        only_now = sorted(set(now["shapes"]) - set(saved["shapes"]))[:3]
        reshaped = [f"{n} {saved['shapes'][n]} -> {now['shapes'][n]}" for n in saved["shapes"]
                    if n in now["shapes"] and now["shapes"][n] != saved["shapes"][n]][:3]
        raise ValueError(
            "this adapter was trained on a base model with other adapted layers (adapted then but not now: "
            f"{only_saved}; adapted now but not then: {only_now}; other shapes: {reshaped}); "
            "load it onto the model it was trained on"
        )
    if saved["digest"] != now["digest"]:
        raise ValueError(
            "the base model's adapted weights differ from those the adapter was trained on (fingerprint mismatch); "
            "load it onto the same checkpoint, or pass check_base=False if you know what you are doing"
        )
