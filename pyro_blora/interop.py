"""Interoperation with peft: export the posterior mean as a LoRA adapter, merge it, or start from one.

Both libraries add ``scaling * B A x`` to a frozen layer with ``scaling =
alpha / r`` (peft: ``lora_alpha / r``), ``A`` of shape ``r x d_in`` and ``B`` of
shape ``d_out x r``, so a point estimate of our factors is a peft adapter:

* :func:`export_peft` writes the posterior mean ``E_q[A]``, ``E_q[B]`` as a peft
  LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``);
* :func:`merge_posterior_mean` folds ``W_0 + (alpha / r) E_q[B] E_q[A]`` into the
  base weights and returns the plain network;
* :func:`from_peft` / :func:`initialise_from_peft` go the other way ("make my
  LoRA Bayesian"): they place the guide so that its posterior-mean factors are
  the closest ones to a peft adapter's (see :func:`solve_inducing`).

The posterior mean of a flow guide is a Monte Carlo average; these functions
draw it under a fixed ``seed`` (``torch.random.fork_rng``), so the same seed
gives the same weights as ``result.use_posterior_mean()`` run under it.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import BLoRAConfig
from .inject import adapted_layers, inject_adapters, matches, remove_adapters
from .io import atomic_write, read_json
from .model import BayesianLoRAModel
from .result import FitResult
from .tasks.base import Task, TensorTask

__all__ = [
    "posterior_mean_weights",
    "export_peft",
    "merge_posterior_mean",
    "read_peft",
    "solve_inducing",
    "align_inducing_inputs",
    "initialise_from_peft",
    "from_peft",
]

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PathLike = Union[str, "os.PathLike[str]"]
_KEY = re.compile(r"^base_model\.model\.(?P<layer>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


@torch.no_grad()
def posterior_mean_weights(result: FitResult, num_samples: int = 256, seed: Optional[int] = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """``{layer: (E_q[A], E_q[B])}`` for every adapted layer (point layers: their parameters).

    ``seed`` fixes the Monte Carlo draws of a flow's mean (None: the global RNG
    is used and advanced). ``E_q[W] = s T_r E_q[U] T_c`` since ``U`` enters linearly.
    """
    if seed is None:
        means = result.guide.mean_weights(num_samples)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            means = result.guide.mean_weights(num_samples)
    out = {}
    for layer in result.model.layers:
        if layer.bayesian:
            a, b = layer.effective_weights(means[layer.lora_A.site_w], means[layer.lora_B.site_w])
            out[layer.layer_name] = (a.detach(), b.detach())
        else:
            out[layer.layer_name] = (layer.lora_A_weight.detach(), layer.lora_B_weight.detach())
    return out


def _target_suffixes(net: nn.Module, names: list[str]) -> list[str]:
    """The adapted modules' last name components if peft's suffix matching selects exactly them, else full names."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    linear = [n for n, _ in net.named_modules() if n and matches(n, suffixes)]
    return suffixes if sorted(linear) == sorted(names) else sorted(names)


