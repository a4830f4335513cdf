"""MC dropout over the LoRA path: masks at prediction, the base model's dropout untouched, save/load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyro_blora
from pyro_blora import BLoRAConfig, MCDropoutResult
from pyro_blora.baselines.mc_dropout import DEFAULT_DROPOUT
import toy
from toy import N_CLASSES, N_FEATURES, make_data


pytestmark = pytest.mark.usefixtures("one_thread")


def make_net() -> nn.Module:
    """A classifier with its own dropout (index 2), which MC dropout must leave in eval mode."""
    return toy.make_net(dropout=0.5)


class QVNet(nn.Module):
    """Module names that BLoRAConfig's default target_modules (q_proj, v_proj) match."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.v_proj = nn.Linear(N_FEATURES, 16), nn.Linear(16, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v_proj(torch.relu(self.q_proj(x)))


def make_config(**changes) -> BLoRAConfig:
    values = dict(target_modules=["0", "3"], r=4, inducing_rows=4, inducing_cols=4, dropout=0.3, prior_sd=1.0)
    values.update(changes)
    return BLoRAConfig(**values)


def quick_fit(net=None, config=None, **options) -> MCDropoutResult:
    options = {"num_steps": 8, "lr": 2e-2, "batch_size": 8, "progress": False, **options}
    return pyro_blora.fit(net or make_net(), make_data(), "mc_dropout", config=config or make_config(), **options)


@pytest.fixture(scope="module")
def fitted() -> MCDropoutResult:
    return quick_fit()


def test_fit_dispatches_to_a_map_fit_with_dropout(fitted: MCDropoutResult) -> None:
    assert isinstance(fitted, MCDropoutResult) and fitted.method == "mc_dropout"
    assert fitted.guide.family_name == "delta" and fitted.dropout == 0.3
    assert not fitted.is_deterministic
    assert len(fitted.history["loss"]) == 8


@pytest.mark.parametrize("stack", [True, False])
def test_samples_differ_and_average_to_a_distribution(fitted: MCDropoutResult, stack: bool) -> None:
    data = make_data(12, seed=3)
    prediction = fitted.predict(data, num_samples=5, stack_samples=stack, seed=0)
    assert prediction.sample_probs.shape == (5, 12, N_CLASSES)
    # every mask is another network: no two samples agree on all examples
    flat = prediction.sample_probs.reshape(5, -1)
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(5) for j in range(i))
    torch.testing.assert_close(prediction.probs, prediction.sample_probs.mean(0))
    torch.testing.assert_close(prediction.probs.sum(-1), torch.ones(12))
    assert (prediction.probs >= 0).all()
    metrics = fitted.evaluate(data, num_samples=5)
    assert metrics["num_samples"] == 5 and metrics["mutual_information"] > 0


def test_seed_fixes_the_masks_and_spares_the_global_rng(fitted: MCDropoutResult) -> None:
    data = make_data(6, seed=4)
    state = torch.get_rng_state()
    first = fitted.predict(data, num_samples=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.sample_probs, fitted.predict(data, num_samples=3, seed=7).sample_probs)
    assert not torch.equal(first.sample_probs, fitted.predict(data, num_samples=3, seed=8).sample_probs)


def test_checkpoints_along_training_score_the_masked_predictive() -> None:
    from pyro_blora.training.callbacks import EvaluationSchedule

    data = make_data(12, seed=6)
    schedule = EvaluationSchedule({"validation": data}, [4, 8], num_samples=3, seed=5)
    result = quick_fit(callbacks=[schedule])
    last = schedule.last["validation"]
    # the callbacks saw the method's own result from the first step (a MAP FitResult has one sample, MI 0)
    assert last.num_samples == 3 and schedule.records[-1]["validation"]["mutual_information"] > 0
    # the last checkpoint is the finished fit's masked predictive, with the same masks
    assert torch.equal(last.sample_probs, result.predict(data, num_samples=3, seed=5).sample_probs)
    assert not torch.allclose(last.probs, result.as_map().predict(data).probs)


