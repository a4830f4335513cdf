"""A failed run removes the folders it created; Ctrl-C keeps its checkpoint and says how to resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import torch

from pyro_blora.experiments import pipeline
from pyro_blora.experiments.cli import build_parser, main
from pyro_blora.experiments.runs import Interrupted
from pyro_blora.experiments.settings import ExperimentConfig

from test_experiment import prepared  # noqa: F401  (fixture)


def test_a_failed_run_removes_the_folders_it_created_only(tmp_path, monkeypatch) -> None:
    def broken(cfg, log=None, **kwargs):
        raise ValueError("the data is broken")

    monkeypatch.setattr(pipeline, "prepare", broken)
    fresh = tmp_path / "fresh"
    with pytest.raises(ValueError, match="broken"):
        pipeline.compare(ExperimentConfig(output=str(fresh)))
    assert not fresh.exists()
    existing = tmp_path / "existing"
    (existing / "delta").mkdir(parents=True)
    (existing / "delta" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError):
        pipeline.compare(ExperimentConfig(output=str(existing)))
    assert (existing / "delta" / "notes.txt").read_text() == "mine" and not (existing / "flow").exists()


def test_ctrl_c_before_training_leaves_nothing_and_exits_130(tmp_path, monkeypatch, capsys) -> None:
    def interrupted(cfg, log=None, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "prepare", interrupted)
    assert main(["fit", "--output", str(tmp_path / "run")]) == 130
    assert "interrupted before any checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _interrupt_at(step: int):
    def callback(state) -> bool:
        if state.step == step:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; fit checkpoints after this step
        return False

    return callback


def test_ctrl_c_checkpoints_and_resume_finishes_the_run(prepared, tmp_path, monkeypatch, capsys) -> None:  # noqa: F811
    out = tmp_path / "run"
    cfg = ExperimentConfig(methods=["delta"], target_modules=["q_proj", "v_proj"], bayesian_modules=["q_proj"],
                           trainable_layers=None, num_steps=4, batch_size=4, num_samples=2, output=str(out))
    monkeypatch.setattr(pipeline, "prepare", lambda cfg, log=None, **kwargs: prepared)
    monkeypatch.setattr("pyro_blora.experiments.report.write_plots", lambda *args, **kwargs: [])
    fit = pipeline.fit
    monkeypatch.setattr(pipeline, "fit", lambda *a, **k: fit(*a, callbacks=[_interrupt_at(2)], **k))
    torch.manual_seed(0)
    with pytest.raises(Interrupted) as info:
        pipeline.compare(cfg)
    root = out / "checkpoint"
    assert info.value.checkpoint == root and (root / "delta" / "latest.json").is_file()
    record = json.loads((root / "experiment.json").read_text())
    assert record["num_steps"] == 4 and record["methods"] == ["delta"]

    # the CLI's message names the checkpoint and the command; --resume reads the run's settings back
    compare = pipeline.compare
    monkeypatch.setattr(pipeline, "compare", lambda cfg: (_ for _ in ()).throw(Interrupted(root)))
    assert main(["fit", "--output", str(out)]) == 130
    assert f"checkpoint in {root}; resume with: pyro-blora fit --resume {root}" in capsys.readouterr().err
    from pyro_blora.experiments.cli import _fit_config

    resumed = _fit_config(build_parser().parse_args(["fit", "--resume", str(root)]))
    assert resumed.methods == ["delta"] and resumed.num_steps == 4 and resumed.output == str(out)

    monkeypatch.setattr(pipeline, "fit", fit)
    rows = compare(dataclasses.replace(cfg, resume=str(root)))
    assert rows[0]["method"] == "delta" and (out / "delta" / "experiment.json").is_file()
    assert len(json.loads((out / "delta" / "history.json").read_text())["loss"]) == 4
    assert not root.exists()  # the checkpoint is used up once the run finished


def test_resume_keeps_the_methods_that_finished_before_the_interruption(tmp_path, monkeypatch) -> None:
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoint"
    (out / "delta").mkdir(parents=True)
    (root / "flow").mkdir(parents=True)
    row = {"method": "delta", "train_seconds": 1.0, "validation": {}, "test": {}}
    (out / "delta" / "metrics.json").write_text(json.dumps(row))

    def no_fit(*args, **kwargs):
        raise AssertionError("a finished method was fitted again")

    monkeypatch.setattr(pipeline, "fit_method", no_fit)
    cfg = ExperimentConfig(methods=["delta", "flow"], output=str(out), resume=str(root))
    assert pipeline.run_method(cfg, None, "delta", out) == row  # type: ignore[arg-type]
    with pytest.raises(AssertionError, match="fitted again"):
        pipeline.run_method(cfg, None, "flow", out)  # type: ignore[arg-type]  (its checkpoint is there: resume it)
