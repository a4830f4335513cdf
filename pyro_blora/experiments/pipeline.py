"""One task, several guides, one table: the pipeline behind ``pyro-blora fit | compare | evaluate``.

:func:`compare` loads a model and a task, caches the frozen bottom blocks once
(when only the top blocks are adapted), fits every method with the same seed
and settings, evaluates each on the validation and test splits, and writes

* ``<output>/<method>/``: the adapter (safetensors + JSON), ``experiment.json``
  (how it was made: :mod:`pyro_blora.experiments.record`), ``metrics.json``,
  ``history.json`` and ``predictions.safetensors`` (per-sample test probabilities);
* ``<output>/summary.json`` and ``summary.md``: the table;
* the plots of :mod:`pyro_blora.experiments.report`.

The settings are checked when the :class:`ExperimentConfig` is built
(:mod:`pyro_blora.experiments.settings`); what each method gets is read from its
record (:mod:`pyro_blora.experiments.method_setup`). Model selection never reads
the test split.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from safetensors.torch import save_file

from pyro_blora.config import BLoRAConfig
from pyro_blora.api import fit
from pyro_blora.inject import remove_adapters
from pyro_blora.io import ensure_writable
from pyro_blora.tasks import AnswerTokenTask, ChoiceLikelihoodTask, DatasetSplits, load_benchmark, load_drug_reviews, subsample
from pyro_blora.tasks.cached import cached_task, split_decoder
from pyro_blora.tasks.activation_store import ActivationStore, store_cache
from pyro_blora.tasks.datasets import load_classification
from pyro_blora.experiments.method_setup import method_setup
from pyro_blora.experiments.record import check_adapter_folder, check_classes, write_record
from pyro_blora.experiments.runs import cleaned_on_failure, remove_empty_checkpoint
from pyro_blora.experiments.settings import DRUG_REVIEW_TEMPLATE, ExperimentConfig, file_task

__all__ = [
    "ExperimentConfig", "compare", "evaluate_adapter", "evaluate_zero_shot", "prepare", "load_splits", "fit_method",
    "blora_config", "guide_options", "run_method", "format_table", "DRUG_REVIEW_TEMPLATE",
]

PARTS = ("train", "validation", "test", "shifted")


def _log(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class Prepared:
    """Model, task and data ready for :func:`fit`: possibly the top part of a split decoder.

    A part :func:`prepare` was not asked for is an empty list.
    """

    net: torch.nn.Module
    task: Any
    splits: DatasetSplits
    train: list
    validation: list
    test: list
    shifted: list
    template: Optional[str] = None
    cache: Optional[Callable[[Any, Sequence[Any], str], list]] = None
    """``cache(task, examples, desc)``: how more examples are cached like these (None: the task is not cached)."""


def load_splits(cfg: ExperimentConfig) -> DatasetSplits:
    """The task's train / validation / test splits under ``cfg`` (data seed ``cfg.seed``, subsampled to its sizes)."""
    path = file_task(cfg.task)
    if path is not None:
        splits = load_classification(path, seed=cfg.seed, name=path.stem)
    elif cfg.task in ("drug_reviews", "drug_reviews_binary"):
        splits = load_drug_reviews(binary=cfg.task.endswith("binary"), seed=cfg.seed)
    else:
        splits = load_benchmark(cfg.task, data_dir=cfg.data_dir, seed=cfg.seed)
    return subsample(splits, train=cfg.train_size, validation=cfg.validation_size, test=cfg.test_size, seed=cfg.seed)


def prompt_template(cfg: ExperimentConfig, splits: DatasetSplits) -> Optional[str]:
    """The template the task uses: ``cfg.template``, else the task's own (None: the built-in multiple-choice ones)."""
    if cfg.template is not None:
        return cfg.template
    if cfg.scoring == "choice_likelihood":
        # a passage (BoolQ) goes before the question; long ones lose their start, never the question
        with_context = any(example.get("context") for example in splits.train[:50])
        return "{context}\nQuestion: {question}\nAnswer:" if with_context else "Question: {question}\nAnswer:"
    if splits.kind == "classification":
        from pyro_blora.tasks import CLASSIFICATION_TEMPLATE

        return DRUG_REVIEW_TEMPLATE if cfg.task.startswith("drug_reviews") else CLASSIFICATION_TEMPLATE
    return None


def _answer_task(cfg: ExperimentConfig, splits: DatasetSplits, tokenizer: Any) -> Any:
    template = prompt_template(cfg, splits)
    if cfg.scoring == "choice_likelihood":
        normalize = {"none": False, "chars": True, "tokens": "tokens"}[cfg.normalize]
        return ChoiceLikelihoodTask(
            tokenizer, template=template, normalize=normalize, max_length=cfg.max_length, num_classes=splits.num_classes
        )
    if splits.kind == "classification":
        words = [" " + name for name in splits.class_names]
        task = AnswerTokenTask(tokenizer, words, template=template, max_length=cfg.max_length)
        room = cfg.max_length - len(task.prompt({"text": ""}))
        if room < 1:  # the text would be cut away entirely: every prompt the same
            raise ValueError(f"max_length {cfg.max_length} leaves no room for the text: the template alone is "
                             f"{cfg.max_length - room} tokens; raise --max-length")
        return task
    letters = [" " + chr(ord("A") + i) for i in range(splits.num_classes)]
    return AnswerTokenTask(tokenizer, letters, template=template, max_length=cfg.max_length)


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


