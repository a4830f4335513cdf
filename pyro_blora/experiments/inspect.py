"""``pyro-blora inspect ADAPTER_DIR``: is the saved posterior doing any work?

Loads an adapter written by ``pyro-blora fit`` / ``compare`` (its
``experiment.json`` names the model and task), takes the first
``--num-examples`` examples of a split, and prints the table of
:func:`pyro_blora.diagnostics.diagnose`: per module what the adapter adds to its
base layer, how much the posterior samples move it, the guide's scales per
factor, the mutual information of the predictive, and the flags (``inert``,
``collapsed``, ``point_mass``) in words. ``--json`` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

from pyro_blora.diagnostics import diagnose, supports
from pyro_blora.experiments.settings import ExperimentConfig

__all__ = ["add_parser", "load_adapter", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand to ``pyro-blora``'s subparsers; returns its parser."""
    parser = subparsers.add_parser(
        "inspect", help="tell a dead posterior from a live one: per-module health of a saved adapter"
    )
    parser.add_argument("adapter", type=Path, help="folder written by fit/compare (<output>/<method>)")
    parser.add_argument("--split", default="validation", choices=["validation", "test"],
                        help="the examples to measure on (default: validation)")
    parser.add_argument("--num-examples", type=int, default=32,
                        help="examples of the split: the first batch feeds the layer numbers, all of them the "
                             "mutual information (default: 32)")
    parser.add_argument("--num-samples", type=int, default=8, help="posterior samples, at least 2 (default: 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per forward (default: 8)")
    parser.add_argument("--json", action="store_true", help="print the diagnostics as JSON instead of a table")
    return parser


def _warn(message: str) -> None:
    print(f"pyro-blora inspect: {message}", file=sys.stderr)


def load_adapter(folder: Path, split: str = "validation", num_examples: int = 32) -> tuple[Any, list]:
    """The saved result in ``folder`` on its recorded model and task, and the first ``num_examples`` of ``split``."""
    from pyro_blora.api import load
    from pyro_blora.experiments.pipeline import load_splits, prepare
    from pyro_blora.experiments.record import check_adapter_folder, check_classes, reconcile

    check_adapter_folder(folder)
    cfg = ExperimentConfig(**reconcile({}, set(), folder, _warn))
    splits = load_splits(cfg)
    check_classes(folder, cfg.task, splits.class_names)  # before the model loads
    splits = dataclasses.replace(splits, **{split: list(getattr(splits, split))[:num_examples]})
    prepared = prepare(cfg, parts=(split,), splits=splits, log=lambda message: print(message, file=sys.stderr))
    result = load(folder, prepared.net, task=prepared.task)
    return result, getattr(prepared, split)


LOADER: Callable[[Path, str, int], tuple[Any, list]] = load_adapter
"""What :func:`run` loads the adapter with (tests replace it to skip the language model)."""


def run(args: argparse.Namespace) -> int:
    """Load, diagnose and print; returns the exit status (0). A refused input raises ``ValueError``/``OSError``."""
    if args.num_examples < 1:
        raise ValueError(f"--num-examples must be >= 1, got {args.num_examples}")
    if args.num_samples < 2:
        raise ValueError(f"--num-samples must be >= 2 to measure a posterior spread, got {args.num_samples}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    result, data = LOADER(args.adapter, args.split, args.num_examples)
    if not supports(result):  # a baseline's adapter (ensemble, MC dropout, ...) has no Bayesian-LoRA guide
        raise ValueError(f"{args.adapter} holds a {type(result).__name__}, not a Bayesian-LoRA posterior: "
                         "inspect reads the adapters of the Bayesian-LoRA guides (flow, normal, mvn, delta)")
    found = diagnose(result, data, num_samples=args.num_samples, batch_size=args.batch_size)
    print(found.to_json() if args.json else found.format())
    return 0
