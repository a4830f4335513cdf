"""Keep the frozen bottom's activations on disk between processes.

:class:`~pyro_blora.tasks.cached.CachedPrefixTask` and
:class:`~pyro_blora.tasks.cached.CachedChoiceTask` run the frozen blocks once per
process; on a CPU that is most of a benchmark invocation's set-up (15 to 20
minutes for OpenBookQA with its ARC shift sets on SmolLM2-135M). An
:class:`ActivationStore` writes each cached split to
``<folder>/<key>.safetensors``, where the key hashes everything the activations
depend on, so a later process with the same model, task and examples reads them
back instead of recomputing them, and any change (another checkpoint, cut,
template, truncation, tokenizer, example, dtype, device type or torch version)
gives another key and a fresh computation:

* the bottom's parameters: names, shapes, dtypes and a strided sample of values;
* the task: its class, the inner task's settings and the tokenizer's name and size;
* the examples, as JSON.

Records are nested dicts and lists with tensor leaves (what ``task.cache``
returns); they round-trip exactly (tested). A file is written to a temporary name
and renamed (:func:`pyro_blora.io.atomic_write`), so an interrupted write leaves no half file under the key's name.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from pyro_blora.io import atomic_write

__all__ = ["ActivationStore", "activation_key", "load_records", "save_records", "store_cache"]

_FORMAT = 1
_SIMPLE = (str, int, float, bool, type(None))


def _module_digest(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].to(torch.float64).cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:{tensor.device.type}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


def _settings(obj: Any) -> dict[str, Any]:
    """The plain-valued attributes of a task object (tokenizer and modules summarised, not hashed whole)."""
    out: dict[str, Any] = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    for name, value in sorted(vars(obj).items()):
        if name.startswith("_") or isinstance(value, nn.Module):
            continue  # private state (a warned-once flag) changes as the task runs; the bottom is hashed by its parameters
        if name == "tokenizer":
            out[name] = [getattr(value, "name_or_path", type(value).__name__), len(value)]
        elif name == "inner":
            out[name] = _settings(value)
        elif isinstance(value, _SIMPLE) or (isinstance(value, (list, tuple)) and all(isinstance(v, _SIMPLE) for v in value)):
            out[name] = value
        elif isinstance(value, Tensor):
            out[name] = value.tolist()
    return out


def activation_key(bottom: nn.Module, task: Any, examples: Sequence[Mapping[str, Any]]) -> str:
    """A hex digest of what ``task.cache(examples)`` computes with ``bottom`` (see the module docstring)."""
    digest = hashlib.sha256()
    parts = {"format": _FORMAT, "torch": torch.__version__, "bottom": _module_digest(bottom), "task": _settings(task)}
    digest.update(json.dumps(parts, sort_keys=True, default=str).encode())
    digest.update(json.dumps(list(examples), sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


def _flatten(obj: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        tensors[key] = obj.detach().cpu().clone().contiguous()  # clone: records share their batch's storage
        return {"t": key}
    if isinstance(obj, Mapping):
        return {"d": {str(k): _flatten(v, f"{key}.{k}", tensors) for k, v in obj.items()}}
    if isinstance(obj, (list, tuple)):
        return {"l": [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, _SIMPLE):
        return {"v": obj}
    raise TypeError(f"cannot store a {type(obj).__name__} in an activation record ({key})")


def _unflatten(node: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> Any:
    if "t" in node:
        return tensors[node["t"]]
    if "d" in node:
        return {k: _unflatten(v, tensors) for k, v in node["d"].items()}
    if "l" in node:
        return [_unflatten(v, tensors) for v in node["l"]]
    return node["v"]


def save_records(path: Path, records: Sequence[Any]) -> None:
    """Write ``records`` (nested dicts and lists with tensor leaves) to one safetensors file, atomically."""
    tensors: dict[str, Tensor] = {}
    layout = [_flatten(record, str(i), tensors) for i, record in enumerate(records)]
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": str(_FORMAT), "layout": json.dumps(layout)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_records(path: Path) -> list[Any]:
    """The records :func:`save_records` wrote; a clear error for a truncated or foreign file."""
    try:
        with safe_open(str(path), framework="pt") as handle:  # one read: the layout and the tensors
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} could not be read as stored activations (truncated or corrupted? delete it): {err}") from err
    if metadata.get("format") != str(_FORMAT) or "layout" not in metadata:
        raise ValueError(f"{path} is not an activation store file of format {_FORMAT}; delete it to recompute")
    return [_unflatten(node, tensors) for node in json.loads(metadata["layout"])]


class ActivationStore:
    """A folder of cached splits; :meth:`cache` stands in for ``task.cache`` and reads a stored result when there is one.

    Args:
        folder: where the files go (created when first written).
        log: called with one line when a split is read back or written.
    """

    def __init__(self, folder: str | os.PathLike, log: Optional[Callable[[str], None]] = None):
        self.folder = Path(folder)
        self.log = log or (lambda message: None)

    def path(self, task: Any, examples: Sequence[Mapping[str, Any]]) -> Path:
        return self.folder / f"{activation_key(task.bottom, task, examples)}.safetensors"

    def cache(self, task: Any, examples: Sequence[Mapping[str, Any]], desc: str = "caching") -> list[Any]:
        """``task.cache(examples, desc)``, computed once per key and read back from the folder afterwards."""
        path = self.path(task, examples)
        if path.is_file():
            records = load_records(path)
            self.log(f"{desc}: {len(records)} records read back from {path}")
            return records
        records = task.cache(examples, desc=desc)
        save_records(path, records)
        self.log(f"{desc}: {len(records)} records stored in {path}")
        return records


def store_cache(store: Optional[ActivationStore]) -> Callable[[Any, Sequence[Mapping[str, Any]], str], list[Any]]:
    """``cache(task, examples, desc)`` through ``store``, or straight ``task.cache`` without one."""
    if store is None:
        return lambda task, examples, desc: task.cache(examples, desc=desc)
    return store.cache
