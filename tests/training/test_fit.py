"""pyro_blora.fit: the MAP limit is plain LoRA, the training loop's options, its errors, and tiny transformers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import pyro_blora
from pyro_blora import BLoRAConfig
from toy import N_CLASSES, make_config, make_data, make_net



pytestmark = pytest.mark.usefixtures("one_thread")


def quick_fit(guide="normal", data=None, net=None, config=None, **options):
    options = {"num_steps": 5, "lr": 1e-2, "batch_size": 16, "progress": False, **options}
    return pyro_blora.fit(net or make_net(), data or make_data(), guide, config=config or make_config(), **options)


def stacked_inputs(data: list[dict]) -> torch.Tensor:
    return torch.stack([example["inputs"] for example in data])


# ---------------------------------------------------------------- MAP = plain LoRA


def test_delta_guide_is_exactly_a_plain_lora_forward() -> None:
    config = make_config(alpha=8.0)
    data = make_data()
    result = quick_fit("delta", data=data, config=config, num_steps=10)
    assert result.is_deterministic
    weights = result.guide.mean_weights()
    x = stacked_inputs(data)

    def lora(layer, h: torch.Tensor) -> torch.Tensor:
        a, b = weights[layer.lora_A.site_w], weights[layer.lora_B.site_w]
        assert a.shape == (config.r, layer.in_features) and b.shape == (layer.out_features, config.r)
        return layer.base(h) + (config.alpha / config.r) * layer.prior_gain() * h @ a.T @ b.T

    first, last = result.model.layers
    with torch.no_grad():
        logits = lora(last, torch.relu(lora(first, x)))
    expected = torch.softmax(logits, dim=-1)

    prediction = result.predict(data, num_samples=3, seed=0)
    assert prediction.num_samples == 1  # a point mass has one draw whatever num_samples says
    torch.testing.assert_close(prediction.probs, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(prediction.sample_probs[0], expected, atol=1e-6, rtol=0)
    assert torch.equal(prediction.labels, torch.tensor([e["labels"] for e in data]))

    # a draw of the guide is the posterior mean: lambda = 0 and q(U) is a point mass
    draw = result.guide()
    for name, value in weights.items():
        torch.testing.assert_close(draw[name], value, atol=1e-7, rtol=1e-6)

    # use_posterior_mean: the adapted network now runs as a plain module
    result.use_posterior_mean()
    with torch.no_grad():
        torch.testing.assert_close(result.net(x), logits, atol=1e-6, rtol=0)


def test_use_posterior_mean_runs_the_net_without_pyro() -> None:
    data = make_data()
    result = quick_fit("normal", data=data)
    net = result.net
    result.predict(data, num_samples=3, stack_samples=True)  # leaves 3 stacked draws in the layers
    x = stacked_inputs(data)[:5]  # 5 rows cannot hold 3 stacked draws
    with pytest.raises(ValueError, match="cannot hold 3 stacked posterior samples"):
        net(x)
    result.use_posterior_mean()
    means = result.guide.mean_weights()  # exact for the Gaussian guide: E[W] = s T_r loc T_c
    with torch.no_grad():
        out = net(x)
        h = x
        for i, layer in enumerate(result.model.layers):
            a, b = means[layer.lora_A.site_w], means[layer.lora_B.site_w]
            h = layer.base(h) + layer.update_scale * h @ a.T @ b.T
            if i == 0:
                h = torch.relu(h)
    assert out.shape == (5, N_CLASSES)
    torch.testing.assert_close(out, h, atol=1e-6, rtol=0)


def test_use_posterior_mean_with_a_flow() -> None:
    result = quick_fit("flow")
    result.use_posterior_mean()  # a Monte Carlo mean of q(U)
    for layer in result.model.layers:
        a, b = layer.adapter_weights()
        assert a.shape == (4, layer.in_features) and b.shape == (layer.out_features, 4)
    with torch.no_grad():
        assert torch.isfinite(result.net(stacked_inputs(make_data(5)))).all()


def test_loaded_net_needs_weights_before_a_plain_forward(tmp_path) -> None:
    net = make_net()
    fresh = copy.deepcopy(net)
    result = quick_fit("normal", net=net)
    result.save(tmp_path)
    loaded = pyro_blora.load(tmp_path, fresh)
    x = stacked_inputs(make_data())[:4]
    with pytest.raises(RuntimeError, match="use_posterior_mean"):
        loaded.net(x)
    loaded.use_posterior_mean()
    assert loaded.net(x).shape == (4, N_CLASSES)


# ---------------------------------------------------------------- the training loop


def test_kl_warmup_ramps_beta_to_kl_weight() -> None:
    result = quick_fit(num_steps=10, kl_weight=0.3, kl_warmup=0.5)
    beta = result.history["beta"]
    expected = [0.3 * min(1.0, (t + 1) / 5) for t in range(10)]
    assert beta == pytest.approx(expected)
    assert all(b1 <= b2 for b1, b2 in zip(beta, beta[1:]))
    assert beta[-1] == pytest.approx(0.3)
    # no warm-up: full weight from the first step
    assert quick_fit(num_steps=3, kl_weight=0.7, kl_warmup=0.0).history["beta"] == pytest.approx([0.7] * 3)


def test_history_and_seed_reproducibility() -> None:
    first = quick_fit(num_steps=4)
    second = quick_fit(num_steps=4)
    assert first.history["step"] == [1.0, 2.0, 3.0, 4.0]
    for key in ("loss", "elbo", "nll", "kl", "beta", "lr"):
        assert len(first.history[key]) == 4
        assert all(math.isfinite(v) for v in first.history[key]), key
    assert first.history["loss"] == second.history["loss"]


def test_num_particles_two() -> None:
    result = quick_fit("flow", num_steps=3, num_particles=2)
    assert result.train_config.num_particles == 2
    assert len(result.history["loss"]) == 3
    assert all(math.isfinite(v) for v in result.history["elbo"])


def test_early_stopping_stops_when_validation_nll_stalls() -> None:
    # lr so small that nothing moves: the (deterministic, MAP) validation NLL never improves
    data = make_data()
    result = quick_fit(
        "delta", data=data, val_data=make_data(12, seed=1), num_steps=50, lr=1e-30, eval_every=2,
        early_stopping_patience=2,
    )
    # checks at steps 2 (best), 4 and 6 (no improvement) -> stop after step 6
    assert len(result.history["step"]) == 6
    assert [v["step"] for v in result.validation] == [2, 4, 6]
    assert len({v["nll"] for v in result.validation}) == 1
    assert {"acc", "ece", "nll"} <= set(result.validation[0])


def test_early_stopping_restores_the_best_validation_state() -> None:
    val = make_data(12, seed=1)
    result = quick_fit(
        "delta", data=make_data(seed=2), val_data=val, num_steps=12, lr=0.5, schedule="constant",
        eval_every=1, early_stopping_patience=3,
    )
    nlls = [v["nll"] for v in result.validation]
    best = min(nlls)
    assert len(result.history["step"]) < 12  # it stopped early ...
    assert nlls[-1] > best  # ... after the best check, whose state comes back
    assert result.evaluate(val)["nll"] == pytest.approx(best, rel=1e-6)


def test_validation_without_patience_only_records() -> None:
    result = quick_fit("delta", val_data=make_data(12, seed=1), num_steps=4, eval_every=2)
    assert [v["step"] for v in result.validation] == [2, 4]
    assert len(result.history["step"]) == 4


def test_callback_returning_true_stops() -> None:
    seen: list[int] = []

    def watch(state) -> None:
        seen.append(state.step)

    def stop_at_three(state) -> bool:
        assert state.result.history is state.history
        assert state.total_steps == 20
        return state.step >= 3

    result = quick_fit(num_steps=20, callbacks=[watch, stop_at_three])
    assert seen == [1, 2, 3]
    assert len(result.history["step"]) == 3


# ---------------------------------------------------------------- errors


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown TrainConfig option\(s\) \['num_stepz'\]; valid options: \[.*'num_steps'"):
        pyro_blora.fit(make_net(), make_data(), "normal", config=make_config(), num_stepz=3)
    with pytest.raises(ValueError, match=r"unknown BLoRAConfig option\(s\) \['rank'\]; valid options: \[.*'r'"):
        pyro_blora.fit(make_net(), make_data(), "normal", config={"target_modules": ["0"], "rank": 4}, num_steps=1)


def test_unknown_guide_name_lists_the_guides() -> None:
    with pytest.raises(ValueError, match=r"unknown guide 'flows'; choose one of \['delta', 'flow', 'mvn', 'normal'\]"):
        quick_fit("flows")


def test_empty_dataset() -> None:
    with pytest.raises(ValueError, match="the dataset is empty"):
        pyro_blora.fit(make_net(), [], "normal", config=make_config(), num_steps=1, progress=False)


def test_labels_out_of_range() -> None:
    data = make_data(8)
    data[3] = {**data[3], "labels": 5}
    with pytest.raises(ValueError, match=r"labels \[5\] out of range for 3 classes \(valid: 0\.\.2\)"):
        quick_fit(data=data, batch_size=8, num_steps=1)
    data[3] = {**data[3], "labels": -1}
    with pytest.raises(ValueError, match=r"labels \[-1\] out of range for 3 classes"):
        quick_fit(data=data, batch_size=8, num_steps=1)


def test_float_labels() -> None:
    data = [{**example, "labels": float(example["labels"])} for example in make_data(8)]
    with pytest.raises(ValueError, match="labels must be integer class indices, got dtype torch.float"):
        quick_fit(data=data, batch_size=8, num_steps=1)


def test_predict_rejects_zero_samples() -> None:
    result = quick_fit(num_steps=1)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        result.predict(make_data(4), num_samples=0)


# ---------------------------------------------------------------- bayesian_modules


def test_bayesian_modules_selects_a_subset() -> None:
    config = make_config(bayesian_modules=["2"])
    result = quick_fit("normal", config=config, num_steps=10, lr=5e-2)
    first, last = result.model.layers
    assert not first.bayesian and last.bayesian
    assert first.factors == [] and not hasattr(first, "lora_A")
    assert set(result.guide.sites) == {"2__lora_A", "2__lora_B"}
    assert [f.site_name for f in result.model.factors] == ["2.lora_A", "2.lora_B"]
    # the point layer's factors are plain LoRA parameters, trained (B starts at zero)
    assert first.lora_A_weight.requires_grad and first.lora_B_weight.requires_grad
    assert first.lora_B_weight.abs().sum() > 0
    state = result.trainable_state()
    assert {"net.0.lora_A_weight", "net.0.lora_B_weight"} <= set(state)
    assert not any(key.startswith("guide.sites.0__") for key in state)
    # the guide samples only the Bayesian layer's sites
    assert set(result.guide()) == {"2.lora_A.W", "2.lora_B.W"}


def test_bayesian_modules_matching_nothing() -> None:
    with pytest.raises(ValueError, match=r"bayesian_modules \['5'\] matched none of the targeted modules"):
        quick_fit(config=make_config(bayesian_modules=["5"]))


# ---------------------------------------------------------------- tiny transformers


def token_data(n: int = 12, length: int = 6, vocab: int = 64, seed: int = 0) -> list[dict]:
    """Examples as dicts of tensors; token 1..vocab-1 (0 is the pad id), label from the first token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long), "labels": int(ids[i, 0]) % 3}
        for i in range(n)
    ]


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, num_labels=3, pad_token_id=0)
    return GPT2ForSequenceClassification(config)


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=16, num_labels=3, pad_token_id=0,
    )
    return LlamaForSequenceClassification(config)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64,
        max_position_embeddings=16, num_labels=3, pad_token_id=0,
    )
    return BertForSequenceClassification(config)


