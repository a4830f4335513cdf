"""``fit_svi``: stochastic variational inference on the ELBO of a Bayesian-LoRA network.

One step draws a minibatch, runs the guide and the model under
``TraceMeanField_ELBO`` (closed-form KL where one is registered: Gaussian
guides against the Gaussian prior, and the conditional ``W | U``; a Monte Carlo
estimate through the flow otherwise), and takes an AdamW step on every
adapter and guide parameter. Parameters live on the modules (no Pyro param
store), so the torch optimiser sees them directly.
"""

from __future__ import annotations

import contextlib
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
from pyro_blora.guides.options import DeltaOptions, FlowOptions, MultivariateNormalOptions, NormalOptions, changed_options
from pyro_blora.guides.network import GuideSpec
from pyro_blora.guides.base import InducingGuide
from pyro_blora.models.geometry import deferred_checks
from pyro_blora.models.layer import BayesianLoRALinear
from pyro_blora.models.packing import pack_parameters
from pyro_blora.models.priors import InducingPrior, shared_geometry

from pyro_blora.training.callbacks import Callback, CheckpointWriter, ValidationMonitor, run_callbacks
from pyro_blora.training.checkpoint import deferred_interrupt, load_checkpoint, restore_checkpoint, seed_epoch
from pyro_blora.config import BLoRAConfig, TrainConfig, config_from_dict
from pyro_blora.training.distributed import ScaleOut
from pyro_blora.training.elbo import MeanFieldELBO
from pyro_blora.inject import adapted_layers, inject_adapters
from pyro_blora.io import ensure_writable
from pyro_blora.methods import FitRequest, Method, register_method
from pyro_blora.model import BayesianLoRAModel
from pyro_blora.result import FitResult, TrainingState, make_loader
from pyro_blora.tasks.base import Task, TensorTask

__all__ = ["fit_svi", "KLScale"]


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
        if schedule == "step":
            return 0.1 ** sum(progress >= milestone for milestone in (1 / 3, 2 / 3))
        return 1.0

    return factor


def kl_beta(train: TrainConfig, step: int, total: int) -> float:
    """``beta_t`` of step ``step`` of ``total`` (see :class:`~pyro_blora.config.TrainConfig`)."""
    start = round(train.kl_start * total)
    if step < start:
        return 0.0
    warmup = max(1, round(train.kl_warmup * total))
    return train.kl_weight * min(1.0, (step + 1 - start) / warmup)


PACKED_MODULES = (InducingGuide, InducingPrior, BayesianLoRALinear)
"""Modules whose same-role parameters are packed while training (:mod:`pyro_blora.models.packing`)."""


def _param_groups(modules: Iterable[nn.Module], train: TrainConfig) -> list[dict[str, Any]]:
    """AdamW groups: every trainable parameter, with the unconstrained scales (``*_rho``) and the prior's
    empirical-Bayes gains (``lora_prior_log_gain``) apart.

    Scales are ``cap * sigmoid(rho)`` and start far below their caps (sigma of
    q(U) at 1e-3 of 0.1, lambda at 1e-3 of 0.03); Adam moves ``rho`` by about the
    learning rate per step, so at the weights' learning rate the posterior width
    would barely move within a short fine-tuning run. They get
    ``lr * variance_lr_multiplier`` and no weight decay. The gains are hyperparameters of the
    prior, fitted by the ELBO (type-II maximum likelihood), also in log space: the same group.
    """
    seen: set[int] = set()
    weights: list[nn.Parameter] = []
    scales: list[nn.Parameter] = []
    for module in modules:
        for name, param in module.named_parameters():
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                (scales if name.endswith(("_rho", "lora_prior_log_gain")) else weights).append(param)
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


def _resolve_config(model: nn.Module, config: Union[BLoRAConfig, dict, None]) -> tuple[BLoRAConfig, bool]:
    """The config to fit with, and whether the model already carries adapters built with it (e.g. from load())."""
    if isinstance(config, dict):
        config = config_from_dict(BLoRAConfig, config)
    existing = adapted_layers(model)
    if existing:
        if config is not None and config != existing[0].config:
            raise ValueError(
                "the model already carries adapters built with another BLoRAConfig; "
                "pass config=None to keep them, or call remove_adapters first"
            )
        return existing[0].config, True
    return config or BLoRAConfig(), False


