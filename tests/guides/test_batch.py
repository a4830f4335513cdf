"""Sites drawn together: each site's distribution, draw, density and KL stay its family's own."""

from __future__ import annotations

import math

import pytest
import torch
from pyro import poutine
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from pyro_blora import BLoRAConfig, inject_adapters
from pyro_blora.guides import BayesianLoRAGuide, DeltaGuide, FlowGuide, InducingSite, NormalGuide
from pyro_blora.guides.batch import SiteMember, conditional_scales, site_distributions
from pyro_blora.guides.flow import FlowBatch
from pyro_blora.model import BayesianLoRAModel
from pyro_blora.models.priors import IsotropicNormal
from pyro_blora.tasks.base import TensorTask

pytestmark = pytest.mark.usefixtures("one_thread")


def site(dim_rows: int = 3, dim_cols: int = 4) -> InducingSite:
    return InducingSite("x.lora_A", dim_rows * dim_cols, (5, 7), (dim_rows, dim_cols), 1e-3, 0.03)


def perturbed(family: nn.Module) -> nn.Module:
    """Move every parameter off its initial value, so equalities are not trivial."""
    with torch.no_grad():
        for param in family.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return family


@pytest.mark.parametrize("options", [{}, {"transforms": ["affine_autoregressive"] * 2}, {"rowwise": False,
                                                                                          "hidden_dims": [20]}],
                         ids=["maf", "maf2", "flat"])
def test_flow_batch_is_each_sites_flow(options):
    torch.manual_seed(0)
    families = [perturbed(FlowGuide(site(), **options)) for _ in range(3)]
    keys = {f.batch_key() for f in families}
    assert len(keys) == 1 and None not in keys
    batch = FlowBatch(families)
    for i, family in enumerate(families):
        q = family.distribution()
        x = (family.loc + batch.eps.reshape(3, -1)[i] * batch.scale.reshape(3, -1)[i]).reshape(q.base_dist.event_shape)
        for transform in q.transforms:
            x = transform(x)
        torch.testing.assert_close(batch.values[i], x)
        # the batched log q equals the family's own density at that draw (MAF inverts exactly)
        torch.testing.assert_close(batch.log_prob_all()[i], q.log_prob(batch.values[i].detach()), rtol=1e-4, atol=1e-4)


def test_normal_and_delta_batches_have_the_closed_form_kl():
    torch.manual_seed(1)
    normals = [perturbed(NormalGuide(site())) for _ in range(2)]
    members = site_distributions(normals)
    prior = IsotropicNormal(12, 0.5)
    dense = MultivariateNormal(torch.zeros(12), scale_tril=0.5 * torch.eye(12))
    for family, member in zip(normals, members):
        expected = kl_divergence(family.distribution(), dense)
        kls, index = member.batched_kl(prior)
        torch.testing.assert_close(kls[index], expected)
        torch.testing.assert_close(kl_divergence(member, prior), expected)
        value = member.rsample()
        torch.testing.assert_close(member.log_prob(value), family.distribution().log_prob(value))
    deltas = [perturbed(DeltaGuide(site())) for _ in range(2)]
    for family, member in zip(deltas, site_distributions(deltas)):
        torch.testing.assert_close(kl_divergence(member, prior), -dense.log_prob(family.loc))
        torch.testing.assert_close(member.rsample(), family.loc)


def test_a_member_hands_out_its_batched_draw_once_then_is_its_family():
    torch.manual_seed(2)
    families = [perturbed(FlowGuide(site())) for _ in range(2)]
    member = site_distributions(families)[1]
    assert isinstance(member, SiteMember) and member.event_shape == (12,)
    first = member.rsample()
    assert first is member.batch.rows()[1]
    assert member.stacked_value(first) == (member.batch.values, 1)
    log_q, index = member.batched_log_prob(first)
    assert index == 1 and log_q.shape == (2,)
    again = member.rsample()
    assert not torch.equal(again, first) and member.stacked_value(again) is None
    torch.testing.assert_close(member.log_prob(again), families[1].distribution().log_prob(again))
    assert member.rsample((4,)).shape == (4, 12)
    with pytest.raises(NotImplementedError, match="no closed-form KL"):
        member.batched_kl(IsotropicNormal(12))
    with pytest.raises(NotImplementedError):
        kl_divergence(member, MultivariateNormal(torch.zeros(12), torch.eye(12)))