TRANSFORMERS = [
    pytest.param(tiny_gpt2, ["c_attn"], "flow", id="gpt2-conv1d"),
    pytest.param(tiny_llama, ["q_proj", "v_proj"], "normal", id="llama"),
    pytest.param(tiny_bert, ["query", "value"], "mvn", id="bert"),
]


@pytest.mark.parametrize(("build", "targets", "guide"), TRANSFORMERS)
def test_fit_tiny_transformer(build, targets, guide) -> None:
    net = build()
    data = token_data()
    config = BLoRAConfig(target_modules=targets, r=2, inducing_rows=3, inducing_cols=3)
    result = pyro_blora.fit(net, data, guide, config=config, num_steps=3, batch_size=4, lr=1e-2, progress=False)
    layers = result.model.layers
    assert len(layers) == 2 * len(targets)  # two blocks
    assert all(layer.layer_name.rsplit(".", 1)[-1] in targets for layer in layers)
    assert len(result.history["loss"]) == 3
    assert all(math.isfinite(v) for v in result.history["elbo"])
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)

    stacked = result.predict(data, num_samples=3, seed=0, stack_samples=True, batch_size=5)
    looped = result.predict(data, num_samples=3, seed=0, stack_samples=False, batch_size=5)
    assert stacked.sample_probs.shape == (3, len(data), 3)
    torch.testing.assert_close(stacked.sample_probs, looped.sample_probs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(stacked.probs, looped.probs, atol=1e-5, rtol=1e-4)
    assert torch.allclose(stacked.probs.sum(-1), torch.ones(len(data)))
    # the draws differ: this is a posterior, not a point estimate
    assert not torch.equal(stacked.sample_probs[0], stacked.sample_probs[1])


def test_stack_samples_matches_looping_on_the_mlp() -> None:
    data = make_data()
    result = quick_fit("flow", data=data)
    stacked = result.predict(data, num_samples=4, seed=3, stack_samples=True, batch_size=7)
    looped = result.predict(data, num_samples=4, seed=3, stack_samples=False, batch_size=7)
    torch.testing.assert_close(stacked.probs, looped.probs, atol=1e-6, rtol=1e-5)
    other_seed = result.predict(data, num_samples=4, seed=4)
    assert not torch.equal(stacked.probs, other_seed.probs)


def test_fit_on_an_adapted_network_keeps_its_config(tmp_path) -> None:
    net = make_net()
    fresh = copy.deepcopy(net)
    config = make_config(r=2, alpha=4.0)
    first = quick_fit("normal", net=net, config=config)
    first.save(tmp_path / "first")
    loaded = pyro_blora.load(tmp_path / "first", copy.deepcopy(fresh))
    # continue training the loaded posterior: the adapters' own settings are recorded
    more = pyro_blora.fit(loaded.net, make_data(), loaded.guide, num_steps=2, progress=False)
    assert more.config == config
    assert more.guide is loaded.guide
    more.save(tmp_path / "more")
    again = pyro_blora.load(tmp_path / "more", copy.deepcopy(fresh))
    assert [layer.r for layer in again.model.layers] == [2, 2]
    with pytest.raises(ValueError, match="already carries adapters built with another BLoRAConfig"):
        pyro_blora.fit(loaded.net, make_data(), "normal", config=make_config(), num_steps=1, progress=False)


def test_guide_option_typo_names_valid_options():
    from pyro_blora.guides.network import guide_factory

    with pytest.raises(ValueError, match=r"unknown option\(s\) \['transform'\] for guide FlowGuide; valid options: .*'transforms'"):
        guide_factory("flow", transform=["planar"])


def test_validation_options_need_validation_data():
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    data = [{"inputs": torch.randn(4), "labels": 0}] * 4
    with pytest.raises(ValueError, match="need val_data"):
        pyro_blora.fit(net, data, config=pyro_blora.BLoRAConfig(target_modules=["0"]), eval_every=2, progress=False)


def test_method_is_another_name_for_a_registered_guide_and_is_given_once() -> None:
    from pyro_blora.baselines.mc_dropout import MCDropoutResult

    result = pyro_blora.fit(make_net(), make_data(), method="mc_dropout", config=make_config(dropout=0.1),
                            num_steps=1, batch_size=8, progress=False)
    assert isinstance(result, MCDropoutResult)
    with pytest.raises(ValueError, match=r"give the method once: guide='delta' and method='flow'"):
        pyro_blora.fit(make_net(), make_data(), "delta", method="flow", num_steps=1, progress=False)
