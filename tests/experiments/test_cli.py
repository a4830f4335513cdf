"""The pyro-blora command line: options, config files, and a tiny end-to-end compare/evaluate/plot."""

from __future__ import annotations

import json

import pytest

from pyro_blora.experiments.cli import build_parser, experiment_config, main

TINY = [
    "--train-size", "12", "--validation-size", "6", "--test-size", "6", "--num-steps", "2",
    "--trainable-layers", "1", "--max-length", "48", "--num-samples", "2", "--batch-size", "4",
]


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--methods", "--target-modules", "--kl-weight", "--trainable-layers", "--config", "--num-samples"):
        assert flag in text
    assert "Methods to fit" in text and "mc_dropout" in text and "--device" in text


def test_config_file_and_flags_merge(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("r: 4\nmethods: [delta, normal]\nlr: 0.01\nbayesian_modules: null\n")
    args = build_parser().parse_args(["compare", "--config", str(config), "--lr", "0.002"])
    cfg = experiment_config(args)
    assert cfg.r == 4 and cfg.methods == ["delta", "normal"] and cfg.lr == 0.002 and cfg.bayesian_modules is None
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"alpha": 8}))
    assert experiment_config(build_parser().parse_args(["fit", "--config", str(as_json)])).alpha == 8


def test_unknown_config_key_is_named(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"learning_rate": 0.1}))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['learning_rate'\]"):
        experiment_config(build_parser().parse_args(["compare", "--config", str(config)]))


def test_bad_values_give_a_clear_error(capsys):
    assert main(["compare", "--scoring", "letters"]) == 2
    assert "scoring must be answer_token or choice_likelihood" in capsys.readouterr().err


def test_compare_evaluate_plot_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["compare", *TINY, "--methods", "delta", "flow", "--output", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [row["method"] for row in summary["results"]] == ["delta", "flow"]
    for row in summary["results"]:
        assert 0.0 <= row["test"]["ece"] <= 1.0 and row["test"]["nll"] > 0
    assert (out / "flow" / "adapter_model.safetensors").is_file()
    assert (out / "reliability.png").stat().st_size > 0
    assert "| flow |" in (out / "summary.md").read_text()
    record = json.loads((out / "flow" / "experiment.json").read_text())
    assert record["max_length"] == 48 and record["trainable_layers"] == 1 and record["num_classes"] == 2
    assert not (out / "checkpoint").exists()
    capsys.readouterr()
    # the task settings come from the adapter's experiment.json: only the split sizes are given again
    sizes = ["--train-size", "12", "--validation-size", "6", "--test-size", "6", "--num-samples", "2"]
    assert main(["evaluate", *sizes, "--adapter", str(out / "flow")]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["test"]["num_examples"] == 6 and "warning" not in captured.err
    assert main(["plot", "--output", str(out)]) == 0
    assert "posterior_predictive_flow.png" in capsys.readouterr().out


def test_compare_help_lists_every_method_with_its_options(capsys) -> None:
    from pyro_blora.methods import METHODS

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "methods and their options" in out
    for name, record in METHODS.items():
        if record.fit is not None:
            assert f"  {name} (" in out
            for option in record.option_help():
                assert f"      {option}: " in out
