"""The post-hoc peers of ``calibration.py``, fitted on each MAP run's weights right after it trains.

Each peer reuses a finished MAP LoRA run (no retraining) and is scored on the same
validation, test and shift sets; its record holds its own cost (seconds and peak
memory of the post-hoc step) next to the MAP run's, so the report can state the
overhead. Selection inside a peer (a prior precision, TFB's sd) reads the
validation split only.

* ``laplace_last_layer``: last-layer Laplace. On answer-token tasks, on the answer head
  (K-FAC GGN of the answer rows, GLM predictive, our own code); with choice likelihood the
  class logits are sums of token log-probabilities, not linear in one head, so there it is
  Laplace-LoRA's own last-layer variant (Yang et al.'s LLLA): laplace-torch's K-FAC over the
  LoRA weights of the last adapted block only, prior precision by marginal likelihood;
* ``laplace_lora``: laplace-torch's K-FAC Laplace over the LoRA weights of
  ``LAPLACE_LORA_MODULES`` (Yang et al., ICLR 2024), prior precision by the Laplace
  marginal likelihood, probit GLM predictive; ``laplace_lora_val``: the same, prior
  precision by validation NLL on a grid;
* ``tfb``: training-free Bayesianization (Shi et al., 2025), one isotropic sd on every
  LoRA ``A`` whose validation NLL stays within ``TFB_TOLERANCE`` of MAP's.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

LAPLACE_LORA_MODULES = ["q_proj", "v_proj"]
"""The ``lm_head`` LoRA is left at MAP: its ``B`` (49,152 x 8) needs a 49,152^2 K-FAC factor (9 GiB in fp32)."""
TFB_TOLERANCE = 0.01
"""Nats of validation NLL TFB may add to MAP's (the library default)."""


@dataclasses.dataclass(frozen=True)
class Peer:
    """How one post-hoc method is built from a MAP fit and the prepared splits, and where it applies."""

    build: Callable[[Any, Any, str], Any]
    """``build(map_result, prepared, scoring)``: the fitted peer."""
    scorings: tuple[str, ...] = ("answer_token", "choice_likelihood")


def last_block_modules(map_result: Any) -> list[str]:
    """Names of the adapted layers of the last adapted transformer block (``...layers.<i>.``, largest ``i``)."""
    blocks: dict[int, list[str]] = {}
    for layer in map_result.model.layers:
        found = re.search(r"(?:^|\.)layers\.(\d+)\.", layer.layer_name)
        if found:
            blocks.setdefault(int(found.group(1)), []).append(layer.layer_name)
    if not blocks:
        raise ValueError("no adapted layer sits in a numbered block (layers.<i>.): no last block to take")
    return blocks[max(blocks)]


def _laplace_last_layer(map_result: Any, prepared: Any, scoring: str) -> Any:
    if scoring == "answer_token":
        from pyro_blora.baselines.laplace.posterior import laplace_from_map

        return laplace_from_map(map_result, prepared.train, prepared.validation)
    from pyro_blora.baselines.laplace.lora_posterior import laplace_lora_from_map

    return laplace_lora_from_map(map_result, prepared.train, prepared.validation, prior_method="marglik",
                                 modules=last_block_modules(map_result))


def _laplace_lora(prior_method: str) -> Callable[[Any, Any, str], Any]:
    def build(map_result: Any, prepared: Any, scoring: str) -> Any:
        from pyro_blora.baselines.laplace.lora_posterior import laplace_lora_from_map

        return laplace_lora_from_map(map_result, prepared.train, prepared.validation, prior_method=prior_method,
                                     modules=LAPLACE_LORA_MODULES)

    return build


def _tfb(map_result: Any, prepared: Any, scoring: str) -> Any:
    from pyro_blora.baselines.tfb import tfb_from_map

    return tfb_from_map(map_result, prepared.validation, tolerance=TFB_TOLERANCE)


PEERS: dict[str, Peer] = {
    "laplace_last_layer": Peer(_laplace_last_layer),
    "laplace_lora": Peer(_laplace_lora("marglik")),
    "laplace_lora_val": Peer(_laplace_lora("val_nll")),
    "tfb": Peer(_tfb),
}


def peer_summary(result: Any) -> dict[str, Any]:
    """What a peer chose (prior precision, sd, K-FAC memory), stored in its run record."""
    out: dict[str, Any] = {}
    for attribute in ("prior_precision", "kfac_bytes", "sigma", "map_nll", "tuning"):
        value = getattr(result, attribute, None)
        if value is not None:
            out[attribute] = value
    return out
