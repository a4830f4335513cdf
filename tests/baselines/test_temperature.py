"""Temperature scaling: recovering a known T, T = 1, an over-confident model, multi-sample predictives, save/load."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import pyro_blora
from pyro_blora import BLoRAConfig, MCDropoutResult, Prediction, TemperatureScaledResult
from pyro_blora.metrics import negative_log_likelihood
from pyro_blora.baselines.temperature import apply_temperature, fit_temperature, temperature_scale

N_FEATURES, N_CLASSES = 16, 3

pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic(t0: float, n: int = 4000, classes: int = 5, samples: int = 1, seed: int = 0) -> Prediction:
    """Predicted probabilities softmax(z_s) with labels drawn from the mixture of softmax(z_s / t0): T* = t0."""
    g = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(n, classes, generator=g) + 0.5 * torch.randn(samples, n, classes, generator=g)
    truth = torch.softmax(z / t0, -1).mean(0)
    labels = torch.multinomial(truth, 1, generator=g).squeeze(-1)
    sample_probs = torch.softmax(z, -1)
    return Prediction(sample_probs.mean(0), sample_probs, labels)


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), nn.Linear(32, N_CLASSES))


def make_data(n: int, seed: int) -> list[dict]:
    """Three heavily overlapping classes: a net fitted to 30 of them is over-confident."""
    g = torch.Generator().manual_seed(seed)
    centers = 0.4 * torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(n) % N_CLASSES
    x = centers[labels] + torch.randn(n, N_FEATURES, generator=g)
    return [{"inputs": x[i], "labels": int(labels[i])} for i in range(n)]


CONFIG = BLoRAConfig(target_modules=["0", "2"], r=4, inducing_rows=4, inducing_cols=4, dropout=0.0, prior_sd=10.0)


@pytest.fixture(scope="module")
def overconfident():
    return pyro_blora.fit(
        make_net(), make_data(30, 0), "delta", config=CONFIG, num_steps=50, lr=5e-2, batch_size=30,
        weight_decay=0.0, progress=False,
    )


@pytest.mark.parametrize("t0", [0.5, 2.0])
def test_recovers_a_known_temperature(t0: float) -> None:
    assert fit_temperature(synthetic(t0)) == pytest.approx(t0, rel=0.08)


def test_recovers_a_known_temperature_of_a_multi_sample_predictive() -> None:
    prediction = synthetic(2.0, samples=4)
    fitted = fit_temperature(prediction)
    assert fitted == pytest.approx(2.0, rel=0.08)
    scaled = apply_temperature(prediction, fitted)
    assert scaled.sample_probs.shape == (4, 4000, 5)
    # each sample is scaled on its own, then averaged
    expected = torch.softmax(torch.log(prediction.sample_probs) / fitted, -1)
    torch.testing.assert_close(scaled.sample_probs, expected)
    torch.testing.assert_close(scaled.probs, expected.mean(0))
    assert negative_log_likelihood(scaled.probs, scaled.labels) < negative_log_likelihood(prediction.probs, prediction.labels)


def test_temperature_one_changes_nothing() -> None:
    prediction = synthetic(1.0, n=50, samples=3)
    same = apply_temperature(prediction, 1.0)
    torch.testing.assert_close(same.sample_probs, prediction.sample_probs)
    torch.testing.assert_close(same.probs, prediction.probs)
    assert same.labels is prediction.labels


def test_zero_probabilities_are_handled() -> None:
    sample_probs = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.7, 0.3, 0.0], [0.0, 0.0, 1.0]]])
    prediction = Prediction(sample_probs[0], sample_probs, torch.tensor([0, 0, 1, 2]))  # one hard miss
    fitted = fit_temperature(prediction)
    assert math.isfinite(fitted) and fitted > 1  # a confidently wrong 1.0 asks for softer probabilities
    scaled = apply_temperature(prediction, fitted)
    assert torch.isfinite(scaled.probs).all() and scaled.probs[1, 0] > 0
    torch.testing.assert_close(scaled.probs.sum(-1), torch.ones(4))


def test_lowers_the_validation_nll_of_an_overconfident_model(overconfident) -> None:
    val = make_data(90, 1)
    before = overconfident.evaluate(val)
    scaled = temperature_scale(overconfident, val)
    assert isinstance(scaled, TemperatureScaledResult) and scaled.temperature > 1.5
    after = scaled.evaluate(val)
    assert after["temperature"] == scaled.temperature
    assert after["nll"] < before["nll"] - 0.1 and after["ece"] < before["ece"]
    assert after["acc"] == before["acc"]  # one sample: the argmax does not move


def test_save_load_round_trip_restores_the_inner_method(tmp_path, overconfident) -> None:
    val = make_data(30, 2)
    mcd = pyro_blora.fit(
        make_net(), make_data(30, 0), "mc_dropout", config=dataclasses.replace(CONFIG, dropout=0.2), num_steps=3,
        batch_size=15, progress=False,
    )
    assert isinstance(mcd, MCDropoutResult)
    for inner in (overconfident, mcd):
        scaled = temperature_scale(inner, val, num_samples=3, seed=0)
        folder = tmp_path / type(inner).__name__
        scaled.save(folder)
        loaded = pyro_blora.load(folder, make_net())
        assert isinstance(loaded, TemperatureScaledResult) and type(loaded.inner) is type(inner)
        assert loaded.temperature == scaled.temperature and loaded.inner_method == getattr(inner, "method", None)
        torch.testing.assert_close(
            loaded.predict(val, num_samples=3, seed=1).probs, scaled.predict(val, num_samples=3, seed=1).probs
        )


def test_clear_errors(overconfident) -> None:
    prediction = synthetic(1.0, n=10)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            apply_temperature(prediction, bad)
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        TemperatureScaledResult(overconfident, 0.0)
    with pytest.raises(ValueError, match="needs a labelled validation Prediction"):
        fit_temperature(Prediction(prediction.probs, prediction.sample_probs))
    empty = Prediction(torch.zeros(0, 3), torch.zeros(1, 0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty validation Prediction"):
        fit_temperature(empty)
    with pytest.raises(ValueError, match="not probabilities"):
        fit_temperature(Prediction(prediction.probs, torch.full_like(prediction.sample_probs, float("nan")), prediction.labels))
    with pytest.raises(ValueError, match="bounds must satisfy"):
        fit_temperature(prediction, bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="needs val_data"):
        temperature_scale(overconfident, None)
    with pytest.raises(ValueError, match="empty val_data"):
        temperature_scale(overconfident, [])
