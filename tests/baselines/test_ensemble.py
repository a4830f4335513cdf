"""Deep ensembles of LoRA adapters: members, the mixture predictive, stacked vs swapped, save/load, combining runs."""

from __future__ import annotations

import pytest
import torch

import pyro_blora
from pyro_blora import EnsembleResult, Prediction, combine_predictions
from toy import N_CLASSES, make_config, make_data, make_net


pytestmark = pytest.mark.usefixtures("one_thread")


OPTIONS = {"num_steps": 6, "lr": 2e-2, "batch_size": 8, "progress": False}


def quick_ensemble(config=None, guide_options=None, **options) -> EnsembleResult:
    return pyro_blora.fit(
        make_net(), make_data(), "ensemble", config=config or make_config(), guide_options=guide_options,
        **{**OPTIONS, **options},
    )


@pytest.fixture(scope="module")
def ensemble() -> EnsembleResult:
    """Bayesian members with the fixed prior scale, so that they share one stacked forward."""
    return quick_ensemble(config=make_config(prior_scale="fixed"), seed=5)


def test_members_with_their_own_prior_gain_predict_one_by_one_and_average() -> None:
    result = quick_ensemble(guide_options={"size": 2}, num_steps=3)  # the default, empirical-Bayes prior scale
    assert not result.can_stack()
    data = make_data(5, seed=7)
    members = member_predictions(result, data)
    torch.testing.assert_close(result.predict(data).probs, (members[0].probs + members[1].probs) / 2)


def member_predictions(result: EnsembleResult, data, **options) -> list[Prediction]:
    out = []
    for m in range(result.size):
        with result.member(m) as member:
            out.append(member.predict(data, **options))
    return out


def test_members_differ_and_carry_their_seeds(ensemble: EnsembleResult) -> None:
    assert ensemble.size == 3 and ensemble.method == "ensemble" and not ensemble.is_deterministic
    assert [m.seed for m in ensemble.members] == [5, 6, 7]
    assert [len(h["loss"]) for h in ensemble.history] == [6, 6, 6]
    states = [m.state for m in ensemble.members]
    assert set(states[0]) == set(ensemble.template.trainable_state())  # a member is only adapter tensors
    for i in range(3):
        for j in range(i):
            assert any(not torch.equal(states[i][k], states[j][k]) for k in states[i])
    probs = [p.probs for p in member_predictions(ensemble, make_data(6, seed=2))]
    assert not torch.allclose(probs[0], probs[1]) and not torch.allclose(probs[1], probs[2])


def test_prediction_is_the_mean_of_the_members(ensemble: EnsembleResult) -> None:
    data = make_data(9, seed=3)
    members = member_predictions(ensemble, data)
    prediction = ensemble.predict(data)
    assert prediction.sample_probs.shape == (3, 9, N_CLASSES)  # one slice per MAP member
    torch.testing.assert_close(prediction.probs, torch.stack([p.probs for p in members]).mean(0))
    for m in range(3):
        torch.testing.assert_close(prediction.sample_probs[m], members[m].probs)
    assert torch.equal(prediction.labels, members[0].labels)
    metrics = ensemble.evaluate(data)
    assert metrics["num_samples"] == 3 and metrics["mutual_information"] > 0


def test_stacked_and_swapped_paths_agree(ensemble: EnsembleResult) -> None:
    assert ensemble.can_stack()
    data = make_data(7, seed=4)
    stacked, swapped = ensemble.predict(data, stack_samples=True), ensemble.predict(data, stack_samples=False)
    torch.testing.assert_close(stacked.sample_probs, swapped.sample_probs)
    torch.testing.assert_close(stacked.probs, swapped.probs)


def test_bayesian_members_stack_their_own_samples() -> None:
    result = quick_ensemble(config=make_config(prior_scale="fixed"), guide_options={"size": 2, "member": "normal"}, num_steps=3)
    assert result.guide.family_name == "normal"
    data = make_data(5, seed=6)
    stacked = result.predict(data, num_samples=3, seed=1)
    swapped = result.predict(data, num_samples=3, seed=1, stack_samples=False)
    assert stacked.sample_probs.shape == (6, 5, N_CLASSES)  # 2 members x 3 draws
    torch.testing.assert_close(stacked.sample_probs, swapped.sample_probs)
    torch.testing.assert_close(stacked.probs, swapped.probs)


def test_plain_lora_layers_fall_back_to_swapping() -> None:
    result = quick_ensemble(config=make_config(bayesian_modules=["2"]), guide_options={"size": 2}, num_steps=3)
    assert not result.can_stack()
    data = make_data(5, seed=7)
    members = member_predictions(result, data)
    torch.testing.assert_close(result.predict(data).probs, (members[0].probs + members[1].probs) / 2)
    # member 0's own plain-LoRA weights are back in the shared modules after predict
    layer = result.model.layers[0]
    assert torch.equal(layer.lora_A_weight, result.members[0].state[f"net.{layer.layer_name}.lora_A_weight"])


