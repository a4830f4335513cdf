"""The folders of one run: removed again when it fails, kept with their checkpoint when Ctrl-C paused it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from pyro_blora.training.checkpoint import LATEST_NAME

__all__ = ["Interrupted", "RUN_RECORD", "cleaned_on_failure", "has_checkpoint", "remove_empty_checkpoint", "run_record"]

RUN_RECORD = "experiment.json"
"""The settings of an interrupted run, in its checkpoint folder: what ``--resume`` reads back."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; ``checkpoint`` is the folder to resume from (None: nothing was saved)."""

    def __init__(self, checkpoint: Optional[Path]) -> None:
        super().__init__(f"interrupted; checkpoint in {checkpoint}" if checkpoint else "interrupted before any checkpoint")
        self.checkpoint = checkpoint


def has_checkpoint(root: Path) -> bool:
    """Whether a method under ``root`` wrote a checkpoint (an ensemble writes one per member)."""
    return root.is_dir() and any(root.rglob(LATEST_NAME))


def remove_empty_checkpoint(folder: Path, consumed: bool = False) -> None:
    """After a method finished: remove its checkpoint folder if it holds no checkpoint, or ``consumed`` (resumed from).

    The checkpoint root goes too once nothing but the run's record is left in it.
    """
    if folder.is_dir() and (consumed or not has_checkpoint(folder)):
        shutil.rmtree(folder, ignore_errors=True)
    root = folder.parent
    if root.is_dir() and all(p.name == RUN_RECORD for p in root.iterdir()):
        shutil.rmtree(root, ignore_errors=True)


def run_record(cfg: Any, root: Path) -> None:
    """Write the run's settings beside its checkpoints (``--resume root`` reads them back)."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "resume"}
    (root / RUN_RECORD).write_text(json.dumps(values, indent=2))


@contextlib.contextmanager
def cleaned_on_failure(paths: Sequence[Path], checkpoint_root: Path, cfg: Any) -> Iterator[None]:
    """Remove those of ``paths`` this run creates if it fails; on Ctrl-C with a checkpoint keep them all.

    A folder that existed before the run is never removed. Ctrl-C raises
    :class:`Interrupted` naming the checkpoint to resume from.
    """
    fresh = [p for p in paths if not p.exists()]
    try:
        yield
    except KeyboardInterrupt as err:
        if has_checkpoint(checkpoint_root):
            run_record(cfg, checkpoint_root)
            raise Interrupted(checkpoint_root) from err
        _remove(fresh)
        raise Interrupted(None) from err
    except BaseException:
        _remove(fresh)
        raise


def _remove(paths: Sequence[Path]) -> None:
    for path in sorted(paths, key=lambda p: len(p.parts), reverse=True):  # deepest first
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
