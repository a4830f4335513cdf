"""MC dropout over the LoRA path: a MAP adapter whose dropout stays on at prediction.

Gal and Ghahramani (2016, "Dropout as a Bayesian approximation", ICML) read a
network trained with dropout as a variational posterior whose samples are the
dropout masks; the predictive is then the average over ``S`` masks,

.. math::

    p(y \\mid x, D) \\approx \\frac{1}{S} \\sum_{s=1}^{S}
        \\mathrm{softmax}\\big(f(x; W_0 + \\tfrac{\\alpha}{r} B A\\,\\mathrm{diag}(m_s))\\big),
    \\qquad m_s \\sim \\mathrm{Bernoulli}(1 - p) / (1 - p),

with the masks ``m_s`` on the input of the LoRA path only (the adapters'
``layer.dropout``, as in peft's ``lora_dropout``). The base model's own dropout
modules stay in eval mode: the frozen base is not part of the posterior.

Training is plain MAP LoRA (the ``"delta"`` guide of :func:`pyro_blora.fit`)
with that dropout active; only prediction differs, and it differs along training too:
validation, early stopping and callbacks (a benchmark's checkpoint scorer) see the
masked predictive, not the MAP one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

from torch import nn

from pyro_blora.config import BLoRAConfig, config_from_dict
from pyro_blora.inject import adapted_layers
from pyro_blora.methods import FitRequest, Method, register_method
from pyro_blora.restore import load_fit_result
from pyro_blora.result import FitResult
from pyro_blora.training.svi import fit_svi

__all__ = ["MCDropoutOptions", "MCDropoutResult", "fit_mc_dropout", "load_mc_dropout", "DEFAULT_DROPOUT"]

DEFAULT_DROPOUT = 0.1
"""Dropout rate of the LoRA path when the caller gives no config (the Bayesian-LoRA paper's MC-dropout baseline)."""



class MCDropoutResult(FitResult):
    """A MAP LoRA fit whose predictive averages ``num_samples`` dropout masks of the LoRA path.

    Each posterior "sample" is one mask per example and adapted layer: with
    ``stack_samples=True`` the batch is repeated ``S`` times and every copy gets
    its own mask in one forward; with ``False`` the network runs ``S`` times.
    ``seed`` fixes the masks (the caller's RNG state is left as it was).
    """

    method = "mc_dropout"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _check_dropout(self.model.layers)

    @property
    def is_deterministic(self) -> bool:
        """Always False: every mask is a different network."""
        return False

    @property
    def dropout(self) -> float:
        """The dropout rate ``p`` of the LoRA path."""
        return float(self.config.dropout)

    def as_map(self) -> FitResult:
        """The same adapters without dropout at prediction: the MAP LoRA predictive (shares the modules)."""
        out = FitResult(self.model, self.guide, self.config, self.train_config, self.task)
        out.history, out.validation = self.history, self.validation
        return out

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        # Everything in eval (the base model's dropout included), then only the
        # adapters' dropout back in train mode; the parent restores all flags.
        with super()._eval_mode():
            for layer in self.model.layers:
                layer.dropout.train()
            yield


def _check_dropout(layers: Sequence[nn.Module]) -> None:
    missing = [layer.layer_name for layer in layers if not isinstance(layer.dropout, nn.Dropout) or layer.dropout.p <= 0]
    if missing:
        raise ValueError(
            f"MC dropout needs dropout > 0 on the LoRA path, but {missing[:3]} have none; "
            "set BLoRAConfig.dropout (e.g. 0.1) or guide_options={'dropout': 0.1}"
        )


@dataclass(frozen=True)
class MCDropoutOptions:
    """Options of ``fit(guide="mc_dropout")``."""

    dropout: Optional[float] = field(
        default=None,
        metadata={"help": f"Dropout rate p on the LoRA path, kept on at prediction (None: BLoRAConfig.dropout, "
                          f"or {DEFAULT_DROPOUT} when no config is given)."},
    )
    # the rate is checked where it lands, by BLoRAConfig (0 <= p < 1) and _resolve_config (p > 0)


def _resolve_config(model: nn.Module, config: Union[BLoRAConfig, dict, None], options: MCDropoutOptions) -> Optional[BLoRAConfig]:
    """The config to fit with: the caller's (or p = 0.1 when none), with ``options.dropout`` applied."""
    if isinstance(config, dict):
        config = config_from_dict(BLoRAConfig, config)
    existing = adapted_layers(model)
    if existing:
        # fit() keeps adapters already in place; their dropout is what MC dropout will sample
        if options.dropout is not None and options.dropout != existing[0].config.dropout:
            raise ValueError(
                f"the model already carries adapters with dropout {existing[0].config.dropout}; "
                "guide_options['dropout'] cannot change it (call remove_adapters first)"
            )
        _check_dropout(existing)
        return config
    if config is None:
        config = BLoRAConfig(dropout=DEFAULT_DROPOUT)
    if options.dropout is not None:
        config = dataclasses.replace(config, dropout=float(options.dropout))
    if config.dropout <= 0:
        raise ValueError(
            "MC dropout needs dropout > 0 on the LoRA path, got BLoRAConfig.dropout = 0; "
            f"set it (e.g. {DEFAULT_DROPOUT}) or pass guide_options={{'dropout': {DEFAULT_DROPOUT}}}"
        )
    return config


def fit_mc_dropout(model: nn.Module, data: Any, request: FitRequest, options: MCDropoutOptions) -> MCDropoutResult:
    """Train MAP LoRA with dropout on the LoRA path; predict with the dropout kept on.

    What ``pyro_blora.fit(model, data, guide="mc_dropout", ...)`` runs. ``config.dropout``
    is the rate ``p`` (``0.1`` when ``config`` is None; 0 is an error);
    ``options.dropout`` overrides it, so one config can be shared with the other
    methods of a benchmark.

    Returns:
        An :class:`MCDropoutResult`; ``predict(data, num_samples=S)`` averages ``S`` masks.
    """
    config = _resolve_config(model, request.config, options)
    # built as an MCDropoutResult from the start, so that validation and callbacks score the masked predictive
    return fit_svi(model, data, "delta", result_type=MCDropoutResult, **{**request.svi_arguments(), "config": config})


def load_mc_dropout(path: Any, model: nn.Module, **kwargs: Any) -> MCDropoutResult:
    """Rebuild a saved :class:`MCDropoutResult` (what :func:`pyro_blora.load` calls for ``"mc_dropout"`` folders)."""
    return MCDropoutResult.from_fit_result(load_fit_result(path, model, **kwargs))


register_method(Method(
    "mc_dropout", fit_mc_dropout, MCDropoutOptions, load=load_mc_dropout, display_name="MC dropout",
    benchmark_defaults={"dropout": DEFAULT_DROPOUT}, ensemble_member=True, point_estimate=True,
))
