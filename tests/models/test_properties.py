"""Property tests over shapes, inducing sizes, ranks, batch shapes and dtypes."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.distributions import kl_divergence

from pyro_blora import BLoRAConfig
from pyro_blora.guides import BayesianLoRAGuide
from pyro_blora.models import BayesianLoRALinear

shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))
inducing = st.integers(1, 6)


@settings(max_examples=25, deadline=None)
@given(shape=shapes, rank=st.integers(1, 6), m_r=inducing, m_c=inducing, batch=st.lists(st.integers(1, 3), max_size=2),
       dtype=st.sampled_from([torch.float32, torch.float64]), guide=st.sampled_from(["flow", "normal", "mvn", "delta"]))
def test_layer_forward_is_finite_for_any_shape(shape, rank, m_r, m_c, batch, dtype, guide):
    d_in, d_out = shape
    config = BLoRAConfig(target_modules=["x"], r=rank, inducing_rows=m_r, inducing_cols=m_c, dropout=0.0)
    layer = BayesianLoRALinear(nn.Linear(d_in, d_out).to(dtype), "x", config)
    assume(guide != "flow" or m_c >= 2)  # a one-feature flow is refused with a clear error (tested below)
    family = BayesianLoRAGuide(layer.factors, guide)
    draws = family()
    layer.set_adapter_weights(draws["x.lora_A.W"], draws["x.lora_B.W"])
    out = layer(torch.randn(*batch, 2, d_in, dtype=dtype))
    assert out.shape == (*batch, 2, d_out) and out.dtype == dtype
    assert torch.isfinite(out).all()


@settings(max_examples=40, deadline=None)
@given(shape=shapes, m_r=inducing, m_c=inducing, lam_q=st.floats(1e-4, 2.0), lam_p=st.floats(1e-2, 2.0),
       shift=st.floats(0.0, 3.0), seed=st.integers(0, 1000))
def test_conditional_kl_is_never_negative_and_log_prob_finite(shape, m_r, m_c, lam_q, lam_p, shift, seed):
    torch.manual_seed(seed)
    config = BLoRAConfig(target_modules=["x"], r=1, inducing_rows=m_r, inducing_cols=m_c)
    layer = BayesianLoRALinear(nn.Linear(shape[1], shape[0]), "x", config)
    factor = layer.lora_B
    u = torch.randn(factor.site_dim)
    q = factor.conditional(u, torch.tensor(lam_q))
    p = factor.conditional(u + shift, torch.tensor(lam_p))
    kl = kl_divergence(q, p)
    assert torch.isfinite(kl) and float(kl) >= -1e-4 * max(1.0, abs(float(kl)))
    w = q.rsample()
    assert torch.isfinite(w).all() and torch.isfinite(q.log_prob(w)) and torch.isfinite(p.log_prob(w))


@settings(max_examples=20, deadline=None)
@given(lam=st.floats(1e-6, 0.99), size=st.integers(1, 10_000))
def test_closed_form_kl_formula_is_non_negative(lam, size):
    # (n / 2)(lambda^2 - 1 - 2 log lambda) >= 0 with equality at lambda = 1
    value = size / 2 * (lam**2 - 1 - 2 * torch.log(torch.tensor(lam, dtype=torch.float64)))
    assert float(value) >= 0


def test_one_feature_flow_is_refused_clearly():
    config = BLoRAConfig(target_modules=["x"], r=2, inducing_rows=3, inducing_cols=1)
    layer = BayesianLoRALinear(nn.Linear(4, 4), "x", config)
    with pytest.raises(ValueError, match="need at least 2 features.*rowwise=False"):
        BayesianLoRAGuide(layer.factors, "flow")
