"""Gradient accumulation equals one big batch; bf16 autocast covers the network, not the inducing algebra or the KL."""

from __future__ import annotations

import pytest
import torch
from pyro import poutine
from torch import nn
from torch.distributions import kl_divergence

import pyro_blora
from pyro_blora import BLoRAConfig
from pyro_blora.config import TrainConfig
from pyro_blora.training.distributed import ScaleOut
from pyro_blora.guides import BayesianLoRAGuide
from pyro_blora.inject import inject_adapters
from pyro_blora.model import BayesianLoRAModel
from pyro_blora.models.priors import shared_geometry
from pyro_blora.tasks.base import TensorTask

pytestmark = pytest.mark.usefixtures("one_thread")

N_FEATURES, N_CLASSES = 8, 3
CONFIG = BLoRAConfig(target_modules=["0", "2"], bayesian_modules=["0"], r=2, inducing_rows=3, inducing_cols=3,
                     dropout=0.0, prior_sd=1.0)


def make_net() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(N_FEATURES, 16), nn.ReLU(), nn.Linear(16, N_CLASSES))


def make_data(n: int = 40) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    centers = 2.0 * torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(n) % N_CLASSES
    x = centers[labels] + torch.randn(n, N_FEATURES, generator=g)
    return [{"inputs": x[i], "labels": int(labels[i])} for i in range(n)]


def train(guide: str = "normal", **options) -> pyro_blora.FitResult:
    options = {"num_steps": 4, "lr": 2e-2, "progress": False, "seed": 11, **options}
    return pyro_blora.fit(make_net(), make_data(), guide, config=CONFIG, **options)


def state(result: pyro_blora.FitResult) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.trainable_state().items()}


# ------------------------------------------------------------------ accumulation


@pytest.mark.parametrize("guide", ["normal", "flow"])
def test_accumulated_micro_batches_equal_one_big_batch(guide) -> None:
    """4 micro-batches of 4 vs batches of 16, over 40 examples: steps of 16, 16 and 8 (a short last group)."""
    big = train(guide, batch_size=16)
    small = train(guide, batch_size=4, gradient_accumulation_steps=4)
    expected, actual = state(big), state(small)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)
    # the logged loss is the global batch's: same N/B-scaled ELBO as the big batch
    torch.testing.assert_close(torch.tensor(small.history["loss"]), torch.tensor(big.history["loss"]), rtol=1e-5, atol=1e-3)
    other = state(train(guide, batch_size=4))  # not a tautology: batches of 4 end elsewhere
    assert max(float((other[k] - expected[k]).abs().max()) for k in expected) > 1e-3


def test_resume_refuses_another_accumulation(tmp_path) -> None:
    train(checkpoint_dir=str(tmp_path), checkpoint_every=2, batch_size=4, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        train(checkpoint_dir=str(tmp_path), checkpoint_every=2, batch_size=4, gradient_accumulation_steps=4,
              resume_from=str(tmp_path))


# ------------------------------------------------------------------ bf16


def test_a_bf16_run_trains_with_float32_parameters() -> None:
    options = {"num_steps": 30, "batch_size": 8, "lr": 3e-2, "kl_warmup": 0.0}
    result = train(mixed_precision="bf16", **options)
    losses, nll = torch.tensor(result.history["loss"]), torch.tensor(result.history["nll"])
    assert torch.isfinite(losses).all()
    assert losses[-5:].mean() < 0.6 * losses[:5].mean() and nll[-5:].mean() < 0.3 < nll[:5].mean()
    assert {v.dtype for v in result.trainable_state().values()} == {torch.float32}
    assert result.evaluate(make_data(), num_samples=2)["acc"] > 0.9
    full = train(mixed_precision="no", **options).history["loss"]
    assert result.history["loss"] != full  # autocast did run inside fit ...
    torch.testing.assert_close(losses, torch.tensor(full), rtol=0.02, atol=0.0)  # ... and changed little


def _bf16_setup():
    net = make_net()
    inject_adapters(net, CONFIG)
    model = BayesianLoRAModel(net, TensorTask(), num_data=40)
    scale = ScaleOut(TrainConfig(mixed_precision="bf16", device_placement=False))  # CPU, also on a GPU machine
    scale.place(net)
    model.network_precision = scale.network_precision
    guide = BayesianLoRAGuide(model.factors, "flow", CONFIG.lambda_init, CONFIG.lambda_max)
    batch = TensorTask().collate(make_data(8))
    return net, model, guide, scale, batch


def test_bf16_covers_the_network_while_prior_conditional_and_kl_stay_float() -> None:
    net, model, guide, scale, batch = _bf16_setup()
    seen = []
    net[2].base.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    # a caller's own autocast around fit is switched off too: only the network forward is cast
    with torch.autocast("cpu", dtype=torch.bfloat16), scale.full_precision(), shared_geometry():
        guide_trace = poutine.trace(guide).get_trace(batch)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
        logits = model_trace.nodes["_RETURN"]["value"]
        sites = [name for name in guide_trace.nodes if name.endswith((".U", ".W"))]
        values = {name: guide_trace.nodes[name]["value"].dtype for name in sites}
        log_probs = {name: model_trace.nodes[name]["fn"].log_prob(model_trace.nodes[name]["value"]).dtype for name in sites}
        kls = {
            name: kl_divergence(guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"]).dtype
            for name in sites if name.endswith(".W")
        }
        geometry = model.factors[0].prior.geometry()
        cholesky = geometry.cholesky[0].dtype
    assert seen == [torch.bfloat16]  # the frozen base ran under autocast
    assert logits.dtype == torch.float32  # the likelihood is evaluated in float32
    assert len(sites) == 4 and set(values.values()) == {torch.float32}
    assert set(log_probs.values()) == {torch.float32} and set(kls.values()) == {torch.float32}
    assert cholesky == torch.float64


def test_without_the_guard_autocast_would_reach_the_inducing_algebra() -> None:
    """The guard matters: the conditional mean T_r U T_c is a matmul that autocast casts to bf16."""
    _, model, _, scale, _ = _bf16_setup()
    factor = model.factors[0]
    u = torch.randn(*factor.prior.inducing_shape)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert factor.prior.geometry().conditional_mean(u).dtype == torch.bfloat16
        with scale.full_precision():
            assert factor.prior.geometry().conditional_mean(u).dtype == torch.float32
