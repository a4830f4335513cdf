"""Saving and loading fitted adapters: safetensors plus JSON, never pickle.

A saved folder holds

* ``adapter_config.json``: the :class:`BLoRAConfig`, the guide family and its
  options, the training settings, the adapted layers with their shapes, and a
  fingerprint of the base model's adapted weights;
* ``adapter_model.safetensors``: adapter parameters (``net.<layer>.<param>``)
  and guide state (``guide.<key>``).

:func:`load` injects the same adapters into a fresh base model, rebuilds the
guide and restores every tensor, refusing a base model whose adapted layers
differ in shape or weights from the one the adapter was trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pyro_blora.guides import BayesianLoRAGuide
from pyro_blora.guides.network import GuideSpec

from .config import BLoRAConfig, TrainConfig, config_from_dict
from .inject import adapted_layers, inject_adapters, remove_adapters
from .model import BayesianLoRAModel
from .result import FitResult
from .tasks.base import Task, TensorTask

__all__ = ["save", "load", "load_fit_result", "fingerprint", "ensure_writable", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Names, shapes and a value digest of the base weights under the adapters.

    The digest hashes a strided sample of each base weight, so it catches a
    different checkpoint of the same architecture without reading every value.
    A quantized base (bitsandbytes ``Linear8bitLt`` / ``Linear4bit``: integer
    storage, 4-bit packed two per byte) is recorded with the shape of the
    ``(out, in)`` weight it stands for, and its digest samples the quantized
    bytes: quantizing the same checkpoint the same way gives the same
    fingerprint, while the unquantized checkpoint (other values) does not.
    """
    layers = adapted_layers(model)
    digest = hashlib.sha256()
    shapes = {}
    for layer in layers:
        weight = layer.base.weight.detach()
        quantized = not weight.is_floating_point()
        shapes[layer.layer_name] = [layer.out_features, layer.in_features] if quantized else list(weight.shape)
        flat = weight.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].to(torch.float32).cpu()
        digest.update(layer.layer_name.encode())
        digest.update(sample.numpy().round(4).tobytes())
    return {"shapes": shapes, "digest": digest.hexdigest()}


def is_main_process() -> bool:
    """True outside a multi-process run; else whether this is accelerate's main process (the one that writes files)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    from accelerate import PartialState

    return PartialState().is_main_process


def save(result: FitResult, path: str | os.PathLike) -> Path:
    """Write ``result`` to the folder ``path`` (created if missing); returns the folder.

    Files are written to temporary names and renamed, so an interrupted save
    never leaves a half-written adapter behind. Under ``accelerate launch`` only
    the main process writes (the others hold the same tensors).
    """
    folder = Path(path)
    if not is_main_process():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "blora_config": result.config.to_dict(),
        "guide": dict(result.guide.spec()),
        "train_config": result.train_config.to_dict(),
        "num_classes": getattr(result.task, "num_classes", None),
        "num_data": result.model.num_data,
        "layers": [
            {"name": layer.layer_name, "bayesian": layer.bayesian, "in": layer.in_features, "out": layer.out_features}
            for layer in result.model.layers
        ],
        "base_fingerprint": fingerprint(result.net),
        "method": getattr(result, "method", None),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in result.trainable_state().items()}
    _atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    _atomic_write(folder / CONFIG_NAME, lambda tmp: tmp.write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return folder


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and write a probe file: fail before training, not after it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"0" * 65536)  # a full disk fails here too
        probe.unlink()
    except OSError as err:
        raise ValueError(f"output folder {folder} is not writable ({err.strerror or err}); choose another --output") from err


def _atomic_write(target: Path, write) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_json(file: Path, what: str = "") -> Any:
    """Parse a JSON file, naming it (and ``what`` it is) when it is truncated or corrupted."""
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what}{file} is not valid JSON (truncated or corrupted?): {err}") from err


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a saved adapter, with clear errors for a missing or corrupted file."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a saved pyro_blora adapter folder")
    meta = read_json(file)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file} has format_version {meta.get('format_version')!r}; this pyro_blora reads {FORMAT_VERSION}")
    return meta


def load(
    path: str | os.PathLike,
    model: nn.Module,
    task: Optional[Task] = None,
    guide: Optional[GuideSpec] = None,
    check_base: bool = True,
) -> Any:
    """Rebuild a fitted result from a folder written by its ``save``.

    Folders of the baselines (MC dropout, ensembles, BLoB, Laplace, temperature
    scaling) come back as their own result types (:data:`pyro_blora.methods.LOADERS`);
    plain Bayesian-LoRA folders as a :class:`FitResult`.

    Args:
        path: the adapter folder.
        model: a fresh copy of the base model (adapters are injected in place).
        task: the task used for prediction (default :class:`TensorTask`).
        guide: the guide family, needed only when it was a custom class or factory.
        check_base: refuse a base model whose adapted weights differ from the
            one the adapter was trained on.
    """
    from .methods import LOADERS, saved_method

    method = saved_method(Path(path))
    if method is not None:
        if method not in LOADERS:
            raise ValueError(f"{path} holds a {method!r} result, which this pyro_blora cannot load; known: {sorted(LOADERS)}")
        return LOADERS[method](path, model, task=task, guide=guide, check_base=check_base)
    return load_fit_result(path, model, task=task, guide=guide, check_base=check_base)


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

    config = config_from_dict(BLoRAConfig, meta["blora_config"])
    if not isinstance(config.prior, str) or "." in config.prior:
        raise ValueError(f"the adapter used a custom prior {config.prior!r}; pass BLoRAConfig.prior to inject it yourself")
    if adapted_layers(model):
        raise ValueError("load() needs a base model without adapters; it injects them itself")
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    inject_adapters(model, config, layer_factory)
    try:
        if check_base:
            _check_base(meta, model)
        task = task or TensorTask(meta.get("num_classes"))
        bayes_model = BayesianLoRAModel(model, task, meta["num_data"])
        spec = meta["guide"]
        family = guide if guide is not None else spec["family"]
        from pyro_blora.guides import GUIDES

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
                        f"{key}: saved shape {tuple(value.shape)} != model shape {tuple(current[key].shape)}; "
                        "the adapter was trained on a different base model"
                    )
                current[key].copy_(value)
    except BaseException:
        # leave the caller's model as it was, so that load() can be retried (e.g. with check_base=False)
        remove_adapters(model)
        for param, flag in requires_grad:
            param.requires_grad_(flag)
        raise
    model.eval()
    return result


def _check_base(meta: dict[str, Any], model: nn.Module) -> None:
    saved = meta["base_fingerprint"]
    now = fingerprint(model)
    if saved["shapes"] != now["shapes"]:
        diff = [n for n in saved["shapes"] if now["shapes"].get(n) != saved["shapes"][n]][:3]
        raise ValueError(
            f"this adapter was trained on a base model with other adapted layers (first differences: {diff}); "
            "load it onto the model it was trained on"
        )
    if saved["digest"] != now["digest"]:
        raise ValueError(
            "the base model's adapted weights differ from those the adapter was trained on (fingerprint mismatch); "
            "load it onto the same checkpoint, or pass check_base=False if you know what you are doing"
        )
