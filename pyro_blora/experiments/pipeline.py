"""One task, several guides, one table: the pipeline behind ``pyro-blora fit | compare``.

:func:`compare` loads a model and a task, caches the frozen bottom blocks once
(when only the top blocks are adapted), fits every method with the same seed
and settings, evaluates each on the validation and test splits, and writes

* ``<output>/<method>/``: the adapter (safetensors + JSON), ``metrics.json``,
  ``history.json`` and ``predictions.safetensors`` (per-sample test probabilities);
* ``<output>/summary.json`` and ``summary.md``: the table;
* the plots of :mod:`pyro_blora.experiments.report`.

Model selection never reads the test split.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import save_file

from pyro_blora.config import BLoRAConfig
from pyro_blora.api import fit
from pyro_blora.inject import remove_adapters
from pyro_blora.io import ensure_writable
from pyro_blora.tasks import AnswerTokenTask, ChoiceLikelihoodTask, DatasetSplits, load_benchmark, load_drug_reviews, subsample
from pyro_blora.tasks.cached import cached_task, split_decoder

__all__ = [
    "ExperimentConfig", "compare", "evaluate_adapter", "evaluate_zero_shot", "prepare", "load_splits", "fit_method",
    "blora_config", "guide_options", "run_method", "format_table", "DRUG_REVIEW_TEMPLATE",
]


def _log(message: str) -> None:
    print(message, file=sys.stderr)


DRUG_REVIEW_TEMPLATE = "Drug review: {text}\nIs the review positive, negative or neutral? Answer:"


@dataclass
class ExperimentConfig:
    """Settings of a ``compare`` run; each field is also a CLI option and a config-file key.

    The defaults are the embedded demo, sized to run in about ten minutes on two
    CPU cores: binary Drugs.com sentiment (the 3-way task stays at the class
    prior for SmolLM2-135M within that budget), the top 2 blocks and the LM head
    adapted on cached activations of the 28 frozen blocks below, 64-token
    prompts, 10 epochs at lr 1e-2, and prior_sd 1 (at the paper's 0.1 the prior
    holds the adapters near zero in so short a run: the MAP model stays at the
    class prior).
    """

    model: str = field(default="smollm2", metadata={"help": "'smollm2' (embedded default), a local folder or a hub id."})
    task: str = field(
        default="drug_reviews_binary",
        metadata={"help": "drug_reviews | drug_reviews_binary | arc_easy | arc_challenge | openbookqa | boolq | winogrande_s | winogrande_m"},
    )
    scoring: str = field(default="answer_token", metadata={"help": "answer_token (answer words) | choice_likelihood (lm-eval-harness acc)."})
    normalize: str = field(
        default="none",
        metadata={"help": "choice_likelihood only: none (harness acc) | chars (harness acc_norm) | tokens (per-token mean)."},
    )
    methods: list[str] = field(
        default_factory=lambda: ["delta", "flow"],
        metadata={"help": "Methods to fit: guides flow, normal, mvn, delta; baselines mc_dropout, ensemble, blob, laplace."},
    )
    prior: str = field(default="gp", metadata={"help": "Prior over U: gp | normal."})
    flow: list[str] = field(default_factory=lambda: ["affine_autoregressive"], metadata={"help": "Flow chain (transform names)."})
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha."})
    lambda_max: float = field(default=0.03, metadata={"help": "Cap of lambda, the scale of q(W | U) (paper: 0.03)."})
    scale_max: float = field(default=0.1, metadata={"help": "Cap of the sd of q(U_w) in normal/mvn/flow guides (paper: 0.1)."})
    prior_sd: float = field(default=1.0, metadata={"help": "Prior sd numerator of the factors."})
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj", "lm_head"], metadata={"help": "Modules to adapt."})
    bayesian_modules: Optional[list[str]] = field(default_factory=lambda: ["q_proj", "lm_head"], metadata={"help": "Bayesian subset (None: all)."})
    trainable_layers: Optional[int] = field(default=2, metadata={"help": "Adapt only the top k blocks and cache the rest (None: all blocks)."})
    max_length: int = field(default=64, metadata={"help": "Prompt tokens at most (longer reviews lose their start)."})
    train_size: Optional[int] = field(default=None, metadata={"help": "Subsample the training split to this many examples."})
    validation_size: Optional[int] = field(default=None, metadata={"help": "Subsample the validation split."})
    test_size: Optional[int] = field(default=None, metadata={"help": "Subsample the test split."})
    epochs: int = field(default=10, metadata={"help": "Training epochs (ignored when num_steps is set)."})
    num_steps: Optional[int] = field(default=None, metadata={"help": "Optimiser steps."})
    batch_size: int = field(default=8, metadata={"help": "Examples per step."})
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate."})
    kl_weight: float = field(default=1.0, metadata={"help": "KL weight beta (1 = proper ELBO)."})
    variance_lr_multiplier: float = field(default=10.0, metadata={"help": "Learning-rate multiplier of sigma and lambda."})
    num_samples: int = field(default=4, metadata={"help": "Posterior samples per prediction."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    data_dir: Optional[str] = field(default=None, metadata={"help": "Folder of the benchmark JSONL files (default ../shared/data)."})
    output: str = field(default="runs/compare", metadata={"help": "Output folder."})
    device: str = field(default="cpu", metadata={"help": "Where the model runs: cpu, cuda, cuda:1, mps."})

    def __post_init__(self) -> None:
        if self.scoring not in ("answer_token", "choice_likelihood"):
            raise ValueError(f"scoring must be answer_token or choice_likelihood, got {self.scoring!r}")
        if self.normalize not in ("none", "chars", "tokens"):
            raise ValueError(f"normalize must be none, chars or tokens, got {self.normalize!r}")
        from pyro_blora.methods import method_names

        if not self.methods:
            raise ValueError("methods is empty: name at least one guide (flow, normal, mvn, delta) or baseline")
        unknown = [m for m in self.methods if m not in method_names()]
        if unknown:  # also keeps output folders (<output>/<method>) inside the output
            raise ValueError(f"unknown method(s) {unknown}; choose from {method_names()}")
        try:
            torch.device(self.device)
        except RuntimeError as err:
            raise ValueError(f"device {self.device!r} is not a torch device (cpu, cuda, cuda:0, mps): {err}") from err
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")


@dataclass
class Prepared:
    """Model, task and data ready for :func:`fit`: possibly the top part of a split decoder."""

    net: torch.nn.Module
    task: Any
    splits: DatasetSplits
    train: list
    validation: list
    test: list
    shifted: list


def load_splits(cfg: ExperimentConfig) -> DatasetSplits:
    """The task's train / validation / test splits under ``cfg`` (data seed ``cfg.seed``, subsampled to its sizes)."""
    if cfg.task in ("drug_reviews", "drug_reviews_binary"):
        splits = load_drug_reviews(binary=cfg.task.endswith("binary"), seed=cfg.seed)
    else:
        splits = load_benchmark(cfg.task, data_dir=cfg.data_dir, seed=cfg.seed)
    return subsample(splits, train=cfg.train_size, validation=cfg.validation_size, test=cfg.test_size, seed=cfg.seed)


