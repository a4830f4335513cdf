"""The answer head of a network: which module it is, its effective weights, and its inputs.

Last-layer Laplace needs class logits that are *linear* in a weight matrix,
``f(x) = W_ans phi(x) [+ b_ans]``:

* answer-token tasks (:class:`~pyro_blora.tasks.AnswerTokenTask`, and
  :class:`~pyro_blora.tasks.cached.CachedPrefixTask` which wraps one as ``.inner``):
  the head is the LM head (``get_output_embeddings()``, the adapted
  :class:`~pyro_blora.models.BayesianLoRALinear` when ``lm_head`` is targeted),
  ``phi`` its input at the last position, and ``W_ans`` the rows of
  ``W0 + (alpha / r) B A`` at the answer token ids;
* :class:`~pyro_blora.tasks.TensorTask`: the last linear module of the network,
  all its rows (the network must output that layer's output as its logits).

``phi`` is read by a forward hook on the head module (no patched forwards).
Every batch checks that the task's logits are the head's outputs and that
``W_ans phi + b`` reproduces them, so a head followed by anything else (logit
soft-capping, a pooling step, a different final layer) is refused, not silently
linearised wrongly.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from pyro_blora.models import BayesianLoRALinear, linear_shape

from pyro_blora.inject import adapted_layers
from pyro_blora.result import make_loader
from pyro_blora.tasks.base import Task, TensorTask

__all__ = ["AnswerHead", "HeadFeatures", "find_head", "answer_ids_of", "head_weight", "collect_features"]


@dataclass
class AnswerHead:
    """The module whose output rows ``ids`` are the class logits.

    Attributes:
        module: the ``nn.Linear`` / ``Conv1D`` or adapted layer.
        name: its module path (for messages and the saved metadata).
        ids: output rows that are the classes, in class order.
        kind: ``"answer_token"`` (LM head at the last position) or ``"linear"`` (a classifier layer).
    """

    module: nn.Module
    name: str
    ids: list[int]
    kind: str

    @property
    def has_bias(self) -> bool:
        return _base(self.module).bias is not None

    @property
    def num_features(self) -> int:
        """``H``, the head's input width, plus one when the bias is folded into ``W``."""
        return int(linear_shape(_base(self.module))[0]) + int(self.has_bias)  # type: ignore[index]


@dataclass
class HeadFeatures:
    """What the linearised predictive needs of a data set (rows in data order).

    Attributes:
        mean: ``(N, C)`` MAP class logits (the task's output, masking included).
        phi: ``(N, H)`` head inputs, with a trailing 1 when the head has a bias.
        keep: ``(N, C)`` bool, False for classes the task masked out; None when none are.
        labels: ``(N,)`` gold labels when the data had them.
    """

    mean: Tensor
    phi: Tensor
    keep: Optional[Tensor]
    labels: Optional[Tensor]


def answer_ids_of(task: Any) -> Optional[list[int]]:
    """The answer token ids of an answer-token task (directly or as ``task.inner``); None otherwise."""
    for candidate in (task, getattr(task, "inner", None)):
        ids = getattr(candidate, "answer_ids", None)
        if ids is not None:
            return [int(i) for i in ids]
    return None


def _base(module: nn.Module) -> nn.Module:
    return module.base if isinstance(module, BayesianLoRALinear) else module


def _module_name(net: nn.Module, module: nn.Module) -> str:
    return next((name for name, m in net.named_modules() if m is module), type(module).__name__)


def find_head(net: nn.Module, task: Optional[Task]) -> AnswerHead:
    """The answer head of ``net`` under ``task``; a clear error for tasks without one."""
    task = task if task is not None else TensorTask()
    ids = answer_ids_of(task)
    if ids is not None:
        getter = getattr(net, "get_output_embeddings", None)
        module = getter() if callable(getter) else getattr(net, "lm_head", None)
        if module is None or linear_shape(_base(module)) is None:
            raise ValueError(
                f"{type(net).__name__} has no linear LM head (get_output_embeddings() / lm_head): "
                "last-layer Laplace reads the answer logits off that layer"
            )
        return AnswerHead(module, _module_name(net, module), ids, "answer_token")
    if isinstance(task, TensorTask):
        wrapped = {id(layer.base) for layer in adapted_layers(net)}
        linears = [
            (name, m) for name, m in net.named_modules()
            if isinstance(m, BayesianLoRALinear) or (linear_shape(m) is not None and id(m) not in wrapped)
        ]
        if not linears:
            raise ValueError(f"{type(net).__name__} has no nn.Linear layer to put a last-layer Laplace posterior on")
        name, module = linears[-1]
        out_features = int(linear_shape(_base(module))[1])  # type: ignore[index]
        return AnswerHead(module, name, list(range(out_features)), "linear")
    raise ValueError(
        f"last-layer Laplace needs an answer-token task (AnswerTokenTask, or CachedPrefixTask around one) "
        f"or a TensorTask whose network ends in a linear classifier; {type(task).__name__} has no answer head"
    )