def export_peft(
    result: FitResult,
    path: PathLike,
    task_type: Optional[str] = None,
    base_model_name_or_path: Optional[str] = None,
    num_samples: int = 256,
    seed: Optional[int] = 0,
) -> Path:
    """Write the posterior-mean adapter as a peft LoRA folder; ``peft.PeftModel.from_pretrained(base, path)`` loads it.

    Keys are ``base_model.model.<layer>.lora_A.weight`` / ``lora_B.weight``;
    ``target_modules`` lists the adapted modules' name suffixes (full names when
    suffixes would match more modules); Conv1D bases set ``fan_in_fan_out``.
    ``task_type`` (e.g. ``"CAUSAL_LM"``) is optional: without it peft loads a
    plain ``PeftModel``. Returns the folder.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    weights = posterior_mean_weights(result, num_samples, seed)
    names = [layer.layer_name for layer in result.model.layers]
    tensors: dict[str, Tensor] = {}
    for name, (a, b) in weights.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.float().contiguous().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.float().contiguous().cpu()
    conv1d = any(type(layer.base).__name__ == "Conv1D" for layer in result.model.layers)
    cfg = result.config
    meta: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _target_suffixes(result.net, names),
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    atomic_write(folder / PEFT_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write(folder / PEFT_CONFIG, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    return folder


@torch.no_grad()
def merge_posterior_mean(result: FitResult, num_samples: int = 256, seed: Optional[int] = 0, copy_net: bool = False) -> nn.Module:
    """The network with ``W_0 + (alpha / r) E_q[B] E_q[A]`` folded into each adapted base weight.

    ``nn.Linear`` stores ``W_0`` as ``d_out x d_in``, GPT-2's ``Conv1D`` as
    ``d_in x d_out`` (the update is added transposed). The base's dtype is kept.
    The adapters are removed (the original module objects are put back), so the
    result is a plain network; in place unless ``copy_net`` (then ``result`` is
    left untouched). After an in-place merge, ``result`` no longer describes the net.
    """
    quantized = [layer.layer_name for layer in adapted_layers(result.net) if not layer.base.weight.dtype.is_floating_point]
    if quantized:
        # adding a float update into int8 / packed 4-bit storage would silently corrupt the base
        raise ValueError(
            f"cannot merge into quantized base weights ({quantized[:3]}, dtype "
            f"{adapted_layers(result.net)[0].base.weight.dtype}); serve the adapter unmerged, or export it "
            "with export_peft and merge into a float copy of the base model"
        )
    weights = posterior_mean_weights(result, num_samples, seed)
    net = copy.deepcopy(result.net) if copy_net else result.net
    for layer in adapted_layers(net):
        a, b = weights[layer.layer_name]
        delta = layer.scaling * (b.double() @ a.double())
        weight = layer.base.weight
        if type(layer.base).__name__ == "Conv1D":
            delta = delta.T
        weight.copy_((weight.double() + delta.to(weight.device)).to(weight.dtype))
    return remove_adapters(net)


def read_peft(path: PathLike) -> tuple[dict[str, Any], dict[str, tuple[Tensor, Tensor]]]:
    """A peft LoRA folder's config and ``{layer: (A, B)}``, with clear errors for what cannot be mapped."""
    folder = Path(path)
    config_file, weights_file = folder / PEFT_CONFIG, folder / PEFT_WEIGHTS
    for file in (config_file, weights_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: {folder} is not a peft LoRA adapter folder (safetensors)")
    meta = read_json(config_file, "peft config ")
    if meta.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_file}: peft_type {meta.get('peft_type')!r} is not LORA")
    for key in ("use_dora", "rank_pattern", "alpha_pattern"):
        if meta.get(key):
            raise ValueError(f"{config_file}: {key}={meta[key]!r} is not supported (one rank and alpha, plain LoRA)")
    factors: dict[str, dict[str, Tensor]] = {}
    for key, value in load_file(str(weights_file)).items():
        found = _KEY.match(key)
        if found is None:
            raise ValueError(f"{weights_file}: unexpected key {key!r} (only LoRA A/B factors can be read)")
        factors.setdefault(found["layer"], {})[found["factor"]] = value
    incomplete = sorted(name for name, ab in factors.items() if set(ab) != {"A", "B"})
    if incomplete:
        raise ValueError(f"{weights_file}: layers without both lora_A and lora_B: {incomplete[:5]}")
    return meta, {name: (ab["A"], ab["B"]) for name, ab in factors.items()}


def _peft_scaling(meta: dict[str, Any]) -> float:
    r, alpha = meta["r"], meta.get("lora_alpha", 8)
    return alpha / r**0.5 if meta.get("use_rslora") else alpha / r


