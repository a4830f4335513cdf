"""``compare``'s per-method pipeline runs every baseline and writes what the report reads."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from pyro_blora import BLoRAConfig
from pyro_blora.experiments.pipeline import ExperimentConfig, Prepared, run_method
from pyro_blora.experiments.report import write_plots
from pyro_blora.tasks import DatasetSplits
from pyro_blora.tasks.causal_lm import AnswerTokenTask

REVIEWS = [
    {"text": "Worked wonders for my migraines, no side effects.", "label": 1},
    {"text": "Terrible. Made me dizzy for a week and did nothing.", "label": 0},
    {"text": "Great relief within days, I would take it again.", "label": 1},
    {"text": "Awful nausea and no benefit at all.", "label": 0},
]


@pytest.fixture
def prepared(tiny_llama, smollm2_tokenizer) -> Prepared:
    task = AnswerTokenTask(smollm2_tokenizer, [" negative", " positive"], template="Review: {text}\nSentiment:",
                           max_length=32)
    splits = DatasetSplits(REVIEWS * 3, REVIEWS, REVIEWS, 2, ["negative", "positive"], "classification", "toy")
    return Prepared(tiny_llama, task, splits, splits.train, splits.validation, splits.test, REVIEWS[:2])


@pytest.mark.parametrize("method", ["mc_dropout", "ensemble", "blob", "laplace"])
def test_run_method_fits_a_baseline_and_the_report_draws_it(prepared, method, tmp_path) -> None:
    cfg = ExperimentConfig(methods=[method], target_modules=["q_proj", "v_proj"], bayesian_modules=["q_proj"],
                           trainable_layers=None, num_steps=2, batch_size=4, num_samples=2, output=str(tmp_path))
    torch.manual_seed(0)
    row = run_method(cfg, prepared, method, tmp_path)
    assert row["method"] == method and 0.0 <= row["test"]["ece"] <= 1.0
    folder = tmp_path / method
    assert json.loads((folder / "metrics.json").read_text())["test"]["num_examples"] == len(REVIEWS)
    assert (folder / "predictions.safetensors").is_file() and (folder / "experiment.json").is_file()
    assert not (tmp_path / "checkpoint").exists()  # fit made the Ctrl-C checkpoint folder; unused, it goes
    assert any(p.name.startswith("reliability") for p in write_plots(tmp_path))
    assert not any(name.startswith("model.layers") for name, _ in prepared.net.named_modules() if "lora" in name)


def test_unknown_method_names_the_baselines() -> None:
    with pytest.raises(ValueError, match="mc_dropout"):
        ExperimentConfig(methods=["dropout"])
    with pytest.raises(ValueError, match="not a torch device"):
        ExperimentConfig(device="gpu0")


def test_method_settings_come_from_the_method_records(tiny_llama) -> None:
    from pyro_blora.experiments.pipeline import blora_config, guide_options
    from pyro_blora.baselines.mc_dropout import DEFAULT_DROPOUT
    from pyro_blora.methods import METHODS

    cfg = ExperimentConfig(target_modules=["q_proj"], trainable_layers=1)
    # MC dropout's rate is its record's benchmark default, passed as its option (no name branch in the pipeline)
    assert METHODS["mc_dropout"].benchmark_defaults["dropout"] == DEFAULT_DROPOUT
    assert guide_options(cfg, "mc_dropout") == {"dropout": DEFAULT_DROPOUT}
    assert blora_config(cfg, method="delta").dropout == BLoRAConfig().dropout
    top = len(tiny_llama.model.layers) - 1
    assert blora_config(cfg, tiny_llama).target_modules == [f"model.layers.{top}.self_attn.q_proj"]
    assert guide_options(cfg, "flow") == {"transforms": ["affine_autoregressive"], "scale_max": cfg.scale_max}
    assert guide_options(cfg, "normal") == {"scale_max": cfg.scale_max}
    assert guide_options(cfg, "delta") == {}


def test_every_registered_method_has_benchmark_defaults_the_pipeline_understands() -> None:
    from pyro_blora.experiments.method_setup import method_records, method_setup

    cfg = ExperimentConfig()
    for name in method_records():
        method_setup(cfg, name)  # raises on a key that is neither an option, a config field nor a flag
    assert method_setup(cfg, "laplace").needs_validation and not method_setup(cfg, "delta").needs_validation


def test_evaluate_reads_the_saved_adapter_and_caches_only_the_splits_it_scores(prepared, tiny_llama, smollm2_tokenizer,
                                                                              monkeypatch, tmp_path) -> None:
    from pyro_blora.experiments import pipeline, zoo
    from pyro_blora.experiments.record import read_record

    cfg = ExperimentConfig(methods=["delta"], target_modules=["q_proj", "v_proj"], bayesian_modules=["q_proj"],
                           trainable_layers=None, num_steps=2, batch_size=4, num_samples=2, output=str(tmp_path))
    run_method(cfg, prepared, "delta", tmp_path)
    record = read_record(tmp_path / "delta")
    assert record["task"] == "drug_reviews_binary" and record["num_classes"] == 2 and record["max_length"] == 64
    monkeypatch.setattr(pipeline, "load_splits", lambda cfg: prepared.splits)
    monkeypatch.setattr(zoo, "load_model", lambda *args, **kwargs: (prepared.net, smollm2_tokenizer))
    cached = []
    original = pipeline.prepare
    monkeypatch.setattr(pipeline, "prepare", lambda *a, **k: cached.append(k["parts"]) or original(*a, **k))
    metrics = pipeline.evaluate_adapter(cfg, tmp_path / "delta")
    assert cached == [("validation", "test")] and metrics["test"]["num_examples"] == len(REVIEWS)
    # prepare keeps (and would cache) only the parts asked for
    monkeypatch.setattr(zoo, "load_model", lambda *args, **kwargs: (tiny_llama, smollm2_tokenizer))
    part = original(dataclasses.replace(cfg, trainable_layers=1), parts=("validation",), splits=prepared.splits)
    assert part.train == [] and part.test == [] and part.shifted == [] and len(part.validation) == len(REVIEWS)


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_your_own_file_is_a_task(tmp_path, suffix) -> None:
    from pyro_blora.experiments.pipeline import load_splits, prompt_template
    from pyro_blora.tasks import CLASSIFICATION_TEMPLATE

    rows = [{"text": f"review number {i}", "label": "good" if i % 2 else "bad"} for i in range(40)]
    file = tmp_path / f"mine.{suffix}"
    if suffix == "csv":
        file.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    else:
        file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ExperimentConfig(task=f"{suffix}:{file}", train_size=10)
    splits = load_splits(cfg)
    assert splits.kind == "classification" and splits.class_names == ["bad", "good"] and len(splits.train) == 10
    assert len(splits.validation) > 0 and len(splits.test) > 0
    assert prompt_template(cfg, splits) == CLASSIFICATION_TEMPLATE
    custom = ExperimentConfig(task=f"{suffix}:{file}", template="Review: {text}\nVerdict:")
    assert prompt_template(custom, splits) == "Review: {text}\nVerdict:"


def test_point_estimate_methods_get_the_map_layout_and_the_others_the_bayesian_one() -> None:
    from pyro_blora.experiments.method_setup import method_setup
    from pyro_blora.experiments.settings import ExperimentConfig

    cfg = ExperimentConfig(methods=["delta", "flow"])
    assert cfg.bayesian_modules is None and cfg.map_bayesian_modules == []
    for name in ("delta", "mc_dropout", "ensemble", "laplace", "laplace_lora", "tfb"):
        assert method_setup(cfg, name).config["bayesian_modules"] == [], name
    for name in ("flow", "normal", "blob"):
        assert "bayesian_modules" not in method_setup(cfg, name).config, name
    paper = ExperimentConfig(preset="paper")
    assert paper.train_options()["lr"] == 7.39e-4 and paper.train_options()["label_smoothing"] == 0.05
    import pytest

    with pytest.raises(ValueError, match="unknown preset 'best'"):
        ExperimentConfig(preset="best")


def test_prepare_with_an_activation_cache_reads_back_the_same_records(prepared, tiny_llama, smollm2_tokenizer,
                                                                     monkeypatch, tmp_path) -> None:
    from pyro_blora.experiments import pipeline, zoo

    monkeypatch.setattr(zoo, "load_model", lambda *args, **kwargs: (tiny_llama, smollm2_tokenizer))
    cfg = ExperimentConfig(methods=["delta"], trainable_layers=1, activation_cache=str(tmp_path / "store"))
    logs: list[str] = []
    first = pipeline.prepare(cfg, log=logs.append, splits=prepared.splits)
    # validation and test hold the same reviews here: one file, computed once
    assert [line.split(":")[0] for line in logs if "stored in" in line] == ["caching train", "caching validation",
                                                                           "caching shifted"]
    logs.clear()
    second = pipeline.prepare(cfg, log=logs.append, splits=prepared.splits)
    assert sum("read back from" in line for line in logs) == 4 and not any("stored in" in line for line in logs)
    for name in ("train", "validation", "test", "shifted"):
        for a, b in zip(getattr(first, name), getattr(second, name), strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    extra = second.cache(second.task, REVIEWS[:1], "caching extra")  # more examples go through the same store
    assert len(extra) == 1 and "caching extra: 1 records stored in" in logs[-1]
