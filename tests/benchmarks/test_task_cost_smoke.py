"""Smoke test of benchmarks/task_cost.py on a tiny random Llama: it times steps and predictions, and sizes a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "task_cost.py"


def test_task_cost_times_a_step_and_a_prediction_and_scales_them_to_the_run(tiny_model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONWARNINGS", None)
    out = tmp_path / "cost.json"
    args = [sys.executable, str(SCRIPT), "--tasks", "drug_reviews_binary", "--methods", "delta", "flow", "--steps", "2",
            "--examples", "4", "--output", str(out), "--set", f"model={tiny_model_dir}", "trainable_layers=1",
            "max_length=32"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(out.read_text())["tasks"][0]
    # the drug reviews' full run: 491 training reviews, batch 8, 5 epochs; 55 validation + 343 test reviews
    assert row["run_steps"] == 62 * 5 and row["run_predicted_examples"] == 55 + 343
    for method in ("delta", "flow"):
        m = row["methods"][method]
        assert m["step_seconds"] > 0 and m["predict_seconds_per_example"] > 0
        expected = (m["step_seconds"] * row["run_steps"] + m["predict_seconds_per_example"] * row["run_predicted_examples"]) / 60
        assert abs(m["run_minutes"] - expected) < 1e-9
    assert "drug_reviews_binary" in done.stdout and "run ~" in done.stdout

    bad = subprocess.run([sys.executable, str(SCRIPT), "--steps", "0"], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "--steps" in bad.stderr