class _Run:
    """One SVI run's parts: the model and guide under the KL scale, the optimiser, schedule and ELBO."""

    def __init__(self, result: FitResult, train: TrainConfig, total: int, start_step: int):
        self.result, self.train, self.total, self.start_step = result, train, total, start_step
        groups = _param_groups([result.net, result.guide], train)
        # the factors' small tensors as a few stacked ones while training (models/packing.py): one
        # accumulation, clip and AdamW update per role instead of per tensor; unpacked by close()
        self.packing = pack_parameters([result.net, result.guide], PACKED_MODULES, [g["params"] for g in groups])
        for group in groups:
            group["params"] = self.packing.replace(group["params"])
        self.params = [p for group in groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, **_fused(self.params))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(train.schedule, train.warmup_steps, total)
        )
        self.elbo = MeanFieldELBO(num_particles=train.num_particles)  # TraceMeanField_ELBO without unused log_probs
        self.kl_scale = KLScale()
        self.scaled_model, self.scaled_guide = self.kl_scale(result.model), self.kl_scale(result.guide)

    def close(self) -> None:
        """Give the packed parameters their own storage again (the result outlives the run)."""
        self.packing.unpack()

    def loss(self, batch: Any, state: TrainingState) -> tuple[torch.Tensor, Any]:
        bayes_model = self.result.model
        bayes_model.particle_nll.clear()
        # The first step checks everything at once (Pyro's argument and shape checks, the labels' range,
        # finite logits, Cholesky retries): after that each check would cost a host sync per site and
        # check what the first step checked; the Cholesky's failure flag then waits on the device.
        first, flags = state.step == self.start_step, []
        deferred = contextlib.nullcontext() if first else deferred_checks(flags)
        with shared_geometry(), pyro.validation_enabled(first), deferred:
            loss = self.elbo.differentiable_loss(self.scaled_model, self.scaled_guide, batch)
        state.deferred_checks.extend((state.step + 1, what, failed) for what, failed in flags)
        return loss, bayes_model.last_nll

    def step(self, scale: ScaleOut, batches: list[Any], state: TrainingState) -> bool:
        """One optimiser step on the global batch, without a host sync; True when the statistics were read.

        A non-finite loss raises FloatingPointError when :meth:`TrainingState.flush` reads it (every
        ``host_sync_every`` steps), naming the step.
        """
        self.kl_scale.beta = kl_beta(self.train, state.step, self.total)
        self.optimizer.zero_grad(set_to_none=True)
        self.packing.zero_grad()  # packed roles: zeroed in place, their members' .grad are views
        # gradients of the global batch (micro-batches, processes) averaged into params' .grad
        outcome = scale.step(lambda batch: self.loss(batch, state), batches, self.params)
        if outcome.error is not None:
            report = _non_finite_report(str(outcome.error), state.step, self.result.net, self.result.guide)
            raise FloatingPointError(report) from outcome.error
        if self.train.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return state.record(outcome.loss, outcome.nll, self.kl_scale.beta, self.scheduler.get_last_lr()[0])


def _resume(path: Any, run: _Run, state: TrainingState, monitor: ValidationMonitor, scale: ScaleOut, meta: dict) -> tuple[int, int]:
    """Restore a checkpoint into ``run``, ``state`` and ``monitor``; returns the data position ``(epoch, skip)``."""
    ckpt = load_checkpoint(path)
    restore_checkpoint(ckpt, state.result, run.optimizer, run.scheduler, meta)
    scale.share_random_state()  # the main process's states hold for every process (and its GPU)
    state.step = ckpt.step
    extra = ckpt.meta["extra"]
    state.history, state.validation = extra["history"], extra["validation"]
    state.result.history, state.result.validation = state.history, state.validation
    monitor.load_state_dict(extra, ckpt.best)
    run.start_step = state.step
    return ckpt.position


