"""The task protocol: how a labelled example becomes class logits.

A task owns two things the rest of the library never looks inside:

* ``collate(examples) -> batch``: turns a list of raw examples (plain dicts as
  the loaders in :mod:`pyro_blora.tasks.datasets` yield them) into a dict of
  tensors that always holds integer ``"labels"`` of shape ``(B,)``;
* ``class_logits(model, batch) -> Tensor``: runs the network on the batch and
  returns unnormalised class scores of shape ``(B, num_classes)``.

The Bayesian layers sample their weights before ``class_logits`` runs, so a task
is oblivious to whether the network is Bayesian. ``class_logits`` must accept a
batch whose rows were repeated (posterior samples stacked along the batch), so it
must not assume a fixed batch size.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

__all__ = ["Task", "TensorTask", "model_inputs", "on_model_device"]


@runtime_checkable
class Task(Protocol):
    """What :func:`pyro_blora.fit` needs to turn examples into class logits."""

    num_classes: int

    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        """Batch raw examples into tensors, including integer ``labels``."""
        ...

    def class_logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """Run ``model`` on ``batch`` and return ``(B, num_classes)`` logits."""
        ...


def model_inputs(batch: Mapping[str, Tensor], exclude: Sequence[str] = ("labels",)) -> dict[str, Tensor]:
    """The entries of ``batch`` that are passed to the network as keyword arguments."""
    return {k: v for k, v in batch.items() if k not in exclude}


def on_model_device(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` with its tensors on the device of ``model``'s parameters.

    Loaders collate on the CPU; a model on an accelerator gets its inputs moved
    here, so the same data and task serve a CPU and a GPU model.
    """
    param = next(model.parameters(), None)
    if param is None:
        return dict(batch)
    device = param.device
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) and v.device != device else v for k, v in batch.items()}


class TensorTask:
    """The default task for networks that already output class logits.

    Examples are ``{"inputs": Tensor, "labels": int}`` dicts (or ``(inputs, label)``
    pairs); the network is called as ``model(inputs)`` for a tensor or
    ``model(**inputs)`` for a dict of tensors, and its output is used directly as
    logits, or its ``.logits`` attribute when it has one (transformers'
    ``SequenceClassifierOutput``).
    """

    def __init__(self, num_classes: int | None = None):
        self.num_classes = num_classes

    def collate(self, examples: Sequence[Any]) -> dict[str, Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        first = examples[0]
        if isinstance(first, Mapping):
            keys = list(first.keys())
            if "labels" not in keys and "label" not in keys:
                raise ValueError(f"examples need a 'labels' entry; found keys {sorted(keys)}")
            out: dict[str, Tensor] = {}
            for key in keys:
                name = "labels" if key == "label" else key
                out[name] = torch.stack([torch.as_tensor(e[key]) for e in examples])
            return out
        inputs, labels = zip(*examples)
        return {"inputs": torch.stack([torch.as_tensor(x) for x in inputs]), "labels": torch.as_tensor(labels)}

    def class_logits(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        batch = on_model_device(model, batch)
        if "inputs" in batch and len(batch) == 2:
            output = model(batch["inputs"])
        else:
            output = model(**model_inputs(batch))
        logits = getattr(output, "logits", output)
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"the network returned {shape}, not (batch, classes) logits; pass a task "
                "(pyro_blora.tasks) that maps its output to class logits"
            )
        return logits
