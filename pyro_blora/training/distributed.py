"""Scale-out for :func:`pyro_blora.fit`: several processes through accelerate, bf16 autocast, gradient accumulation.

``fit`` runs unchanged under ``accelerate launch --num_processes P script.py``
(``torchrun`` works too). Each process trains on its shard of every global
batch; the update is the one a single process would take on the whole global
batch.

**The objective across processes.** With ``P`` processes of ``B`` examples each,
process ``p`` computes ``loss_p = (N / B) sum_{i in b_p} -log p(y_i | x_i, W) + beta KL``.
Every process holds the same parameters and the same random state (all seed
``TrainConfig.seed``, and all consume the same amount of randomness per step), so
all draw the *same* posterior sample ``W ~ q`` and compute the same KL. The
average of their gradients is therefore::

    (1/P) sum_p grad loss_p = grad [ (N / (P B)) sum_{i in b_1 u ... u b_P} -log p(y_i | x_i, W) + beta KL ],

the gradient of the one-process loss on the global batch of ``P B`` examples:
an unbiased estimate of the full-data ELBO's gradient, exactly as with one
process. ``tests/test_distributed.py`` checks that two processes of batch 4 end
at the parameters of one process of batch 8.

**Gradient accumulation** (``TrainConfig.gradient_accumulation_steps = k``) takes
``k`` micro-batches ``b_j`` per step, weights micro-batch ``j``'s loss by
``|b_j| / sum_j |b_j|`` and replays the random state before each one, so that the
same posterior sample serves all of them: the accumulated gradient is the
gradient on the union of the micro-batches, also when the last group of an
epoch is shorter. A consequence: dropout masks repeat across micro-batches (and,
as with accelerate's ``set_seed``, across processes), which keeps each
example's mask a Bernoulli draw.

**Why the gradients are all-reduced by hand instead of wrapping in DDP.** Pyro
calls the guide and the model as two functions; the trainable state is the
guide's parameters and the adapted layers' (the prior's ``Z``, ``D``, plain LoRA
factors), a few MB next to a frozen base of GBs. DDP would broadcast the whole
frozen base when wrapping (bitsandbytes' quantised weights included, whose
quantisation state does not travel), would need ``find_unused_parameters`` for
guides that leave a parameter out of a step, and ``no_sync`` juggling for
accumulation. Instead, after the last micro-batch of a step, one
``accelerate.utils.reduce`` averages the flattened gradients of the trainable
parameters (plus a few statistics: loss, NLL, a failure flag, which parameters
got a gradient); the result equals DDP's (sum over processes divided by ``P``)
without overlapping communication with the backward pass, which costs nothing
noticeable for adapter-sized gradients. FSDP and DeepSpeed shard parameters,
which this module does not handle: they are refused with a clear error.

**Data.** The training ``DataLoader`` goes through
:func:`accelerate.data_loader.prepare_data_loader` (``even_batches``): process
``p`` gets batches ``p, p + P, p + 2P, ...`` of the loader's order, which the
epoch seed (:func:`pyro_blora.training.checkpoint.seed_epoch`) makes the same on every
process, so a global step covers the same examples as one process with batch
``P B``. When ``N`` is not a multiple of ``P B`` accelerate completes the last
round with examples from the start of the epoch (as DDP's sampler does).

**Files and output.** Only the main process writes checkpoints and saved
adapters (:func:`is_main_process`) and shows the progress bar; every process
evaluates the validation data (same numbers everywhere, so early stopping
agrees), and stop requests (callbacks, Ctrl-C) are agreed on after every step.

**Mixed precision.** ``mixed_precision="bf16"`` autocasts the network forward
only (:meth:`ScaleOut.network_precision`, entered by
:class:`~pyro_blora.model.BayesianLoRAModel` around ``task.class_logits``); the
guide, the prior, ``W | U`` and every KL run with autocast switched off, so the
inducing algebra stays in float32/float64, and the parameters (and AdamW's
state) stay float32. ``fp16`` would need loss scaling and is refused.

References: PyTorch DDP (Li et al., 2020, "PyTorch Distributed"); accelerate's
``prepare_data_loader`` and ``utils.reduce``; Goyal et al. (2017) for the
large-batch equivalence.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Mapping, Optional, Sequence

import torch
from accelerate import PartialState
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import DistributedType, broadcast, get_int_from_env, parse_flag_from_env, reduce
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pyro_blora.io import is_main_process

if TYPE_CHECKING:
    from pyro_blora.config import TrainConfig

__all__ = ["ScaleOut", "StepResult", "process_state", "is_main_process", "PRECISIONS"]

PRECISIONS = ("no", "bf16")
"""Values of ``TrainConfig.mixed_precision`` that fit accepts."""

_WORLD_SIZE_ENV = ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"]
_SHARDED = {
    "ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed", "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"
}
_REPLICATED = {DistributedType.NO} | {t for t in DistributedType if t.name.startswith("MULTI_")}


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


def process_state() -> PartialState:
    """accelerate's :class:`~accelerate.PartialState` of this process, checked for what fit supports.

    A process started by ``accelerate launch`` / ``torchrun`` on a machine
    without an accelerator joins a gloo process group on the CPU (accelerate
    itself only does so when told ``cpu=True``; without it every process would
    silently train alone).

    Raises:
        NotImplementedError: FSDP, DeepSpeed, Megatron-LM or XLA launches.
        RuntimeError: the launcher started several processes but they did not form one group.
    """
    for flag, name in _SHARDED.items():
        if parse_flag_from_env(flag):
            raise NotImplementedError(
                f"fit does not support {name} ({flag} is set): it replicates the frozen base on every process and "
                "averages the adapters' gradients (data parallel). Launch with plain multi-process data parallelism "
                "(accelerate launch --multi_gpu --num_processes N), or dispatch a large base over devices with "
                "device_map"
            )
    world = get_int_from_env(_WORLD_SIZE_ENV, 1)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or (world > 1 and not _has_accelerator()))
    if state.distributed_type not in _REPLICATED:
        raise NotImplementedError(
            f"fit supports single-process and data-parallel (MULTI_*) runs, not {state.distributed_type.name}"
        )
    if world > 1 and state.num_processes != world:
        raise RuntimeError(
            f"the launcher started {world} processes (WORLD_SIZE) but accelerate sees {state.num_processes}: "
            "each process would train alone. Create accelerate's PartialState/Accelerator with the right device "
            "before calling fit, or launch with accelerate launch"
        )
    return state


@dataclass
class StepResult:
    """One optimiser step's numbers, averaged over micro-batches and processes.

    Attributes:
        loss: the ELBO loss of the global batch (``N/|batch|`` scaled likelihood plus ``beta`` KL), a 0-d
            tensor on the device (a float after a multi-process average).
        nll: mean per-example NLL of the global batch, likewise.
        error: a ``FloatingPointError`` raised on this or another process; the step must not be taken.
    """

    loss: Any
    nll: Any
    error: Optional[FloatingPointError] = None


def _device_random(device: torch.device) -> Any:
    """``torch.cuda`` (or the like) for an accelerator device with its own generator, None for the CPU."""
    module = getattr(torch, device.type, None) if device.type != "cpu" else None
    return module if module is not None and hasattr(module, "get_rng_state") else None


class _ReplayRandom:
    """Captures the random state now and puts it back on :meth:`restore` (CPU and the compute device)."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.module = _device_random(device)
        self.device_state = self.module.get_rng_state(device) if self.module is not None else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.module is not None:
            self.module.set_rng_state(self.device_state, self.device)


