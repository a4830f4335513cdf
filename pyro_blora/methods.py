"""Baseline methods behind the same ``fit`` switch as the Bayesian-LoRA guides.

``pyro_blora.fit(model, data, guide=name)`` takes a guide family of
Bayesian-LoRA (``"flow"``, ``"normal"``, ``"mvn"``, ``"delta"``, see
:data:`pyro_blora.guides.GUIDES`) or one of the baselines registered here,
each a function with ``fit``'s signature (without ``guide``) that returns an
object with the :class:`~pyro_blora.result.FitResult` surface
(``predict``, ``evaluate``, ``save``, ``history``).

Register your own with ``METHODS["mine"] = fit_mine``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

__all__ = ["METHODS", "LOADERS", "METHOD_FILE", "method_names", "saved_method"]

MethodFit = Callable[..., Any]


def _mc_dropout(model: Any, data: Any, **kwargs: Any) -> Any:
    from pyro_blora.baselines.mc_dropout import fit_mc_dropout

    return fit_mc_dropout(model, data, **kwargs)


def _ensemble(model: Any, data: Any, **kwargs: Any) -> Any:
    from pyro_blora.baselines.ensemble import fit_ensemble

    return fit_ensemble(model, data, **kwargs)


def _blob(model: Any, data: Any, **kwargs: Any) -> Any:
    from pyro_blora.baselines.blob.fit import fit_blob

    return fit_blob(model, data, **kwargs)


def _laplace(model: Any, data: Any, **kwargs: Any) -> Any:
    from pyro_blora.baselines.laplace.posterior import fit_laplace

    return fit_laplace(model, data, **kwargs)


METHODS: dict[str, MethodFit] = {
    "mc_dropout": _mc_dropout,
    "ensemble": _ensemble,
    "blob": _blob,
    "laplace": _laplace,
}
"""Baseline methods by name (the Bayesian-LoRA guide families are in ``GUIDES``)."""


def method_names() -> list[str]:
    """Every name ``fit(guide=...)`` accepts: guide families and baselines."""
    from pyro_blora.guides import GUIDES

    return sorted(set(GUIDES) | set(METHODS))


METHOD_FILE = "method.json"
"""A folder written by a baseline's ``save`` names its method here: ``{"method": name, ...}``."""


def saved_method(folder: Path) -> Optional[str]:
    """The method a saved folder holds: ``method.json``, else the adapter config's ``method`` key, else None."""
    marker = folder / METHOD_FILE
    if marker.is_file():
        from .io import read_json

        return read_json(marker).get("method")
    config = folder / "adapter_config.json"
    if config.is_file():
        try:
            return json.loads(config.read_text()).get("method")
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # read_config names the corrupted file with a clear error
    return None


def _load(module: str, function: str) -> Callable[..., Any]:
    def load(path: Any, model: Any, **kwargs: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(f"pyro_blora.{module}"), function)(path, model, **kwargs)

    return load


LOADERS: dict[str, Callable[..., Any]] = {
    "mc_dropout": _load("baselines.mc_dropout", "load_mc_dropout"),
    "ensemble": _load("baselines.ensemble", "load_ensemble"),
    "temperature": _load("baselines.temperature", "load_temperature_scaled"),
    "blob": _load("baselines.blob.fit", "load_blob"),
    "laplace": _load("baselines.laplace.posterior", "load_laplace"),
}
"""How :func:`pyro_blora.load` rebuilds a saved baseline: ``loader(path, model, task=, guide=, check_base=)``."""
