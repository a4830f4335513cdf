"""MeanFieldELBO: the same loss and gradients as Pyro's TraceMeanField_ELBO, without the unused log_probs."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch import nn

from pyro_blora import BLoRAConfig, inject_adapters
from pyro_blora.training.elbo import MeanFieldELBO
from pyro_blora.training.svi import KLScale
from pyro_blora.guides import BayesianLoRAGuide
from pyro_blora.model import BayesianLoRAModel
from pyro_blora.models import InducingConditional
from pyro_blora.models.priors import shared_geometry
from pyro_blora.tasks.base import TensorTask

pytestmark = pytest.mark.usefixtures("one_thread")

GUIDES = [
    ("delta", {}),
    ("normal", {}),
    ("mvn", {"rank": 3}),
    ("flow", {}),
    ("flow", {"transforms": ["planar"]}),  # drawn site by site (no batched draw)
]


def setup(guide: str, options: dict, prior: str = "gp", whitened: bool = True):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    config = BLoRAConfig(target_modules=["0", "2"], r=2, inducing_rows=3, inducing_cols=3, dropout=0.0,
                         prior=prior, whitened=whitened)
    inject_adapters(net, config)
    model = BayesianLoRAModel(net, TensorTask(), num_data=50)
    family = BayesianLoRAGuide(model.factors, guide, config.lambda_init, config.lambda_max, **options)
    with torch.no_grad():  # move every scale off its initial value so the KL terms are not tiny
        for name, param in family.named_parameters():
            if name.endswith("_rho"):
                param.add_(2.0)
    batch = {"inputs": torch.randn(5, 6), "labels": torch.tensor([0, 1, 2, 1, 0])}
    return model, family, batch


def loss_and_grads(elbo, model, family, batch, validation: bool):
    params = [p for m in (model.net, family) for p in m.parameters() if p.requires_grad]
    scale = KLScale(0.3)  # the warm-up weight of fit: scales every latent site
    pyro.set_rng_seed(7)
    with shared_geometry(), pyro.validation_enabled(validation):
        loss = elbo.differentiable_loss(scale(model), scale(family), batch)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), grads


@pytest.mark.parametrize("validation", [False, True], ids=["fast", "validated"])
@pytest.mark.parametrize("guide,options", GUIDES, ids=["delta", "normal", "mvn", "flow", "flow-planar"])
def test_loss_and_gradients_equal_trace_mean_field(guide, options, validation):
    model, family, batch = setup(guide, options)
    ours, our_grads = loss_and_grads(MeanFieldELBO(), model, family, batch, validation)
    pyros, pyro_grads = loss_and_grads(TraceMeanField_ELBO(), model, family, batch, validation)
    torch.testing.assert_close(ours, pyros, rtol=1e-5, atol=1e-5)
    compared = 0
    for mine, theirs in zip(our_grads, pyro_grads):
        if theirs is None:
            assert mine is None or not mine.abs().any()
            continue
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
        compared += 1
    assert compared > 10


@pytest.mark.parametrize("prior,whitened", [("gp", False), ("normal", True)], ids=["gp-unwhitened", "normal-prior"])
def test_other_priors_equal_trace_mean_field(prior, whitened):
    model, family, batch = setup("normal", {}, prior=prior, whitened=whitened)
    ours, our_grads = loss_and_grads(MeanFieldELBO(), model, family, batch, False)
    pyros, pyro_grads = loss_and_grads(TraceMeanField_ELBO(), model, family, batch, False)
    torch.testing.assert_close(ours, pyros, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(our_grads, pyro_grads):
        if theirs is not None:
            torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_closed_form_sites_are_not_scored(monkeypatch):
    """The W sites' KL is closed form: their Woodbury log_prob must not run (it does under Pyro's ELBO)."""
    calls = []
    original = InducingConditional.log_prob
    monkeypatch.setattr(InducingConditional, "log_prob", lambda self, value: calls.append(1) or original(self, value))
    model, family, batch = setup("flow", {})
    with shared_geometry(), pyro.validation_enabled(False):
        loss = MeanFieldELBO().differentiable_loss(model, family, batch)
    assert loss.requires_grad and calls == []
    with shared_geometry(), pyro.validation_enabled(False):
        TraceMeanField_ELBO().differentiable_loss(model, family, batch)
    assert len(calls) == 2 * len(model.factors)  # model and guide conditional of every factor


def test_particles_average_and_number_api():
    model, family, batch = setup("normal", {})
    pyro.set_rng_seed(3)
    with shared_geometry():
        two = MeanFieldELBO(num_particles=2).differentiable_loss(model, family, batch)
    pyro.set_rng_seed(3)
    with shared_geometry():
        first = MeanFieldELBO().differentiable_loss(model, family, batch)
        second = MeanFieldELBO().differentiable_loss(model, family, batch)
    torch.testing.assert_close(two, (first + second) / 2)
    assert isinstance(MeanFieldELBO().loss(model, family, batch), float)
    # SVI's entry point: a number back, gradients in the parameters
    value = MeanFieldELBO().loss_and_grads(model, family, batch)
    assert isinstance(value, float)
    assert all(p.grad is not None for p in family.parameters())


def test_guide_site_missing_from_model_must_be_auxiliary():
    def model():
        pyro.sample("x", pyro.distributions.Normal(0.0, 1.0))

    def guide():
        pyro.sample("x", pyro.distributions.Normal(torch.tensor(0.5), 1.0))
        pyro.sample("extra", pyro.distributions.Normal(0.0, 1.0))

    with pyro.validation_enabled(False), pytest.raises(ValueError, match="'extra' is not in the model and not marked"):
        MeanFieldELBO().differentiable_loss(model, guide)
    # a marked auxiliary site is scored like Pyro does
    def aux_guide():
        pyro.sample("x", pyro.distributions.Normal(torch.tensor(0.5), 1.0))
        pyro.sample("extra", pyro.distributions.Normal(0.0, 1.0), infer={"is_auxiliary": True})

    pyro.set_rng_seed(0)
    ours = MeanFieldELBO().differentiable_loss(model, aux_guide)
    pyro.set_rng_seed(0)
    traced = poutine.trace(aux_guide).get_trace()
    expected = 0.125  # KL(N(0.5, 1) || N(0, 1)), plus log q(extra)
    expected = expected + float(traced.nodes["extra"]["fn"].log_prob(traced.nodes["extra"]["value"]))
    torch.testing.assert_close(float(ours), expected, rtol=1e-5, atol=1e-6)
