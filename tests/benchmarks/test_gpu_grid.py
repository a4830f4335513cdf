"""benchmarks/gpu_grid.sh: each job line becomes one ``calibration.py --only`` command; bad arguments fail first."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_grid.sh"


def _grid(tmp_path: Path, jobs: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "jobs").write_text(jobs)
    env = {**os.environ, "PYTHON": "echo", "GRID_SET": "num_steps=2"}  # echo prints the command it would run
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "jobs"), str(tmp_path / "out"), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_each_job_line_becomes_one_run_with_its_tag_and_settings(tmp_path):
    done = _grid(tmp_path, "# a comment\nopenbookqa flow:0\n\narc_easy delta:1 lr3e-3 lr=0.003\n", "2", "60", "cpu")
    assert done.returncode == 0, done.stderr
    logs = {p.name: p.read_text().split() for p in (tmp_path / "out" / "logs").iterdir()}
    assert set(logs) == {"openbookqa_flow_0.log", "arc_easy_delta-lr3e-3_1.log"}
    plain, tagged = logs["openbookqa_flow_0.log"], logs["arc_easy_delta-lr3e-3_1.log"]
    assert plain[:7] == ["calibration.py", "--tasks", "openbookqa", "--methods", "flow", "--seeds", "0"]
    assert "--tag" not in plain and plain[plain.index("--set") + 1:] == ["num_steps=2"]
    assert tagged[tagged.index("--tag") + 1] == "lr3e-3" and tagged[tagged.index("--only") + 1] == "delta:1"
    assert tagged[tagged.index("--set") + 1:] == ["lr=0.003", "num_steps=2"]
    assert tagged[tagged.index("--device") + 1] == "cpu" and "--peers" in tagged


def test_bad_arguments_fail_before_any_run(tmp_path):
    done = _grid(tmp_path, "openbookqa flow:0\n", "0")
    assert done.returncode == 2 and "PARALLEL must be a positive integer, got 0" in done.stderr
    assert not (tmp_path / "out").exists()
