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
    assert "How to read" in fig.get_suptitle()
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
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["A", "B", "C", "D"]
    assert "How to read" in fig.get_suptitle()
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
    assert len(fig.axes) == 3  # NLL, KL, eval_acc: the ELBO (swamped by the KL constant) is left out
    assert fig.axes[0].get_title().startswith("NLL per training example")
    assert "KL" in fig.axes[1].get_title()
    assert fig.axes[2].get_xlabel() == "record"
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
    assert "How to read" in fig.get_suptitle()
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
    assert "lower is better" in fig.axes[0].get_ylabel()
    assert "lower is better" in fig.axes[0].get_title()
    _check_png(tmp_path / "risk.png")


def test_posterior_marginals(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    samples = {
        "mean-field": torch.randn(500, 6, generator=g) * 0.5,
        "flow": torch.cat([0.5 * torch.randn(250, 6, generator=g) - 1.5, 0.5 * torch.randn(250, 6, generator=g) + 1]),
        "point mass": torch.zeros(1, 6),  # no spread: drawn as a line, not a KDE
    }
    fig = plots.posterior_marginals(samples, dims=(0, 1, 2, 3, 5), path=tmp_path / "marginals.png",
                                    layer="model.layers.29.self_attn.q_proj")
    assert len(fig.axes) == 5
    assert fig.axes[4].get_title() == "dimension 5"
    assert "model.layers.29.self_attn.q_proj" in fig.get_suptitle()
    assert any(line.get_label() == "prior N(0, 1²)" for line in fig.axes[0].get_lines())
    _check_png(tmp_path / "marginals.png")
    with pytest.raises(ValueError, match="out of range"):
        plots.posterior_marginals(samples, dims=(6,))
    with pytest.raises(ValueError, match=r"\(S, D\)"):
        plots.posterior_marginals({"bad": torch.zeros(3)})


def _flow_like_history(n: int = 491, kl_constant: float = 1e6) -> dict[str, list[float]]:
    """A flow's history: a KL dominated by a large constant, the loss N * nll + beta * kl."""
    nll = list(0.7 * np.exp(-np.arange(60) / 20) + 0.2)
    kl = [kl_constant + 50 * t for t in range(60)]
    return {"step": list(range(1, 61)), "nll": nll, "kl": kl, "beta": [1.0] * 60,
            "loss": [n * a + b for a, b in zip(nll, kl)], "elbo": [-(n * a + b) for a, b in zip(nll, kl)]}


def test_training_curves_readable_kl_per_example() -> None:
    fig = plots.training_curves(_flow_like_history())
    assert [ax.get_title().split("\n")[0] for ax in fig.axes] == [
        "NLL per training example (lower is better)", "KL(q || p) per training example"]
    kl_line = fig.axes[1].get_lines()[-1].get_ydata()
    assert abs(kl_line[0]) < 1.0  # the constant is taken out: the curve starts near 0 and shows its change
    assert f"{1e6 / 491:.4g}" in fig.axes[1].get_title()  # ... and is named in the title (N read from the loss)


def test_training_curves_no_kl_panel_for_map() -> None:
    history = _flow_like_history()
    history["kl"] = [float("nan")] * 60
    assert [ax.get_title() for ax in plots.training_curves(history).axes] == ["NLL per training example (lower is better)"]
    fig = plots.training_curves(_flow_like_history(), has_posterior=False)
    assert len(fig.axes) == 1 and "no posterior" in fig.get_suptitle()


def test_choose_examples_tells_the_story() -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.softmax(4 * torch.randn(1, 40, 2, generator=g) + 0.05 * torch.randn(16, 40, 2, generator=g), -1)
    s[:, 7] = torch.tensor([[0.95, 0.05], [0.05, 0.95]]).repeat(8, 1)  # the samples disagree: most uncertain
    y = s.mean(0).argmax(-1).clone()
    y[12] = 1 - y[12]  # one confident wrong prediction
    chosen = plots.choose_examples(s, y, k=6)
    assert len(chosen) == 6 == len(set(chosen))
    assert chosen[0] == 7 and 12 in chosen
    confident_right = max((i for i in range(40) if i not in (7, 12)), key=lambda i: float(s.mean(0)[i].max()))
    assert confident_right in chosen
    fig = plots.posterior_predictive(s, y, chosen, class_names=["negative", "positive"])
    ticks = {t.get_text() for ax in fig.axes for t in ax.get_xticklabels()}
    assert ticks == {"negative", "positive"}
    assert any("predicts" in ax.get_title() for ax in fig.axes)  # a wrong one is on show


def test_write_plots_reads_a_run_folder(tmp_path: Path, sample_probs: torch.Tensor, labels: torch.Tensor) -> None:
    import json

    from safetensors.torch import save_file

    from pyro_blora.experiments.report import write_plots

    for method, draws in (("delta", sample_probs[:1]), ("flow", sample_probs)):
        folder = tmp_path / method
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({"method": method}))
        (folder / "history.json").write_text(json.dumps(_flow_like_history()))
        (folder / "experiment.json").write_text(json.dumps({"class_names": [" bad", " meh", " ok", " good"]}))
        tensors = {"test_sample_probs": draws.contiguous(), "test_labels": labels.contiguous()}
        if method == "flow":
            tensors["q_u.model.layers.1.self_attn.q_proj"] = torch.randn(50, 3, 4)
        save_file(tensors, str(folder / "predictions.safetensors"))
    names = {p.name for p in write_plots(tmp_path)}
    assert {"reliability.png", "risk_coverage.png", "training_curves_delta.png", "training_curves_flow.png",
            "posterior_predictive_flow.png", "q_u_marginals.png"} <= names
    assert all((tmp_path / name).is_file() for name in names)