@torch.no_grad()
def solve_inducing(factor: Any, target: Tensor) -> tuple[Tensor, float]:
    """The whitened inducing value whose conditional mean is closest to ``target``; and the relative error.

    The posterior-mean factor is ``W = s T_r U T_c`` (``T_r``: ``p x m_r``,
    ``T_c``: ``m_c x q``). In least squares (Frobenius norm) the best ``U`` is

    .. math:: U^\\star = T_r^{+} (W / s) T_c^{+},

    exact when ``W``'s column space lies in that of ``T_r`` and its row space in
    that of ``T_c`` (e.g. ``m_r >= p`` with ``T_r`` of full rank ``p``). For the
    whitened GP prior the site holds ``U_w = L_r^{-1} U L_c^{-T}``. Returns the
    flattened site value and ``||s T_r U* T_c - W||_F / ||W||_F`` (0 when ``W = 0``).
    """
    geometry = factor.prior.geometry()
    t_rows, t_cols = (t.double() for t in geometry.projections)
    w = target.double().to(t_rows.device) / factor.scale
    inducing = torch.linalg.pinv(t_rows) @ w @ torch.linalg.pinv(t_cols)
    fitted = factor.scale * (t_rows @ inducing @ t_cols)
    norm = float(target.double().norm())
    error = float((fitted - target.double().to(fitted.device)).norm()) / norm if norm > 0 else 0.0
    prior = factor.prior
    if getattr(prior, "whitened", False):
        lr, lc = geometry.cholesky
        inducing = torch.linalg.solve_triangular(lr, inducing, upper=False)
        inducing = torch.linalg.solve_triangular(lc, inducing.T, upper=False).T  # U L_c^{-T}
    elif type(prior).__name__ not in ("GPPrior", "NormalPrior"):
        raise TypeError(f"{factor.site_name}: cannot invert the custom prior {type(prior).__name__}'s inducing_matrix")
    return inducing.reshape(-1).to(factor.prior.z_rows.dtype), error


@torch.no_grad()
def align_inducing_inputs(factor: Any, target: Tensor) -> None:
    """Make the prior's inducing inputs span ``target``'s singular subspaces, so :func:`solve_inducing` is exact.

    ``T_r = Z_r^T K_r^{-1}`` spans the rows of ``Z_r``, ``T_c = K_c^{-1} Z_c`` the
    rows of ``Z_c``. With ``target = P S Q^T`` of rank ``k``, the first
    ``min(k, m)`` rows of ``Z_r`` (``Z_c``) become the leading columns of ``P``
    (``Q``) as unit vectors (the random rows they replace have norm ~ 1); the
    other rows stay random. This changes the prior (its inducing inputs are
    type-II ML parameters, trained on anyway), so it is opt-in.
    """
    prior = factor.prior
    u, svals, vh = torch.linalg.svd(target.double(), full_matrices=False)
    rank = int((svals > svals.max() * 1e-10).sum()) if svals.numel() and float(svals.max()) > 0 else 0
    for z, basis in ((prior.z_rows, u.T), (prior.z_cols, vh)):
        k = min(rank, z.shape[0])
        if k:
            z[:k] = basis[:k].to(z)


def _set_location(family: nn.Module, value: Tensor, name: str) -> None:
    """Put ``E_q[U_w] ~= value``: the location for Gaussian and point-mass families, the flow's preimage for flows."""
    loc = getattr(family, "loc", None)
    if not isinstance(loc, nn.Parameter):
        raise TypeError(f"{name}: the guide family {type(family).__name__} has no 'loc' to place")
    transforms = getattr(family, "transforms", None)
    if transforms is None:
        loc.data.copy_(value)
        return
    # a flow: u_0 ~ N(loc, sigma) pushed through f; with small sigma E[f(u_0)] ~ f(loc), so solve f(loc) = value
    dist = family.distribution()
    x = value.detach()
    try:
        for transform in reversed(dist.transforms):
            x = transform.inv(x)
        loc.data.copy_(x.reshape(-1))
    except NotImplementedError:
        loc.data.copy_(value)
        opt = torch.optim.LBFGS([loc], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")
        shape = dist.base_dist.mean.shape

        def closure() -> Tensor:
            opt.zero_grad()
            y = loc.reshape(shape)
            for transform in family.distribution().transforms:
                y = transform(y)
            loss = (y.reshape(-1) - value).pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)


