"""The BLoB layer and guide: prior, closed-form KL, q(A)'s moments, Flipout, and the plain-LoRA limit."""

from __future__ import annotations

import math

import pytest
import torch
from pyro.infer import TraceMeanField_ELBO
from torch import nn
from torch.distributions import kl_divergence

from pyro_blora import BLoRAConfig
from pyro_blora.baselines.blob import BLoBGuide
from pyro_blora.baselines.blob import BLoBLinear, flipout_project

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**kw) -> BLoRAConfig:
    return BLoRAConfig(target_modules=["lin"], r=4, dropout=0.0, **kw)


def make_layer(d_in: int = 10, d_out: int = 6, prior_std: float = 0.2, **kw) -> BLoBLinear:
    torch.manual_seed(0)
    return BLoBLinear(nn.Linear(d_in, d_out), "lin", config(), prior_std=prior_std, **kw)


def closed_form_kl(loc: torch.Tensor, sd: torch.Tensor, prior_std: float) -> torch.Tensor:
    """KL(N(M, sd^2) || N(0, sigma_p^2)) summed over the entries."""
    return (math.log(prior_std) - sd.log() + (sd**2 + loc**2) / (2 * prior_std**2) - 0.5).sum()


def test_layer_samples_one_site_with_the_blob_prior_and_starts_as_peft_lora() -> None:
    layer = make_layer(prior_std=0.3)
    assert layer.site_w == "lin.lora_A.W"
    prior = layer.prior()
    assert prior.event_shape == (4, 10) and prior.batch_shape == ()
    torch.testing.assert_close(prior.base_dist.scale, torch.full((4, 10), 0.3))
    torch.testing.assert_close(prior.base_dist.loc, torch.zeros(4, 10))
    assert torch.count_nonzero(layer.lora_B_weight) == 0  # zero B: the adapted net starts as the base net
    bound = 1 / math.sqrt(10)  # peft's Kaiming-uniform(a = sqrt 5) bound for A
    assert layer.lora_A_weight.abs().max() <= bound and layer.lora_A_weight.std() > 0.3 * bound
    assert not layer.bayesian and layer.factors == []  # no inducing factors: only A is random
    a, b = layer.model()
    assert a.shape == (4, 10) and b is layer.lora_B_weight


def test_guide_kl_is_the_closed_form_gaussian_kl_and_the_elbo_uses_it() -> None:
    layer = make_layer(prior_std=0.2)
    guide = BLoBGuide([layer], init_eps=0.3)
    with torch.no_grad():
        layer.lora_A_weight.normal_()
    sd = guide.site(layer).scale()
    expected = closed_form_kl(layer.lora_A_weight, sd, 0.2)
    torch.testing.assert_close(kl_divergence(guide.distribution(layer), layer.prior()), expected)
    # with no data, the negative ELBO of model and guide is that KL exactly (no Monte Carlo noise)
    elbo = TraceMeanField_ELBO()
    losses = [elbo.differentiable_loss(layer.model, guide) for _ in range(3)]
    for loss in losses:
        torch.testing.assert_close(loss, expected)
    loss = losses[0]
    loss.backward()
    # dKL/dG = 2 G (-1 / sd + sd / sigma_p^2) and dKL/dM = M / sigma_p^2: both reach their parameters
    g = guide.site(layer).lora_A_rho
    torch.testing.assert_close(g.grad, 2 * g.detach() * (-1 / sd.detach() + sd.detach() / 0.04))
    torch.testing.assert_close(layer.lora_A_weight.grad, layer.lora_A_weight.detach() / 0.04)


def test_guide_starts_as_blob_and_keeps_only_its_scales() -> None:
    layer = make_layer(d_in=64, d_out=8)
    guide = BLoBGuide([layer], init_eps=0.05)
    g = guide.site(layer).lora_A_rho
    assert g.shape == (4, 64)
    assert g.min() >= 0.05 / math.sqrt(2) and g.max() <= 0.05 and g.std() > 0
    torch.testing.assert_close(guide.site(layer).scale(), g.detach() ** 2)
    # M and B belong to the layer: the guide's state is G alone, named *_rho for fit's scale group
    assert [name for name, _ in guide.named_parameters()] == ["sites.lin__lora_A__W.lora_A_rho"]
    assert guide.spec() == {"family": "blob", "options": {"prior_std": 0.2, "init_eps": 0.05, "flipout": True}}
    torch.testing.assert_close(guide.mean_weights()["lin.lora_A.W"], layer.lora_A_weight.detach())
    assert guide.sample_inducing(3) == {}


def test_draws_of_a_have_mean_m_and_sd_g_squared() -> None:
    layer = make_layer()
    guide = BLoBGuide([layer])
    with torch.no_grad():
        guide.site(layer).lora_A_rho.copy_(torch.linspace(0.3, 0.8, 40).reshape(4, 10))
    assert guide()["lin.lora_A.W"].shape == (4, 10)
    draws = guide.distribution(layer).rsample((20000,))  # what guide() draws from, vectorised
    sd = guide.site(layer).scale().detach()
    n = draws.shape[0]
    assert ((draws.mean(0) - layer.lora_A_weight.detach()).abs() < 4 * sd / math.sqrt(n)).all()
    assert ((draws.std(0) - sd).abs() < 4 * sd / math.sqrt(2 * n)).all()


