"""pyro_blora.diagnostics: a dead posterior is flagged, a live one is not; ``pyro-blora inspect`` prints the table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import pyro_blora
from pyro_blora.diagnostics import Diagnostics, diagnose, supports
from pyro_blora.experiments import cli
from pyro_blora.experiments import inspect as inspect_command
from toy import make_config, make_data, make_net


def _kinds(found: Diagnostics) -> set[tuple[str, Any]]:
    return {(flag.kind, flag.module) for flag in found.flags}


@pytest.fixture(scope="module")
def data() -> list[dict]:
    return make_data()


@pytest.fixture(scope="module")
def dead(data: list[dict]) -> Any:
    """Layer "0" Bayesian with its B means zeroed, layer "2" plain LoRA: the plain path carries the fit."""
    result = pyro_blora.fit(make_net(), data, "normal", config=make_config(bayesian_modules=["0"], prior_scale="fixed"), num_steps=20,
                            batch_size=8, lr=1e-2, progress=False)
    with torch.no_grad():
        result.guide.site_guide("0.lora_B").loc.zero_()
    return result


@pytest.fixture(scope="module")
def live(data: list[dict]) -> Any:
    """Both layers Bayesian, B means far from zero and wide guides (sd 0.5 of U, cap 1)."""
    result = pyro_blora.fit(make_net(), data, "normal", config=make_config(), num_steps=2, batch_size=8,
                            progress=False, guide_options={"scale_init": 0.5, "scale_max": 1.0})
    torch.manual_seed(3)
    with torch.no_grad():
        for name in ("0.lora_B", "2.lora_B"):
            result.guide.site_guide(name).loc.normal_(0.0, 3.0)
    return result


def test_a_bayesian_module_beside_a_plain_one_that_carries_the_fit_is_flagged_inert_and_collapsed(dead: Any, data: list) -> None:
    found = diagnose(dead, data)
    kinds = _kinds(found)
    assert ("inert", "0") in kinds and ("collapsed", "0") in kinds and ("collapsed", None) in kinds
    inert = next(f for f in found.flags if f.kind == "inert")
    assert "'2'" in inert.message and "carry the fit" in inert.message
    rows = {(r.module, r.factor): r for r in found.rows}
    assert set(rows) == {("0", "A"), ("0", "B"), ("2", "-")}
    assert rows["0", "B"].mean_ratio == 0.0  # E_q[W_B] = 0 exactly
    assert rows["2", "-"].mean_ratio > 1e-2 and not rows["2", "-"].bayesian
    assert rows["0", "B"].u_mean_rms == 0.0 and rows["0", "B"].sd_cap == pytest.approx(0.1)
    assert found.mutual_information < 5e-3 and not found.healthy


def test_a_flow_trained_beside_a_plain_module_is_flagged_collapsed(data: list) -> None:
    result = pyro_blora.fit(make_net(), data, "flow", config=make_config(bayesian_modules=["0"]), num_steps=10,
                            batch_size=8, progress=False)
    found = diagnose(result, data, num_samples=4)
    assert ("collapsed", None) in _kinds(found)
    assert found.family == "flow"
    assert all(r.u_sd is not None and r.u_sd < 0.05 for r in found.rows if r.bayesian)  # measured from draws


def test_a_wide_posterior_with_nonzero_factors_raises_no_flag(live: Any, data: list) -> None:
    found = diagnose(live, data)
    assert found.flags == [], found.format()
    assert found.healthy and found.mutual_information > 5e-3
    for row in found.rows:
        assert row.bayesian and row.mean_ratio > 1e-2 and row.spread > 1e-2
        assert row.u_sd == pytest.approx(0.5, rel=0.25)  # the Normal guide's sigma, measured from draws
        assert row.base_sd == pytest.approx(0.5, rel=0.05) and row.sd_cap == 1.0
        assert 0.0 < row.lam < 0.03


def test_the_adapter_ratio_is_what_the_layer_adds_to_its_base(dead: Any, data: list) -> None:
    found = diagnose(dead, data, batch_size=8)
    layer = next(layer for layer in dead.model.layers if layer.layer_name == "2")
    with torch.no_grad():
        # the input of layer "2": the Bayesian layer "0" adds nothing at its posterior mean (B = 0)
        x = torch.relu(dead.net[0].base(torch.stack([d["inputs"] for d in data[:8]])))
        delta = layer.scaling * x @ layer.lora_A_weight.T @ layer.lora_B_weight.T
        expected = float(delta.norm(dim=-1).mean() / layer.base(x).norm(dim=-1).mean())
    row = next(r for r in found.rows if r.module == "2")
    assert row.mean_ratio == pytest.approx(expected, rel=1e-4)


def test_a_map_result_is_named_a_point_mass_and_the_callers_rng_is_left_alone(data: list) -> None:
    result = pyro_blora.fit(make_net(), data, "delta", config=make_config(), num_steps=2, batch_size=8, progress=False)
    state = torch.random.get_rng_state()
    found = diagnose(result, data)
    assert torch.equal(state, torch.random.get_rng_state())
    assert ("point_mass", None) in _kinds(found) and not any(f.kind == "collapsed" for f in found.flags)
    assert found.deterministic and found.num_samples == 1
    assert all(r.lam == 0.0 and r.base_sd is None for r in found.rows)


def test_a_blob_result_is_read_too_its_layers_without_inducing_factors(data: list) -> None:
    result = pyro_blora.fit(make_net(), data, "blob", config=make_config(), num_steps=2, batch_size=8, progress=False)
    found = diagnose(result, data, num_samples=4)
    assert [(r.module, r.factor, r.u_sd) for r in found.rows] == [("0", "-", None), ("2", "-", None)]
    assert all(r.spread > 0 for r in found.rows)  # BLoB's A is random: the samples move the output
    assert found.family == "blob" and not found.deterministic


def test_to_dict_is_json_and_format_is_a_table(live: Any, dead: Any, data: list) -> None:
    found = diagnose(dead, data, num_samples=4)
    loaded = json.loads(found.to_json())
    assert loaded["rows"][0]["module"] == "0" and loaded["flags"][0]["kind"] == "inert"
    assert loaded["mutual_information"] == pytest.approx(found.mutual_information)
    text = found.format()
    assert text.splitlines()[0].split()[:3] == ["module", "factor", "adapter/base"]
    assert "[inert]" in text and "mutual information" in text
    assert "flags: none" in diagnose(live, data, num_samples=4).format()


def test_what_is_not_a_bayesian_lora_result_is_refused(data: list) -> None:
    assert not supports(object())
    with pytest.raises(TypeError, match="Bayesian-LoRA result"):
        diagnose(object(), data)
    with pytest.raises(ValueError, match="num_samples"):
        diagnose(object(), data, num_samples=1)


def test_inspect_prints_the_table_of_a_saved_adapter(dead: Any, data: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    dead.save(str(tmp_path / "adapter"))
    seen = {}

    def load_toy(folder: Path, split: str, num_examples: int) -> tuple[Any, list]:
        seen.update(folder=folder, split=split, num_examples=num_examples)
        return pyro_blora.load(folder, make_net()), data[:num_examples]

    monkeypatch.setattr(inspect_command, "LOADER", load_toy)
    assert cli.main(["inspect", str(tmp_path / "adapter"), "--num-examples", "16", "--num-samples", "4"]) == 0
    out = capsys.readouterr().out
    assert seen == {"folder": tmp_path / "adapter", "split": "validation", "num_examples": 16}
    assert out.splitlines()[0].startswith("module") and "[inert]" in out and "16 examples" in out
    assert cli.main(["inspect", str(tmp_path / "adapter"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flags"]


def test_inspect_refuses_bad_numbers_and_a_result_without_a_guide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", str(tmp_path), "--num-samples", "1"]) == 2
    assert "--num-samples must be >= 2" in capsys.readouterr().err
    monkeypatch.setattr(inspect_command, "LOADER", lambda folder, split, n: (object(), []))
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "not a Bayesian-LoRA posterior" in capsys.readouterr().err


@pytest.mark.slow
def test_inspect_reads_an_adapter_saved_by_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = ["--train-size", "12", "--validation-size", "6", "--test-size", "6", "--num-steps", "2",
            "--trainable-layers", "1", "--max-length", "48", "--num-samples", "2", "--batch-size", "4"]
    assert cli.main(["compare", *tiny, "--methods", "flow", "--output", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    folder = tmp_path / "run" / "flow"
    assert cli.main(["inspect", str(folder), "--num-examples", "4", "--num-samples", "2", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("module") and "4 examples" in out and "q_proj" in out
