"""Inference with a fixed draw merged into the frozen weight: the same outputs, only where it is exact and pays."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyro_blora import BLoRAConfig
from pyro_blora.models import BayesianLoRALinear
from pyro_blora.models.merging import adapter_path, merge_pays


def config(**kw):
    kw.setdefault("dropout", 0.0)
    return BLoRAConfig(target_modules=["lin"], r=4, inducing_rows=3, inducing_cols=3, **kw)


@pytest.fixture
def merges_seen(monkeypatch):
    """The layers' calls of ``merged_weight``, counted (a merged forward calls it once)."""
    import pyro_blora.models.layer as layer_module

    calls = []
    real = layer_module.merged_weight

    def record(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_module, "merged_weight", record)
    return calls


def unmerged(layer: BayesianLoRALinear, x: torch.Tensor) -> torch.Tensor:
    a, b = layer.adapter_weights()
    return layer.base(x) + layer.update_scale * (x @ a.T @ b.T)


@pytest.mark.parametrize("bayesian", [True, False])
@pytest.mark.parametrize("prior_scale", ["fixed", "empirical_bayes"])
def test_merged_forward_equals_the_adapter_path(bayesian, prior_scale, merges_seen):
    torch.manual_seed(0)
    layer = BayesianLoRALinear(nn.Linear(12, 6), "lin", config(prior_scale=prior_scale), bayesian=bayesian)
    if bayesian:
        layer.model()
    else:
        nn.init.normal_(layer.lora_B_weight)
    x = torch.randn(3, 8, 12)  # 24 tokens >= 12 * 6 / 18: the merge pays
    with torch.no_grad():
        merged = layer(x)
        assert merges_seen == [(6, 12)]
        torch.testing.assert_close(merged, unmerged(layer, x), rtol=1e-5, atol=1e-6)


def test_merged_forward_follows_a_new_draw_and_an_in_place_edit():
    torch.manual_seed(1)
    layer = BayesianLoRALinear(nn.Linear(12, 6), "lin", config(), bayesian=False)
    nn.init.normal_(layer.lora_B_weight)
    x = torch.randn(40, 12)
    with torch.no_grad():
        first = layer(x)
        layer.lora_A_weight.mul_(2.0)  # an optimiser step edits the factor in place
        torch.testing.assert_close(layer(x), unmerged(layer, x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(layer(x), first)
        a, b = torch.randn(4, 12), torch.randn(6, 4)
        layer.set_adapter_weights(a, b)
        torch.testing.assert_close(layer(x), layer.base(x) + layer.update_scale * x @ a.T @ b.T, rtol=1e-5, atol=1e-5)


def test_no_merge_where_it_would_change_the_result_or_not_pay(merges_seen):
    torch.manual_seed(2)
    x = torch.randn(40, 12)

    def merges(layer, inp=x, grad=False):
        merges_seen.clear()
        with torch.set_grad_enabled(grad):
            layer(inp)
        return bool(merges_seen)

    layer = BayesianLoRALinear(nn.Linear(12, 6), "lin", config(), bayesian=False)
    assert merges(layer)
    assert not merges(layer, grad=True)  # training and Laplace's Jacobians take the adapter path
    assert not merges(layer, inp=torch.randn(2, 12))  # 2 tokens: the merge costs more than it saves
    layer.merge_for_inference = False
    assert not merges(layer)
    half = BayesianLoRALinear(nn.Linear(12, 6).to(torch.bfloat16), "lin", config(), bayesian=False)
    assert not merges(half, inp=x.to(torch.bfloat16))  # W0 + sBA in bf16 would lose the update
    converted = BayesianLoRALinear(nn.Linear(12, 6), "lin", config(), bayesian=False).to(torch.bfloat16)
    assert not merges(converted, inp=x.to(torch.bfloat16))  # converted after construction: checked per call
    dropout = BayesianLoRALinear(nn.Linear(12, 6), "lin", config(dropout=0.5), bayesian=False)
    assert not merges(dropout.train())  # MC dropout: a mask per forward
    assert merges(dropout.eval())
    stacked = BayesianLoRALinear(nn.Linear(12, 6), "lin", config())
    stacked.set_adapter_weights(torch.randn(3, 4, 12), torch.randn(3, 6, 4))
    assert not merges(stacked, inp=torch.randn(3 * 40, 12))


def test_merge_pays_at_the_multiply_add_break_even():
    assert merge_pays(288, 576, 576) and not merge_pays(287, 576, 576)
    assert not merge_pays(512, 576, 49152) and merge_pays(570, 576, 49152)


def test_adapter_path_turns_merging_off_and_restores_it():
    layers = [BayesianLoRALinear(nn.Linear(12, 6), "lin", config(), bayesian=False) for _ in range(2)]
    layers[1].merge_for_inference = False
    with adapter_path(layers):
        assert not any(layer.merge_for_inference for layer in layers)
    assert layers[0].merge_for_inference and "merge_for_inference" not in layers[0].__dict__
    assert not layers[1].merge_for_inference


def test_a_fitted_posterior_predicts_the_same_merged_or_not(merges_seen):
    import pyro_blora
    from toy import make_config, make_data, make_net

    data = make_data(n=64)
    result = pyro_blora.fit(make_net(), data, "flow", config=make_config(), num_steps=5, batch_size=16, progress=False)
    merged = result.predict(data, num_samples=3, batch_size=64)
    assert sorted(merges_seen) == sorted([(32, 16), (3, 32)] * 3)  # 64 rows: both layers merged, every draw
    merges_seen.clear()
    with adapter_path(result.model.layers):
        unmerged_ = result.predict(data, num_samples=3, batch_size=64)
    assert not merges_seen
    torch.testing.assert_close(merged.sample_probs, unmerged_.sample_probs, rtol=1e-5, atol=1e-6)