def _answer_task(cfg: ExperimentConfig, splits: DatasetSplits, tokenizer: Any):
    if cfg.scoring == "choice_likelihood":
        if splits.kind != "multiple_choice":
            raise ValueError(f"choice_likelihood scoring needs a multiple-choice task; {cfg.task} is {splits.kind}")
        normalize = {"none": False, "chars": True, "tokens": "tokens"}[cfg.normalize]
        # a passage (BoolQ) goes before the question; long ones lose their start, never the question
        with_context = any(example.get("context") for example in splits.train[:50])
        template = "{context}\nQuestion: {question}\nAnswer:" if with_context else "Question: {question}\nAnswer:"
        return ChoiceLikelihoodTask(
            tokenizer, template=template, normalize=normalize, max_length=cfg.max_length, num_classes=splits.num_classes
        )
    if splits.kind == "classification":
        words = [" " + name for name in splits.class_names]
        return AnswerTokenTask(tokenizer, words, template=DRUG_REVIEW_TEMPLATE, max_length=cfg.max_length)
    letters = [" " + chr(ord("A") + i) for i in range(splits.num_classes)]
    return AnswerTokenTask(tokenizer, letters, max_length=cfg.max_length)


def _shift(examples: list, seed: int, size: int = 100) -> list:
    """A synthetic covariate shift: ``size`` test reviews with their words shuffled."""
    rng = random.Random(seed)
    out = []
    for example in examples[:size]:
        if "text" not in example:
            return []
        words = example["text"].split()
        rng.shuffle(words)
        out.append({**example, "text": " ".join(words)})
    return out


