"""Training recipes as named presets of :class:`~pyro_blora.config.TrainConfig` fields.

A preset changes the objective and the optimiser the same way for every method
(MAP LoRA, MC dropout, ensembles, BLoB and the Bayesian-LoRA families), so no
method gets a trick that its baseline lacks:

``"proper"``
    The ELBO itself: ``kl_weight = 1`` from the first step (after the usual
    warm-up), no label smoothing, no entropy bonus.

``"paper"``
    The released Bayesian-LoRA training script (Lin et al., 2026; see
    ``PAPER.md``): cross-entropy with label smoothing 0.05, a predictive-entropy
    bonus of 0.05, the KL switched on from epoch 2 of 6 at
    ``0.1 * KL / batches_per_epoch`` (``kl_weight = 0.1 * batch_size`` in this
    library's units, where the likelihood is summed and scaled by ``N / B``),
    AdamW at lr 7.39e-4 and weight decay 0.027, the step decay at epochs 2 and
    4 (``schedule="step"``), 6 epochs. Its ECE gains are partly not Bayesian:
    label smoothing and the entropy bonus also calibrate plain LoRA.

Usage::

    pyro_blora.fit(net, data, guide="flow", **train_preset("paper", batch_size=6))
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

__all__ = ["PRESETS", "preset_names", "train_preset"]

PAPER_LR = 7.39e-4
PAPER_WEIGHT_DECAY = 0.027


def _proper(batch_size: int) -> dict[str, Any]:
    return {"kl_weight": 1.0, "kl_start": 0.0, "label_smoothing": 0.0, "entropy_bonus": 0.0}


def _paper(batch_size: int) -> dict[str, Any]:
    return {
        "kl_weight": 0.1 * batch_size, "kl_start": 1 / 6, "kl_warmup": 0.0, "label_smoothing": 0.05,
        "entropy_bonus": 0.05, "lr": PAPER_LR, "weight_decay": PAPER_WEIGHT_DECAY, "schedule": "step", "epochs": 6,
    }


PRESETS: dict[str, Callable[[int], dict[str, Any]]] = {"proper": _proper, "paper": _paper}
"""Preset name -> function of the batch size returning the TrainConfig fields it sets. Add your own here."""


def preset_names() -> list[str]:
    return sorted(PRESETS)


def train_preset(name: str, batch_size: int = 8, **overrides: Any) -> dict[str, Any]:
    """The :class:`~pyro_blora.config.TrainConfig` fields of preset ``name`` (plus ``batch_size``), then ``overrides``.

    Raises ``ValueError`` naming the presets for an unknown ``name``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {preset_names()}")
    return {"batch_size": batch_size, **PRESETS[name](batch_size), **overrides}


def with_preset(name: str | None, train: Mapping[str, Any]) -> dict[str, Any]:
    """``train`` with preset ``name``'s fields set over it (None: ``train`` unchanged)."""
    if name is None:
        return dict(train)
    return {**train, **train_preset(name, int(train.get("batch_size", 8)))}
