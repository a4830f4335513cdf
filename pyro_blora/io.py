"""Saving and loading fitted adapters: safetensors plus JSON, never pickle.

A saved folder holds

* ``adapter_config.json``: the :class:`BLoRAConfig`, the guide family and its
  options, the training settings, the adapted layers with their shapes, and a
  fingerprint of the base model's adapted weights;
* ``adapter_model.safetensors``: adapter parameters (``net.<layer>.<param>``)
  and guide state (``guide.<key>``).

This module holds the file format and its helpers only (it imports no result
type); :func:`pyro_blora.restore.load_fit_result` injects the same adapters into
a fresh base model, rebuilds the guide and restores every tensor, refusing a
base model whose adapted layers differ in shape or weights from the training one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from safetensors.torch import save_file
from torch import nn

from .inject import adapted_layers

if TYPE_CHECKING:
    from .result import FitResult

__all__ = [
    "CONFIG_NAME", "FORMAT_VERSION", "METHOD_FILE", "WEIGHTS_NAME", "atomic_write", "dump_json", "ensure_writable",
    "fingerprint", "is_main_process", "with_user_mode", "read_config", "read_json", "read_method_file", "save", "write_method_file",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1
METHOD_FILE = "method.json"
"""A folder written by a baseline's ``save`` names its method and settings here: ``{"method": name, ...}``."""


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


def save(result: "FitResult", path: str | os.PathLike) -> Path:
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
    # clone: during fit (a callback saving), parameters are views of packed rows (models/packing.py)
    tensors = {k: v.detach().cpu().clone() for k, v in result.trainable_state().items()}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: tmp.write_text(dump_json(meta)))
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


def with_user_mode(path: Path) -> Path:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would: 0666 (files) or 0777 (folders) less the umask.

    ``tempfile`` creates its files 0600 and folders 0700, which would make adapters,
    predictions and checkpoints unreadable to the user's group unlike every other file.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    return path


def atomic_write(target: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` to a temporary file beside ``target``, then rename it over ``target``.

    An interrupted write never leaves a half-written file under the final name.
    ``mkstemp`` creates the file mode 0600; it is given the user's umask (0644
    by default), as any other file the user writes would be.
    """
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with_user_mode(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def dump_json(obj: Any) -> str:
    """``obj`` as the indented, key-sorted JSON every pyro_blora file uses."""
    return json.dumps(obj, indent=2, sort_keys=True)


def write_method_file(folder: Path, meta: Mapping[str, Any]) -> None:
    """Write a baseline's ``method.json`` (``meta`` names the method and its settings) atomically."""
    atomic_write(folder / METHOD_FILE, lambda tmp: tmp.write_text(dump_json(dict(meta))))


def read_method_file(folder: Path, method: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A saved baseline's ``method.json``, checked to name ``method`` and hold the ``required`` keys."""
    file = Path(folder) / METHOD_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {folder} is not a saved {method} result")
    meta = read_json(file)
    if not isinstance(meta, dict) or meta.get("method") != method:
        found = meta.get("method") if isinstance(meta, dict) else None
        raise ValueError(f"{file} holds a {found!r} result, not {method!r}")
    missing = [key for key in required if key not in meta]
    if missing:
        raise ValueError(f"{file} holds no {missing} (a {method} result needs {list(required)})")
    return meta


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
