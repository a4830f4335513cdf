"""The empirical-Bayes prior scale: its start, where it acts, what it is not for, and that it makes the adapters live."""

from __future__ import annotations

import math

import pytest
import torch

import pyro_blora
from pyro_blora import BLoRAConfig
from pyro_blora.diagnostics import diagnose
from pyro_blora.interop import posterior_mean_weights
from pyro_blora.models import BayesianLoRALinear
from toy import make_config, make_data, make_net


def _layer(**changes) -> BayesianLoRALinear:
    torch.manual_seed(0)
    config = BLoRAConfig(target_modules=["x"], r=4, inducing_rows=4, inducing_cols=4, **changes)
    return BayesianLoRALinear(torch.nn.Linear(64, 48), "x", config)


def test_the_gain_starts_where_the_inducing_part_carries_the_full_priors_variance() -> None:
    layer = _layer()
    share = layer.lora_A.mean_share() * layer.lora_B.mean_share()
    assert float(layer.prior_gain()) == pytest.approx(1 / math.sqrt(share), rel=1e-5)
    # the whitened GP prior's closed form: tr(Q_r) tr(Q_c) / (rows cols), Q = Z^T K^-1 Z
    for factor in layer.factors:
        geometry = factor.prior.geometry()
        q_rows = geometry.z_rows.double().T @ torch.cholesky_solve(geometry.z_rows.double(), geometry.cholesky[0])
        q_cols = geometry.z_cols.double().T @ torch.cholesky_solve(geometry.z_cols.double(), geometry.cholesky[1])
        exact = float(q_rows.trace() * q_cols.trace()) / (factor.shape[0] * factor.shape[1])
        assert factor.mean_share(draws=4000) == pytest.approx(exact, rel=0.1)
    assert 1.5 < float(layer.prior_gain()) < 1e3  # well above 1: the fixed prior's subspace is that much too small


def test_the_gain_scales_the_update_in_the_forward_and_in_the_posterior_mean() -> None:
    layer = _layer().eval()  # no LoRA dropout
    a, b = torch.randn(4, 64), torch.randn(48, 4)
    layer.set_adapter_weights(a, b)
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer.lora_prior_log_gain.fill_(math.log(3.0))
        expected = layer.base(x) + layer.scaling * 3.0 * (x @ a.T) @ b.T
        assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-3)
    fixed = _layer(prior_scale="fixed")
    assert fixed.prior_gain() == 1.0 and not hasattr(fixed, "lora_prior_log_gain")


def test_a_point_mass_keeps_the_gain_and_the_other_families_learn_it() -> None:
    data = make_data()
    delta = pyro_blora.fit(make_net(), data, "delta", config=make_config(), num_steps=5, lr=1e-2, progress=False)
    flow = pyro_blora.fit(make_net(), data, "flow", config=make_config(), num_steps=5, lr=1e-2, progress=False)
    start = _gains(pyro_blora.fit(make_net(), data, "flow", config=make_config(), num_steps=1, lr=1e-12, progress=False))
    assert _gains(delta) == pytest.approx(start, rel=1e-6)  # MAP alone would send g -> infinity
    assert all(abs(g - s) > 1e-3 for g, s in zip(_gains(flow), start))
    means = posterior_mean_weights(flow)
    layer = flow.model.layers[0]
    torch.manual_seed(0)  # posterior_mean_weights' seed: the same Monte Carlo draws of the flow's mean
    raw = flow.guide.mean_weights(256)[layer.lora_A.site_w]
    assert torch.allclose(means[layer.layer_name][0], raw * layer.prior_gain())


def _gains(result) -> list[float]:
    return [float(layer.prior_gain()) for layer in result.model.layers]


@pytest.mark.parametrize("prior_scale", ["empirical_bayes", "fixed"])
def test_the_default_prior_scale_trains_the_bayesian_module_out_of_zero_beside_a_plain_one(prior_scale: str) -> None:
    """Layer "0" Bayesian beside a plain layer "2" that could carry the fit alone (the inert-adapter toy)."""
    torch.set_num_threads(1)
    data = make_data(96)
    result = pyro_blora.fit(make_net(), data, "flow", config=make_config(bayesian_modules=["0"], prior_scale=prior_scale),
                            num_steps=200, lr=1e-2, progress=False)
    rows = {(r.module, r.factor): r.mean_ratio for r in diagnose(result, data).rows}
    share = rows["0", "A"] / rows["2", "-"]
    if prior_scale == "empirical_bayes":
        assert share > 0.1  # measured 0.16 (0.65 against 4.1)
    else:  # the released code's constant scale: the plain path takes the fit
        assert share < 0.01  # measured 0.004 (0.038 against 9.8)
