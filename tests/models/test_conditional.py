"""The math of W | U: mean, Matheron covariance, Woodbury log_prob, closed-form KL."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import MultivariateNormal, kl_divergence

from pyro_blora.models import InducingConditional, InducingGeometry
from pyro_blora.models.geometry import CholeskyError, robust_cholesky


def make_geometry(p=3, q=4, m_r=2, m_c=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return InducingGeometry(
        torch.randn(m_r, p, generator=g, dtype=dtype),
        torch.randn(m_c, q, generator=g, dtype=dtype),
        torch.rand(m_r, generator=g, dtype=dtype) + 0.5,
        torch.rand(m_c, generator=g, dtype=dtype) + 0.5,
    )


def dense_joint(geom):
    """The joint covariance of (vec W, vec U) built from the generative definition."""
    zr, zc = geom.z_rows, geom.z_cols
    p, q = geom.shape
    kr, kc = geom.kernels
    cross = torch.kron(zr, zc)  # Cov(vec U, vec W) = Z_r (x) Z_c
    top = torch.cat([torch.eye(p * q, dtype=zr.dtype), cross.T], 1)
    bottom = torch.cat([cross, torch.kron(kr, kc)], 1)
    return torch.cat([top, bottom], 0)


def test_conditional_mean_matches_independent_formula():
    geom = make_geometry()
    u = torch.randn(2, 3, dtype=torch.float64)
    kr, kc = geom.kernels
    expected = geom.z_rows.T @ torch.linalg.inv(kr) @ u @ torch.linalg.inv(kc) @ geom.z_cols
    torch.testing.assert_close(geom.conditional_mean(u), expected)
    # and against Gaussian conditioning of the dense joint
    joint = dense_joint(geom)
    n = 12
    cond_mean = joint[:n, n:] @ torch.linalg.solve(joint[n:, n:], u.reshape(-1))
    torch.testing.assert_close(geom.conditional_mean(u).reshape(-1), cond_mean)


def test_dense_covariance_is_the_gaussian_conditional():
    geom = make_geometry()
    joint = dense_joint(geom)
    n = 12
    schur = joint[:n, :n] - joint[:n, n:] @ torch.linalg.solve(joint[n:, n:], joint[n:, :n])
    torch.testing.assert_close(geom.dense_covariance(), schur)


def test_matheron_samples_have_the_conditional_covariance():
    torch.manual_seed(0)
    geom = make_geometry()
    noise = geom.matheron_noise(torch.Size([40000])).reshape(40000, -1)
    empirical = noise.T @ noise / noise.shape[0]
    assert (empirical - geom.dense_covariance()).abs().max() < 0.03
    assert noise.mean(0).abs().max() < 0.02


def test_woodbury_log_prob_equals_dense_gaussian():
    geom = make_geometry()
    u = torch.randn(2, 3, dtype=torch.float64)
    scale, lam = 0.3, torch.tensor(0.2, dtype=torch.float64)
    d = InducingConditional(geom, u, scale, lam)
    dense = MultivariateNormal(
        (scale * geom.conditional_mean(u)).reshape(-1), covariance_matrix=(scale * lam) ** 2 * geom.dense_covariance()
    )
    w = d.rsample(torch.Size([5]))
    torch.testing.assert_close(d.log_prob(w), dense.log_prob(w.reshape(5, -1)))
    assert torch.isclose(geom.logdet_sigma, torch.logdet(geom.dense_covariance()))


@pytest.mark.parametrize("lam_q,lam_p,shift", [(0.05, 1.0, 0.0), (0.5, 0.7, 0.0), (0.3, 1.0, 0.4)])
def test_closed_form_kl_equals_dense_gaussian_kl(lam_q, lam_p, shift):
    geom = make_geometry()
    u = torch.randn(2, 3, dtype=torch.float64)
    q = InducingConditional(geom, u, 0.5, torch.tensor(lam_q, dtype=torch.float64))
    p = InducingConditional(geom, u + shift, 0.5, torch.tensor(lam_p, dtype=torch.float64))
    cov = geom.dense_covariance()
    dense_q = MultivariateNormal(q.mean.reshape(-1), covariance_matrix=(0.5 * lam_q) ** 2 * cov)
    dense_p = MultivariateNormal(p.mean.reshape(-1), covariance_matrix=(0.5 * lam_p) ** 2 * cov)
    torch.testing.assert_close(kl_divergence(q, p), kl_divergence(dense_q, dense_p))
    if shift == 0.0:
        size = 12
        r = lam_q / lam_p
        assert math.isclose(float(kl_divergence(q, p)), size / 2 * (r**2 - 1 - 2 * math.log(r)), rel_tol=1e-10)


def test_point_mass_limit():
    geom = make_geometry()
    u = torch.randn(2, 3, dtype=torch.float64)
    q = InducingConditional(geom, u, 0.5, 0.0)
    p = InducingConditional(geom, u, 0.5, 1.0)
    torch.testing.assert_close(q.rsample(), q.mean)
    assert float(q.log_prob(q.mean)) == 0.0
    assert float(kl_divergence(q, p)) == 0.0


def test_monte_carlo_kl_agrees_with_closed_form_on_average():
    """Trace_ELBO scores log q - log p by sampling; TraceMeanField_ELBO uses the registered KL."""
    geom = make_geometry(dtype=torch.float32)
    u = torch.randn(2, 3)
    lam = torch.tensor(0.4)

    def model():
        pyro.sample("W", InducingConditional(geom, u, 0.5, 1.0))

    def guide():
        pyro.sample("W", InducingConditional(geom, u, 0.5, lam))

    pyro.set_rng_seed(0)
    closed = TraceMeanField_ELBO().loss(model, guide)
    monte_carlo = Trace_ELBO(num_particles=4000, vectorize_particles=False).loss(model, guide)
    assert math.isclose(closed, 12 / 2 * (0.16 - 1 - 2 * math.log(0.4)), rel_tol=1e-5)
    assert abs(monte_carlo - closed) < 0.1 * closed


def test_float32_log_prob_is_stable_for_wide_factors():
    torch.manual_seed(0)
    p, q = 2048, 8
    geom = InducingGeometry(torch.randn(9, p) / p**0.5, torch.randn(9, q) / q**0.5, torch.ones(9), torch.ones(9))
    d = InducingConditional(geom, torch.randn(9, 9), 0.1 / q**0.5, torch.tensor(1e-3))
    w = d.rsample()
    value = d.log_prob(w)
    assert torch.isfinite(value)
    # the quadratic form of a true sample is chi-square with pq degrees of freedom
    quad = geom.mahalanobis((w / d.scale - d.unit_mean) / d.lam)
    assert abs(float(quad) / (p * q) - 1) < 0.1


def test_robust_cholesky_adds_jitter_then_names_the_layer():
    singular = torch.ones(3, 3, dtype=torch.float64)
    factor = robust_cholesky(singular, jitter=1e-6)
    assert torch.isfinite(factor).all()
    with pytest.raises(CholeskyError, match="layers.0.q_proj.*raise BLoRAConfig.jitter"):
        robust_cholesky(-torch.eye(3, dtype=torch.float64), jitter=1e-6, name="layers.0.q_proj")
    with pytest.raises(CholeskyError, match="NaN or inf"):
        robust_cholesky(torch.full((2, 2), float("nan")), name="x")