def _train(run: _Run, scale: ScaleOut, loader: DataLoader, state: TrainingState, position: tuple[int, int],
           callbacks: Sequence[Callback], checkpoints: Optional[CheckpointWriter]) -> None:
    """The loop over epochs and batches until ``state.total_steps`` or a callback stops it."""
    train = run.train
    epoch, skip = position
    bar = tqdm(total=state.total_steps, initial=state.step, desc=f"fit[{run.result.guide.family_name}]",
               disable=not (train.progress and scale.is_main_process), dynamic_ncols=True)
    interrupt = deferred_interrupt(checkpoints is not None)  # Ctrl-C: checkpoint after the current step
    interrupted = interrupt.__enter__()
    try:
        while state.step < state.total_steps and not state.stop:
            seed_epoch(loader, train.seed, epoch)  # the order of each epoch is reproducible, for resuming
            for consumed, batches in scale.micro_batches(loader, skip):
                if state.step >= state.total_steps:
                    break
                if run.step(scale, batches, state):
                    bar.set_postfix(state.postfix(), refresh=False)
                bar.update(1)
                state.stop = run_callbacks(callbacks, state) or state.stop
                state.stop, state.interrupted = scale.agree(state.stop, interrupted.is_set())  # all processes alike
                state.position = (epoch, consumed) if consumed < len(loader) else (epoch + 1, 0)
                if checkpoints is not None:
                    checkpoints(state)
                if state.interrupted:
                    raise KeyboardInterrupt(f"interrupted after step {state.step}; checkpoint in {train.checkpoint_dir}")
                if state.stop:
                    break
            epoch, skip = epoch + 1, 0
    finally:
        interrupt.__exit__(None, None, None)
        bar.close()


def fit_svi(
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
    result_type: type[FitResult] = FitResult,
    **options: Any,
) -> FitResult:
    """Fit Bayesian-LoRA adapters to ``model`` on ``data`` by SVI: the loop every method trains with.

    ``pyro_blora.fit`` dispatches a method's name through :mod:`pyro_blora.methods`;
    this is what its Bayesian-LoRA families (and the baselines that train by SVI) run.

    Args:
        model: any ``nn.Module``; adapters are injected in place per ``config``
            unless it already carries them (e.g. from :func:`pyro_blora.load`).
        data: training examples (a ``Dataset``, ``datasets.Dataset`` or list,
            collated by ``task``) or a ``DataLoader`` of collated batches.
        guide: a guide family name (``"flow"``, ``"normal"``, ``"mvn"``, ``"delta"``), an
            :class:`~pyro_blora.guides.InducingGuide` subclass, a ``factory(site)``, or a
            ready guide module (a :class:`~pyro_blora.guides.BayesianLoRAGuide`, or a
            baseline's guide over its own injected layers).
        task: turns batches into class logits; default :class:`~pyro_blora.tasks.TensorTask`.
        config: where the adapters go and their prior (:class:`BLoRAConfig` or dict).
        guide_options: keyword arguments of the guide family (``transforms``,
            ``hidden_dims``, ``rank``, ``scale_init``, ...).
        val_data: validation examples, evaluated every ``eval_every`` steps
            (validation NLL drives early stopping; never pass the test split).
        callbacks: called after each step with a :class:`TrainingState`; return True to stop.
        resume_from: a checkpoint folder (``TrainConfig.checkpoint_dir`` of an earlier
            run): continue that run where it stopped, with the same data and options.
        result_type: the :class:`FitResult` subclass built before the first step (a method's own
            predictive, e.g. MC dropout's): validation, callbacks and checkpoint scoring along
            training then predict as the finished fit will.
        **options: any :class:`TrainConfig` field (``num_steps``, ``lr``, ``kl_weight``, ...).
    """
    train = config_from_dict(TrainConfig, options)
    scale = ScaleOut(train)  # this process under accelerate (one process: no-op), precision, accumulation
    if train.checkpoint_dir is not None and scale.is_main_process:
        ensure_writable(Path(train.checkpoint_dir))
    if val_data is None and (train.eval_every or train.early_stopping_patience):
        raise ValueError("eval_every and early_stopping_patience need val_data (a validation split, never the test split)")
    config, adapted = _resolve_config(model, config)
    task = task or TensorTask()
    torch.manual_seed(train.seed)
    pyro.set_rng_seed(train.seed)

    scale.place(model)
    loader = scale.shard(make_loader(data, task, train.batch_size, shuffle=True, seed=train.seed))
    num_data = len(loader.dataset)
    steps_per_epoch = scale.steps_per_epoch(loader)
    total = train.num_steps or train.epochs * steps_per_epoch
    if not adapted:
        inject_adapters(model, config)
    bayes_model = BayesianLoRAModel(model, task, num_data)
    bayes_model.network_precision = scale.network_precision
    bayes_model.label_smoothing, bayes_model.entropy_bonus = train.label_smoothing, train.entropy_bonus
    if isinstance(guide, nn.Module):  # a ready guide: BayesianLoRAGuide, or a baseline's (BLoBGuide)
        bayes_guide = guide
        scale.place(bayes_guide)
    else:
        bayes_guide = BayesianLoRAGuide(
            bayes_model.factors, guide, config.lambda_init, config.lambda_max, **(guide_options or {})
        )
    if getattr(bayes_guide, "point_mass", False):
        for layer in bayes_model.layers:  # MAP has no entropy to stop g -> infinity: the prior stays fixed
            if getattr(layer, "lora_prior_log_gain", None) is not None:
                layer.lora_prior_log_gain.requires_grad_(False)
    result = result_type(bayes_model, bayes_guide, config, train, task)
    meta = {"total_steps": total, "steps_per_epoch": steps_per_epoch, "num_data": num_data, "seed": train.seed,
            "batch_size": train.batch_size,
            "num_processes": scale.num_processes, "gradient_accumulation_steps": train.gradient_accumulation_steps}
    _run_loop(result, scale, loader, meta, val_data, callbacks, resume_from)
    return result


