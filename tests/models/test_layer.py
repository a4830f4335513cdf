"""The adapted layer, its priors, and the parameter budget against the paper's."""

from __future__ import annotations

import pytest
import torch
from pyro import poutine
from torch import nn

from pyro_blora import BLoRAConfig, inject_adapters
from pyro_blora.guides import BayesianLoRAGuide
from pyro_blora.models import BayesianLoRALinear, GPPrior, InducingPrior, NormalPrior, build_prior


def config(**kw):
    return BLoRAConfig(target_modules=["lin"], r=4, inducing_rows=3, inducing_cols=3, dropout=0.0, **kw)


def test_layer_samples_named_sites_and_adds_low_rank_update():
    base = nn.Linear(10, 6)
    layer = BayesianLoRALinear(base, "lin", config())
    trace = poutine.trace(layer.model).get_trace()
    names = [n for n, s in trace.nodes.items() if s["type"] == "sample"]
    assert names == ["lin.lora_A.U", "lin.lora_A.W", "lin.lora_B.U", "lin.lora_B.W"]
    a, b = layer.adapter_weights()
    assert a.shape == (4, 10) and b.shape == (6, 4)
    x = torch.randn(5, 10)
    torch.testing.assert_close(layer(x), base(x) + layer.update_scale * x @ a.T @ b.T)
    assert not any(p.requires_grad for p in base.parameters())


def test_stacked_samples_use_their_own_weights():
    layer = BayesianLoRALinear(nn.Linear(10, 6), "lin", config())
    draws = [layer.model() for _ in range(3)]
    layer.set_adapter_weights(torch.stack([a for a, _ in draws]), torch.stack([b for _, b in draws]))
    x = torch.randn(2, 7, 10)
    out = layer(x.repeat(3, 1, 1)).reshape(3, 2, 7, 6)
    for s, (a, b) in enumerate(draws):
        torch.testing.assert_close(out[s], layer.base(x) + layer.update_scale * x @ a.T @ b.T)


def test_unsampled_layer_explains_itself():
    layer = BayesianLoRALinear(nn.Linear(4, 4), "blocks.3.q", config())
    with pytest.raises(RuntimeError, match="blocks.3.q has no sampled adapter weights"):
        layer(torch.randn(1, 4))


def test_gpt2_conv1d_is_adapted():
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(12, 5)  # nf=12 outputs, nx=5 inputs
    layer = BayesianLoRALinear(base, "c_attn", config())
    assert (layer.in_features, layer.out_features) == (5, 12)
    layer.model()
    assert layer(torch.randn(2, 3, 5)).shape == (2, 3, 12)


