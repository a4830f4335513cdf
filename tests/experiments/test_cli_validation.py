"""Everything a user can type is refused in one line (exit 2) before a model or data set is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pyro_blora.experiments.cli import build_parser, experiment_config, main


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    """Any model load fails the test: every case here must be refused before one."""
    from pyro_blora.experiments import zoo

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(zoo, "load_model", refuse)
    monkeypatch.setattr(zoo, "load_smollm2", refuse)


def refused(argv: list[str], capsys, warnings: int = 0) -> str:
    """Run ``main(argv)``; it must exit 2 with one error line on stderr (after ``warnings`` warnings), which is returned."""
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 + warnings and "Traceback" not in err, err
    assert all("warning" in line for line in lines[:-1]), err
    return lines[-1]


@pytest.mark.parametrize("argv, message", [
    (["fit", "--epochs", "0"], "epochs must be >= 1, got 0"),
    (["fit", "--epochs", "-1"], "epochs must be >= 1, got -1"),
    (["fit", "--epochs", "ten"], "invalid int value: 'ten'"),
    (["fit", "--lr", "nan"], "lr must be a finite number, got nan"),
    (["fit", "--lr", "inf"], "lr must be a finite number"),
    (["fit", "--lr", "-0.001"], "lr must be positive"),
    (["fit", "--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["fit", "--max-length", "0"], "max_length must be >= 8"),
    (["fit", "--r", "0"], "r must be an integer >= 1"),
    (["fit", "--num-samples", "0"], "num_samples must be >= 1"),
    (["fit", "--trainable-layers", "0"], "trainable_layers must be >= 1 or none"),
    (["fit", "--guide", "dropout"], "unknown method(s) ['dropout']; choose from"),
    (["compare", "--methods", "delta", "bogus"], "unknown method(s) ['bogus']"),
    (["compare", "--scoring", "letters"], "scoring must be answer_token or choice_likelihood"),
    (["compare", "--scoring", "choice_likelihood"], "needs a multiple-choice task; drug_reviews_binary is classification"),
    (["compare", "--task", "imdb"], "unknown task 'imdb'"),
    (["fit", "--template", "Review: {review}"], "must use {text}"),
    (["fit", "--device", "gpu0"], "not a torch device"),
    (["fit", "--model", "./no/such/model"], "model folder ./no/such/model not found"),
    (["fit", "--data-dir", "/no/such/data"], "data_dir /no/such/data is not a folder"),
    (["fit", "--resume", "/no/such/checkpoint"], "checkpoint folder /no/such/checkpoint not found"),
    (["fit", "--config", "/no/such/run.yaml"], "config file /no/such/run.yaml not found"),
    (["plot", "--output", "/no/such/run"], "run folder /no/such/run not found"),
])
def test_bad_arguments_are_refused_before_any_model_loads(argv, message, capsys) -> None:
    line = refused(argv, capsys)
    assert line.startswith("pyro-blora") and message in line, line


def test_cuda_on_a_cpu_only_torch_is_refused(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = refused(["fit", "--device", "cuda"], capsys)
    assert "device 'cuda' asked for" in line and "use --device cpu" in line


def test_a_missing_adapter_folder_names_the_near_miss(tmp_path, capsys) -> None:
    (tmp_path / "flow").mkdir()
    line = refused(["evaluate", "--adapter", str(tmp_path / "flwo")], capsys)
    assert f"adapter folder {tmp_path / 'flwo'} not found" in line and "did you mean" in line and "flow" in line
    line = refused(["evaluate", "--adapter", str(tmp_path / "flow")], capsys)
    assert "holds no saved adapter" in line


@pytest.mark.parametrize("name, text, message", [
    ("run.yaml", "r: 4\nmethods: [delta, flow\n", "is not valid YAML at line"),
    ("run.json", "{\"r\": 4,", "is not valid JSON"),
    ("run.yaml", "- r\n- 4\n", "must hold a mapping of options"),
    ("run.yaml", "learning_rate: 0.1\n", "unknown option(s) ['learning_rate']"),
    ("run.yaml", "epochs: ten\n", "epochs must be an integer, got 'ten'"),
    ("run.yaml", "lr: .nan\n", "lr must be a finite number"),
    ("run.yaml", "max_length: null\n", "max_length must not be none"),
    ("run.yaml", "methods: []\n", "methods is empty"),
])
def test_a_broken_config_file_is_named(tmp_path, name, text, message, capsys) -> None:
    config = tmp_path / name
    config.write_text(text)
    line = refused(["compare", "--config", str(config)], capsys)
    assert message in line, line


def test_none_is_accepted_where_the_help_offers_it(capsys) -> None:
    cfg = experiment_config(build_parser().parse_args(
        ["compare", "--trainable-layers", "none", "--bayesian-modules", "none", "--num-steps", "None"]))
    assert cfg.trainable_layers is None and cfg.bayesian_modules is None and cfg.num_steps is None
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "None: all blocks" not in text and "(none: every block, no cache)" in text
    # the library's help text, with the pipeline's own default named beside the library's
    assert "AdamW learning rate. [TrainConfig.lr; the library's default: 0.0005] (default: 0.01)" in text


def test_a_task_file_without_the_columns_is_refused(tmp_path, capsys) -> None:
    data = tmp_path / "mine.csv"
    data.write_text("review,stars\ngood,5\n")
    line = refused(["fit", "--task", f"csv:{data}"], capsys)
    assert "has no ['label', 'text'] column(s)" in line
    rows = tmp_path / "mine.jsonl"
    rows.write_text(json.dumps({"text": "good", "stars": 5}) + "\n")
    assert "has no ['label'] column(s)" in refused(["fit", "--task", f"jsonl:{rows}"], capsys)


def _fake_adapter(folder: Path, **record) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"blora_config": {"r": 8, "alpha": 16.0}}))
    (folder / "experiment.json").write_text(json.dumps({
        "task": "drug_reviews_binary", "scoring": "answer_token", "normalize": "none", "template": None,
        "trainable_layers": 1, "max_length": 48, "model": "smollm2", "data_dir": None,
        "num_classes": 2, "class_names": ["negative", "positive"], **record,
    }))
    return folder


def test_a_binary_adapter_is_refused_on_a_three_class_task(tmp_path, capsys) -> None:
    adapter = _fake_adapter(tmp_path / "run" / "flow")
    data = tmp_path / "three.csv"
    data.write_text("text,label\n" + "".join(f"review {i},{i % 3}\n" for i in range(30)))
    line = refused(["evaluate", "--adapter", str(adapter), "--task", f"csv:{data}"], capsys, warnings=1)
    assert "fitted on drug_reviews_binary with 2 classes (negative, positive)" in line and "has 3 (0, 1, 2)" in line


def test_evaluate_takes_the_adapters_record_and_warns_where_flags_contradict(tmp_path) -> None:
    from pyro_blora.experiments.cli import gather_options
    from pyro_blora.experiments.record import reconcile

    adapter = _fake_adapter(tmp_path / "flow")
    args = build_parser().parse_args(["evaluate", "--adapter", str(adapter), "--max-length", "32", "--r", "4"])
    values, explicit = gather_options(args)
    warnings: list[str] = []
    out = reconcile(values, explicit, adapter, warnings.append)
    assert out["task"] == "drug_reviews_binary" and out["trainable_layers"] == 1 and out["max_length"] == 32
    assert len(warnings) == 2
    assert "max_length 32 differs from 48" in warnings[0]
    # a different rank is named as ignored, not blamed on a different base model
    assert "r 4 is ignored: the adapter in" in warnings[1] and "saved with r 8" in warnings[1]


def test_a_binary_adapter_is_refused_on_the_three_class_drug_reviews(tmp_path, capsys) -> None:
    adapter = _fake_adapter(tmp_path / "run" / "delta")
    line = refused(["evaluate", "--adapter", str(adapter), "--task", "drug_reviews"], capsys, warnings=1)
    assert "with 2 classes (negative, positive); drug_reviews has 3 (negative, neutral, positive)" in line


def test_another_task_keeps_its_own_template_and_multiple_choice_counts_may_differ(tmp_path) -> None:
    from pyro_blora.experiments.record import check_classes, reconcile

    adapter = _fake_adapter(tmp_path / "flow", task="arc_easy", scoring="choice_likelihood", num_classes=5,
                            template="Question: {question}\nAnswer:", class_names=list("ABCDE"))
    warnings: list[str] = []
    values = {"task": "drug_reviews", "template": None, "scoring": "answer_token", "max_length": 64}
    out = reconcile(values, {"task"}, adapter, warnings.append)
    assert out["template"] is None and out["scoring"] == "answer_token" and out["max_length"] == 48
    check_classes(adapter, "openbookqa", list("ABCD"))  # a shift between multiple-choice tasks is allowed
    with pytest.raises(ValueError, match="fitted on arc_easy with 5 classes"):
        check_classes(adapter, "drug_reviews", ["negative", "neutral", "positive"])
