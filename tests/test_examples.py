"""Smoke tests of every script in ``examples/`` (as Pyro does): each runs ``main(["--smoke", ...])``.

An example without an entry in :data:`SMOKE_ARGS` fails :func:`test_every_example_has_a_smoke_test`.
The scripts are imported by path, so ``examples/`` never goes on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from pyro_blora.tasks.benchmarks import resolve_data_dir

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
HAS_DATA = (resolve_data_dir() / "ARC-Easy").is_dir()

# script -> extra arguments after ["--smoke", "--output", <tmp>]
SMOKE_ARGS: dict[str, list[str]] = {
    "quickstart.py": [],
    "swap_guides.py": [],
    "posterior_predictive_plots.py": [],
    "benchmark.py": ["--tasks", "arc_easy", "--methods", "delta", "flow"],
}

# files each script promises under --output
OUTPUTS: dict[str, list[str]] = {
    "quickstart.py": ["metrics.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"],
    "swap_guides.py": ["swap_guides.md", "reliability.png", "q_u_marginals.png"],
    "posterior_predictive_plots.py": [
        "posterior_predictive.png", "reliability.png", "risk_coverage.png", "training_curves_delta.png",
        "training_curves_flow.png", "uncertainty_shift.png", "q_u_marginals.png",
    ],
    "benchmark.py": ["benchmark.md", "arc_easy/summary.md", "arc_easy/reliability.png"] if HAS_DATA else [],
}


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{Path(name).stem}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_smoke_test() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(SMOKE_ARGS)
    assert set(OUTPUTS) == set(SMOKE_ARGS)


@pytest.mark.parametrize("name", sorted(SMOKE_ARGS))
def test_example_smoke(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    module = load_example(name)
    assert module.__doc__, f"{name} needs a module docstring saying what it shows"
    module.main(["--smoke", "--output", str(tmp_path), *SMOKE_ARGS[name]])
    for relative in OUTPUTS[name]:
        path = tmp_path / relative
        assert path.is_file(), f"{name} did not write {relative}"
        assert path.stat().st_size > 0, f"{name} wrote an empty {relative}"
    if name == "benchmark.py" and not HAS_DATA:
        assert "benchmark data not found" in capsys.readouterr().out


def test_benchmark_without_data_exits_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-data-here"
    status = load_example("benchmark.py").main(["--smoke", "--output", str(tmp_path / "out"), "--data-dir", str(missing)])
    assert status == 0
    out = capsys.readouterr().out
    assert "benchmark data not found" in out and str(missing.resolve()) in out
    assert not (tmp_path / "out").exists()
