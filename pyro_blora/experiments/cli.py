"""``pyro-blora``: fit, evaluate, compare and plot from the command line.

Every option of :class:`~pyro_blora.experiments.settings.ExperimentConfig` is a flag
(``--target-modules q_proj v_proj``) and a key of a JSON or YAML file given with
``--config``; flags override the file. Without options, ``compare`` runs the
embedded default: MAP LoRA against Bayesian-LoRA on SmolLM2-135M-Instruct and
the Drugs.com reviews.

Everything a user can type is checked before a model or data set is loaded.
A refused run ends with one line on stderr and exit status 2; Ctrl-C with 130,
naming the checkpoint and the command that resumes it. ``PYRO_BLORA_TRACEBACK=1``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional, Sequence

from pyro_blora.experiments import inspect as inspect_command
from pyro_blora.experiments.settings import ExperimentConfig

__all__ = ["main", "build_parser", "experiment_config", "gather_options"]

# what evaluate has no use for: it writes no folder and trains nothing
_NOT_FOR_EVALUATE = ("methods", "output", "checkpoint_dir", "resume")
_USAGE_ERRORS = (ValueError, OSError, ModuleNotFoundError)  # FileNotFoundError is an OSError


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``pyro-blora fit: error: ... (see pyro-blora fit --help)``, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _unwrap(hint: Any) -> tuple[bool, Any]:
    if typing.get_origin(hint) is typing.Union:
        return True, next(a for a in typing.get_args(hint) if a is not type(None))
    return False, hint


def _or_none(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """A flag type that also takes ``none`` (an Optional field's None)."""
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = convert.__name__  # argparse names it in "invalid int value"
    return parse


def _add_experiment_options(parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    from pyro_blora.experiments.method_setup import methods_help

    hints = typing.get_type_hints(ExperimentConfig)
    for spec in dataclasses.fields(ExperimentConfig):
        if spec.name in exclude:
            continue
        optional, inner = _unwrap(hints[spec.name])
        text = spec.metadata.get("help", "")
        if spec.name == "methods":
            text += " Registered: " + methods_help() + "."
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()  # type: ignore[misc]
        text = (text if default is None else f"{text} (default: {default})").replace("%", "%%")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text}
        if typing.get_origin(inner) is list:
            # an Optional list may be given empty (--map-bayesian-modules with no names: [])
            kwargs.update(nargs="*" if optional else "+", type=str)
        elif inner in (int, float, str):
            kwargs["type"] = _or_none(inner) if optional else inner
        parser.add_argument("--" + spec.name.replace("_", "-"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-blora`` parser: compare, fit, evaluate, plot."""
    from pyro_blora.experiments.method_setup import methods_help, methods_options_help

    parser = _Parser(prog="pyro-blora", description="Bayesian-LoRA on Pyro: calibrated fine-tuning of language models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    listing = {"epilog": methods_options_help(), "formatter_class": argparse.RawDescriptionHelpFormatter}
    compare = commands.add_parser("compare", help="fit several methods on one task and print one table", **listing)
    fit = commands.add_parser("fit", help="fit one method on a task", **listing)
    evaluate = commands.add_parser("evaluate", help="evaluate a saved adapter (or the base model) on a task")
    plot = commands.add_parser("plot", help="redraw the plots of a compare/fit output folder")
    for sub in (compare, fit, evaluate):
        sub.add_argument("--config", type=Path, help="JSON or YAML file of options (flags override it)")
    _add_experiment_options(compare)
    fit.add_argument("--guide", "--method", dest="guide", default=None,
                     help=f"the method to fit (default: flow): {methods_help()}")
    _add_experiment_options(fit, exclude=("methods",))
    evaluate.add_argument("--adapter", type=Path, help="folder written by fit/compare (<output>/<method>); its "
                          "experiment.json supplies the task settings; omit it to score the base model zero-shot")
    evaluate.add_argument("--split", default="validation", choices=["train", "validation", "test"], help="zero-shot: the split to score")
    _add_experiment_options(evaluate, exclude=_NOT_FOR_EVALUATE)
    plot.add_argument("--output", type=Path, required=True, help="the run folder to plot")
    inspect_command.add_parser(commands)
    return parser


def _read_config_file(path: Optional[Path]) -> dict[str, Any]:
    """The options in a JSON or YAML file; a syntax error is named with its line, not a traceback."""
    if path is None:
        return {}
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise ValueError(f"config file {path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of options, got {type(values).__name__}")
    return values


def _resume_record(namespace: argparse.Namespace) -> dict[str, Any]:
    """The settings an interrupted run left beside its checkpoint (``--resume`` continues it with them)."""
    from pyro_blora.experiments.runs import RUN_RECORD

    resume = getattr(namespace, "resume", None)
    if resume is None:
        return {}
    folder = Path(resume)
    if not folder.is_dir():
        raise FileNotFoundError(f"resume: checkpoint folder {folder} not found")
    file = folder / RUN_RECORD
    if not file.is_file():
        return {}
    try:
        return dict(json.loads(file.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise ValueError(f"{file} is not valid JSON (truncated?): {err}") from None


def gather_options(namespace: argparse.Namespace) -> tuple[dict[str, Any], set[str]]:
    """The options of a run, lowest first: a resumed run's record, the config file, the flags; and those the user set."""
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    values = _resume_record(namespace)
    values = {k: v for k, v in values.items() if k in names}
    from_file = _read_config_file(getattr(namespace, "config", None))
    unknown = sorted(set(from_file) - names)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} in the config file; valid: {sorted(names)}")
    flags = {k: v for k, v in vars(namespace).items() if k in names}
    values.update(from_file)
    values.update(flags)
    hints = typing.get_type_hints(ExperimentConfig)
    for key, value in values.items():  # "none" in a file or after a list flag is an Optional field's None
        if _unwrap(hints[key])[0] and value in (["none"], ["None"], "none", "None", "null"):
            values[key] = None
    return values, set(from_file) | set(flags)


def experiment_config(namespace: argparse.Namespace, **fixed: Any) -> ExperimentConfig:
    """Merge the config file, the flags and ``fixed`` into an :class:`ExperimentConfig` (checked on creation)."""
    values, _ = gather_options(namespace)
    return ExperimentConfig(**{**values, **fixed})


def _warn(message: str) -> None:
    print(f"pyro-blora: {message}", file=sys.stderr)


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from pyro_blora.experiments.pipeline import evaluate_adapter, evaluate_zero_shot
    from pyro_blora.experiments.record import check_adapter_folder, reconcile

    values, explicit = gather_options(args)
    if args.adapter is None:
        return evaluate_zero_shot(ExperimentConfig(**values), args.split)
    check_adapter_folder(args.adapter)
    cfg = ExperimentConfig(**reconcile(values, explicit, args.adapter, _warn))
    return evaluate_adapter(cfg, args.adapter)


def _fit_config(args: argparse.Namespace) -> ExperimentConfig:
    values, _ = gather_options(args)
    if args.guide is not None or "methods" not in values:  # a resumed run keeps its method unless told otherwise
        values["methods"] = [args.guide or "flow"]
    if len(values["methods"]) != 1:
        raise ValueError(f"fit takes one method, got {values['methods']} from the config file or the resumed run: "
                         "choose one with --guide, or use compare")
    return ExperimentConfig(**values)


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        return inspect_command.run(args)
    if args.command == "plot":
        from pyro_blora.experiments.report import write_plots

        if not args.output.is_dir():
            raise FileNotFoundError(f"run folder {args.output} not found")
        for path in write_plots(args.output):
            print(path)
        return 0
    if args.command == "evaluate":
        print(json.dumps(_evaluate(args), indent=2))
        return 0
    from pyro_blora.experiments.pipeline import compare

    compare(_fit_config(args) if args.command == "fit" else experiment_config(args))
    return 0


def _interrupted(command: str, err: KeyboardInterrupt) -> int:
    checkpoint = getattr(err, "checkpoint", None)
    if checkpoint is not None:
        _warn(f"interrupted; checkpoint in {checkpoint}; resume with: pyro-blora {command} --resume {checkpoint}")
    elif command in ("evaluate", "plot"):  # these write no run folder
        _warn("interrupted")
    else:
        _warn("interrupted before any checkpoint; the folders this run created are removed")
    return 130


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``pyro-blora`` with ``argv``; returns the exit status (0 done, 2 refused, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt as err:
        return _interrupted(args.command, err)
    except _USAGE_ERRORS as err:
        if os.environ.get("PYRO_BLORA_TRACEBACK"):
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"pyro-blora {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
