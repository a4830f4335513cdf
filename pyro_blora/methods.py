"""The method registry: one record per method that ``pyro_blora.fit`` and ``pyro_blora.load`` dispatch through.

A :class:`Method` names how a method trains (``fit``), how a saved folder of it
comes back (``load``), its typed options (a frozen dataclass whose field
metadata holds the help text), its display name and what the benchmark runner
changes for it. Each method registers itself where it is defined: the
Bayesian-LoRA guide families in :mod:`pyro_blora.training.svi`, the baselines
in :mod:`pyro_blora.baselines`. Register your own with :func:`register_method`::

    register_method(Method("mine", fit=fit_mine, options=MineOptions, load=load_mine))

``fit_mine(model, data, request, options)`` gets a :class:`FitRequest` (every
other argument of ``pyro_blora.fit``) and an instance of ``MineOptions``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from pyro_blora.io import METHOD_FILE, read_json
from pyro_blora.restore import load_fit_result

__all__ = [
    "METHODS", "METHOD_FILE", "FitRequest", "Method", "get_method", "load_saved", "method_names", "parse_options",
    "register_method", "saved_method",
]



@dataclass(frozen=True)
class FitRequest:
    """Everything ``pyro_blora.fit`` was given besides the model, the data and the method's options."""

    task: Any = None
    config: Any = None
    val_data: Any = None
    callbacks: Sequence[Callable[..., Any]] = ()
    resume_from: Optional["os.PathLike[str] | str"] = None
    train: Mapping[str, Any] = field(default_factory=dict)
    """:class:`~pyro_blora.config.TrainConfig` fields as given (``num_steps``, ``lr``, ...)."""

    def svi_arguments(self) -> dict[str, Any]:
        """The keyword arguments of :func:`pyro_blora.training.svi.fit_svi` for this request."""
        return dict(task=self.task, config=self.config, val_data=self.val_data, callbacks=self.callbacks,
                    resume_from=self.resume_from, **self.train)


def parse_options(options_type: type, value: Any, method: str) -> Any:
    """``value`` (None, a dict, or already an ``options_type``) as an ``options_type``; unknown keys are named."""
    if isinstance(value, options_type):
        return value
    if value is None:
        return options_type()
    if not isinstance(value, Mapping):
        raise TypeError(f"options of {method!r} must be a dict or a {options_type.__name__}, got {type(value).__name__}")
    valid = [f.name for f in dataclasses.fields(options_type)]
    unknown = sorted(set(value) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {valid}")
    return options_type(**value)


FitFunction = Callable[[Any, Any, FitRequest, Any], Any]
LoadFunction = Callable[..., Any]


@dataclass(frozen=True)
class Method:
    """One method of the registry.

    Attributes:
        name: what ``fit(guide=...)``, ``--method`` and saved folders call it.
        fit: ``fit(model, data, request, options) -> result``; None for a post-hoc
            method that wraps a finished result (temperature scaling).
        options: a frozen dataclass of the method's options, help text in field metadata.
        load: ``load(path, model, task=, guide=, check_base=)`` for a folder the method's
            result saved; None for a plain Bayesian-LoRA adapter folder.
        display_name: how tables and plots name it.
        benchmark_defaults: what the compare pipeline changes for it: option fields, or
            :class:`~pyro_blora.config.BLoRAConfig` / :class:`~pyro_blora.config.TrainConfig` fields.
        bayesian_lora: a guide family of Bayesian-LoRA itself (not a baseline).
        needs_validation: ``fit`` needs ``val_data`` (to tune a prior precision or a noise scale).
        ensemble_member: a deep ensemble may train its members with it (every Bayesian-LoRA family may).
        point_estimate: it trains (or starts from) point-estimate LoRA factors (MAP, MC dropout, ensembles,
            the post-hoc Laplace and TFB): the compare pipeline gives it the MAP layout
            (``ExperimentConfig.map_bayesian_modules``, plain LoRA by default, what a peft user trains).
    """

    name: str
    fit: Optional[FitFunction]
    options: type
    load: Optional[LoadFunction] = None
    display_name: str = ""
    benchmark_defaults: Mapping[str, Any] = field(default_factory=dict)
    bayesian_lora: bool = False
    needs_validation: bool = False
    ensemble_member: bool = False
    point_estimate: bool = False

    def parse_options(self, value: Any) -> Any:
        """The method's options from a dict (the old ``guide_options``), None or a ready record."""
        return parse_options(self.options, value, self.name)

    def option_help(self) -> dict[str, str]:
        """Each option's name and help text, for ``--help`` listings."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(self.options)}


METHODS: dict[str, Method] = {}
"""Every registered method by name."""


def register_method(method: Method, replace: bool = False) -> Method:
    """Add ``method`` to :data:`METHODS`; a second method of the same name needs ``replace=True``."""
    if not dataclasses.is_dataclass(method.options):
        raise TypeError(f"method {method.name!r}: options must be a dataclass type, got {method.options!r}")
    if method.name in METHODS and not replace and METHODS[method.name] != method:
        raise ValueError(f"a method named {method.name!r} is registered already; pass replace=True to override it")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The record of ``name``, or an error listing every registered method."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {method_names()}")
    return METHODS[name]


def method_names(trainable: bool = True) -> list[str]:
    """Every name ``fit(guide=...)`` accepts (``trainable=False``: also the post-hoc ones)."""
    return sorted(name for name, m in METHODS.items() if m.fit is not None or not trainable)


def saved_method(folder: Path) -> Optional[str]:
    """The method a saved folder holds: ``method.json``, else the adapter config's ``method`` key, else None."""
    marker = folder / METHOD_FILE
    if marker.is_file():
        return read_json(marker).get("method")
    config = folder / "adapter_config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("method")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # read_config names the corrupted file with a clear error
    return None


def load_saved(path: "str | os.PathLike[str]", model: Any, **kwargs: Any) -> Any:
    """Rebuild whatever result ``path`` holds, through its method's loader (``kwargs``: ``task``, ``guide``, ``check_base``)."""
    name = saved_method(Path(path))
    if name is None:
        return load_fit_result(path, model, **kwargs)
    if name not in METHODS:
        raise ValueError(f"{path} holds a {name!r} result, which this pyro_blora cannot load; known: {method_names(False)}")
    return (METHODS[name].load or load_fit_result)(path, model, **kwargs)