def prepare(cfg: ExperimentConfig, log: Callable[[str], None] = _log, parts: Sequence[str] = PARTS,
            splits: Optional[DatasetSplits] = None) -> Prepared:
    """Load the model and data, build the task, and cache the frozen bottom blocks when asked.

    ``parts``: which of train / validation / test / shifted to keep (and cache);
    ``splits``: already loaded ones (else :func:`load_splits`).
    """
    from pyro_blora.experiments.zoo import load_model

    splits = splits if splits is not None else load_splits(cfg)
    log(f"data: {splits.describe()}")
    model, tokenizer = load_model(cfg.model, "causal_lm")
    model.eval().to(cfg.device)
    task = _answer_task(cfg, splits, tokenizer)
    data = {"train": splits.train, "validation": splits.validation, "test": splits.test,
            "shifted": _shift(splits.test, cfg.seed)}
    data = {name: (list(examples) if name in parts else []) for name, examples in data.items()}
    template = prompt_template(cfg, splits)
    if cfg.trainable_layers is None or not isinstance(task, (AnswerTokenTask, ChoiceLikelihoodTask)):
        return Prepared(model, task, splits, *data.values(), template=template)
    try:
        bottom, top = split_decoder(model, cfg.trainable_layers)
    except TypeError as err:  # not a Llama-style decoder: adapt its top blocks without a cache
        log(f"no activation cache: {err}")
        return Prepared(model, task, splits, *data.values(), template=template)
    cached = cached_task(task, bottom)
    cache = store_cache(ActivationStore(cfg.activation_cache, log) if cfg.activation_cache else None)
    cached_parts = [cache(cached, part, f"caching {name}") if part else [] for name, part in data.items()]
    return Prepared(top, cached, splits, *cached_parts, template=template, cache=cache)


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

    A method whose record's ``benchmark_defaults`` name BLoRAConfig fields gets them here.
    """
    config = cfg.blora_config()
    changes = dict(method_setup(cfg, method).config)
    if net is not None:  # the uncached path (choice likelihood) adapts the same top blocks
        changes["target_modules"] = _top_block_targets(net, list(config.target_modules), cfg.trainable_layers)
    return dataclasses.replace(config, **changes) if changes else config


def guide_options(cfg: ExperimentConfig, method: str) -> dict[str, Any]:
    """The ``guide_options`` of ``method`` under ``cfg``: its record's benchmark defaults and the guide settings it takes."""
    return method_setup(cfg, method).options


def fit_method(cfg: ExperimentConfig, prepared: Prepared, method: str, seed: Optional[int] = None, **options: Any) -> Any:
    """:func:`pyro_blora.fit` of one method with ``cfg``'s settings on ``prepared``'s training split.

    ``seed`` defaults to ``cfg.seed``; ``options`` go to :func:`fit` as they are
    (``progress=False``, ``callbacks``, ``checkpoint_dir``, ``resume_from``). A method
    whose record says it needs the validation split (last-layer Laplace tunes
    its prior precision on it) gets it; no other method sees it.
    """
    setup = method_setup(cfg, method)
    if setup.needs_validation:
        options.setdefault("val_data", prepared.validation)
    train = {**cfg.train_options(), **setup.train, **({} if seed is None else {"seed": seed})}
    return fit(
        prepared.net,
        prepared.train,
        method=method,
        task=prepared.task,
        config=blora_config(cfg, prepared.net, method),
        guide_options=setup.options,
        **{**train, **options},
    )


def _checkpoint_options(cfg: ExperimentConfig, method: str) -> dict[str, Any]:
    """Ctrl-C checkpoints into ``<checkpoint root>/<method>``; resume from ``<resume>/<method>`` when it is there."""
    options: dict[str, Any] = {"checkpoint_dir": str(cfg.checkpoint_root() / method)}
    if cfg.resume is not None and (Path(cfg.resume) / method).is_dir():
        options["resume_from"] = str(Path(cfg.resume) / method)
    return options


def run_method(cfg: ExperimentConfig, prepared: Prepared, method: str, out: Path) -> dict[str, Any]:
    """Fit one method, evaluate it on validation and test, and write its folder."""
    folder = out / method
    if cfg.resume is not None and (folder / "metrics.json").is_file() and not (Path(cfg.resume) / method).is_dir():
        return json.loads((folder / "metrics.json").read_text())  # finished before the interruption
    start = time.perf_counter()
    checkpoint = _checkpoint_options(cfg, method)
    result = fit_method(cfg, prepared, method, **checkpoint)
    train_seconds = time.perf_counter() - start
    result.save(folder)
    write_record(folder, cfg, prepared.template, prepared.splits.class_names)
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
    resumed = "resume_from" in checkpoint and Path(checkpoint["resume_from"]) == Path(checkpoint["checkpoint_dir"])
    remove_empty_checkpoint(Path(checkpoint["checkpoint_dir"]), consumed=resumed)
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
    """Fit every method of ``cfg`` on its task and write the table and plots.

    A failure removes the folders this run created (never one that was there
    before); Ctrl-C keeps them with the checkpoint and raises
    :class:`~pyro_blora.experiments.runs.Interrupted` naming it.
    """
    out = Path(cfg.output)
    root = cfg.checkpoint_root()
    with cleaned_on_failure([out, root, *(out / m for m in cfg.methods)], root, cfg):
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
    """Metrics of a saved adapter on ``cfg``'s task: validation and test splits (the training split is not cached)."""
    from pyro_blora.api import load

    folder = Path(adapter)
    check_adapter_folder(folder)
    splits = load_splits(cfg)
    check_classes(folder, cfg.task, splits.class_names)  # before the model loads
    prepared = prepare(cfg, parts=("validation", "test"), splits=splits)
    result = load(folder, prepared.net, task=prepared.task)
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