@torch.no_grad()
def initialise_from_peft(
    result_or_model: Union[FitResult, nn.Module], path: PathLike, align_inducing: bool = False, num_samples: int = 1024
) -> dict[str, dict[str, float]]:
    """Start the adapters of ``result_or_model`` at a peft adapter; returns the relative errors per layer.

    Point (non-Bayesian) layers get peft's ``A`` and ``B`` directly. Bayesian
    factors get the guide location of :func:`solve_inducing`. Our ``B`` is peft's
    times ``peft_scaling / (alpha / r)`` so the update ``scaling * B A`` is the
    same (rsLoRA and a different alpha included). A bare network (no guide) can
    only take point layers. The report maps ``"<layer>.lora_A"`` / ``.lora_B`` to
    ``{"least_squares": e*, "posterior_mean": e}``: the best achievable relative
    error and the one of the placed guide's (Monte Carlo) posterior mean.
    With ``align_inducing`` the prior's inducing inputs are first turned towards
    the adapter (:func:`align_inducing_inputs`), which makes the least-squares
    fit exact for ``r <= m_r, m_c``.
    """
    result = result_or_model if isinstance(result_or_model, FitResult) else None
    net = result.net if result is not None else result_or_model
    meta, factors = read_peft(path)
    layers = {layer.layer_name: layer for layer in adapted_layers(net)}
    missing, extra = sorted(set(layers) - set(factors)), sorted(set(factors) - set(layers))
    if missing or extra:
        raise ValueError(f"{path}: adapter layers differ from the model's: not in the adapter {missing[:5]}, not in the model {extra[:5]}")
    report: dict[str, dict[str, float]] = {}
    for name, layer in layers.items():
        a, b = factors[name]
        if a.shape != (layer.r, layer.in_features) or b.shape != (layer.out_features, layer.r):
            raise ValueError(f"{path}: {name} has A {tuple(a.shape)}, B {tuple(b.shape)}; the model's layer needs rank {layer.r}")
        b = b * (_peft_scaling(meta) / layer.scaling)
        if not layer.bayesian:
            layer.lora_A_weight.copy_(a)
            layer.lora_B_weight.copy_(b)
            continue
        if result is None:
            raise TypeError(f"{name} is Bayesian: pass the FitResult (its guide holds the factors' posterior)")
        a = a / float(layer.prior_gain())  # the forward multiplies A's draws by the prior gain g
        for factor, target in ((layer.lora_A, a), (layer.lora_B, b)):
            if align_inducing:
                align_inducing_inputs(factor, target)
            value, error = solve_inducing(factor, target)
            family = result.guide.site_guide(factor.site_name)
            _set_location(family, value.to(family.loc.dtype), factor.site_name)
            mean = factor.conditional(family.mean(num_samples), 0.0).mean.double()
            target64 = target.double().to(mean.device)
            norm = float(target64.norm())
            achieved = float((mean - target64).norm()) / norm if norm > 0 else float(mean.norm())
            report[factor.site_name] = {"least_squares": error, "posterior_mean": achieved}
    return report


def from_peft(
    model: nn.Module,
    peft_path: PathLike,
    config: Optional[BLoRAConfig] = None,
    guide: Any = "flow",
    task: Optional[Task] = None,
    num_data: int = 1,
    guide_options: Optional[dict] = None,
    align_inducing: bool = False,
) -> tuple[FitResult, dict[str, dict[str, float]]]:
    """Inject Bayesian-LoRA adapters into ``model`` and start them at a peft adapter ("make my LoRA Bayesian").

    ``config`` defaults to the peft adapter's ``target_modules``, ``r``,
    ``lora_alpha`` and ``lora_dropout``. Returns the untrained :class:`FitResult`
    (step 0) and the reconstruction report of :func:`initialise_from_peft`
    (``align_inducing``: see there). Train
    it with ``pyro_blora.fit(model, data, guide=result.guide, task=task)``: the
    model already carries the adapters, and the given guide is used as is.
    """
    from .config import TrainConfig
    from .guides import BayesianLoRAGuide

    meta, _ = read_peft(peft_path)
    if config is None:
        config = BLoRAConfig(
            target_modules=meta["target_modules"], r=int(meta["r"]), alpha=float(meta.get("lora_alpha", 8)),
            dropout=float(meta.get("lora_dropout", 0.0)),
        )
    if adapted_layers(model):
        raise ValueError("from_peft needs a base model without adapters; it injects them itself")
    inject_adapters(model, config)
    task = task or TensorTask()
    bayes_model = BayesianLoRAModel(model, task, num_data)
    if any(layer.bayesian for layer in bayes_model.layers):
        bayes_guide = BayesianLoRAGuide(bayes_model.factors, guide, config.lambda_init, config.lambda_max, **(guide_options or {}))
    else:  # pragma: no cover - a guide needs Bayesian factors
        raise ValueError("from_peft: no Bayesian layer (bayesian_modules matched none); use plain peft instead")
    result = FitResult(bayes_model, bayes_guide, config, TrainConfig(), task)
    report = initialise_from_peft(result, peft_path, align_inducing=align_inducing)
    model.eval()
    return result, report
