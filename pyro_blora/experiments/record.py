"""How a saved adapter was made: ``experiment.json`` beside its ``adapter_config.json``.

The pipeline writes the task settings an adapter cannot be scored without
(task, scoring, normalize, template, trainable blocks, prompt length, classes);
``pyro-blora evaluate --adapter`` reads them back, so they need not be typed
again. :mod:`pyro_blora.io` ignores the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from pyro_blora.experiments.settings import ADAPTER_FIELDS, task_kind

__all__ = ["RECORD_NAME", "RECORDED", "check_classes", "check_adapter_folder", "read_record", "reconcile", "write_record"]

RECORD_NAME = "experiment.json"
# a prompt template and a scoring rule belong to their task: another task keeps its own
_TIED_TO_TASK = ("template", "scoring", "normalize")
RECORDED = ("task", "scoring", "normalize", "template", "trainable_layers", "max_length", "model", "data_dir")


def write_record(folder: Path, cfg: Any, template: Optional[str], class_names: list[str]) -> None:
    """Write ``experiment.json`` into a saved adapter ``folder``."""
    record = {key: getattr(cfg, key) for key in RECORDED}
    record.update(template=template, num_classes=len(class_names), class_names=list(class_names))
    (folder / RECORD_NAME).write_text(json.dumps(record, indent=2))


def check_adapter_folder(folder: Path) -> None:
    """Refuse a missing folder, naming the near misses beside it, or one that holds no saved adapter."""
    if not folder.is_dir():
        import difflib

        parent = folder.parent
        siblings = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        close = difflib.get_close_matches(folder.name, siblings, n=3)
        hint = f"; did you mean {', '.join(str(parent / c) for c in close)}?" if close else (
            f"; {parent} holds {siblings}" if siblings else "")
        raise FileNotFoundError(f"adapter folder {folder} not found{hint}")
    if not any((folder / name).is_file() for name in ("adapter_config.json", "method.json")):
        raise FileNotFoundError(f"{folder} holds no saved adapter (no adapter_config.json): give a <output>/<method> folder")


def read_record(folder: Path) -> Optional[dict[str, Any]]:
    """The record of a saved adapter, or None for one saved without the pipeline."""
    file = folder / RECORD_NAME
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON (truncated or corrupted?): {err}") from err
    if not isinstance(record, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return record


def _saved_adapter_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "adapter_config.json").read_text()).get("blora_config", {})
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}  # the loader names a broken config with a clear error


def reconcile(values: dict[str, Any], explicit: set[str], folder: Path, warn: Callable[[str], None]) -> dict[str, Any]:
    """``values`` with the adapter's recorded settings where the user gave none; a warning where they contradict.

    Adapter settings (``r``, ``target_modules``, ...) are not the user's to change
    at evaluation: the saved ``adapter_config.json`` holds them; a differing flag
    is named and ignored.
    """
    record = read_record(folder) or {}
    out = dict(values)
    other_task = "task" in explicit and "task" in record and values.get("task") != record["task"]
    for key in RECORDED:
        if key not in record or (other_task and key in _TIED_TO_TASK):
            continue
        if key not in explicit:
            out[key] = record[key]
        elif values.get(key) != record[key]:
            warn(f"warning: {key} {values.get(key)!r} differs from {record[key]!r} in {folder / RECORD_NAME}; using {values.get(key)!r}")
    saved = _saved_adapter_config(folder)
    for key in sorted(explicit & set(ADAPTER_FIELDS)):
        if key in saved and _differs(values.get(key), saved[key]):
            warn(f"warning: {key} {values.get(key)!r} is ignored: the adapter in {folder} was saved with {key} {saved[key]!r}")
    return out


def _differs(given: Any, saved: Any) -> bool:
    if isinstance(given, (list, tuple)) and isinstance(saved, (list, tuple)):
        return list(given) != list(saved)
    return given != saved


def check_classes(folder: Path, task: str, class_names: list[str]) -> None:
    """Refuse a classification task whose class count differs from the one the adapter was fitted on.

    Multiple-choice tasks may differ (ARC's five letters, OpenBookQA's four): that is a shift, not a mismatch.
    """
    record: Mapping[str, Any] = read_record(folder) or {}
    fitted = record.get("num_classes")
    kinds = {task_kind(task), task_kind(record["task"])} if "task" in record else {task_kind(task)}
    if fitted is not None and fitted != len(class_names) and "classification" in kinds:
        names = ", ".join(record.get("class_names", []))
        raise ValueError(
            f"the adapter in {folder} was fitted on {record.get('task')} with {fitted} classes ({names}); "
            f"{task} has {len(class_names)} ({', '.join(class_names)}): score it on a {fitted}-class task"
        )
