"""Smoke tests of the benchmark scripts: they run in seconds with tiny settings and write what docs/performance.md says.

The three scripts start together in subprocesses (each pays the torch / transformers
import once), so the module takes well under a minute. No real model is loaded:
``speed.py --models random`` with ``--tiny`` uses a tiny random Llama.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
TIMEOUT = 240
HAS_COMPILER = shutil.which("g++") is not None or shutil.which("c++") is not None


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHON=sys.executable)
    env.pop("PYTHONWARNINGS", None)
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    commands = {
        "speed": [sys.executable, str(BENCH / "speed.py"), "--tiny", "--models", "random",
                  "--output", str(out / "speed.json")],
        "scale": [sys.executable, str(BENCH / "scale.py"), "--models", "tiny", "Llama-2-7B",
                  "--output", str(out / "scale")],
        "gpu": ["bash", str(BENCH / "gpu.sh"), "--tiny", "--device", "cpu", "--output", str(out / "gpu.json")],
        "counts": [sys.executable, str(BENCH / "step_counts.py"), "--model", "tiny", "--steps", "2",
                   "--batch-size", "2", "--seq-len", "16", "--output", str(out / "counts.json")],
    }
    if HAS_COMPILER:  # inductor builds C++ kernels on a CPU
        commands["compile"] = [sys.executable, str(BENCH / "compile_check.py"), "--tiny", "--steps", "3", "--warmup", "1",
                               "--output", str(out / "compile.json")]
    procs = {
        name: subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in commands.items()
    }
    logs = {}
    for name, proc in procs.items():
        try:
            logs[name] = proc.communicate(timeout=TIMEOUT)[0]
        except subprocess.TimeoutExpired:
            for other in procs.values():
                if other.poll() is None:
                    other.kill()
            pytest.fail(f"benchmarks/{name} did not finish in {TIMEOUT} s")
        assert proc.returncode == 0, f"benchmarks/{name} failed (exit {proc.returncode}):\n{logs[name][-3000:]}"
    return out, logs


def _positive(value, what: str) -> None:
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{what} = {value!r}"


def test_speed_json(runs):
    out, logs = runs
    data = json.loads((out / "speed.json").read_text())
    assert {"settings", "models", "layers", "targets", "checks", "env"} <= set(data)
    assert data["settings"]["tiny"] is True and data["settings"]["threads"] == 1
    assert data["settings"]["clock"] == "cpu"
    assert list(data["models"]) == ["tiny"]
    tiny = data["models"]["tiny"]
    methods = tiny["methods"]
    assert list(methods) == ["peft", "delta", "normal", "flow"]
    for method, row in methods.items():
        _positive(row["median_step_s"], f"{method} step")
        _positive(row["median_wall_s"], f"{method} wall step")
        assert len(row["step_times_s"]) == data["settings"]["steps"]
        _positive(row["trainable_params"], f"{method} params")
        assert row["peak_memory_mb"] >= 0 and math.isfinite(row["peak_memory_mb"])
        _positive(row["step_ratio"], f"{method} step ratio")
    assert methods["peft"]["step_ratio"] == pytest.approx(1.0)
    for method in ("delta", "normal", "flow"):  # what each adds on the adapted layers alone
        assert math.isfinite(methods[method]["adapter_extra_s"])
        _positive(methods[method]["step_ratio_adapters"], f"{method} estimated ratio")
        _positive(methods[method]["adapter_plain_step_s"], "plain LoRA on the adapted layers")
    assert methods["flow"]["trainable_params"] > methods["peft"]["trainable_params"]
    assert len(tiny["loadavg_before"]) == 3
    prediction = tiny["prediction"]
    _positive(prediction["lora_forward_s"], "LoRA forward")
    assert set(prediction["guides"]["flow"]) == {"1", "4", "10"}
    for n, v in prediction["guides"]["flow"].items():
        _positive(v["seconds"], f"predict N={n}")
        _positive(v["ratio"], f"predict ratio N={n}")
        assert set(prediction["modes"]["flow"][n]) == {"default", "stacked", "loop", "unmerged"}
    layers = data["layers"]
    assert set(layers["results"]) == {"plain", "delta", "flow"}
    for method, per in layers["results"].items():
        assert set(per) == {str(c) for c in layers["counts"]}
        for count, v in per.items():
            _positive(v["median_step_s"], f"layers {method}/{count}")
            _positive(v["per_layer_s"], f"layers {method}/{count} per layer")
        assert math.isfinite(layers["growth"][method])
    assert all(isinstance(ok, bool) for ok in data["checks"].values())
    assert {"tiny/flow/step", "tiny/flow/memory", "tiny/flow/predict4", "layers/flow/flat"} <= set(data["checks"])
    assert "x peft" in logs["speed"] and "per-layer overhead" in logs["speed"] and "targets:" in logs["speed"]


@pytest.mark.skipif(not HAS_COMPILER, reason="torch.compile (inductor) needs a C++ compiler on a CPU")
def test_compile_check_times_eager_and_compiled_adapters(runs):
    out, logs = runs
    data = json.loads((out / "compile.json").read_text())
    assert set(data["median_step_s"]) == {"plain", "plain_compiled", "ours", "ours_compiled"}
    for variant, seconds in data["median_step_s"].items():
        _positive(seconds, f"{variant} step")
        _positive(data["first_step_s"][variant], f"{variant} first step")
    for ratios in (data["compiled_over_eager"], data["ours_over_plain"]):
        for key, value in ratios.items():
            _positive(value, key)
    assert "compiled / eager" in logs["compile"]


def test_interleaved_loops_take_turns_and_time_their_own_steps():
    """The baton of interleave.py: loops alternate step by step; a failing loop's error reaches the caller."""
    spec = importlib.util.spec_from_file_location("interleave", BENCH / "interleave.py")
    interleave = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(interleave)
    order: list[str] = []

    def loop(name: str, steps: int):
        def run(clock):
            for _ in range(steps):
                order.append(name)
                sum(i * i for i in range(2000))  # some CPU work on this thread
                clock()
            return name

        return run

    results, clocks = interleave.run_interleaved([loop("a", 3), loop("b", 2), loop("c", 3)])
    assert results == ["a", "b", "c"]
    assert order == ["a", "b", "c", "a", "b", "c", "a", "c"]
    for clock, steps in zip(clocks, (3, 2, 3)):
        times = clock.step_times(0)
        assert len(times["wall"]) == len(times["cpu"]) == steps
        assert all(t > 0 for t in times["cpu"])

    def broken(clock):
        clock()
        raise RuntimeError("step 2 failed")

    with pytest.raises(RuntimeError, match="step 2 failed"):
        interleave.run_interleaved([loop("a", 3), broken])