@torch.no_grad()
def head_weight(head: AnswerHead) -> Tensor:
    """``W_ans`` (``C x H``, float64): rows ``ids`` of ``W0 + (alpha / r) B A``, with the bias as a last column.

    The adapter factors are the ones the layer currently holds: call
    :meth:`~pyro_blora.FitResult.use_posterior_mean` first for a Bayesian layer.
    """
    base = _base(head.module)
    ids = torch.tensor(head.ids, device=base.weight.device)
    weight = base.weight.T if type(base).__name__ == "Conv1D" else base.weight  # Conv1D stores (in, out)
    rows = weight.index_select(0, ids).to(torch.float64)
    if isinstance(head.module, BayesianLoRALinear):
        a, b = head.module.adapter_weights()
        if a.dim() == 3:
            if a.shape[0] != 1:
                raise ValueError(f"{head.name} holds {a.shape[0]} stacked adapter samples; fix one (use_posterior_mean)")
            a, b = a[0], b[0]
        rows = rows + float(head.module.update_scale) * (b.index_select(0, ids).to(torch.float64) @ a.to(torch.float64))
    if base.bias is not None:
        rows = torch.cat([rows, base.bias.index_select(0, ids).to(torch.float64).unsqueeze(1)], dim=1)
    return rows.cpu()


@contextlib.contextmanager
def _capture(module: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record the input and output of ``module``'s last call (a forward hook, removed on exit)."""
    seen: dict[str, Tensor] = {}

    def hook(_: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        seen["input"], seen["output"] = inputs[0].detach(), output.detach()

    handle = module.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def _last_position(x: Tensor) -> Tensor:
    """``(B, H)`` as is, else the last position of ``(B, T, H)`` (prompts are left padded)."""
    return x if x.dim() == 2 else x[:, -1]


def _check_close(what: str, got: Tensor, want: Tensor, scale: Tensor, dtype: torch.dtype, width: int) -> None:
    # round-off of a width-H dot product in the head's dtype, relative to the logits' size (|W_c| |phi|)
    rel = min(0.05, max(1e-4, 100 * torch.finfo(dtype).eps * math.sqrt(width)))
    err = (got - want).abs()
    if bool((err > rel * (1.0 + scale)).any()):
        raise ValueError(
            f"{what} (largest difference {float(err.max()):.3g}): the class logits are not linear in the head's "
            "weights, so last-layer Laplace cannot linearise them (is the head followed by soft-capping or pooling?)"
        )


@torch.no_grad()
def collect_features(
    net: nn.Module,
    task: Task,
    head: AnswerHead,
    data: Union[Dataset, DataLoader, Sequence[Any]],
    batch_size: int,
) -> HeadFeatures:
    """Run ``net`` (in eval mode) over ``data`` and keep MAP logits, head inputs and masks."""
    weight = head_weight(head)
    rows_norm = weight.norm(dim=1)
    ids = torch.tensor(head.ids)
    loader = make_loader(data, task, batch_size, shuffle=False)
    means, phis, keeps, labels = [], [], [], []
    was_training = net.training
    net.eval()
    try:
        for batch in loader:
            with _capture(head.module) as seen:
                logits = task.class_logits(net, batch).detach().float().cpu()
            if "input" not in seen:
                raise ValueError(f"the head {head.name} did not run in the task's forward pass")
            out = _last_position(seen["output"]).cpu()
            out = out.index_select(-1, ids) if head.kind == "answer_token" else out
            if out.shape != logits.shape:
                raise ValueError(
                    f"the head {head.name} gives {tuple(out.shape)} class outputs but the task's logits are "
                    f"{tuple(logits.shape)}: last-layer Laplace needs the task's logits to be that layer's output"
                )
            phi = _last_position(seen["input"]).to(torch.float64).cpu()
            if head.has_bias:
                phi = torch.cat([phi, phi.new_ones(phi.shape[0], 1)], dim=1)
            keep = torch.as_tensor(batch["class_mask"]).bool().cpu() if "class_mask" in batch else torch.ones_like(logits, dtype=torch.bool)
            scale = rows_norm.unsqueeze(0) * phi.norm(dim=1, keepdim=True)
            dtype = seen["output"].dtype
            _check_close("the task's logits differ from the head's outputs", logits[keep].double(), out.double()[keep], scale[keep], dtype, phi.shape[1])
            _check_close("W_ans phi differs from the head's outputs", phi @ weight.T, out.double(), scale, dtype, phi.shape[1])
            means.append(logits)
            phis.append(phi.float())
            keeps.append(keep)
            if "labels" in batch:
                labels.append(torch.as_tensor(batch["labels"]).long().cpu())
    finally:
        net.train(was_training)
    keep_all = torch.cat(keeps)
    return HeadFeatures(
        mean=torch.cat(means),
        phi=torch.cat(phis),
        keep=None if bool(keep_all.all()) else keep_all,
        labels=torch.cat(labels) if labels else None,
    )
