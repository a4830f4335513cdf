"""Typed configuration: where the adapters go (:class:`BLoRAConfig`) and how they train (:class:`TrainConfig`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

__all__ = ["BLoRAConfig", "TrainConfig", "config_from_dict"]

TargetModules = Union[list[str], str]
PRIOR_SCALES = ("empirical_bayes", "fixed")


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class BLoRAConfig:
    """Which layers get Bayesian-LoRA adapters and how their prior and conditional look.

    ``target_modules`` and ``bayesian_modules`` follow peft: a list of names
    matched as the full module name or its dotted suffix (``"q_proj"`` matches
    ``model.layers.0.self_attn.q_proj``), or one string taken as a regular
    expression that must match the full name.
    """

    target_modules: TargetModules = _help(
        "Modules to adapt: list of name suffixes, or a regex matched against the full name.",
        factory=lambda: ["q_proj", "v_proj"],
    )
    bayesian_modules: Optional[TargetModules] = _help(
        "Which targeted modules get Bayesian factors (same syntax); None = all of them, [] = none (plain LoRA "
        "everywhere, what a peft user trains). The others get plain LoRA factors trained as point estimates.",
        None,
    )
    r: int = _help("LoRA rank.", 8)
    alpha: float = _help("LoRA scaling numerator: the update is (alpha / r) B A x.", 16.0)
    dropout: float = _help("Dropout on the LoRA path's input (training only).", 0.05)
    inducing_rows: int = _help("m_r, rows of each inducing matrix U.", 9)
    inducing_cols: int = _help("m_c, columns of each inducing matrix U.", 9)
    prior: Any = _help("Prior over U: 'gp' (matrix normal), 'normal' (isotropic), or an InducingPrior class.", "gp")
    whitened: bool = _help("Sample the whitened U_w ~ N(0, I) and map U = L_r U_w L_c^T (the 'gp' prior).", True)
    prior_sd: float = _help("Prior sd numerator: W = s (T_r U T_c + lambda noise), s = prior_sd / sqrt(fan_in).", 0.1)
    lambda_init: float = _help("Initial conditional noise scale lambda of q(W | U).", 1e-3)
    lambda_max: float = _help("Upper bound of lambda (a smooth cap, lambda = max * sigmoid(rho)).", 0.03)
    lambda_prior: Optional[float] = _help(
        "lambda_p of the prior p(W | U) = N(s T_r U T_c, s^2 lambda_p^2 Sigma); None = lambda_max. "
        "KL(q(W|U) || p(W|U)) = d_out d_in (r^2 / 2 - log r - 1/2), r = lambda_q / lambda_p, is minimised over "
        "lambda_p at lambda_p = lambda_q (its empirical-Bayes value), and the largest lambda_q allowed is "
        "lambda_max: so lambda_p = lambda_max costs 0 nats at the cap and d_out d_in log(lambda_max / lambda_q) "
        "below it, a KL that says how far q left the prior. The released code's 1.0 adds a constant of about "
        "3 nats per weight entry at lambda_q = 0.03 that hides the rest of the KL.", None,
    )
    prior_scale: str = _help(
        "'empirical_bayes': each Bayesian layer learns a gain g on its prior's output scale (type-II maximum "
        "likelihood: the update's prior is g s_A s_B (T U_B T)(T U_A T), and g maximises the ELBO, as a kernel's "
        "outputscale in a GP; a point-mass guide, delta, keeps g = 1, since without q's entropy the optimum is "
        "g -> infinity); 'fixed': g = 1, the released code's constant s = prior_sd / sqrt(fan_in), whose "
        "inducing-subspace mean is too small for a few hundred examples to move.", "empirical_bayes",
    )
    jitter: float = _help("Relative diagonal jitter added when a kernel Cholesky fails.", 1e-6)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        for name in ("target_modules", "bayesian_modules"):
            value = getattr(self, name)
            if value is None and name == "bayesian_modules":
                continue
            if name == "bayesian_modules" and isinstance(value, list) and not value:
                continue  # no Bayesian module: every target is a plain LoRA layer (a peft-style MAP LoRA)
            if isinstance(value, str):
                if not value:
                    raise ValueError(f"{name} is an empty string; give a regex or a list of module names")
            elif not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
                raise ValueError(f"{name} must be a non-empty list of module names or a regex string, got {value!r}")
        _check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, f"r must be an integer >= 1, got {self.r!r}")
        _check(self.alpha > 0, f"alpha must be positive, got {self.alpha!r}")
        _check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("inducing_rows", "inducing_cols"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 64,
                f"{name} must be an integer in [1, 64] (the U-site has inducing_rows * inducing_cols dims), got {value!r}",
            )
        _check(self.prior_sd > 0, f"prior_sd must be positive, got {self.prior_sd!r}")
        _check(self.lambda_max > 0, f"lambda_max must be positive, got {self.lambda_max!r}")
        _check(
            0 < self.lambda_init < self.lambda_max,
            f"lambda_init must be in (0, lambda_max={self.lambda_max}), got {self.lambda_init!r}",
        )
        _check(
            self.lambda_prior is None or self.lambda_prior > 0,
            f"lambda_prior must be positive or None (= lambda_max), got {self.lambda_prior!r}",
        )
        _check(
            self.prior_scale in PRIOR_SCALES,
            f"prior_scale must be one of {', '.join(PRIOR_SCALES)}, got {self.prior_scale!r}",
        )
        _check(0 < self.jitter < 1, f"jitter must be in (0, 1), got {self.jitter!r}")

    @property
    def conditional_prior_scale(self) -> float:
        """``lambda_p``: :attr:`lambda_prior`, or :attr:`lambda_max` where that is None."""
        return self.lambda_max if self.lambda_prior is None else float(self.lambda_prior)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; a prior given as a class is stored by its qualified name."""
        out = dataclasses.asdict(self)
        if not isinstance(self.prior, str):
            out["prior"] = f"{self.prior.__module__}.{self.prior.__qualname__}"
        return out