def test_families_that_change_their_distribution_are_drawn_alone():
    class Shifted(NormalGuide):
        def distribution(self):
            return Independent(Normal(self.loc + 1.0, self.scale()), 1)

    planar = FlowGuide(site(), transforms=["planar"])
    assert Shifted(site()).batch_key() is None and planar.batch_key() is None
    members = site_distributions([Shifted(site()), planar, NormalGuide(site()), NormalGuide(site())])
    assert members[2].batch is members[3].batch and members[0].batch is not members[1].batch
    draw = members[1].rsample()  # planar: scored through the transform's cache, on the same object
    assert torch.isfinite(members[1].log_prob(draw))
    assert members[1].site_distribution() is members[1].site_distribution()


def test_conditional_scales_are_each_familys_lambda():
    families = [perturbed(NormalGuide(site())) for _ in range(3)] + [DeltaGuide(site())]
    lams, refs = conditional_scales(families)
    for family, lam, ref in zip(families[:3], lams, refs):
        torch.testing.assert_close(lam, family.conditional_scale())
        assert ref[0][ref[1]] is not None
    assert lams[3] == 0.0 and refs[3] is None


def test_a_handler_that_replaces_u_gets_w_from_that_value():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    inject_adapters(net, BLoRAConfig(target_modules=["0", "2"], r=2, inducing_rows=3, inducing_cols=3, dropout=0.0))
    model = BayesianLoRAModel(net, TensorTask(), num_data=10)
    guide = BayesianLoRAGuide(model.factors, "flow")
    factor = model.factors[1]
    fixed = torch.randn(9)
    trace = poutine.trace(poutine.condition(guide, data={factor.site_u: fixed})).get_trace()
    w_site = trace.nodes[factor.site_w]
    assert w_site["fn"].source is fixed
    expected = factor.conditional(fixed, 0.0).mean
    torch.testing.assert_close(w_site["fn"].mean, expected)
    # the other factors kept their batched draws
    other = trace.nodes[model.factors[0].site_u]
    assert isinstance(other["fn"], SiteMember) and other["value"] is other["fn"].batch.rows()[other["fn"].index]


def test_isotropic_kl_of_a_mean_field_gaussian_is_the_textbook_formula():
    loc, scale, sd = torch.tensor([0.5, -1.0]), torch.tensor([0.2, 2.0]), 1.5
    expected = sum(0.5 * ((s**2 + m**2) / sd**2 - 1 - 2 * math.log(s / sd)) for m, s in zip(loc.tolist(), scale.tolist()))
    kl = kl_divergence(Independent(Normal(loc, scale), 1), IsotropicNormal(2, sd))
    torch.testing.assert_close(kl, torch.tensor(expected))


@pytest.mark.parametrize("family", ["flow", "delta"])
def test_sample_weights_draws_every_sample_at_once_from_the_posterior(family):
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    inject_adapters(net, BLoRAConfig(target_modules=["0", "2"], r=2, inducing_rows=3, inducing_cols=3, dropout=0.0))
    model = BayesianLoRAModel(net, TensorTask(), num_data=10)
    options = {"scale_init": 0.05} if family == "flow" else {}
    guide = BayesianLoRAGuide(model.factors, family, lambda_init=0.02, lambda_max=0.03, **options)
    draws = guide.sample_weights(4000)
    means = guide.mean_weights(num_samples=4000)
    assert set(draws) == {f.site_w for f in model.factors}
    for factor in model.factors:
        w = draws[factor.site_w]
        assert w.shape == (4000, *factor.shape)
        if family == "delta":
            assert torch.equal(w[0], w[-1])
            torch.testing.assert_close(w[0], means[factor.site_w])
        else:
            assert not torch.equal(w[0], w[1])
            spread = w.std(0).max()
            torch.testing.assert_close(w.mean(0), means[factor.site_w], atol=float(5 * spread / 4000**0.5) + 1e-4, rtol=0)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        guide.sample_weights(0)
