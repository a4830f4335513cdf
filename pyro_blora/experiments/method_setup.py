"""What the pipeline gives each method, read from its record in :data:`pyro_blora.methods.METHODS`.

The pipeline never branches on a method's name: a method's options type says
which of the pipeline's guide settings (``scale_max``, ``flow``) it takes, and
its ``benchmark_defaults`` say what the benchmark changes for it (MC dropout's
rate, the ensemble's size); the record's ``needs_validation`` says whether it gets the validation split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyro_blora.config import BLoRAConfig, TrainConfig

if TYPE_CHECKING:
    from pyro_blora.experiments.settings import ExperimentConfig

__all__ = ["MethodSetup", "check_methods", "method_records", "method_setup", "methods_help", "methods_options_help"]

# option field of a method -> the ExperimentConfig field that sets it
PIPELINE_OPTIONS = {"scale_max": "scale_max", "transforms": "flow"}


def method_records() -> dict[str, Any]:
    """Every trainable registered method by name (importing :mod:`pyro_blora.api` registers the baselines)."""
    import pyro_blora.api  # noqa: F401  (the baselines register themselves on import)
    from pyro_blora.methods import METHODS, method_names

    return {name: METHODS[name] for name in method_names()}


def check_methods(names: list[str]) -> None:
    """Refuse an empty list or an unknown name (which also keeps ``<output>/<method>`` inside the output)."""
    known = sorted(method_records())
    if not names:
        raise ValueError(f"methods is empty: name at least one of {known}")
    unknown = [m for m in names if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {known}")


def methods_help() -> str:
    """``name (display name)`` for each method, for ``--help``."""
    return ", ".join(f"{name} ({record.display_name or name})" for name, record in method_records().items())


def methods_options_help() -> str:
    """Every method's options with their help text (the records' dataclass metadata), for ``--help`` epilogs."""
    lines = ["methods and their options (in Python: pyro_blora.fit(..., guide=NAME, guide_options={...})):"]
    for name, record in method_records().items():
        options = record.option_help()
        lines.append(f"  {name} ({record.display_name or name}){':' if options else ': no options'}")
        lines += [f"      {key}: {text}" for key, text in options.items()]
    return "\n".join(lines)


@dataclass
class MethodSetup:
    """What :func:`pyro_blora.fit` gets for one method besides the shared settings."""

    options: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    needs_validation: bool = False


def _listed(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def method_setup(cfg: "ExperimentConfig", method: str) -> MethodSetup:
    """The options, config and training overrides of ``method`` under ``cfg``, from its record.

    ``benchmark_defaults`` come first; the pipeline's guide settings the method's
    options have (``scale_max``, ``transforms`` from ``cfg.flow``) are set on top.
    """
    record = method_records()[method]
    option_names = {f.name for f in dataclasses.fields(record.options)}
    config_names = {f.name for f in dataclasses.fields(BLoRAConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    setup = MethodSetup(needs_validation=record.needs_validation)
    if record.point_estimate:
        setup.config["bayesian_modules"] = _listed(cfg.map_bayesian_modules)
    for key, value in record.benchmark_defaults.items():
        if key in option_names:
            setup.options[key] = value
        elif key in config_names:
            setup.config[key] = value
        elif key in train_names:
            setup.train[key] = value
        else:
            raise ValueError(f"method {method!r}: benchmark_defaults key {key!r} is neither an option "
                             "nor a BLoRAConfig or TrainConfig field")
    for option, setting in PIPELINE_OPTIONS.items():
        if option in option_names:
            setup.options[option] = _listed(getattr(cfg, setting))
    return setup