def prepare(cfg: ExperimentConfig, log: Callable[[str], None] = _log) -> Prepared:
    """Load the model and data, build the task, and cache the frozen bottom blocks when asked."""
    from pyro_blora.experiments.zoo import load_model

    splits = load_splits(cfg)
    log(f"data: {splits.describe()}")
    model, tokenizer = load_model(cfg.model, "causal_lm")
    model.eval().to(cfg.device)
    task = _answer_task(cfg, splits, tokenizer)
    shifted = _shift(splits.test, cfg.seed)
    if cfg.trainable_layers is None or not isinstance(task, (AnswerTokenTask, ChoiceLikelihoodTask)):
        return Prepared(model, task, splits, splits.train, splits.validation, splits.test, shifted)
    try:
        bottom, top = split_decoder(model, cfg.trainable_layers)
    except TypeError as err:  # not a Llama-style decoder: adapt its top blocks without a cache
        log(f"no activation cache: {err}")
        return Prepared(model, task, splits, splits.train, splits.validation, splits.test, shifted)
    cached = cached_task(task, bottom)
    parts = [cached.cache(list(part), desc=f"caching {name}") for name, part in (
        ("train", splits.train), ("validation", splits.validation), ("test", splits.test), ("shifted", shifted)
    )]
    return Prepared(top, cached, splits, *parts)


def _top_block_targets(net: torch.nn.Module, names: list[str], blocks: Optional[int]) -> list[str]:
    """Full names of the targets outside the blocks or in the top ``blocks`` blocks of an uncut decoder."""
    layers = getattr(getattr(net, "model", None), "layers", None)
    if blocks is None or layers is None or len(layers) <= blocks:
        return names
    cut = len(layers) - blocks
    keep = []
    for full, _ in net.named_modules():
        if any(full == n or full.endswith("." + n) for n in names):
            block = re.search(r"\.layers\.(\d+)\.", full)
            if block is None or int(block.group(1)) >= cut:
                keep.append(full)
    return keep or names


def blora_config(cfg: ExperimentConfig, net: Optional[torch.nn.Module] = None, method: str = "delta") -> BLoRAConfig:
    """The adapter config of ``method`` under ``cfg``: its targets (cut to the top blocks of ``net``), rank, prior.

    MC dropout gets the rate of its baseline (:data:`pyro_blora.baselines.mc_dropout.DEFAULT_DROPOUT`)
    on the LoRA path; every other method keeps the config's training dropout.
    """
    targets = list(cfg.target_modules)
    if net is not None:  # the uncached path (choice likelihood) adapts the same top blocks
        targets = _top_block_targets(net, targets, cfg.trainable_layers)
    config = BLoRAConfig(
        target_modules=targets,
        bayesian_modules=None if cfg.bayesian_modules is None else list(cfg.bayesian_modules),
        r=cfg.r,
        alpha=cfg.alpha,
        prior=cfg.prior,
        prior_sd=cfg.prior_sd,
        lambda_max=cfg.lambda_max,
    )
    if method == "mc_dropout":
        from pyro_blora.baselines.mc_dropout import DEFAULT_DROPOUT

        config = dataclasses.replace(config, dropout=DEFAULT_DROPOUT)
    return config


def guide_options(cfg: ExperimentConfig, method: str) -> dict[str, Any]:
    """The ``guide_options`` of ``method`` under ``cfg``: flow chain and sd cap of the Bayesian-LoRA guides."""
    options: dict[str, Any] = {"transforms": list(cfg.flow)} if method == "flow" else {}
    if method in ("flow", "normal", "mvn"):
        options["scale_max"] = cfg.scale_max
    return options


def fit_method(cfg: ExperimentConfig, prepared: Prepared, method: str, seed: Optional[int] = None, **options: Any) -> Any:
    """:func:`pyro_blora.fit` of one method with ``cfg``'s settings on ``prepared``'s training split.

    ``seed`` defaults to ``cfg.seed``; ``options`` go to :func:`fit` as they are
    (``progress=False``, ``callbacks``). Last-layer Laplace also gets the
    validation split, to tune its prior precision; no other method sees it.
    """
    if method == "laplace":
        options.setdefault("val_data", prepared.validation)
    return fit(
        prepared.net,
        prepared.train,
        guide=method,
        task=prepared.task,
        config=blora_config(cfg, prepared.net, method),
        guide_options=guide_options(cfg, method),
        epochs=cfg.epochs,
        num_steps=cfg.num_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        kl_weight=cfg.kl_weight,
        variance_lr_multiplier=cfg.variance_lr_multiplier,
        seed=cfg.seed if seed is None else seed,
        **options,
    )


