"""``pyro-blora``: fit, evaluate, compare and plot from the command line.

Every option of :class:`~pyro_blora.experiments.pipeline.ExperimentConfig` is a flag
(``--target-modules q_proj v_proj``) and a key of a JSON or YAML file given with
``--config``; flags override the file. Without options, ``compare`` runs the
embedded default: MAP LoRA against Bayesian-LoRA on SmolLM2-135M-Instruct and
the Drugs.com reviews.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from pyro_blora.experiments.pipeline import ExperimentConfig

__all__ = ["main", "build_parser"]


def _add_experiment_options(parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    hints = typing.get_type_hints(ExperimentConfig)
    for spec in dataclasses.fields(ExperimentConfig):
        if spec.name in exclude:
            continue
        flag = "--" + spec.name.replace("_", "-")
        hint = hints[spec.name]
        inner = hint
        if typing.get_origin(hint) is typing.Union:  # Optional[X] -> X
            inner = next(a for a in typing.get_args(hint) if a is not type(None))
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": spec.metadata.get("help", "")}
        if typing.get_origin(inner) is list:
            kwargs["nargs"] = "+"
            kwargs["type"] = str
        elif inner in (int, float, str):
            kwargs["type"] = inner
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-blora",
        description="Bayesian-LoRA on Pyro: calibrated fine-tuning of language models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("compare", help="fit several methods on one task and print one table")
    fit = commands.add_parser("fit", help="fit one method on a task")
    evaluate = commands.add_parser("evaluate", help="evaluate a saved adapter on a task's test split")
    plot = commands.add_parser("plot", help="redraw the plots of a compare/fit output folder")
    for sub in (compare, fit, evaluate):
        sub.add_argument("--config", type=Path, help="JSON or YAML file of options (flags override it)")
    _add_experiment_options(compare)
    fit.add_argument(
        "--guide", "--method", dest="guide", default="flow",
        help="the method to fit: guides flow | normal | mvn | delta, baselines mc_dropout | ensemble | blob | laplace",
    )
    _add_experiment_options(fit, exclude=("methods",))
    evaluate.add_argument(
        "--adapter", type=Path, help="folder written by fit/compare (<output>/<method>); omit it to score the base model zero-shot"
    )
    evaluate.add_argument("--split", default="validation", choices=["train", "validation", "test"], help="zero-shot: the split to score")
    _add_experiment_options(evaluate, exclude=("methods", "output"))
    plot.add_argument("--output", type=Path, required=True, help="the run folder to plot")
    return parser


def _read_config_file(path: Optional[Path]) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.is_file():
        raise SystemExit(f"pyro-blora: config file {path} not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise SystemExit(f"pyro-blora: {path} must hold a mapping of options")
    return values


def experiment_config(namespace: argparse.Namespace, **fixed: Any) -> ExperimentConfig:
    """Merge the config file, the flags and ``fixed`` into an :class:`ExperimentConfig`."""
    values = _read_config_file(getattr(namespace, "config", None))
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SystemExit(f"pyro-blora: unknown option(s) {unknown} in the config file; valid: {sorted(names)}")
    values.update({k: v for k, v in vars(namespace).items() if k in names})
    values.update(fixed)
    for key in ("bayesian_modules",):
        if values.get(key) in (["none"], ["None"], "none", "None"):
            values[key] = None
    return ExperimentConfig(**values)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plot":
            from pyro_blora.experiments.report import write_plots

            for path in write_plots(args.output):
                print(path)
            return 0
        if args.command == "compare":
            from pyro_blora.experiments.pipeline import compare

            compare(experiment_config(args))
            return 0
        if args.command == "fit":
            from pyro_blora.experiments.pipeline import compare

            cfg = experiment_config(args, methods=[args.guide])
            compare(cfg)
            return 0
        from pyro_blora.experiments.pipeline import evaluate_adapter, evaluate_zero_shot

        cfg = experiment_config(args)
        if args.adapter is None:
            print(json.dumps(evaluate_zero_shot(cfg, args.split), indent=2))
        else:
            print(json.dumps(evaluate_adapter(cfg, args.adapter), indent=2))
        return 0
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"pyro-blora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
