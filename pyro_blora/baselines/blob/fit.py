"""BLoB as a method of ``fit``: ``pyro_blora.fit(model, data, guide="blob")``.

BLoB (Wang, Shi, Han, Metaxas, Wang, "BLoB: Bayesian Low-Rank Adaptation by
Backpropagation for Large Language Models", NeurIPS 2024, arXiv 2406.11675) is
the nearest published peer of Bayesian-LoRA: a mean-field Gaussian over LoRA's
``A``, a deterministic ``B``, trained by Bayes by backprop with Flipout::

    A ~ N(0, sigma_p^2 I),   q(A) = N(M, (G o G)^2),   y = W0 x + (alpha / r) B A x.

Here it runs in this package's harness: the layer is
:class:`pyro_blora.models.BLoBLinear`, the guide :class:`pyro_blora.guides.BLoBGuide`,
and training is :func:`pyro_blora.fit`'s loop (``TraceMeanField_ELBO`` with the
closed-form Normal-Normal KL, the ``N / B`` plate, KL warm-up, AdamW,
checkpoints), so the only difference from the other methods is the posterior.

What we took from BLoB's released code (github.com/Wang-ML-Lab/bayesian-peft,
``modelwrappers/blob.py`` and ``scripts/blob/*.sh``), as ``guide_options``:

* ``prior_std`` (``--bayes-beta``, 0.2): ``sigma_p`` of the prior on every entry of ``A``;
* ``init_eps`` (``--bayes-eps``, 0.05): ``G`` starts uniform in ``[eps / sqrt(2), eps]``
  (posterior sd ``G^2`` in ``[0.00125, 0.0025]``); ``M`` and ``B`` start as peft's LoRA
  (Kaiming-uniform ``M``, zero ``B``). BLoB's ``eps < 0`` variant (softplus sd) is not offered;
* ``flipout`` (True): Flipout in training, per example (BLoB flips per token; see
  :mod:`pyro_blora.baselines.blob.layer`);
* prediction averages ``num_samples`` draws of ``A`` (``--bayes-eval-n-samples-final``
  is 10 in BLoB's scripts; ``predict``'s default is 4, as for the other methods: pass
  ``num_samples=10`` to match the paper).

What we do not copy, and why. BLoB's code takes two optimiser steps per batch:
AdamW on the mean NLL, then SGD (``--bayes-kllr``) on ``pi_i * KL``, with
``pi_i = 1 / M`` (``M`` batches per epoch) or, with ``--bayes-klreweighting`` (on in
its scripts), Blundell et al.'s ``pi_i = 2^i / (2^(M+1) - 1)`` cycling over ``i`` with
``M = int(100 N^(pi / gamma) / batch_size)`` (``--bayes-gamma`` 8). That is no single
objective, so here BLoB trains on the same loss as every method::

    loss = (N / B) sum_batch -log p(y | x, A, B) + beta_t KL(q(A) || p(A)),

with ``beta_t`` from ``kl_weight`` and ``kl_warmup`` (``kl_weight = 1``: the proper
ELBO). BLoB without reweighting (mean NLL + KL / batches per epoch) is
``kl_weight = batch_size`` in these units. ``G`` is optimised with the posterior
scales (``lr * variance_lr_multiplier``, no weight decay). Where several targeted
modules are given, ``BLoRAConfig.bayesian_modules`` selects which get a Gaussian
``A`` (default: all, as in BLoB); the others are plain LoRA.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from pyro_blora.baselines.blob.guide import BLoBGuide
from pyro_blora.baselines.blob.layer import BLoBLinear
from pyro_blora.models import BayesianLoRALinear

from pyro_blora.config import BLoRAConfig, TrainConfig, config_from_dict
from pyro_blora.inject import adapted_layers, inject_adapters, restored_on_failure
from pyro_blora.io import read_config
from pyro_blora.methods import FitRequest, Method, parse_options, register_method
from pyro_blora.restore import load_fit_result
from pyro_blora.model import BayesianLoRAModel
from pyro_blora.result import FitResult
from pyro_blora.tasks.base import Task
from pyro_blora.training.svi import fit_svi

__all__ = ["BLoBOptions", "BLoBResult", "blob_layer_factory", "fit_blob", "load_blob"]


@dataclass(frozen=True)
class BLoBOptions:
    """BLoB's settings (``guide_options`` of ``fit(guide="blob")``); see the module docstring."""

    prior_std: float = field(default=0.2, metadata={"help": "Prior sd of A's entries (BLoB's released code: 0.2)."})
    init_eps: float = field(default=0.05, metadata={"help": "G starts uniform in (eps / sqrt 2, eps); A's sd is G^2."})
    flipout: bool = field(default=True, metadata={"help": "Flipout estimate of the projection by a random A."})

    def __post_init__(self) -> None:
        for name in ("prior_std", "init_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
                raise ValueError(f"BLoB's {name} must be a positive finite number, got {value!r}")
        if not isinstance(self.flipout, bool):
            raise ValueError(f"BLoB's flipout must be True or False, got {self.flipout!r}")


def blob_layer_factory(prior_std: float, flipout: bool) -> Callable[..., BayesianLoRALinear]:
    """A ``layer_factory`` for :func:`~pyro_blora.inject.inject_adapters`: BLoB layers where
    ``bayesian``, plain LoRA layers elsewhere."""

    def make(base: nn.Module, name: str, config: BLoRAConfig, bayesian: bool = True) -> BayesianLoRALinear:
        if bayesian:
            return BLoBLinear(base, name, config, prior_std=prior_std, flipout=flipout)
        return BayesianLoRALinear(base, name, config, bayesian=False)

    return make


def _blob_layers(layers: Sequence[nn.Module]) -> list[BLoBLinear]:
    return [layer for layer in layers if isinstance(layer, BLoBLinear)]


class BLoBResult(FitResult):
    """A fitted BLoB posterior: :class:`FitResult` whose ``save`` marks the folder as ``"blob"``."""

    method = "blob"

    @property
    def is_deterministic(self) -> bool:
        """False: every draw of ``A`` is a different network."""
        return False

    @torch.no_grad()
    def posterior_sd(self) -> dict[str, torch.Tensor]:
        """The posterior sd ``G o G`` of every Bayesian ``A``, by site name."""
        return {layer.site_w: self.guide.site(layer).scale().detach() for layer in _blob_layers(self.model.layers)}


def fit_blob(model: nn.Module, data: Any, request: FitRequest, options: BLoBOptions) -> BLoBResult:
    """Fit BLoB adapters to ``model`` on ``data`` with the SVI loop of :func:`~pyro_blora.training.svi.fit_svi`.

    What ``pyro_blora.fit(model, data, guide="blob", ...)`` runs. BLoB layers are
    injected in place on ``config.target_modules`` of a base model without
    adapters (and removed again if fitting fails); the config's inducing and
    prior settings are Bayesian-LoRA's and unused here.

    Returns:
        A :class:`BLoBResult` (``predict``, ``evaluate``, ``save``, ``history``).
    """
    config = request.config
    if isinstance(config, dict):
        config = config_from_dict(BLoRAConfig, config)
    config = config or BLoRAConfig()
    train = config_from_dict(TrainConfig, request.train)  # bad options fail before the model is touched
    if adapted_layers(model):
        raise ValueError(
            "fit(guide='blob') injects its own adapters; pass a base model without adapters (see remove_adapters)"
        )
    torch.manual_seed(train.seed)  # M (Kaiming) and G (uniform) start reproducibly, as fit() seeds its adapters
    with restored_on_failure(model):  # the caller's model as it was, so that the call can be corrected and retried
        layers = inject_adapters(model, config, blob_layer_factory(options.prior_std, options.flipout))
        guide = BLoBGuide(_blob_layers(layers), init_eps=options.init_eps)
        return fit_svi(model, data, guide, result_type=BLoBResult, **{**request.svi_arguments(), "config": config})


def load_blob(
    path: Union[str, "os.PathLike[str]"],
    model: nn.Module,
    task: Optional[Task] = None,
    guide: Any = None,
    check_base: bool = True,
) -> BLoBResult:
    """Rebuild a :class:`BLoBResult` from a folder written by its ``save`` (what :func:`pyro_blora.load` calls).

    Args:
        path: the adapter folder.
        model: a fresh copy of the base model (adapters are injected in place).
        task: the task used for prediction (default :class:`~pyro_blora.tasks.TensorTask`).
        guide: None or ``"blob"`` (the guide is fixed by the folder).
        check_base: refuse a base model whose adapted weights differ from the training one.
    """
    if guide not in (None, "blob"):
        raise ValueError(f"{path} holds a BLoB adapter; its guide is 'blob', not {guide!r}")
    spec = read_config(path)["guide"]
    if spec.get("family") != "blob":
        raise ValueError(f"{path} holds a {spec.get('family')!r} adapter, not a BLoB one; load it with pyro_blora.load")
    options = parse_options(BLoBOptions, spec.get("options"), "blob")

    def build_guide(bayes_model: BayesianLoRAModel, saved: dict[str, Any]) -> BLoBGuide:
        return BLoBGuide(_blob_layers(bayes_model.layers), init_eps=options.init_eps)

    result = load_fit_result(
        path, model, task=task, check_base=check_base,
        layer_factory=blob_layer_factory(options.prior_std, options.flipout), build_guide=build_guide,
    )
    return BLoBResult.from_fit_result(result)


register_method(Method("blob", fit_blob, BLoBOptions, load=load_blob, display_name="BLoB"))
