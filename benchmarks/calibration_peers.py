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

The MAP run's adapter is saved next to its record, so a peer missing from an earlier
invocation (interrupted, or added since) is fitted on the reloaded MAP weights
(:func:`peer_backlog`, :func:`fit_peers_from_saved`) instead of retraining the MAP run.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Optional

from calibration_io import adapter_path, brief, log, predict_all, run_path, write_run
from common import PeakMemory

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


def _applies(name: str, scoring: str) -> bool:
    return scoring in PEERS[name].scorings


def missing_peers(out: Path, task: str, seed: int, scoring: str, names: Optional[list[str]]) -> list[str]:
    """The peers of ``names`` (None: all) that apply to ``scoring`` and have no finished run for ``seed``."""
    return [n for n in (PEERS if names is None else names)
            if _applies(n, scoring) and not run_path(out, task, n, seed).exists()]


def peer_backlog(out: Path, task: str, seeds: list[int], scoring: str, names: Optional[list[str]]) -> dict[int, list[str]]:
    """Per seed whose MAP run finished and saved its adapter: the peers still to fit on it."""
    backlog = {}
    for seed in seeds:
        if not (run_path(out, task, "delta", seed).exists() and adapter_path(out, task, seed).is_dir()):
            continue
        todo = missing_peers(out, task, seed, scoring, names)
        if todo:
            backlog[seed] = todo
    return backlog


def fit_peers(map_result: Any, map_record: dict[str, Any], cfg: Any, prepared: Any, shifted: dict[str, list],
              out: Path, seed: int, names: Optional[list[str]]) -> None:
    """Fit and score every post-hoc peer of this MAP run that applies to the task's scoring and is not done yet."""
    for name in missing_peers(out, cfg.task, seed, cfg.scoring, names):
        memory = PeakMemory(cfg.device)
        memory.start()
        started = time.perf_counter()
        try:
            result = PEERS[name].build(map_result, prepared, cfg.scoring)
        except ImportError as err:
            log(f"{name} skipped: {err}")
            continue
        seconds, peak_mb = time.perf_counter() - started, memory.peak_mb()
        predictions = predict_all(result, prepared, shifted, cfg.num_samples, seed)
        record = {"task": cfg.task, "method": name, "seed": seed, "train_seconds": seconds, "posthoc_of": "delta",
                  "peak_memory_mb": peak_mb, "memory_method": memory.method,
                  "cost_over_map": {"map_seconds": map_record["train_seconds"],
                                    "map_peak_memory_mb": map_record["peak_memory_mb"]},
                  "chosen": peer_summary(result), "num_train": len(prepared.train),
                  "settings": map_record["settings"]}
        write_run(run_path(out, cfg.task, name, seed), record, predictions)
        log(f"{cfg.task} {name} seed {seed}: {seconds:.0f} s, test {brief(predictions['test'])}")
        map_result.use_posterior_mean()


def fit_peers_from_saved(cfg: Any, prepared: Any, shifted: dict[str, list], out: Path, seed: int,
                         names: list[str]) -> None:
    """Reload the saved MAP adapter of ``seed`` into ``prepared.net`` and fit ``names`` on it; adapters removed after."""
    from pyro_blora.api import load
    from pyro_blora.inject import remove_adapters

    map_record = json.loads(run_path(out, cfg.task, "delta", seed).read_text())
    map_result = load(adapter_path(out, cfg.task, seed), prepared.net, task=prepared.task)
    log(f"{cfg.task}: peers {names} of the saved MAP run, seed {seed}")
    try:
        fit_peers(map_result, map_record, cfg, prepared, shifted, out, seed, names)
    finally:
        remove_adapters(prepared.net)