def _run_loop(result: FitResult, scale: ScaleOut, loader: DataLoader, meta: dict[str, Any], val_data: Any,
              callbacks: Sequence[Callback], resume_from: Any) -> None:
    """Set up the optimiser, the built-in callbacks and a resumed state, then train ``result`` in place."""
    train = result.train_config
    state = TrainingState(result=result, step=0, total_steps=meta["total_steps"], num_data=meta["num_data"],
                          sync_every=train.host_sync_every)
    result.history = state.history  # filled in place as the host reads the steps (TrainingState.flush)
    run = _Run(result, train, meta["total_steps"], start_step=0)
    try:
        monitor = ValidationMonitor(val_data, train.eval_every, train.early_stopping_patience)
        position = (0, 0) if resume_from is None else _resume(resume_from, run, state, monitor, scale, meta)
        checkpoints = None
        if train.checkpoint_dir is not None:
            checkpoints = CheckpointWriter(train.checkpoint_dir, train.checkpoint_every, run.optimizer,
                                           run.scheduler, meta, monitor, enabled=scale.is_main_process)
        result.net.train()
        _train(run, scale, loader, state, position, [monitor, *callbacks], checkpoints)
        state.flush()
        monitor.finish(state)
    finally:
        run.close()
    result.net.eval()


def _family_fit(name: str) -> Callable[..., FitResult]:
    def fit_family(model: nn.Module, data: Any, request: FitRequest, options: Any) -> FitResult:
        return fit_svi(model, data, name, guide_options=changed_options(options), **request.svi_arguments())

    fit_family.__doc__ = f"Bayesian-LoRA with the {name!r} guide family (:func:`fit_svi`)."
    return fit_family


for _name, _options, _display in (
    ("delta", DeltaOptions, "MAP LoRA"),
    ("normal", NormalOptions, "Bayesian-LoRA (normal)"),
    ("mvn", MultivariateNormalOptions, "Bayesian-LoRA (mvn)"),
    ("flow", FlowOptions, "Bayesian-LoRA (flow)"),
):
    register_method(Method(_name, _family_fit(_name), _options, display_name=_display, bayesian_lora=True,
                           point_estimate=_name == "delta"))
