"""Find the target modules of a network and wrap them in Bayesian-LoRA layers.

Matching follows peft's ``target_modules``: a list of strings matches a module
whose full name equals an entry or ends with ``"." + entry``; a single string is
a regular expression that must match the full name. Only ``nn.Linear`` and
transformers' ``Conv1D`` can be adapted.

What changes in place: each matched module is replaced on its parent by a
:class:`~pyro_blora.models.BayesianLoRALinear` that holds the original module
as ``.base``; every parameter of the network is frozen (``requires_grad=False``).
:func:`remove_adapters` restores the original modules (their weights untouched).
"""

from __future__ import annotations

import contextlib
import difflib
import re
from typing import Callable, Iterator, Optional, Sequence, Union

from torch import nn

from pyro_blora.models import BayesianLoRALinear, linear_shape

from .config import BLoRAConfig
from .quantization import check_quantized_layers

__all__ = ["inject_adapters", "adapted_layers", "remove_adapters", "matches", "find_targets", "restored_on_failure"]

LayerFactory = Callable[..., BayesianLoRALinear]


def matches(name: str, spec: Union[str, Sequence[str]]) -> bool:
    """peft semantics: regex full match for a string, suffix match for a list."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def find_targets(model: nn.Module, spec: Union[str, Sequence[str]]) -> list[str]:
    """Names of the modules matched by ``spec``; a clear error when none is adaptable."""
    matched = [name for name, module in model.named_modules() if name and matches(name, spec)]
    adaptable = [name for name in matched if linear_shape(model.get_submodule(name)) is not None]
    if adaptable:
        return adaptable
    linear_names = [name for name, module in model.named_modules() if linear_shape(module) is not None]
    if matched:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in matched})
        raise ValueError(
            f"target_modules {spec!r} matched {len(matched)} module(s) of type {kinds}, none of them nn.Linear "
            f"or Conv1D; linear layers of this model include: {_suffix_summary(linear_names)}"
        )
    keys = [spec] if isinstance(spec, str) else list(spec)
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
    close = sorted({c for key in keys for c in difflib.get_close_matches(key.rsplit(".", 1)[-1], suffixes, n=3, cutoff=0.5)})
    hint = f" Did you mean {close}?" if close else ""
    raise ValueError(
        f"target_modules {spec!r} matched no module of {type(model).__name__}.{hint} "
        f"Linear layers it has: {_suffix_summary(linear_names)}"
    )


def _suffix_summary(names: list[str], limit: int = 12) -> str:
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    shown = ", ".join(suffixes[:limit])
    return shown + (f", ... ({len(suffixes)} names)" if len(suffixes) > limit else "") if suffixes else "(none)"


def inject_adapters(
    model: nn.Module, config: BLoRAConfig, layer_factory: Optional[LayerFactory] = None
) -> list[BayesianLoRALinear]:
    """Freeze ``model`` and wrap every target module; return the new layers in module order.

    ``layer_factory(base, name, config, bayesian=...)`` builds each layer (default
    :class:`BayesianLoRALinear`; BLoB passes its own, see :mod:`pyro_blora.baselines.blob.fit`).
    """
    if adapted_layers(model):
        raise ValueError("the model already carries Bayesian-LoRA adapters; call remove_adapters first")
    targets = find_targets(model, config.target_modules)
    check_quantized_layers(model, targets)
    if config.bayesian_modules is not None:
        bayesian = {name for name in targets if matches(name, config.bayesian_modules)}
        if not bayesian and config.bayesian_modules:  # [] asks for plain LoRA everywhere
            raise ValueError(
                f"bayesian_modules {config.bayesian_modules!r} matched none of the targeted modules "
                f"{_suffix_summary(targets)}; use None to make all of them Bayesian"
            )
    else:
        bayesian = set(targets)
    for param in model.parameters():
        param.requires_grad_(False)
    layers = []
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = (layer_factory or BayesianLoRALinear)(getattr(parent, child), name, config, bayesian=name in bayesian)
        setattr(parent, child, layer)
        layers.append(layer)
    return layers


def adapted_layers(model: nn.Module) -> list[BayesianLoRALinear]:
    """The Bayesian-LoRA layers inside ``model``, in module order."""
    return [module for module in model.modules() if isinstance(module, BayesianLoRALinear)]


def remove_adapters(model: nn.Module) -> nn.Module:
    """Put the original base modules back; returns ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BayesianLoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.base)
    return model


@contextlib.contextmanager
def restored_on_failure(model: nn.Module) -> Iterator[None]:
    """Leave ``model`` as it was if the block fails: adapters it injected removed, ``requires_grad`` restored.

    Loading or fitting that injects adapters and then fails (a wrong base, a
    corrupted file, a bad option) must not leave a half-adapted model behind, so
    that the call can be corrected and retried on the same model.
    """
    requires_grad = [(param, param.requires_grad) for param in model.parameters()]
    had_adapters = bool(adapted_layers(model))
    try:
        yield
    except BaseException:
        if not had_adapters:
            remove_adapters(model)
        for param, flag in requires_grad:
            param.requires_grad_(flag)
        raise