def test_dropout_forced_off_is_the_map_prediction() -> None:
    result = quick_fit()
    data = make_data(9, seed=5)
    map_prediction = result.as_map().predict(data)
    assert map_prediction.num_samples == 1
    for layer in result.model.layers:
        layer.dropout.p = 0.0
    prediction = result.predict(data, num_samples=4)
    # the base model's Dropout(0.5) would make these differ if it ran in train mode
    for sample in prediction.sample_probs:
        torch.testing.assert_close(sample, map_prediction.probs)


def test_only_the_lora_dropout_is_on_at_prediction(fitted: MCDropoutResult) -> None:
    base_dropout = fitted.net[2]
    seen: dict[str, list[bool]] = {"base": [], "lora": []}
    hooks = [base_dropout.register_forward_pre_hook(lambda m, a: seen["base"].append(m.training))]
    hooks += [
        layer.dropout.register_forward_pre_hook(lambda m, a: seen["lora"].append(m.training))
        for layer in fitted.model.layers
    ]
    try:
        fitted.predict(make_data(4), num_samples=2)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen["base"] and not any(seen["base"]) and len(seen["lora"]) >= 2 and all(seen["lora"])
    # the flags are put back afterwards
    assert not fitted.net.training and not any(layer.dropout.training for layer in fitted.model.layers)


def test_default_dropout_and_guide_option_override() -> None:
    options = {"num_steps": 2, "batch_size": 8, "progress": False}
    result = pyro_blora.fit(QVNet(), make_data(), "mc_dropout", **options)
    assert result.dropout == DEFAULT_DROPOUT
    assert [layer.dropout.p for layer in result.model.layers] == [DEFAULT_DROPOUT] * 2
    override = pyro_blora.fit(make_net(), make_data(), "mc_dropout", config=make_config(dropout=0.0), guide_options={"dropout": 0.2}, **options)
    assert override.dropout == 0.2 and override.model.layers[0].dropout.p == 0.2


def test_clear_errors() -> None:
    options = {"num_steps": 1, "progress": False}
    with pytest.raises(ValueError, match="MC dropout needs dropout > 0"):
        quick_fit(config=make_config(dropout=0.0), num_steps=1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['p'\] for method 'mc_dropout'"):
        pyro_blora.fit(make_net(), make_data(), "mc_dropout", config=make_config(), guide_options={"p": 0.1}, **options)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        pyro_blora.fit(make_net(), make_data(), "mc_dropout", config=make_config(), guide_options={"dropout": 1.5}, **options)
    net = make_net()
    pyro_blora.inject_adapters(net, make_config(dropout=0.0))
    with pytest.raises(ValueError, match="MC dropout needs dropout > 0 on the LoRA path"):
        pyro_blora.fit(net, make_data(), "mc_dropout", **options)
    with pytest.raises(ValueError, match="cannot change it"):
        pyro_blora.fit(net, make_data(), "mc_dropout", guide_options={"dropout": 0.1}, **options)
    plain = pyro_blora.fit(make_net(), make_data(), "delta", config=make_config(dropout=0.0), **options)
    with pytest.raises(ValueError, match="MC dropout needs dropout > 0"):
        MCDropoutResult.from_fit_result(plain)


def test_save_load_round_trip(tmp_path, fitted: MCDropoutResult) -> None:
    fitted.save(tmp_path / "mcd")
    loaded = pyro_blora.load(tmp_path / "mcd", make_net())
    assert isinstance(loaded, MCDropoutResult) and loaded.dropout == fitted.dropout
    data = make_data(8, seed=6)
    expected = fitted.predict(data, num_samples=3, seed=11)
    again = loaded.predict(data, num_samples=3, seed=11)
    torch.testing.assert_close(again.sample_probs, expected.sample_probs)
    torch.testing.assert_close(loaded.as_map().predict(data).probs, fitted.as_map().predict(data).probs)


def test_resume_keeps_the_method(tmp_path) -> None:
    options = {"num_steps": 6, "checkpoint_every": 3, "checkpoint_dir": str(tmp_path / "ckpt")}
    full = quick_fit(**options)
    resumed = quick_fit(resume_from=tmp_path / "ckpt", **options)
    assert isinstance(resumed, MCDropoutResult)
    for key, value in full.trainable_state().items():
        torch.testing.assert_close(resumed.trainable_state()[key], value)
