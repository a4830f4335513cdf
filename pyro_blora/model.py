"""The Pyro model of a network with Bayesian-LoRA adapters.

.. math::

    p(y, W, U \\mid x) = \\prod_{\\text{factors}} p(U)\\, p(W \\mid U)
                         \\prod_{i=1}^{N} p(y_i \\mid x_i, W),

with ``p(y | x, W) = Categorical(softmax(task.class_logits(net, x)))``. A
minibatch of ``B`` examples is observed in a ``pyro.plate`` of size ``N``, which
scales its log-likelihood by ``N / B`` (unbiased for the full-data ELBO).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Mapping

import pyro
import pyro.distributions as dist
from pyro.poutine.util import is_validation_enabled
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_blora.models import BayesianLoRALinear, InducingFactor

from .inject import adapted_layers
from .tasks.base import Task

__all__ = ["BayesianLoRAModel", "check_labels"]


def check_labels(labels: Any, num_classes: int, check_range: bool = True) -> Tensor:
    """Integer labels in ``[0, num_classes)``, or a ``ValueError`` that says what is wrong.

    ``check_range=False`` skips the range check, the one that reads the values (a host sync on a GPU).
    """
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a tensor of class indices, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (batch,), got {tuple(labels.shape)}")
    if check_range and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].unique()[:5].tolist()
        raise ValueError(f"labels {bad} out of range for {num_classes} classes (valid: 0..{num_classes - 1})")
    return labels.long()


class BayesianLoRAModel(nn.Module):
    """Wraps an adapted network, its task and the data size into a Pyro model.

    Args:
        net: a network already carrying :class:`BayesianLoRALinear` layers.
        task: maps batches to class logits (:class:`~pyro_blora.tasks.Task`).
        num_data: ``N``, the training-set size, for the ``N / B`` likelihood scale.
    """

    def __init__(self, net: nn.Module, task: Task, num_data: int):
        super().__init__()
        layers = adapted_layers(net)
        if not layers:
            raise ValueError("the network has no Bayesian-LoRA layers; inject adapters first")
        if num_data < 1:
            raise ValueError(f"num_data must be >= 1, got {num_data}")
        self.net = net
        self.task = task
        self.num_data = int(num_data)
        # Plain lists: the layers are already registered as submodules of ``net``.
        self.layers: list[BayesianLoRALinear] = layers
        self.factors: list[InducingFactor] = [f for layer in layers for f in layer.factors]
        # per-example NLL of each particle since the last reset, kept on the device: one host sync per step
        self.particle_nll: list[Tensor] = []
        # Context of the network forward only (fit sets bf16 autocast here, see pyro_blora.training.distributed):
        # the adapters' sampling, the prior and the KL stay outside it, in full precision.
        self.network_precision: Callable[[], ContextManager[Any]] = contextlib.nullcontext
        # the training objective's tempering (TrainConfig.label_smoothing, entropy_bonus); 0, 0 = the likelihood
        self.label_smoothing = 0.0
        self.entropy_bonus = 0.0

    @property
    def last_nll(self) -> Tensor:
        """Mean per-example NLL over the particles of the last ELBO evaluation (a 0-d tensor on the device)."""
        return torch.stack(self.particle_nll).mean() if self.particle_nll else torch.tensor(float("nan"))

    def sample_adapters(self) -> None:
        """Sample every Bayesian factor (Pyro sites ``*.U`` and ``*.W``) into its layer."""
        for layer in self.layers:
            layer.model()

    def set_adapter_weights(self, weights: Mapping[str, Tensor]) -> None:
        """Put given factor draws (site name ``*.W`` -> tensor, optionally with a sample dim) into the layers."""
        for layer in self.layers:
            layer.set_draws(weights)

    def class_logits(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Sample the adapters, then the task's class logits for ``batch``."""
        self.sample_adapters()
        with self.network_precision():
            logits = self.task.class_logits(self.net, batch)
        return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        if "labels" not in batch:
            raise ValueError(f"a training batch needs 'labels'; it has {sorted(batch)}")
        logits = self.class_logits(batch)
        # value checks read the device: only with validation on (fit's first step); later steps' non-finite
        # losses are caught when TrainingState.flush reads them
        checking = is_validation_enabled()
        if checking and not torch.isfinite(logits).all():
            raise FloatingPointError("the network produced non-finite class logits")
        labels = check_labels(batch["labels"], logits.shape[-1], check_range=checking).to(logits.device)
        with torch.no_grad():
            self.particle_nll.append(F.cross_entropy(logits.float(), labels))
        with pyro.plate("data", self.num_data, subsample=torch.arange(len(labels), device=logits.device)):
            if self.label_smoothing == 0 and self.entropy_bonus == 0:
                pyro.sample("labels", dist.Categorical(logits=logits), obs=labels)
            else:
                pyro.factor("labels", -self.example_loss(logits, labels))
        return logits

    def example_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-example ``CE_eps(y) - entropy_bonus * H(softmax(logits))``: the tempered objective's data term.

        With ``eps = label_smoothing``, ``CE_eps = -(1 - eps) log p_y - (eps / K) sum_k log p_k``
        (:func:`torch.nn.functional.cross_entropy`'s ``label_smoothing``, as the released code uses).
        """
        loss = F.cross_entropy(logits, labels, reduction="none", label_smoothing=self.label_smoothing)
        if self.entropy_bonus:
            log_p = F.log_softmax(logits, dim=-1)
            loss = loss + self.entropy_bonus * (log_p.exp() * log_p).sum(-1)
        return loss
