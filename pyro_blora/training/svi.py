"""``fit``: stochastic variational inference on the ELBO of a Bayesian-LoRA network.

One step draws a minibatch, runs the guide and the model under
``TraceMeanField_ELBO`` (closed-form KL where one is registered: Gaussian
guides against the Gaussian prior, and the conditional ``W | U``; a Monte Carlo
estimate through the flow otherwise), and takes an AdamW step on every
adapter and guide parameter. Parameters live on the modules (no Pyro param
store), so the torch optimiser sees them directly.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import pyro
import torch
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pyro_blora.guides import BayesianLoRAGuide
from pyro_blora.guides.network import GuideSpec
from pyro_blora.models.priors import shared_geometry

from pyro_blora.training.checkpoint import deferred_interrupt, load_checkpoint, restore_checkpoint, save_checkpoint, seed_epoch
from pyro_blora.config import BLoRAConfig, TrainConfig, config_from_dict
from pyro_blora.training.distributed import ScaleOut
from pyro_blora.training.elbo import MeanFieldELBO
from pyro_blora.inject import adapted_layers, inject_adapters
from pyro_blora.io import ensure_writable
from pyro_blora.methods import METHODS
from pyro_blora.model import BayesianLoRAModel
from pyro_blora.result import FitResult, TrainingState, make_loader
from pyro_blora.tasks.base import Task, TensorTask

__all__ = ["fit", "KLScale"]

Callback = Callable[[TrainingState], Optional[bool]]


class KLScale(Messenger):
    """Multiplies the log-density of every latent (non-observed) site by ``beta``.

    Applied to both model and guide, it scales every KL term of the ELBO,
    analytic or Monte Carlo, while the likelihood keeps its ``N / B`` scale.
    """

    def __init__(self, beta: float = 1.0):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.beta


def _lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def _param_groups(modules: Iterable[nn.Module], train: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: every trainable parameter, with the unconstrained scales (``*_rho``) apart.

    Scales are ``cap * sigmoid(rho)`` and start far below their caps (sigma of
    q(U) at 1e-3 of 0.1, lambda at 1e-3 of 0.03); Adam moves ``rho`` by about the
    learning rate per step, so at the weights' learning rate the posterior width
    would barely move within a short fine-tuning run. They get
    ``lr * variance_lr_multiplier`` and no weight decay.
    """
    seen: set[int] = set()
    weights: list[nn.Parameter] = []
    scales: list[nn.Parameter] = []
    for module in modules:
        for name, param in module.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                (scales if name.endswith("_rho") else weights).append(param)
    groups: list[dict[str, Any]] = [{"params": weights}]
    if scales:
        groups.append({"params": scales, "lr": train.lr * train.variance_lr_multiplier, "weight_decay": 0.0})
    return groups