@dataclass
class TrainConfig:
    """How :func:`pyro_blora.fit` runs SVI on the ELBO.

    The objective per step is the minibatch ELBO with the likelihood scaled by
    ``N / B`` and every KL term (latent site) scaled by ``beta_t``::

        loss = (N / B) sum_batch [CE_eps(y, x, W) - entropy_bonus * H(p(. | x, W))] + beta_t * KL(q || p),
        beta_t = 0 for t < kl_start * T, else kl_weight * min(1, (t + 1 - kl_start T) / kl_warmup_steps),

    with ``CE_eps`` the cross-entropy with label smoothing ``eps`` (``-log p(y | x, W)``
    at ``eps = 0``). ``kl_weight = 1``, ``label_smoothing = entropy_bonus = kl_start = 0``
    is the proper ELBO (the ``"proper"`` preset, :mod:`pyro_blora.training.presets`).
    The released Bayesian-LoRA code uses the mean cross-entropy plus
    ``0.1 * KL / batches_per_epoch``, which is ``kl_weight = 0.1 * batch_size`` in
    these units (the ``"paper"`` preset).
    """

    num_steps: Optional[int] = _help("Optimiser steps; if None, epochs * batches per epoch.", None)
    epochs: int = _help("Passes over the training data when num_steps is None.", 3)
    batch_size: int = _help(
        "Examples per micro-batch and process (when data is not already a DataLoader); a step sees "
        "batch_size * gradient_accumulation_steps * processes examples.", 8
    )
    lr: float = _help("AdamW learning rate.", 5e-4)
    weight_decay: float = _help("AdamW weight decay.", 0.01)
    variance_lr_multiplier: float = _help(
        "Learning-rate multiplier of the posterior's scale parameters (sigma of q(U), lambda); no weight decay.", 10.0
    )
    schedule: str = _help(
        "Learning-rate schedule: constant | linear | cosine | step (x0.1 at 1/3 and 2/3 of the steps: the released "
        "code's MultiStepLR at epochs 2 and 4 of 6).", "cosine",
    )
    warmup_steps: int = _help("Linear learning-rate warm-up steps.", 0)
    max_grad_norm: Optional[float] = _help("Clip the global gradient norm (None: no clipping).", 1.0)
    host_sync_every: int = _help(
        "Steps between the host's reads of the step statistics (the loss history, the progress bar, the check "
        "for a non-finite loss or a failed Cholesky): steps in between never wait for the device. A failure is "
        "then reported up to this many steps late, naming the step it happened in; 1 checks every step.", 16,
    )
    kl_weight: float = _help("beta: weight of the KL terms (1 = proper ELBO).", 1.0)
    kl_warmup: float = _help("Fraction of the steps over which beta ramps linearly up to kl_weight.", 0.2)
    kl_start: float = _help(
        "Fraction of the steps trained with beta = 0 before the KL (and its warm-up) starts; the released code "
        "switches the KL on at epoch 2 of 6 (1/6).", 0.0,
    )
    label_smoothing: float = _help(
        "Label smoothing eps of the training cross-entropy (torch's definition; the released code: 0.05). "
        "Not part of the ELBO: a tempered likelihood.", 0.0,
    )
    entropy_bonus: float = _help(
        "Weight of the predictive-entropy bonus subtracted from the per-example loss (the released code: 0.05). "
        "Not part of the ELBO.", 0.0,
    )
    num_particles: int = _help("Posterior samples per ELBO estimate.", 1)
    eval_every: Optional[int] = _help("Evaluate on the validation data every this many steps.", None)
    early_stopping_patience: Optional[int] = _help(
        "Stop after this many validation checks without a lower validation NLL.", None
    )
    seed: int = _help("Seed for torch, Pyro and the data order.", 0)
    progress: bool = _help("Show a progress bar with ELBO, NLL and KL.", True)
    checkpoint_every: Optional[int] = _help(
        "Write a resumable checkpoint into checkpoint_dir every this many steps (None: only on Ctrl-C).", None
    )
    checkpoint_dir: Optional[str] = _help(
        "Folder for checkpoints (safetensors + JSON; resume with fit(..., resume_from=folder)). "
        "None: no checkpoints.",
        None,
    )
    gradient_accumulation_steps: int = _help(
        "Micro-batches per optimiser step; the update equals one batch of their union (one posterior draw per step).", 1
    )
    mixed_precision: Optional[str] = _help(
        "'no' or 'bf16' (autocast of the network forward; guide, prior and KL stay float32/64); "
        "None: accelerate launch's --mixed_precision, else 'no'.",
        None,
    )
    device_placement: bool = _help(
        "Move the network to accelerate's device for this process (its GPU under accelerate launch) before "
        "training; models dispatched with device_map or holding quantized weights stay where they are.",
        True,
    )

    def __post_init__(self) -> None:
        _check(self.num_steps is None or self.num_steps >= 1, f"num_steps must be >= 1, got {self.num_steps!r}")
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs!r}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        _check(self.lr > 0, f"lr must be positive, got {self.lr!r}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _check(self.variance_lr_multiplier > 0, f"variance_lr_multiplier must be positive, got {self.variance_lr_multiplier!r}")
        _check(
            self.schedule in ("constant", "linear", "cosine", "step"),
            f"schedule must be one of constant, linear, cosine, step; got {self.schedule!r}",
        )
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        _check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"max_grad_norm must be positive or None (no clipping), got {self.max_grad_norm!r}",
        )
        _check(isinstance(self.host_sync_every, int) and self.host_sync_every >= 1,
               f"host_sync_every must be an integer >= 1, got {self.host_sync_every!r}")
        _check(self.eval_every is None or self.eval_every >= 1, f"eval_every must be >= 1 or None, got {self.eval_every!r}")
        _check(
            self.early_stopping_patience is None or self.early_stopping_patience >= 1,
            f"early_stopping_patience must be >= 1 or None, got {self.early_stopping_patience!r}",
        )
        _check(self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight!r}")
        _check(0 <= self.kl_warmup <= 1, f"kl_warmup must be a fraction in [0, 1], got {self.kl_warmup!r}")
        _check(0 <= self.kl_start < 1, f"kl_start must be a fraction in [0, 1), got {self.kl_start!r}")
        _check(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        _check(self.entropy_bonus >= 0, f"entropy_bonus must be >= 0, got {self.entropy_bonus!r}")
        _check(self.num_particles >= 1, f"num_particles must be >= 1, got {self.num_particles!r}")
        _check(
            self.checkpoint_every is None or (isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 1),
            f"checkpoint_every must be an integer >= 1 or None, got {self.checkpoint_every!r}",
        )
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)
        _check(
            isinstance(self.gradient_accumulation_steps, int) and not isinstance(self.gradient_accumulation_steps, bool)
            and self.gradient_accumulation_steps >= 1,
            f"gradient_accumulation_steps must be an integer >= 1, got {self.gradient_accumulation_steps!r}",
        )
        _check(
            self.mixed_precision in (None, "no", "bf16"),
            f"mixed_precision must be 'no', 'bf16' or None (accelerate's setting), got {self.mixed_precision!r}"
            + ("; fp16 needs loss scaling, which fit does not do: use bf16" if self.mixed_precision == "fp16" else ""),
        )
        _check(
            self.checkpoint_every is None or self.checkpoint_dir is not None,
            "checkpoint_every needs checkpoint_dir, the folder to write the checkpoints into",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def config_from_dict(cls: type, values: Mapping[str, Any]):
    """Build ``cls`` from a mapping, naming unknown keys and the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} option(s) {unknown}; valid options: {sorted(names)}")
    return cls(**dict(values))

