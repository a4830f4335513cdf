"""Batched geometry and W | U: the same values, gradients and distributions as factor by factor."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal, kl_divergence

from pyro_blora import BLoRAConfig
from pyro_blora.models import InducingConditional, InducingGeometry
from pyro_blora.models.batched import BatchedGeometry, batch_geometries, batch_matheron_noise, gather
from pyro_blora.models.conditional import _kl_inducing_conditional, batch_conditionals
from pyro_blora.models.geometry import CholeskyError
from pyro_blora.models.layer import InducingFactor, factor_conditionals
from pyro_blora.models.priors import IsotropicNormal, shared_geometry

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(3, 5, 2, 3), (4, 2, 2, 2), (3, 5, 2, 3), (6, 1, 3, 2), (3, 5, 2, 3)]  # (p, q, m_r, m_c)


def factor_params(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    params = []
    for p, q, m_r, m_c in SHAPES:
        params.append([
            torch.randn(m_r, p, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(m_c, q, generator=g, dtype=dtype).requires_grad_(),
            (0.3 * torch.randn(m_r, generator=g, dtype=dtype)).requires_grad_(),
            (0.3 * torch.randn(m_c, generator=g, dtype=dtype)).requires_grad_(),
        ])
    return params


def batched(params, jitter=1e-6):
    names = [f"f{i}" for i in range(len(params))]
    return batch_geometries(*[[f[k] for f in params] for k in range(4)], [jitter] * len(params), names)


def single(f):
    return InducingGeometry(f[0], f[1], f[2].exp(), f[3].exp())


def scalar_of(geometry, u):
    """A scalar touching every batched quantity: kernels, Choleskys, projections, the conditional mean."""
    kr, kc = geometry.kernels
    lr, lc = geometry.cholesky
    return (geometry.conditional_mean(u) ** 2).sum() + kr.sum() + kc.sum() + lr.diagonal().log().sum() + lc.sum() \
        + geometry.logdet_sigma


def test_batch_equals_factor_by_factor_in_values_and_gradients():
    params = factor_params()
    us = [torch.randn(m_r, m_c, dtype=torch.float64) for _, _, m_r, m_c in SHAPES]
    geometries = batched(params)
    assert all(isinstance(g, BatchedGeometry) for g in geometries)
    for f, g, u in zip(params, geometries, us):
        ref = single(f)
        for name in ("gram", "kernels", "cholesky", "projections"):
            for mine, theirs in zip(getattr(g, name), getattr(ref, name)):
                torch.testing.assert_close(mine, theirs)
        torch.testing.assert_close(g.d_rows, ref.d_rows)
        torch.testing.assert_close(g.logdet_sigma, ref.logdet_sigma)
    flat = [t for f in params for t in f]
    ours = torch.autograd.grad(sum(scalar_of(g, u) for g, u in zip(geometries, us)), flat)
    theirs = torch.autograd.grad(sum(scalar_of(single(f), u) for f, u in zip(params, us)), flat)
    for mine, ref in zip(ours, theirs):
        torch.testing.assert_close(mine, ref)


def test_a_kernel_that_needs_jitter_gets_it_and_a_hopeless_one_is_named():
    params = factor_params()
    with torch.no_grad():
        params[1][0].zero_()  # Z_r = 0 and D_r ~ 0: a singular row kernel for factor f1
        params[1][2].fill_(-40.0)
    geometries = batched(params, jitter=1e-6)
    lr = geometries[1].cholesky[0]
    assert torch.isfinite(lr).all() and (lr.diagonal() > 0).all()
    torch.testing.assert_close(geometries[0].cholesky[0], single(params[0]).cholesky[0])  # the others untouched
    with torch.no_grad():
        params[3][1].fill_(float("nan"))
    with pytest.raises(CholeskyError, match=r"f3 \(columns\)"):
        batched(params)
    with pytest.raises(ValueError, match="one z_rows, z_cols"):
        batch_geometries([params[0][0]], [], [], [], [], [])


def test_gather_takes_a_whole_group_without_copying_and_falls_back_to_stacking():
    params = factor_params()
    geometries = batched(params)
    same = [geometries[i] for i in (0, 2, 4)]  # the (3, 5, 2, 3) group, in order
    stacked = gather(same, "t_rows")
    assert stacked is same[0].batch.groups[same[0].key]["t_rows"]
    torch.testing.assert_close(gather([same[2], same[0]], "t_rows"), torch.stack([same[2].projections[0],
                                                                                    same[0].projections[0]]))
    plain = [single(params[i]) for i in (0, 2)]
    torch.testing.assert_close(gather(plain, "chol_cols"), torch.stack([g.cholesky[1] for g in plain]))


def test_batched_matheron_noise_has_the_conditional_covariance():
    torch.manual_seed(0)
    f = factor_params()[0]
    with torch.no_grad():
        geometry = single(f)
        draws = 20000
        noise = batch_matheron_noise([geometry] * draws).reshape(draws, -1)
    empirical = noise.T @ noise / draws
    assert (empirical - geometry.dense_covariance()).abs().max() < 0.05
    assert noise.mean(0).abs().max() < 0.03


def test_batch_conditionals_draw_mean_plus_scaled_noise_and_know_their_kl():
    torch.manual_seed(1)
    f = factor_params()[0]
    with torch.no_grad():
        geometry = single(f)
        count, scale = 20000, 0.7
        u = torch.randn(2, 3, dtype=torch.float64)
        lams = torch.full((count,), 0.4, dtype=torch.float64)
        conds = batch_conditionals([geometry] * count, u.expand(count, 2, 3), scale, lams, [u] * count)
        draws = torch.stack([c.rsample() for c in conds]).reshape(count, -1)
    mean = scale * geometry.conditional_mean(u).reshape(-1)
    assert (draws.mean(0) - mean).abs().max() < 0.03
    centred = draws - mean
    covariance = (scale * 0.4) ** 2 * geometry.dense_covariance()
    assert (centred.T @ centred / count - covariance).abs().max() < 0.02
    # the draw is handed out once; then the conditional draws afresh
    assert not torch.equal(conds[0].rsample(), draws[0].reshape(3, 5))
    torch.testing.assert_close(conds[0].mean, scale * geometry.conditional_mean(u))
    # KL to the lambda = 1 conditional on the same U: the closed form, batched
    prior = InducingConditional(geometry, u, scale, 1.0, source=u)
    size = 3 * 5
    expected = 0.5 * size * (0.4**2 - 1 - 2 * math.log(0.4))
    kls, index = conds[5].batched_kl(prior)
    torch.testing.assert_close(kls[index], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(_kl_inducing_conditional(conds[5], prior), kls[index])
    other = InducingConditional(geometry, u + 1, scale, 1.0)  # another U: no batched KL
    assert conds[5].batched_kl(other) is None


def test_point_mass_conditionals_are_their_means():
    f = factor_params()[0]
    geometry = single(f)
    u = torch.randn(3, 2, 3, dtype=torch.float64)
    conds = batch_conditionals([geometry] * 3, u, 0.5, None, list(u))
    for cond, ui in zip(conds, u):
        assert cond.is_point_mass and cond.batched_kl(cond) is None
        torch.testing.assert_close(cond.rsample(), 0.5 * geometry.conditional_mean(ui))


def test_factor_conditionals_match_each_factors_own_conditional():
    torch.manual_seed(2)
    config = BLoRAConfig(r=2, inducing_rows=3, inducing_cols=3)
    factors = [InducingFactor(f"l{i}.lora_A", 2, q, config) for i, q in enumerate([5, 5, 7])]
    factors.append(InducingFactor("l3.lora_B", 4, 2, config))
    us = [torch.randn(9) for _ in factors]
    lams = [torch.tensor(0.02), torch.tensor(0.01), 0.0, torch.tensor(0.03)]
    with shared_geometry(f.prior for f in factors):
        conds = factor_conditionals(factors, us, lams)
        for factor, cond, u, lam in zip(factors, conds, us, lams):
            ref = factor.conditional(u, lam)
            assert cond.geometry is ref.geometry and cond.source is u
            torch.testing.assert_close(cond.unit_mean, ref.unit_mean)
            torch.testing.assert_close(cond.inducing, ref.inducing)
            assert cond.rsample().shape == factor.shape


def test_isotropic_normal_is_the_multivariate_normal_it_claims():
    torch.manual_seed(3)
    for sd in (1.0, 0.3):
        iso = IsotropicNormal(6, sd)
        dense = MultivariateNormal(torch.zeros(6), scale_tril=sd * torch.eye(6))
        x = torch.randn(4, 6)
        torch.testing.assert_close(iso.log_prob(x), dense.log_prob(x))
        loc, scale = torch.randn(6), torch.rand(6) + 0.1
        q = Independent(Normal(loc, scale), 1)
        torch.testing.assert_close(kl_divergence(q, iso), kl_divergence(q, dense))
        mvn = MultivariateNormal(loc, scale_tril=torch.diag(scale))
        torch.testing.assert_close(kl_divergence(mvn, iso), kl_divergence(mvn, dense))
    with pytest.raises(ValueError, match="sd must be positive"):
        IsotropicNormal(3, 0.0)