def test_flipout_perturbs_each_example_with_the_right_marginal_and_decorrelates_them() -> None:
    torch.manual_seed(1)
    loc, sd = torch.randn(3, 5), torch.rand(3, 5) + 0.5
    h = torch.randn(1, 5).repeat(2, 1)  # two identical examples
    outs = torch.stack([flipout_project(h, loc, loc + sd * torch.randn(3, 5)) for _ in range(5000)])
    mean, var = h[0] @ loc.T, (h[0] ** 2) @ (sd**2).T
    n = outs.shape[0]
    for example in range(2):
        assert ((outs[:, example].mean(0) - mean).abs() < 4 * (var / n).sqrt()).all()
        assert ((outs[:, example].var(0) / var - 1).abs() < 0.1).all()  # sd of the estimate: 0.02
    # one shared draw, but the two examples' perturbations are (nearly) uncorrelated
    noise = outs - mean
    corr = (noise[:, 0] * noise[:, 1]).mean(0) / var
    assert (corr.abs() < 0.08).all()  # sd of the estimate: 0.014; without Flipout it would be 1


def test_flipout_signs_are_per_example_and_shared_by_its_tokens() -> None:
    torch.manual_seed(2)
    loc, sample = torch.randn(3, 5), torch.randn(3, 5)
    h = torch.randn(4, 1, 5).repeat(1, 7, 1)  # 4 sequences of 7 identical tokens
    out = flipout_project(h, loc, sample)
    assert out.shape == (4, 7, 3)
    torch.testing.assert_close(out, out[:, :1].expand(-1, 7, -1))
    assert not torch.allclose(out[0, 0], out[1, 0])  # different examples, different signs (with prob ~1)
    with pytest.raises(ValueError, match="2-d centre and draw of one shape"):
        flipout_project(h, loc, sample[:2])


def test_zero_variance_layer_is_plain_lora_and_flipout_only_trains() -> None:
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B_weight.normal_()
    x = torch.randn(5, 10)
    plain = layer.base(x) + layer.scaling * x @ layer.lora_A_weight.T @ layer.lora_B_weight.T
    layer.train()
    layer.set_adapter_weights(layer.lora_A_weight.detach().clone())  # A = M: no perturbation to flip
    torch.testing.assert_close(layer(x), plain)
    a = layer.lora_A_weight.detach() + 0.5 * torch.randn(4, 10)
    layer.set_adapter_weights(a)
    expected = layer.base(x) + layer.scaling * x @ a.T @ layer.lora_B_weight.T
    assert not torch.allclose(layer(x), expected)  # training: per-example flipped perturbations
    layer.eval()
    torch.testing.assert_close(layer(x), expected)  # prediction: the draw itself, shared by the batch
    no_flip = make_layer(flipout=False)
    with torch.no_grad():
        no_flip.lora_B_weight.copy_(layer.lora_B_weight)
        no_flip.lora_A_weight.copy_(layer.lora_A_weight)
    no_flip.train().set_adapter_weights(a)
    torch.testing.assert_close(no_flip(x), expected)


def test_stacked_draws_use_their_own_a() -> None:
    layer = make_layer().eval()
    with torch.no_grad():
        layer.lora_B_weight.normal_()
    draws = torch.randn(3, 4, 10)
    layer.set_adapter_weights(draws)
    x = torch.randn(2, 7, 10)
    out = layer(x.repeat(3, 1, 1)).reshape(3, 2, 7, 6)
    for s in range(3):
        torch.testing.assert_close(out[s], layer.base(x) + layer.scaling * x @ draws[s].T @ layer.lora_B_weight.T)
    with pytest.raises(ValueError, match="cannot hold 3 stacked posterior samples"):
        layer(torch.randn(4, 10))


def test_bad_inputs_are_named() -> None:
    for bad in (0.0, -1.0, True, "0.2"):
        with pytest.raises(ValueError, match="prior_std \\(sigma_p\\) must be a positive number"):
            make_layer(prior_std=bad)
    layer = make_layer()
    with pytest.raises(RuntimeError, match="lin has no sampled adapter weights"):
        layer(torch.randn(1, 10))
    with pytest.raises(ValueError, match=r"a draw of A must have shape \(\[S,\] 4, 10\)"):
        layer.set_adapter_weights(torch.zeros(10, 4))
    with pytest.raises(ValueError, match="B is a deterministic parameter"):
        layer.set_adapter_weights(torch.zeros(4, 10), torch.zeros(6, 4))
    with pytest.raises(ValueError, match="init_eps must be a positive number"):
        BLoBGuide([layer], init_eps=0.0)
    with pytest.raises(ValueError, match="needs at least one BLoB layer"):
        BLoBGuide([])