def test_scale_outputs(runs):
    out, logs = runs
    data = json.loads((out / "scale.json").read_text())
    rows = {row["model"]: row for row in data["rows"]}
    assert set(rows) == {"tiny", "Llama-2-7B"}
    for name, row in rows.items():
        for key in ("base_params", "plain_lora_params", "blora_params", "extra_params", "blora_prior_params",
                    "blora_guide_params", "plain_lora_bytes_adamw", "extra_bytes_adamw"):
            _positive(row[key], f"{name} {key}")
        assert row["blora_params"] == row["plain_lora_params"] + row["extra_params"]
        assert row["extra_bytes_adamw"] == 12 * row["extra_params"]
    seven = rows["Llama-2-7B"]
    # r (d_in + d_out) on 32 q_proj, 32 v_proj (4096 x 4096) and lm_head (4096 -> 32000)
    assert seven["plain_lora_params"] == 64 * 8 * 8192 + 8 * (4096 + 32000)
    assert 6.5e9 < seven["base_params"] < 7e9
    table = (out / "scale.md").read_text()
    assert "| Llama-2-7B |" in table and "extra + AdamW" in table


def test_gpu_check_json(runs):
    out, logs = runs
    data = json.loads((out / "gpu.json").read_text())
    assert data["settings"]["tiny"] is True and data["settings"]["device"] == "cpu"
    assert [(r["model"], r["precision"]) for r in data["runs"]] == [("tiny", "fp32"), ("tiny", "bf16")]
    for run in data["runs"]:
        assert set(run["results"]) == {"peft", "delta", "normal", "flow"}
        for method, res in run["results"].items():
            _positive(res["median_step_s"], f"{method} step")
            _positive(res["predict_s"], f"{method} predict")
            assert len(res["step_times_s"]) == data["settings"]["steps"]
            for key in ("step", "memory", "predict4"):
                assert key in run["ratios"][method]
        assert run["ratios"]["peft"]["step"] == 1.0
    table = (out / "gpu.md").read_text()
    assert "| tiny | 4 x 16 | bf16 | flow |" in table and "predict4 x peft forward" in table


def test_step_counts_json(runs):
    out, logs = runs
    data = json.loads((out / "counts.json").read_text())
    assert data["model"] == "tiny" and data["malloc"] == "default"
    assert set(data["variants"]) == {"peft", "delta", "normal", "flow"}
    for variant, row in data["variants"].items():
        _positive(row["aten_ops_per_step"], f"{variant} aten ops")
        assert len(row["minor_faults_per_step"]) == 2 and all(f >= 0 for f in row["minor_faults_per_step"])
    assert data["variants"]["peft"]["aten_ops_ratio"] == 1.0
    assert "aten ops/step" in logs["counts"]


def test_speed_results_collects_the_runs_into_the_documented_shape(runs, tmp_path):
    out, _ = runs
    spec = importlib.util.spec_from_file_location("speed_results", BENCH / "speed_results.py")
    speed_results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed_results)
    target = tmp_path / "speed.json"
    doc = speed_results.main(["--default", str(out / "speed.json"), "--counts", str(out / "counts.json"),
                              "--model", "tiny", "--output", str(target)])
    assert json.loads(target.read_text()) == doc
    assert {"commit", "load_average", "cpu", "aten_ops_ratio", "gpu"} <= set(doc)
    speed = json.loads((out / "speed.json").read_text())["models"]["tiny"]
    for variant in ("delta", "normal", "flow"):
        row = doc["cpu"]["default"][variant]
        assert row["step_ratio"] == speed["methods"][variant]["step_ratio"]
        assert row["memory_ratio"] == speed["methods"][variant]["memory_ratio"]
        _positive(doc["aten_ops_ratio"][variant], f"{variant} aten ratio")
    assert doc["cpu"]["default"]["flow"]["predict4_ratio"] == speed["prediction"]["guides"]["flow"]["4"]["ratio"]
    assert doc["cpu"]["pinned"] is None and doc["gpu"] is None
    with pytest.raises(ValueError, match="--pinned must be a speed.py run with --malloc pinned"):
        speed_results.collect(json.loads((out / "speed.json").read_text()),
                              json.loads((out / "speed.json").read_text()), json.loads((out / "counts.json").read_text()),
                              model="tiny")