def run_method(cfg: ExperimentConfig, prepared: Prepared, method: str, out: Path) -> dict[str, Any]:
    """Fit one method, evaluate it on validation and test, and write its folder."""
    start = time.perf_counter()
    result = fit_method(cfg, prepared, method)
    train_seconds = time.perf_counter() - start
    folder = out / method
    result.save(folder)
    validation = result.evaluate(prepared.validation, num_samples=cfg.num_samples)
    prediction = result.predict(prepared.test, num_samples=cfg.num_samples, seed=cfg.seed)
    test = prediction.metrics()
    tensors = {"test_sample_probs": prediction.sample_probs.contiguous(), "test_labels": prediction.labels.contiguous()}
    if prepared.shifted:
        shifted = result.predict(prepared.shifted, num_samples=cfg.num_samples, seed=cfg.seed)
        tensors["shifted_sample_probs"] = shifted.sample_probs.contiguous()
    sample_inducing = getattr(getattr(result, "guide", None), "sample_inducing", None)
    if sample_inducing is not None:  # Bayesian-LoRA guides: a few draws of q(U) for the marginals plot
        tensors.update({f"q_u.{k}": v.contiguous() for k, v in list(sample_inducing(200).items())[:1]})
    save_file(tensors, str(folder / "predictions.safetensors"))
    metrics = {"method": method, "train_seconds": train_seconds, "validation": validation, "test": test}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (folder / "history.json").write_text(json.dumps(result.history))
    remove_adapters(prepared.net)
    return metrics


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of test ACC, ECE, NLL, Brier (and validation ECE) per method."""
    lines = [
        "| method | test ACC | test ECE | test NLL | test Brier | val ACC | val ECE | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        t, v = row["test"], row["validation"]
        lines.append(
            f"| {row['method']} | {t['acc']:.3f} | {t['ece']:.3f} | {t['nll']:.3f} | {t['brier']:.3f} "
            f"| {v['acc']:.3f} | {v['ece']:.3f} | {row['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def compare(cfg: ExperimentConfig, log: Callable[[str], None] = _log) -> list[dict[str, Any]]:
    """Fit every method of ``cfg`` on its task and write the table and plots."""
    out = Path(cfg.output)
    ensure_writable(out)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    prepared = prepare(cfg, log)
    log(f"prepared in {time.perf_counter() - start:.0f} s")
    rows = [run_method(cfg, prepared, method, out) for method in cfg.methods]
    table = format_table(rows)
    total = time.perf_counter() - start
    summary = {"config": dataclasses.asdict(cfg), "results": rows, "total_seconds": total}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(table + "\n")
    from pyro_blora.experiments.report import write_plots

    write_plots(out, class_names=prepared.splits.class_names)
    print(table)
    log(f"total {total:.0f} s; results and plots in {out}")
    return rows


def evaluate_adapter(cfg: ExperimentConfig, adapter: str | Path) -> dict[str, Any]:
    """Metrics of a saved adapter on ``cfg``'s task: validation and test splits."""
    from pyro_blora.api import load

    prepared = prepare(cfg)
    result = load(adapter, prepared.net, task=prepared.task)
    return {
        "adapter": str(adapter),
        "validation": result.evaluate(prepared.validation, num_samples=cfg.num_samples),
        "test": result.evaluate(prepared.test, num_samples=cfg.num_samples),
    }


@torch.no_grad()
def evaluate_zero_shot(cfg: ExperimentConfig, split: str = "validation", batch_size: int = 4) -> dict[str, Any]:
    """Metrics of the base model, no adapter, on one split of ``cfg``'s task."""
    from pyro_blora.metrics import classification_metrics
    from pyro_blora.result import make_loader
    from pyro_blora.experiments.zoo import load_model

    splits = load_splits(cfg)
    examples = {"train": splits.train, "validation": splits.validation, "test": splits.test}[split]
    model, tokenizer = load_model(cfg.model, "causal_lm")
    model.eval().to(cfg.device)
    task = _answer_task(cfg, splits, tokenizer)
    probs, labels = [], []
    for batch in make_loader(examples, task, batch_size, shuffle=False):
        probs.append(torch.softmax(task.class_logits(model, batch).float(), -1))
        labels.append(batch["labels"])
    metrics = classification_metrics(torch.cat(probs), torch.cat(labels))
    scoring = cfg.scoring + ("" if cfg.scoring == "answer_token" else f" (normalize={cfg.normalize})")
    return {"task": cfg.task, "split": split, "scoring": scoring, "num_examples": len(examples), **metrics}