def _fused(params: Sequence[torch.Tensor]) -> dict[str, bool]:
    """``fused=True`` where torch has AdamW's fused kernel for all ``params``: a Bayesian-LoRA
    network has about ten small tensors per factor, and the per-tensor loop costs more than the math."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    ok = bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)
    return {"fused": True} if ok else {}


def _non_finite_report(loss: Any, step: int, model: nn.Module, guide: nn.Module) -> str:
    """Name where a non-finite loss came from: a diverged parameter, else the data or the likelihood."""
    bad = [
        f"{prefix}{name}"
        for prefix, module in (("", model), ("guide.", guide))
        for name, param in module.named_parameters()
        if param.requires_grad and not torch.isfinite(param).all()
    ]
    where = f"non-finite parameters: {bad[:5]}" if bad else "all parameters are finite: look at the inputs and the logits"
    return (
        f"non-finite loss ({loss}) at step {step} ({where}); training stopped and the parameters of the last "
        "finished step are kept: lower lr, raise BLoRAConfig.jitter, or check the inputs for NaN"
    )


def fit(
    model: nn.Module,
    data: Union[Dataset, DataLoader, Sequence[Any]],
    guide: Union[GuideSpec, nn.Module] = "flow",
    *,
    task: Optional[Task] = None,
    config: Union[BLoRAConfig, dict, None] = None,
    guide_options: Optional[dict] = None,
    val_data: Union[Dataset, DataLoader, Sequence[Any], None] = None,
    callbacks: Sequence[Callback] = (),
    resume_from: Union[str, "os.PathLike[str]", None] = None,
    **options: Any,
) -> FitResult:
    """Fit Bayesian-LoRA adapters to ``model`` on ``data`` by SVI.

    Args:
        model: any ``nn.Module``; adapters are injected in place per ``config``
            unless it already carries them (e.g. from :func:`pyro_blora.load`).
        data: training examples (a ``Dataset``, ``datasets.Dataset`` or list,
            collated by ``task``) or a ``DataLoader`` of collated batches.
        guide: ``"flow"`` (default), ``"normal"``, ``"mvn"``, ``"delta"`` (MAP,
            plain LoRA), a baseline of :data:`pyro_blora.methods.METHODS` (``"mc_dropout"``,
            ``"ensemble"``, ``"blob"``, ``"laplace"``), an :class:`~pyro_blora.guides.InducingGuide` subclass, a
            ``factory(site)``, or a ready guide module (a :class:`~pyro_blora.guides.BayesianLoRAGuide`,
            or :class:`~pyro_blora.guides.BLoBGuide` over injected BLoB layers).
        task: turns batches into class logits; default :class:`~pyro_blora.tasks.TensorTask`.
        config: where the adapters go and their prior (:class:`BLoRAConfig` or dict).
        guide_options: keyword arguments of the guide family (``transforms``,
            ``hidden_dims``, ``rank``, ``scale_init``, ...).
        val_data: validation examples, evaluated every ``eval_every`` steps
            (validation NLL drives early stopping; never pass the test split).
        callbacks: called after each step with a :class:`TrainingState`; return
            True to stop.
        resume_from: a checkpoint folder (``TrainConfig.checkpoint_dir`` of an
            earlier run, see :mod:`pyro_blora.training.checkpoint`): continue that run
            where it stopped, with the same data and options.
        **options: any :class:`TrainConfig` field (``num_steps``, ``lr``, ``kl_weight``, ...).

    Returns:
        A :class:`FitResult` with ``predict``, ``evaluate`` and ``save``.
    """
    if isinstance(guide, str) and guide in METHODS:
        return METHODS[guide](
            model, data, task=task, config=config, guide_options=guide_options, val_data=val_data,
            callbacks=callbacks, resume_from=resume_from, **options,
        )
    train = config_from_dict(TrainConfig, options)
    scale = ScaleOut(train)  # this process under accelerate (one process: no-op), precision, accumulation
    if train.checkpoint_dir is not None and scale.is_main_process:
        ensure_writable(Path(train.checkpoint_dir))
    if val_data is None and (train.eval_every or train.early_stopping_patience):
        raise ValueError("eval_every and early_stopping_patience need val_data (a validation split, never the test split)")
    if isinstance(config, dict):
        config = config_from_dict(BLoRAConfig, config)
    existing = adapted_layers(model)
    if existing:
        # adapters already in place (e.g. from load()): record the settings they were built with
        if config is not None and config != existing[0].config:
            raise ValueError(
                "the model already carries adapters built with another BLoRAConfig; "
                "pass config=None to keep them, or call remove_adapters first"
            )
        config = existing[0].config
    config = config or BLoRAConfig()
    task = task or TensorTask()
    torch.manual_seed(train.seed)
    pyro.set_rng_seed(train.seed)

    scale.place(model)
    loader = scale.shard(make_loader(data, task, train.batch_size, shuffle=True, seed=train.seed))
    num_data = len(loader.dataset)
    steps_per_epoch = scale.steps_per_epoch(loader)
    total = train.num_steps or train.epochs * steps_per_epoch

    if not existing:
        inject_adapters(model, config)
    bayes_model = BayesianLoRAModel(model, task, num_data)
    bayes_model.network_precision = scale.network_precision
    if isinstance(guide, nn.Module):  # a ready guide: BayesianLoRAGuide, or a baseline's (BLoBGuide)
        bayes_guide = guide
        scale.place(bayes_guide)
    else:
        bayes_guide = BayesianLoRAGuide(
            bayes_model.factors, guide, config.lambda_init, config.lambda_max, **(guide_options or {})
        )
    result = FitResult(bayes_model, bayes_guide, config, train, task)

    groups = _param_groups([model, bayes_guide], train)
    params = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, **_fused(params))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(train.schedule, train.warmup_steps, total))
    elbo = MeanFieldELBO(num_particles=train.num_particles)  # TraceMeanField_ELBO without unused log_probs
    kl_scale = KLScale()
    scaled_model, scaled_guide = kl_scale(bayes_model), kl_scale(bayes_guide)
    warmup_steps = max(1, round(train.kl_warmup * total))

    state = TrainingState(result=result, step=0, total_steps=total)
    best = (math.inf, None)
    stale = 0
    epoch, skip = 0, 0
    run = {"total_steps": total, "steps_per_epoch": steps_per_epoch, "num_data": num_data, "seed": train.seed,
           "num_processes": scale.num_processes, "gradient_accumulation_steps": train.gradient_accumulation_steps}
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        restore_checkpoint(ckpt, result, optimizer, scheduler, run)
        scale.share_random_state()  # the main process's states hold for every process (and its GPU)
        state.step, (epoch, skip) = ckpt.step, ckpt.position
        extra = ckpt.meta["extra"]
        state.history, state.validation, stale = extra["history"], extra["validation"], extra["stale"]
        result.history, result.validation = state.history, state.validation
        best = (math.inf if extra["best_nll"] is None else extra["best_nll"], ckpt.best)

    def checkpoint(position: tuple[int, int]) -> None:
        extra = {"history": state.history, "validation": state.validation, "stale": stale,
                 "best_nll": None if math.isinf(best[0]) else best[0]}
        save_checkpoint(train.checkpoint_dir, result, optimizer, scheduler, step=state.step, epoch=position[0],
                        batch_index=position[1], run=run, extra=extra, best=best[1])

    start_step = state.step

    def elbo_loss(batch: Any) -> tuple[torch.Tensor, float]:
        bayes_model.particle_nll.clear()
        # Pyro's argument and shape checks run on the first step only: after that
        # they cost a host sync per site and check what the first step checked.
        with shared_geometry(), pyro.validation_enabled(state.step == start_step):
            loss = elbo.differentiable_loss(scaled_model, scaled_guide, batch)
        return loss, bayes_model.last_nll

    model.train()
    bar = tqdm(total=total, initial=state.step, desc=f"fit[{bayes_guide.family_name}]",
               disable=not (train.progress and scale.is_main_process), dynamic_ncols=True)
    interrupt = deferred_interrupt(train.checkpoint_dir is not None)  # Ctrl-C: checkpoint after the current step
    interrupted = interrupt.__enter__()
    try:
        while state.step < total:
            seed_epoch(loader, train.seed, epoch)  # the order of each epoch is reproducible, for resuming
            for consumed, batches in scale.micro_batches(loader, skip):
                if state.step >= total:
                    break
                kl_scale.beta = train.kl_weight * min(1.0, (state.step + 1) / warmup_steps)
                optimizer.zero_grad(set_to_none=True)
                # gradients of the global batch (micro-batches, processes) averaged into params' .grad
                outcome = scale.step(elbo_loss, batches, params)
                if outcome.error is not None:
                    report = _non_finite_report(str(outcome.error), state.step, model, bayes_guide)
                    raise FloatingPointError(report) from outcome.error
                if not math.isfinite(outcome.loss):
                    raise FloatingPointError(
                        f"the loss became {outcome.loss} at step {state.step}; lower lr, raise jitter, "
                        "or check the inputs for NaN"
                    )
                if train.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
                optimizer.step()
                scheduler.step()
                state.record(outcome.loss, outcome.nll, num_data, kl_scale.beta, scheduler.get_last_lr()[0])
                bar.update(1)
                bar.set_postfix(state.postfix(), refresh=False)
                if val_data is not None and train.eval_every and state.step % train.eval_every == 0:
                    metrics = result.evaluate(val_data, num_samples=4)
                    state.record_validation(metrics)
                    if metrics["nll"] < best[0]:
                        best, stale = (metrics["nll"], result.state_dict_copy()), 0
                    else:
                        stale += 1
                    if train.early_stopping_patience is not None and stale >= train.early_stopping_patience:
                        state.stop = True
                for callback in callbacks:
                    if callback(state):
                        state.stop = True
                state.stop, interrupt_now = scale.agree(state.stop, interrupted.is_set())  # all processes alike
                position = (epoch, consumed) if consumed < len(loader) else (epoch + 1, 0)
                if train.checkpoint_dir is not None and scale.is_main_process and (
                    interrupt_now or (train.checkpoint_every and state.step % train.checkpoint_every == 0)
                ):
                    checkpoint(position)
                if interrupt_now:
                    raise KeyboardInterrupt(f"interrupted after step {state.step}; checkpoint in {train.checkpoint_dir}")
                if state.stop:
                    break
            if state.stop:
                break
            epoch, skip = epoch + 1, 0
    finally:
        interrupt.__exit__(None, None, None)
        bar.close()
    if best[1] is not None and train.early_stopping_patience is not None:
        result.load_state_dict_copy(best[1])
    model.eval()
    return result