def test_adapters_follow_float64_base_and_keep_base_dtype():
    base = nn.Linear(8, 8).double()
    layer = BayesianLoRALinear(base, "lin", config())
    assert layer.lora_A.prior.z_rows.dtype == torch.float64
    layer.model()
    assert layer(torch.randn(2, 8, dtype=torch.float64)).dtype == torch.float64
    half = BayesianLoRALinear(nn.Linear(8, 8).to(torch.bfloat16), "lin", config())
    assert half.base.weight.dtype == torch.bfloat16 and half.lora_A.prior.z_rows.dtype == torch.float32
    half.model()
    assert half(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_whitened_and_plain_gp_prior_give_the_same_u_distribution():
    torch.manual_seed(0)
    white = GPPrior(5, 6, config(), "f", whitened=True)
    plain = GPPrior(5, 6, config(), "f", whitened=False)
    plain.load_state_dict(white.state_dict())
    geom = white.geometry()
    u_w = white.site_distribution(geom).sample((20000,))
    u = white.inducing_matrix(u_w, geom).reshape(20000, -1)
    cov_plain = plain.site_distribution(geom).covariance_matrix
    kr, kc = geom.kernels
    torch.testing.assert_close(cov_plain.double(), torch.kron(kr, kc), rtol=1e-5, atol=1e-6)
    empirical = u.T @ u / u.shape[0]
    assert ((empirical - cov_plain) / cov_plain.diagonal().max()).abs().max() < 0.05


def test_priors_by_name_class_and_factory():
    cfg = config()
    assert isinstance(build_prior("gp", 4, 5, cfg), GPPrior)
    assert isinstance(build_prior("normal", 4, 5, cfg), NormalPrior)

    class Wide(NormalPrior):
        def __init__(self, rows, cols, config, name=""):
            super().__init__(rows, cols, config, name, sd=3.0)

    assert build_prior(Wide, 4, 5, cfg).sd == 3.0
    with pytest.raises(ValueError, match="unknown prior 'laplace'.*'gp', 'normal'"):
        build_prior("laplace", 4, 5, cfg)
    with pytest.raises(TypeError, match="not an InducingPrior"):
        build_prior(lambda *a: object(), 4, 5, cfg)


def test_custom_prior_drives_a_layer():
    class HalfScale(GPPrior):
        def inducing_matrix(self, value, geometry):
            return 0.5 * super().inducing_matrix(value, geometry)

    layer = BayesianLoRALinear(nn.Linear(6, 6), "lin", config(prior=HalfScale))
    assert isinstance(layer.lora_A.prior, HalfScale) and isinstance(layer.lora_A.prior, InducingPrior)
    layer.model()
    assert torch.isfinite(layer(torch.randn(3, 6))).all()


def lora_extra_parameters(shapes, bayesian, r, m_r, m_c, guide_params_per_factor):
    """Our formula: per Bayesian factor (p x q), Z_r, Z_c, D_r, D_c replace the p*q LoRA entries; per Bayesian
    layer one empirical-Bayes prior gain."""
    extra = 0
    for name, (d_out, d_in) in shapes.items():
        if name not in bayesian:
            continue
        extra += 1
        for p, q in ((r, d_in), (d_out, r)):
            extra += m_r * p + m_c * q + m_r + m_c - p * q + guide_params_per_factor
    return extra


def test_llama2_7b_extra_parameters_match_the_formula(capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    )
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg)
    blora = BLoRAConfig(target_modules=["q_proj", "v_proj", "lm_head"], bayesian_modules=["q_proj", "lm_head"], r=8)
    layers = inject_adapters(net, blora)
    factors = [f for layer in layers for f in layer.factors]
    guide = BayesianLoRAGuide(factors, "flow")
    adapter = sum(p.numel() for layer in layers for n, p in layer.named_parameters() if not n.startswith("base."))
    guide_total = sum(p.numel() for p in guide.parameters())
    per_factor = guide_total // len(factors)
    lora = sum(8 * (layer.in_features + layer.out_features) for layer in layers)
    shapes = {layer.layer_name: (layer.out_features, layer.in_features) for layer in layers}
    bayesian = {layer.layer_name for layer in layers if layer.bayesian}
    extra = adapter + guide_total - lora
    assert len(factors) == 2 * 33
    assert extra == lora_extra_parameters(shapes, bayesian, 8, 9, 9, per_factor)
    with capsys.disabled():
        print(
            f"\nLlama-2-7B, r=8 on q,v,lm_head, Bayesian q,lm_head, 9x9 inducing, flow guide: "
            f"LoRA {lora / 1e6:.3f}M params, Bayesian-LoRA extra {extra / 1e6:.3f}M "
            f"(inducing inputs {(adapter - lora) / 1e6:.3f}M, guide {guide_total / 1e6:.3f}M); "
            "paper: +0.42M"
        )


@pytest.mark.parametrize("lambda_prior", [1.0, 0.03, 0.3])
def test_the_prior_conditional_uses_lambda_prior_and_its_kl_follows_the_formula(lambda_prior: float) -> None:
    import math

    from torch.distributions import kl_divergence

    from pyro_blora.models.layer import InducingFactor

    config = BLoRAConfig(r=4, inducing_rows=4, inducing_cols=4, lambda_prior=lambda_prior)
    factor = InducingFactor("f", 4, 16, config)
    trace = poutine.trace(factor.model).get_trace()
    prior_w = trace.nodes["f.W"]["fn"]
    u_value = trace.nodes["f.U"]["value"]
    q = factor.conditional(u_value, torch.tensor(0.03))
    entries = 4 * 16
    ratio = 0.03 / lambda_prior
    expected = entries / 2 * (ratio**2 - 1 - 2 * math.log(ratio))
    assert float(kl_divergence(q, prior_w).detach()) == pytest.approx(expected, rel=1e-5, abs=1e-6)
