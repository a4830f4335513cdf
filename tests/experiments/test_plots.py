"""pyro_blora.experiments.plots: every figure renders, saves a PNG and has the expected layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pyro_blora import metrics
from pyro_blora.experiments import plots

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == _PNG_MAGIC


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    # The module builds figures without pyplot, but close anything a failure left open.
    import matplotlib.pyplot as plt

    plt.close("all")


@pytest.fixture(scope="module")
def sample_probs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    centre = 2.5 * torch.randn(1, 120, 4, generator=g)
    return torch.softmax(centre + 0.8 * torch.randn(24, 120, 4, generator=g), dim=-1)


@pytest.fixture(scope="module")
def labels(sample_probs: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    pred = sample_probs.mean(0).argmax(1)
    flip = torch.rand(pred.shape, generator=g) < 0.3
    return torch.where(flip, torch.randint(0, 4, pred.shape, generator=g), pred)


def test_reliability_diagram(tmp_path: Path, sample_probs: torch.Tensor, labels: torch.Tensor) -> None:
    map_probs = torch.softmax(3 * torch.log(sample_probs[0]), -1)  # sharpened: over-confident
    results = {"MAP": (map_probs, labels), "Bayesian-LoRA": (sample_probs.mean(0).numpy(), labels.numpy())}
    fig = plots.reliability_diagram(results, n_bins=10, path=tmp_path / "reliability.png")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4  # two methods x (diagram, histogram)
    ece = metrics.expected_calibration_error(map_probs, labels, 10)
    assert f"ECE = {100 * ece:.2f}%" in fig.axes[0].get_title()
    _check_png(tmp_path / "reliability.png")


def test_reliability_diagram_single_method_and_no_path() -> None:
    probs = torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    fig = plots.reliability_diagram({"one": (probs, torch.tensor([0, 1]))})
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="results is empty"):
        plots.reliability_diagram({})


def test_posterior_predictive(tmp_path: Path, sample_probs: torch.Tensor, labels: torch.Tensor) -> None:
    path = tmp_path / "nested" / "predictive.png"
    fig = plots.posterior_predictive(sample_probs, labels, [0, 3, 7, 11, 19], class_names=["A", "B", "C", "D"],
                                     credible=0.9, path=path)
    assert len(fig.axes) == 5  # surplus grid cells removed
    assert "example 3" in fig.axes[1].get_title()
    _check_png(path)
    with pytest.raises(ValueError, match="example_indices must lie in"):
        plots.posterior_predictive(sample_probs, labels, [500])
    with pytest.raises(ValueError, match="class_names has 2 entries"):
        plots.posterior_predictive(sample_probs, labels, [0], class_names=["x", "y"])
    with pytest.raises(ValueError, match="credible must lie strictly between"):
        plots.posterior_predictive(sample_probs, labels, [0], credible=1.0)


def test_posterior_predictive_skewed_samples() -> None:
    # 23 of 24 samples put all mass on class 0: the mean lies outside the 90% interval.
    s = torch.zeros(24, 1, 2)
    s[:, 0, 0] = 1.0
    s[0, 0] = torch.tensor([0.0, 1.0])
    fig = plots.posterior_predictive(s, [1], [0])
    assert len(fig.axes) == 1


def test_training_curves(tmp_path: Path) -> None:
    steps = list(range(0, 400, 2))
    rng = np.random.default_rng(0)
    history = {
        "step": steps,
        "elbo": list(-1000 * np.exp(-np.arange(200) / 50) - 50 + 10 * rng.standard_normal(200)),
        "nll": list(1.5 * np.exp(-np.arange(200) / 40) + 0.3),
        "kl": list(20 + np.arange(200) / 10),
        "eval_acc": [0.5, 0.7, 0.8, 0.82],  # logged less often: plotted against its index
    }
    fig = plots.training_curves(history, path=tmp_path / "curves.png")
    assert len(fig.axes) == 4
    assert fig.axes[0].get_title() == "ELBO"
    assert fig.axes[3].get_xlabel() == "record"
    _check_png(tmp_path / "curves.png")
    with pytest.raises(ValueError, match="no curves"):
        plots.training_curves({"step": [1, 2]})


def test_uncertainty_histograms(tmp_path: Path, sample_probs: torch.Tensor) -> None:
    in_dist = metrics.uncertainty_decomposition(sample_probs)
    shifted_samples = torch.softmax(torch.log(sample_probs) * 0.3 + 0.6 * torch.randn(sample_probs.shape), -1)
    shifted = metrics.uncertainty_decomposition(shifted_samples)
    keys = ("predictive_entropy", "mutual_information")
    fig = plots.uncertainty_histograms({k: in_dist[k] for k in keys}, {k: shifted[k].numpy() for k in keys},
                                       path=tmp_path / "uncertainty.png")
    assert len(fig.axes) == 2
    assert "AUROC" in fig.axes[0].get_title()
    _check_png(tmp_path / "uncertainty.png")
    with pytest.raises(ValueError, match="share no keys"):
        plots.uncertainty_histograms({"a": [1.0]}, {"b": [1.0]})


def test_uncertainty_histograms_constant_scores() -> None:
    fig = plots.uncertainty_histograms({"mutual_information": np.zeros(10)}, {"mutual_information": np.zeros(5)})
    assert len(fig.axes) == 1


def test_risk_coverage_curve(tmp_path: Path, sample_probs: torch.Tensor, labels: torch.Tensor) -> None:
    results = {"sample 0": (sample_probs[0], labels), "MC mean": (sample_probs.mean(0), labels)}
    fig = plots.risk_coverage_curve(results, path=tmp_path / "risk.png")
    assert len(fig.axes) == 1
    assert len(fig.axes[0].get_lines()) == 2
    _check_png(tmp_path / "risk.png")


def test_posterior_marginals(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    samples = {
        "mean-field": torch.randn(500, 6, generator=g) * 0.5,
        "flow": torch.cat([0.5 * torch.randn(250, 6, generator=g) - 1.5, 0.5 * torch.randn(250, 6, generator=g) + 1]),
        "point mass": torch.zeros(1, 6),  # no spread: drawn as a line, not a KDE
    }
    fig = plots.posterior_marginals(samples, dims=(0, 1, 2, 3, 5), path=tmp_path / "marginals.png")
    assert len(fig.axes) == 5
    assert fig.axes[4].get_title() == "dimension 5"
    _check_png(tmp_path / "marginals.png")
    with pytest.raises(ValueError, match="out of range"):
        plots.posterior_marginals(samples, dims=(6,))
    with pytest.raises(ValueError, match=r"\(S, D\)"):
        plots.posterior_marginals({"bad": torch.zeros(3)})