def _batch_size(batch: Any) -> int:
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if labels is None:
        has = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"a training batch needs 'labels'; it has {has}")
    return len(labels)


class ScaleOut:
    """This process's part of a fit: devices, data shard, precision, accumulation and gradient averaging.

    Args:
        train: the run's :class:`~pyro_blora.config.TrainConfig` (``gradient_accumulation_steps``,
            ``mixed_precision``, ``device_placement``).
    """

    def __init__(self, train: "TrainConfig"):
        self.state = process_state()
        self.accumulation = train.gradient_accumulation_steps
        precision = train.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        if precision not in PRECISIONS:
            raise ValueError(
                f"mixed_precision {precision!r} (from accelerate launch --mixed_precision) is not supported by fit; "
                f"use one of {PRECISIONS} (fp16 would need loss scaling)"
            )
        self.mixed_precision = precision
        self.device_placement = train.device_placement
        self.device = self.state.device

    @property
    def num_processes(self) -> int:
        return self.state.num_processes

    @property
    def process_index(self) -> int:
        return self.state.process_index

    @property
    def is_main_process(self) -> bool:
        return self.state.is_main_process

    # ---------------------------------------------------------------- placement and data

    def place(self, net: nn.Module) -> None:
        """Move ``net`` to accelerate's device for this process, as ``Accelerator.prepare`` does.

        Left where it is: with ``device_placement=False``, a model dispatched over
        several devices (``device_map``), or one holding quantised (integer)
        weights, which bitsandbytes places when it quantises (load those with
        ``device_map={"": PartialState().process_index}``).
        """
        params = list(net.parameters())
        devices = {p.device for p in params}
        dispatched = len(devices) > 1 or len(set((getattr(net, "hf_device_map", None) or {}).values())) > 1
        quantized = any(not p.is_floating_point() for p in params)
        if self.device_placement and params and not dispatched and not quantized and devices != {self.state.device}:
            net.to(self.state.device)
        first = next(net.parameters(), None)
        self.device = first.device if first is not None else self.state.device
        if self.mixed_precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(self.device)
            raise ValueError(f"mixed_precision='bf16' but {name} has no bfloat16 support; use mixed_precision='no'")

    def shard(self, loader: DataLoader) -> DataLoader:
        """This process's shard of ``loader`` (``loader`` itself in a single process)."""
        if self.num_processes == 1:
            return loader
        return prepare_data_loader(
            loader, num_processes=self.num_processes, process_index=self.process_index,
            split_batches=False, put_on_device=False, rng_types=None, even_batches=True,
        )

    def steps_per_epoch(self, loader: DataLoader) -> int:
        """Optimiser steps per pass over ``loader``: groups of ``gradient_accumulation_steps`` batches."""
        return math.ceil(len(loader) / self.accumulation)

    def micro_batches(self, loader: DataLoader, skip: int = 0) -> Iterator[tuple[int, list[Any]]]:
        """``(batches consumed after this group, group)`` for each step of an epoch, after ``skip`` batches.

        A group holds ``gradient_accumulation_steps`` consecutive batches; the
        last group of an epoch may hold fewer.
        """
        group: list[Any] = []
        index = -1
        for index, batch in enumerate(loader):
            if index < skip:
                continue
            group.append(batch)
            if len(group) == self.accumulation:
                yield index + 1, group
                group = []
        if group:
            yield index + 1, group

    # ---------------------------------------------------------------- precision

    def network_precision(self) -> ContextManager[Any]:
        """The context the network forward runs in: bf16 autocast, or nothing."""
        if self.mixed_precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def full_precision(self) -> ContextManager[Any]:
        """Autocast off (also a caller's): the guide, prior, ``W | U`` and KL run in their own dtypes.

        Nothing to turn off without bf16 and outside a caller's autocast: then no context at all. Entering
        and leaving ``torch.autocast(enabled=False)`` every step made glibc's malloc hand the step's
        activation memory back to the kernel and fault it in again (12k-45k minor page faults per SmolLM2
        step with the default allocator, none without it: ``benchmarks/step_counts.py``).
        """
        if self.mixed_precision != "bf16" and not torch.is_autocast_enabled(self.device.type):
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, enabled=False)

    # ---------------------------------------------------------------- one step

    def step(
        self, loss_fn: Callable[[Any], tuple[Tensor, float]], batches: Sequence[Any], params: Sequence[nn.Parameter]
    ) -> StepResult:
        """Backpropagate the global batch's loss into ``params[i].grad`` (averaged over processes).

        ``loss_fn(batch) -> (loss, mean NLL)`` evaluates the ELBO loss of one
        micro-batch. The caller zeroes the gradients before and takes the
        optimiser step after, unless the result carries an ``error``.
        """
        sizes = [_batch_size(batch) for batch in batches]
        total = sum(sizes)
        replay = _ReplayRandom(self.device) if len(batches) > 1 else None
        loss: Any = 0.0
        nll: Any = 0.0
        error = None
        with self.full_precision():
            for j, (batch, size) in enumerate(zip(batches, sizes)):
                if replay is not None and j:
                    replay.restore()  # the same posterior draw for every micro-batch
                try:
                    value, batch_nll = loss_fn(batch)
                except FloatingPointError as err:
                    loss, error = math.nan, err
                    break
                weight = size / total
                # statistics stay on the device (no host sync): TrainingState.flush reads and checks them
                (value * weight).backward()
                loss = loss + weight * value.detach()
                nll = nll + weight * batch_nll
        if self.num_processes > 1:
            return self._average(params, loss, nll, error)
        return StepResult(loss, nll, error)

    def _average(
        self, params: Sequence[nn.Parameter], loss: Any, nll: Any, error: Optional[FloatingPointError]
    ) -> StepResult:
        """All-reduce (mean) the gradients and the step's statistics in one flat tensor per dtype."""
        flags = torch.tensor([float(error is not None)] + [float(p.grad is not None) for p in params],
                             dtype=torch.float64, device=self.device)
        parts = [torch.as_tensor(v).detach().to(self.device, torch.float64).reshape(1) for v in (loss, nll)]
        stats = torch.cat(parts + [flags])
        groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
        for index, param in enumerate(params):
            groups.setdefault((param.dtype, param.device), []).append(index)
        stats = reduce(stats, reduction="sum")
        has_grad = stats[3:].tolist()
        for members in groups.values():
            grads = [params[i].grad if params[i].grad is not None else torch.zeros_like(params[i]) for i in members]
            averaged = reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
            offset = 0
            for i in members:
                count = params[i].numel()
                if has_grad[i] > 0:  # a parameter no process touched keeps grad None, as in one process
                    params[i].grad = averaged[offset: offset + count].view_as(params[i])
                offset += count
        processes = self.num_processes
        loss, nll, failures = stats[0].item() / processes, stats[1].item() / processes, stats[2].item()
        if failures and error is None:
            error = FloatingPointError(f"a non-finite value on {int(failures)} other process(es) of {processes}")
        return StepResult(loss, nll, error)

    def share_random_state(self) -> None:
        """Put the main process's random state (CPU, and its device's) on every process's CPU and device.

        Needed after resuming: a checkpoint holds the main process's states, and
        its generator of another process's GPU was never advanced.
        """
        if self.num_processes == 1:
            return
        torch.set_rng_state(broadcast(torch.get_rng_state().to(self.device), from_process=0).cpu())
        module = _device_random(self.device)
        if module is not None:
            state = broadcast(module.get_rng_state(self.device).to(self.device), from_process=0).cpu()
            module.set_rng_state(state, self.device)

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag set on any process (stop requests, Ctrl-C), so all processes take the same branch."""
        if self.num_processes == 1:
            return tuple(bool(f) for f in flags)
        flags_tensor = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=self.device)
        summed = reduce(flags_tensor, reduction="sum")
        return tuple(bool(v > 0) for v in summed.tolist())
