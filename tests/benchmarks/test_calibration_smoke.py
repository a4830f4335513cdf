"""Smoke test of the calibration benchmark runner on a tiny random Llama with the real tokenizer.

One subprocess runs MAP (with its post-hoc peers and the extra MAP seeds the
ensemble needs) and flow on the drug reviews, plus the OpenBookQA -> ARC shift
protocol when ../shared/data is there; a second call must find every run done.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "calibration.py"


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_runner_writes_runs_table_and_grid_then_resumes(tiny_model_dir, tmp_path):
    from pyro_blora.tasks.benchmarks import default_data_dir

    tasks = ["drug_reviews_binary"] + (["openbookqa"] if (default_data_dir() / "OpenBookQA").is_dir() else [])
    common = ["--tasks", *tasks, "--methods", "delta", "flow", "--seeds", "0", "--output", str(tmp_path),
              "--set", f"model={tiny_model_dir}", "train_size=12", "validation_size=8", "test_size=8", "epochs=1", "num_steps=4",
              "trainable_layers=1", "max_length=48"]
    first = _run(common)
    assert first.returncode == 0, first.stderr[-3000:]

    task_dir = tmp_path / "drug_reviews_binary"
    _check_run_records(task_dir, tiny_model_dir)
    _check_results_and_report(tmp_path, tasks)

    again = _run(common)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "all runs finished" in again.stderr
    assert "prepared in" not in again.stderr  # nothing was re-run, not even the caching
    assert "caching train: 12 records stored in" in first.stderr
    _check_lost_peer_refitted(task_dir, common)


def _check_run_records(task_dir, tiny_model_dir):
    """The runner's files for one task: MAP seeds for the ensemble, peers on --seeds only, a flow record with
    its environment, checkpoints every 10 % of the budget and the last one reported."""
    assert sorted(p.name for p in (task_dir / "delta").glob("*.json")) == ["seed0.json", "seed1.json", "seed2.json"]
    assert (task_dir / "flow" / "seed0.safetensors").exists()
    assert not (task_dir / "tfb" / "seed1.json").exists()  # MAP seeds 1-2 serve the ensemble only: no peers on them
    for peer in ("laplace_last_layer", "laplace_lora", "laplace_lora_val", "tfb"):  # fitted on each MAP run of --seeds
        peer_record = json.loads((task_dir / peer / "seed0.json").read_text())
        assert peer_record["cost_over_map"]["map_seconds"] > 0 and peer_record["peak_memory_mb"] >= 0
        assert 0.0 <= peer_record["metrics"]["test"]["ece"] <= 1.0
    record = json.loads((task_dir / "flow" / "seed0.json").read_text())
    assert record["settings"]["model"] == str(tiny_model_dir)
    assert record["training"]["num_steps"] == 4 and record["training"]["lr"] == record["settings"]["lr"]  # no preset
    environment = record["environment"]  # what a non-reproducing rerun is compared on
    assert environment["torch"] == torch.__version__ and environment["threads"] >= 1
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and environment["pyro"]
    for split in ("validation", "test"):
        assert 0.0 <= record["metrics"][split]["ece"] <= 1.0 and record["metrics"][split]["num_examples"] == 8

    # the long protocol's checkpoints: every 10 % of the 4 steps is steps 1..4, scored on validation and test
    assert [point["step"] for point in record["trajectory"]] == [1, 2, 3, 4]
    assert {"validation", "test"} <= set(record["trajectory"][-1]) and record["selected"]["step"] in (1, 2, 3, 4)
    assert record["trajectory"][-1]["test"] == record["metrics"]["test"]  # the last checkpoint is the reported run


def _check_results_and_report(tmp_path, tasks):
    """calibration.json in the issue's shape, the summary's tables and the figures."""
    results = json.loads((tmp_path / "calibration.json").read_text())
    rows = results["tasks"]["drug_reviews_binary"]
    assert {"delta", "flow", "delta+temperature", "flow+temperature", "ensemble", "ensemble@val", "flow@val",
            "delta+temperature@val", "flow+temperature@val", "laplace_last_layer", "laplace_lora", "laplace_lora_val",
            "tfb"} <= set(rows)
    assert rows["tfb"]["cost"]["seconds"]["mean"] > 0 and "cost" not in rows["delta"]
    assert set(rows["flow"]) == {"acc", "ece", "nll", "brier", "mi", "seeds", "per_seed", "devices"}
    assert rows["flow"]["seeds"] == 1 and rows["flow"]["devices"] == ["cpu"] and rows["flow@val"]["devices"] == ["cpu"]
    assert list(rows["flow"]["per_seed"]) == ["0"] and rows["flow"]["per_seed"]["0"]["ece"] == rows["flow"]["ece"]["mean"]
    assert rows["tfb"]["per_seed"]["0"]["cost"]["seconds"] == rows["tfb"]["cost"]["seconds"]["mean"]
    assert 0 <= rows["flow"]["ece"]["mean"] <= 1 and results["protocol"]["ece_bins"] == 15
    assert (tmp_path / "trajectory.png").stat().st_size > 5_000

    summary = (tmp_path / "summary.md").read_text()
    for row in ("MAP LoRA", "MAP + temperature", "ensemble (3 MAP)", "last-layer Laplace", "Laplace-LoRA (marglik)", "TFB",
                "B-LoRA flow"):
        assert row in summary
    assert "Bayesian-LoRA (flow) against MAP LoRA" in summary and "MI (nats)" in summary
    assert "cost over their MAP run" in summary
    # sampled methods only: flow's 4 draws against its first draw; MAP has one draw and no row
    averaging = summary.split("One posterior sample against the average")[1].split("\n## ")[0]
    assert "| drug_reviews_binary | B-LoRA flow | 4 |" in averaging and "MAP LoRA" not in averaging
    table = json.loads((tmp_path / "summary.json").read_text())["table"]["drug_reviews_binary"]
    assert table["ensemble"]["n"] == 1 and table["delta"]["n"] == 1
    assert (tmp_path / "reliability_grid.png").stat().st_size > 10_000
    if "openbookqa" in tasks:
        shifted = json.loads((tmp_path / "openbookqa" / "delta" / "seed0.json").read_text())["metrics"]
        assert {"shift.arc_easy", "shift.arc_challenge"} <= set(shifted)
        assert "trained on openbookqa" in summary
        # choice likelihood: last-layer Laplace is laplace-torch over the last adapted block's LoRA weights
        last = json.loads((tmp_path / "openbookqa" / "laplace_last_layer" / "seed0.json").read_text())
        assert 0.0 <= last["metrics"]["test"]["ece"] <= 1.0 and last["chosen"]["prior_precision"] > 0
        assert {"laplace_last_layer", "laplace_lora", "tfb"} <= set(results["tasks"]["openbookqa"])


def _check_lost_peer_refitted(task_dir, common):
    """A peer lost (or added later) is fitted on the saved MAP adapter: the MAP run is not retrained."""
    assert (task_dir / "delta" / "seed0.adapter" / "adapter_config.json").is_file()
    map_record = (task_dir / "delta" / "seed0.json").read_text()
    tfb = json.loads((task_dir / "tfb" / "seed0.json").read_text())
    (task_dir / "tfb" / "seed0.json").unlink()
    redo = _run(common + ["--tasks", "drug_reviews_binary", "--no-report"])
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert "peers ['tfb'] of the saved MAP run, seed 0" in redo.stderr and "delta seed" not in redo.stderr
    assert "caching train: 12 records read back from" in redo.stderr  # the frozen blocks did not run again
    assert (task_dir / "delta" / "seed0.json").read_text() == map_record
    refit = json.loads((task_dir / "tfb" / "seed0.json").read_text())
    assert refit["chosen"]["sigma"] == tfb["chosen"]["sigma"]  # the same MAP weights, the same search
    assert refit["metrics"]["test"] == tfb["metrics"]["test"]


@pytest.mark.parametrize("only, message", [
    (["flow"], "--only expects METHOD:SEED (e.g. flow:0), got 'flow'"),
    (["tfb:5"], "--only tfb:5: no saved MAP adapter"),
    (["ensemble:0"], "--only ensemble:0: 'ensemble' is neither a trained method"),
])
def test_only_names_a_bad_run_before_any_model_loads(tmp_path, only, message):
    result = _run(["--tasks", "drug_reviews_binary", "--output", str(tmp_path), "--only", *only])
    assert result.returncode != 0 and message in result.stderr
    assert "prepared in" not in result.stderr and not any(tmp_path.iterdir())


def test_last_block_modules_takes_the_highest_numbered_block(monkeypatch):
    from types import SimpleNamespace

    peers = _load_by_path(monkeypatch, "common", "calibration_io", "calibration_peers")
    names = ["layers.1.self_attn.q_proj", "layers.10.self_attn.q_proj", "layers.10.self_attn.v_proj",
             "layers.9.self_attn.v_proj", "lm_head"]
    fit = SimpleNamespace(model=SimpleNamespace(layers=[SimpleNamespace(layer_name=n) for n in names]))
    assert peers.last_block_modules(fit) == ["layers.10.self_attn.q_proj", "layers.10.self_attn.v_proj"]
    only_head = SimpleNamespace(model=SimpleNamespace(layers=[SimpleNamespace(layer_name="lm_head")]))
    with pytest.raises(ValueError, match="no adapted layer sits in a numbered block"):
        peers.last_block_modules(only_head)


def test_merge_replaces_only_the_given_tasks_and_marks_partial_ones(monkeypatch):
    module = _load_by_path(monkeypatch, "calibration_io", "calibration_report", "calibration_results")
    row = lambda n: {"acc": {"mean": 0.5, "sd": 0.0}, "seeds": n}  # noqa: E731
    committed = {"commit": "old", "protocol": {"seeds": [0, 1, 2], "tasks": {"a": {"x": 1}}},
                 "tasks": {"a": {"delta": row(3)}, "b": {"delta": row(1)}}}
    new = {"commit": "new", "protocol": {"tasks": {"b": {"x": 2}}}, "tasks": {"b": {"delta": row(3), "flow": row(1)}}}
    merged = module.merge_results(new, committed, ["b"], note="flow seed 0 only")
    assert merged["tasks"]["a"] == committed["tasks"]["a"] and merged["tasks"]["b"] == new["tasks"]["b"]
    assert merged["protocol"]["tasks"] == {"a": {"x": 1}, "b": {"x": 2}} and merged["protocol"]["commits"] == {"b": "new"}
    assert merged["protocol"]["partial"]["b"] == {"rows_with_fewer_seeds": {"flow": 1}, "commit": "new", "why": "flow seed 0 only"}
    complete = module.merge_results({"commit": "n2", "tasks": {"b": {"delta": row(3)}}}, merged, ["b"])
    assert "b" not in complete["protocol"]["partial"]
    with pytest.raises(ValueError, match="'c' has no rows in the new results"):
        module.merge_results(new, committed, ["c"])
    # rows only: the task's other rows and its protocol stay
    rows_only = module.merge_results({"commit": "n3", "tasks": {"a": {"mc_dropout": row(3), "delta": row(1)}}}, committed,
                                     ["a"], methods=["mc_dropout"])
    assert rows_only["tasks"]["a"] == {"delta": row(3), "mc_dropout": row(3)}
    assert rows_only["protocol"]["tasks"]["a"] == {"x": 1} and rows_only["protocol"]["commits"]["a"] == {"mc_dropout": "n3"}
    with pytest.raises(ValueError, match=r"a: no rows \['blob'\]"):
        module.merge_results({"tasks": {"a": {"delta": row(3)}}}, committed, ["a"], methods=["blob"])


def test_pooling_adds_a_later_invocations_seeds_to_the_committed_rows(monkeypatch):
    module = _load_by_path(monkeypatch, "calibration_io", "calibration_report", "calibration_results")
    seed = lambda acc, cost=None: {"acc": acc, "ece": 0.1, "nll": 1.0, "brier": 0.5, "mi": 0.0,  # noqa: E731
                                   **({"cost": dict.fromkeys(module.COSTS, cost)} if cost else {})}
    committed = {"protocol": {"seeds": [0, 1, 2]},
                 "tasks": {"a": {"delta": module.row_from_seeds({"0": seed(0.3)}),
                                 "tfb": module.row_from_seeds({"0": seed(0.2, cost=10.0)}),
                                 "old": {"acc": {"mean": 0.5, "sd": 0.0}, "seeds": 3}}}}
    new = {"commit": "n", "tasks": {"a": {"delta": module.row_from_seeds({"1": seed(0.4), "2": seed(0.5)}),
                                          "tfb": module.row_from_seeds({"1": seed(0.4, cost=20.0), "2": seed(0.6, cost=30.0)}),
                                          "old": module.row_from_seeds({"1": seed(0.1)})}}}
    pooled = module.merge_results(new, committed, ["a"], methods=["delta", "tfb"], pool=True)
    delta = pooled["tasks"]["a"]["delta"]
    assert delta["seeds"] == 3 and sorted(delta["per_seed"]) == ["0", "1", "2"]
    assert delta["acc"]["mean"] == pytest.approx(0.4) and delta["acc"]["sd"] == pytest.approx(0.1)
    assert pooled["tasks"]["a"]["tfb"]["cost"]["seconds"]["mean"] == pytest.approx(20.0)
    assert "a" not in pooled["protocol"]["partial"]  # every row of the task now has the protocol's 3 seeds
    assert pooled["tasks"]["a"]["old"] == committed["tasks"]["a"]["old"] and pooled["protocol"]["commits"]["a"]["tfb"] == "n"
    # a seed in both: the new value wins; a committed row without per-seed values cannot be pooled
    again = module.merge_results({"tasks": {"a": {"delta": module.row_from_seeds({"0": seed(0.9)})}}}, pooled, ["a"],
                                 methods=["delta"], pool=True)
    assert again["tasks"]["a"]["delta"]["per_seed"]["0"]["acc"] == 0.9 and again["tasks"]["a"]["delta"]["seeds"] == 3
    with pytest.raises(ValueError, match="a old: the committed row has no per-seed values to pool"):
        module.merge_results(new, committed, ["a"], methods=["old"], pool=True)


def _load_by_path(monkeypatch, *names: str):
    """Import benchmarks/<name>.py by path, in order (each may import the ones before); the last module."""
    import importlib.util

    for name in names:  # benchmarks/ never goes on sys.path
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)  # imported by the next, and a dataclass looks it up
        spec.loader.exec_module(module)
    return module


def test_pooled_rows_name_the_devices_their_seeds_ran_on(monkeypatch):
    module = _load_by_path(monkeypatch, "calibration_io", "calibration_report", "calibration_results")
    metrics = {"acc": 0.5, "ece": 0.1, "nll": 1.0, "brier": 0.5, "mutual_information": 0.02}
    on = lambda device: module._seed_values(metrics, {"settings": {"device": device}})  # noqa: E731
    assert on("cuda")["device"] == "cuda" and "device" not in module._seed_values(metrics)
    committed = {"protocol": {"seeds": [0, 1, 2]}, "tasks": {"a": {"normal": module.row_from_seeds({"0": on("cuda")})}}}
    new = {"commit": "n", "tasks": {"a": {"normal": module.row_from_seeds({"1": on("cpu"), "2": on("cpu")})}}}
    pooled = module.merge_results(new, committed, ["a"], methods=["normal"], pool=True)["tasks"]["a"]["normal"]
    assert pooled["devices"] == ["cpu", "cuda"] and pooled["per_seed"]["0"]["device"] == "cuda"
    assert pooled["mi"]["mean"] == pytest.approx(0.02) and pooled["seeds"] == 3


def test_tagged_variants_of_map_and_flow_get_their_own_temperature_rows(monkeypatch, tmp_path):
    import torch

    from pyro_blora.result import Prediction

    module = _load_by_path(monkeypatch, "calibration_io", "calibration_report", "calibration_results")
    io = sys.modules["calibration_io"]
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    sure = torch.tensor([[0.99, 0.01], [0.02, 0.98], [0.01, 0.99], [0.97, 0.03], [0.05, 0.95], [0.9, 0.1]])

    def prediction() -> Prediction:  # over-confident: a temperature above 1 helps; safetensors wants own storage
        return Prediction(sure.clone(), sure[None].clone(), labels.clone())

    for method in ("delta", "delta-top6", "flow-kl4", "mc_dropout"):
        io.write_run(tmp_path / "t" / method / "seed0.json", {"task": "t", "method": method, "seed": 0,
                     "train_seconds": 1.0}, {"validation": prediction(), "test": prediction()})
    runs = sys.modules["calibration_report"].collect(tmp_path, seeds=[0], ensemble_size=3)["t"]
    assert {"delta+ts", "delta-top6+ts", "flow-kl4+ts"} <= set(runs) and "mc_dropout+ts" not in runs
    temperature = runs["delta+ts"][0]["temperature"]
    assert temperature > 1 and runs["delta-top6+ts"][0]["temperature"] == pytest.approx(temperature)
    rows = module.results({"t": runs}, seeds=[0], protocol={})["tasks"]["t"]
    assert {"delta+temperature", "delta-top6+temperature", "flow-kl4+temperature"} <= set(rows)
    assert rows["delta-top6+temperature"]["nll"]["mean"] < rows["delta-top6"]["nll"]["mean"]


def test_the_early_stopped_ensemble_averages_each_members_validation_selected_checkpoint(monkeypatch, tmp_path):
    import torch

    from pyro_blora.baselines.ensemble import combine_predictions
    from pyro_blora.result import Prediction

    module = _load_by_path(monkeypatch, "calibration_io", "calibration_report", "calibration_results")
    io, report = sys.modules["calibration_io"], sys.modules["calibration_report"]
    labels = torch.tensor([0, 1, 1, 0])

    def prediction(p: float) -> Prediction:
        probs = torch.tensor([[p, 1 - p], [1 - p, p], [0.5, 0.5], [p, 1 - p]])
        return Prediction(probs.clone(), probs[None].clone(), labels.clone())

    def write(seed: int, selected: bool) -> None:
        record = {"task": "t", "method": "delta", "seed": seed, "train_seconds": 1.0,
                  "selected": {"step": 10 * (seed + 1), "metrics": {}}}
        chosen = {"validation": prediction(0.6 + 0.1 * seed), "test": prediction(0.6 + 0.1 * seed)} if selected else None
        io.write_run(tmp_path / "t" / "delta" / f"seed{seed}.json", record,
                     {"validation": prediction(0.99), "test": prediction(0.99)}, chosen)

    for seed in range(3):
        write(seed, selected=True)
    ensemble = report.collect(tmp_path, seeds=[0], ensemble_size=3)["t"]["ensemble"][0]
    expected = combine_predictions([prediction(0.6 + 0.1 * s) for s in range(3)]).metrics()
    assert ensemble["selected"]["step"] == [10, 20, 30]
    assert ensemble["selected"]["metrics"]["test"]["nll"] == pytest.approx(expected["nll"])
    assert ensemble["metrics"]["test"]["nll"] == pytest.approx(prediction(0.99).metrics()["nll"])
    # the stored checkpoint is not one of the splits the post-hoc rows are computed on
    assert set(report.collect(tmp_path, seeds=[0], ensemble_size=3)["t"]["delta+ts"][0]["metrics"]) == {"validation", "test"}
    rows = module.results(report.collect(tmp_path, seeds=[0], ensemble_size=3), seeds=[0], protocol={})["tasks"]["t"]
    assert rows["ensemble@val"]["nll"]["mean"] == pytest.approx(expected["nll"]) and "delta@val" not in rows
    write(1, selected=False)  # a member stored before the checkpoints were kept: no early-stopped ensemble
    assert "selected" not in report.collect(tmp_path, seeds=[0], ensemble_size=3)["t"]["ensemble"][0]


def test_the_early_stopped_map_gets_its_own_temperature_row(monkeypatch, tmp_path):
    import torch

    from pyro_blora.baselines.temperature import apply_temperature, fit_temperature
    from pyro_blora.result import Prediction

    module = _load_by_path(monkeypatch, "calibration_io", "calibration_report", "calibration_results")
    io, report = sys.modules["calibration_io"], sys.modules["calibration_report"]
    labels = torch.tensor([0, 1, 1, 0, 1])

    def prediction(p: float) -> Prediction:  # right on four of five: p = 0.99 over-confident, p = 0.6 under-confident
        probs = torch.tensor([[p, 1 - p], [1 - p, p], [p, 1 - p], [p, 1 - p], [1 - p, p]])
        return Prediction(probs.clone(), probs[None].clone(), labels.clone())

    record = {"task": "t", "method": "delta", "seed": 0, "train_seconds": 1.0, "selected": {"step": 7, "metrics": {}}}
    io.write_run(tmp_path / "t" / "delta" / "seed0.json", record, {"validation": prediction(0.99), "test": prediction(0.99)},
                 {"validation": prediction(0.6), "test": prediction(0.6)})
    tempered = report.collect(tmp_path, seeds=[0], ensemble_size=3)["t"]["delta+ts"][0]
    assert tempered["temperature"] > 1 > tempered["selected"]["temperature"] and tempered["selected"]["step"] == 7
    expected = apply_temperature(prediction(0.6), fit_temperature(prediction(0.6))).metrics()["nll"]
    assert tempered["selected"]["metrics"]["test"]["nll"] == pytest.approx(expected)
    assert expected < prediction(0.6).metrics()["nll"]  # the selected checkpoint's own temperature helps it
    rows = module.results(report.collect(tmp_path, seeds=[0], ensemble_size=3), seeds=[0], protocol={})["tasks"]["t"]
    assert rows["delta+temperature@val"]["nll"]["mean"] == pytest.approx(expected) and "delta+ts@val" not in rows