def test_save_load_round_trip(tmp_path, ensemble: EnsembleResult) -> None:
    ensemble.save(tmp_path / "ens")
    assert sorted(p.name for p in (tmp_path / "ens").iterdir()) == ["member_0", "member_1", "member_2", "method.json"]
    loaded = pyro_blora.load(tmp_path / "ens", make_net())
    assert isinstance(loaded, EnsembleResult) and [m.seed for m in loaded.members] == [5, 6, 7]
    data = make_data(8, seed=8)
    expected = ensemble.predict(data)
    again = loaded.predict(data)
    torch.testing.assert_close(again.sample_probs, expected.sample_probs)
    torch.testing.assert_close(again.probs, expected.probs)


def test_from_results_is_a_checkpoint_ensemble_of_separate_runs() -> None:
    runs = [pyro_blora.fit(make_net(), make_data(), "delta", config=make_config(), seed=s, **OPTIONS) for s in (0, 1)]
    data = make_data(6, seed=9)
    per_run = [r.predict(data) for r in runs]
    before = runs[0].state_dict_copy()
    ensemble = EnsembleResult.from_results(runs)
    prediction = ensemble.predict(data, stack_samples=False)
    combined = combine_predictions(per_run)
    torch.testing.assert_close(prediction.probs, combined.probs)
    torch.testing.assert_close(prediction.sample_probs, combined.sample_probs)
    torch.testing.assert_close(ensemble.predict(data).probs, combined.probs)  # the stacked path too
    for key, value in runs[0].trainable_state().items():  # the first run's adapters are its own again
        assert torch.equal(value, before[key])


def test_combine_predictions_from_saved_probabilities() -> None:
    labels = torch.tensor([0, 2, 1])
    a = torch.softmax(torch.randn(2, 3, 3), -1)
    b = torch.softmax(torch.randn(2, 3, 3), -1)
    combined = combine_predictions([Prediction(a.mean(0), a, labels), Prediction(b.mean(0), b, labels)])
    assert combined.sample_probs.shape == (4, 3, 3)
    torch.testing.assert_close(combined.probs, (a.mean(0) + b.mean(0)) / 2)
    assert torch.equal(combined.labels, labels)


def test_per_member_checkpoints_resume(tmp_path) -> None:
    options = {"checkpoint_dir": str(tmp_path / "ckpt"), "checkpoint_every": 3, "guide_options": {"size": 2}}
    first = quick_ensemble(**options)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["member_0", "member_1"]
    resumed = quick_ensemble(resume_from=tmp_path / "ckpt", **options)
    for before, after in zip(first.members, resumed.members):
        for key, value in before.state.items():
            torch.testing.assert_close(after.state[key], value)


def test_clear_errors(ensemble: EnsembleResult) -> None:
    with pytest.raises(ValueError, match="ensemble size must be an integer >= 2"):
        pyro_blora.fit(make_net(), make_data(), "ensemble", config=make_config(), guide_options={"size": 1}, **OPTIONS)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['k'\] for method 'ensemble'"):
        pyro_blora.fit(make_net(), make_data(), "ensemble", config=make_config(), guide_options={"k": 3}, **OPTIONS)
    with pytest.raises(ValueError, match="ensemble members cannot be 'ensemble'"):
        pyro_blora.fit(make_net(), make_data(), "ensemble", config=make_config(), guide_options={"member": "ensemble"}, **OPTIONS)
    with pytest.raises(ValueError, match="at least 2 results"):
        EnsembleResult.from_results([ensemble.template])
    other = pyro_blora.fit(make_net(), make_data(), "normal", config=make_config(), **OPTIONS)
    with pytest.raises(ValueError, match="another guide or BLoRAConfig"):
        EnsembleResult.from_results([ensemble.template, other])
    with pytest.raises(ValueError, match="at least one Prediction"):
        combine_predictions([])
    p = Prediction(torch.full((2, 3), 1 / 3), torch.full((1, 2, 3), 1 / 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same num_samples"):
        combine_predictions([p, Prediction(p.probs, p.sample_probs.repeat(2, 1, 1), p.labels)])
    with pytest.raises(ValueError, match="not of the same examples"):
        combine_predictions([p, Prediction(p.probs, p.sample_probs, torch.tensor([1, 1]))])
    with pytest.raises(IndexError, match="out of range"):
        with ensemble.member(3):
            pass
