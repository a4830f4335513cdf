"""Figures for calibration, uncertainty and posterior diagnostics.

Every function takes plain tensors, arrays, lists and dicts (never library
objects), returns a :class:`matplotlib.figure.Figure` and, when ``path`` is
given, also saves it there (PNG at 120 dpi, tight bounding box).

Figures are built with :class:`~matplotlib.figure.Figure` directly instead of
``pyplot``: nothing is registered with a GUI backend, so the functions work
headless, inside servers and in tests without ``matplotlib.use("Agg")``, and
leave the caller's global backend alone. No ``plt.close`` is needed either: a
figure is freed with its last reference.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from pyro_blora import metrics
from pyro_blora.experiments.plot_base import _PRETTY, _caption, _finish, _grid, _np
from pyro_blora.experiments.plot_training import posterior_marginals, training_curves
from pyro_blora.metrics import ArrayLike

__all__ = [
    "reliability_diagram",
    "posterior_predictive",
    "training_curves",
    "uncertainty_histograms",
    "risk_coverage_curve",
    "posterior_marginals",
    "choose_examples",
]


def choose_examples(sample_probs: ArrayLike, labels: ArrayLike, k: int = 6) -> list[int]:
    """Examples that tell the story: the most uncertain, the wrong ones, and one confident right one.

    Ranked by mutual information (epistemic) and by predictive entropy (total):
    about half the ``k`` slots go to the most uncertain, the rest to wrong
    predictions (most confident first), and the last to the most confident
    correct one, so a reader sees both what the posterior doubts and what it gets.
    """
    s = torch.as_tensor(_np(sample_probs, "sample_probs"))
    y = torch.as_tensor(_np(labels, "labels")).long().reshape(-1)
    if s.ndim != 3 or s.shape[1] != y.shape[0] or k < 1:
        raise ValueError(f"need (S, N, C) sample_probs, (N,) labels and k >= 1; got {tuple(s.shape)}, {tuple(y.shape)}, {k}")
    parts = metrics.uncertainty_decomposition(s)
    mean = s.mean(0)
    conf, pred = mean.max(-1)
    # rank by MI, ties (one-sample posteriors have MI 0) by total entropy
    uncertainty = parts["mutual_information"] + 1e-6 * parts["predictive_entropy"]
    chosen: list[int] = []

    def take(order: list[int], limit: int) -> None:
        for i in order:
            if len(chosen) >= limit:
                return
            if i not in chosen:
                chosen.append(i)

    right = [i for i in conf.argsort(descending=True).tolist() if pred[i] == y[i]]
    budget = k - 1 if right else k
    take(uncertainty.argsort(descending=True).tolist(), max(1, budget // 2))
    take([i for i in conf.argsort(descending=True).tolist() if pred[i] != y[i]], budget)
    take(uncertainty.argsort(descending=True).tolist(), budget)
    take(right, k)
    return chosen


def _require_results(results: Mapping[str, tuple[ArrayLike, ArrayLike]]) -> None:
    if not results:
        raise ValueError("results is empty; pass {method name: (probs, labels)}")


def reliability_diagram(
    results: Mapping[str, tuple[ArrayLike, ArrayLike]],
    n_bins: int = 15,
    path: str | Path | None = None,
) -> Figure:
    """Reliability diagrams, one column per method, with confidence histograms beneath.

    Top row: accuracy per confidence bin (bars) against the diagonal of perfect
    calibration; the hatched red part of each bar is the gap to the bin's mean
    confidence (above the bar: over-confident, inside it: under-confident). The
    title carries the ECE. Bottom row: the fraction of examples in each bin, with
    the overall accuracy and mean confidence marked; a gap between the two lines
    is the "average" miscalibration the ECE weights by these counts.

    Args:
        results: ``{method name: (probs (N, C), labels (N,))}``.
        n_bins: equal-width confidence bins, as in :func:`metrics.expected_calibration_error`.
        path: where to save the PNG, if anywhere.
    """
    _require_results(results)
    m = len(results)
    fig = Figure(figsize=(3.3 * m + 0.5, 5.0), layout="constrained")
    axes = fig.subplots(2, m, squeeze=False, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for j, (name, (probs, labels)) in enumerate(results.items()):
        bins = metrics.calibration_bins(probs, labels, n_bins)
        ece = metrics.expected_calibration_error(probs, labels, n_bins)
        acc_all = metrics.accuracy(probs, labels)
        edges = bins["bin_edges"].numpy()
        conf, acc, count = bins["confidence"].numpy(), bins["accuracy"].numpy(), bins["count"].numpy()
        width, left, full = 1.0 / n_bins, edges[:-1], count > 0

        ax = axes[0, j]
        ax.bar(left[full], acc[full], width, align="edge", color="C0", edgecolor="black", lw=0.6, label="accuracy")
        ax.bar(left[full], (conf - acc)[full], width, bottom=acc[full], align="edge", color="tab:red",
               alpha=0.3, hatch="//", edgecolor="tab:red", lw=0.5, label="gap to confidence")
        ax.plot([0, 1], [0, 1], ls="--", color="0.35", lw=1, label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), title=f"{name}\nECE = {100 * ece:.2f}%   acc = {100 * acc_all:.1f}%")
        ax.grid(alpha=0.25)
        if j == 0:
            ax.set_ylabel("accuracy in bin")
            ax.legend(loc="upper left", fontsize=8, framealpha=0.9)

        axh = axes[1, j]
        n = max(int(count.sum()), 1)
        axh.bar(left, count / n, width, align="edge", color="0.6", edgecolor="black", lw=0.5)
        mean_conf = float((conf * count).sum() / n)
        axh.axvline(acc_all, color="C0", lw=1.5, label="accuracy")
        axh.axvline(mean_conf, color="tab:red", lw=1.5, ls="--", label="mean confidence")
        axh.set_xlabel("top-1 confidence")
        axh.grid(alpha=0.25)
        if j == 0:
            axh.set_ylabel("fraction of\nexamples")
            axh.legend(loc="upper left", fontsize=7, framealpha=0.9)
    _caption(fig, "How to read: bars on the dashed diagonal are calibrated; red above a bar is over-confidence. "
                  "Lower ECE is better.")
    return _finish(fig, path)


def _predictive_inputs(sample_probs: ArrayLike, labels: ArrayLike, example_indices: Sequence[int],
                       class_names: Sequence[str] | None, credible: float
                       ) -> tuple[np.ndarray, np.ndarray, list[int], list[str]]:
    """Checked inputs of :func:`posterior_predictive`: ``(S, N, C)`` samples, labels, indices, class names."""
    s = _np(sample_probs, "sample_probs")
    if s.ndim != 3 or s.size == 0:
        raise ValueError(f"sample_probs must be a non-empty (S, N, C) array, got shape {s.shape}")
    _, n, c = s.shape
    y = _np(labels, "labels").reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"mismatched lengths: sample_probs has N={n} examples but labels has {y.shape[0]}")
    idx = [int(i) for i in example_indices]
    if not idx:
        raise ValueError("example_indices is empty; choose at least one example")
    if any(i < 0 or i >= n for i in idx):
        raise ValueError(f"example_indices must lie in [0, {n - 1}], got {idx}")
    if not 0.0 < credible < 1.0:
        raise ValueError(f"credible must lie strictly between 0 and 1, got {credible}")
    names = [str(k) for k in range(c)] if class_names is None else [str(k) for k in class_names]
    if len(names) != c:
        raise ValueError(f"class_names has {len(names)} entries but there are C={c} classes")
    return s, y, idx, names


def posterior_predictive(
    sample_probs: ArrayLike,
    labels: ArrayLike,
    example_indices: Sequence[int],
    class_names: Sequence[str] | None = None,
    credible: float = 0.9,
    path: str | Path | None = None,
) -> Figure:
    """What the posterior believes about individual examples.

    One panel per example: every posterior sample's class probabilities as
    jittered dots, their Monte-Carlo mean as a bar (the gold class in green), and
    the central ``credible`` interval across samples as an error bar. Wide
    intervals and scattered dots are epistemic uncertainty; a flat mean with
    tight dots is aleatoric.

    Args:
        sample_probs: ``(S, N, C)`` class probabilities per posterior sample.
        labels: ``(N,)`` gold classes.
        example_indices: which of the ``N`` examples to draw.
        class_names: ``C`` tick labels; defaults to ``0..C-1``.
        credible: mass of the central interval, in ``(0, 1)``.
        path: where to save the PNG, if anywhere.
    """
    s, y, idx, names = _predictive_inputs(sample_probs, labels, example_indices, class_names, credible)
    n_samples, _, c = s.shape
    k = len(idx)
    panel_w = max(2.8, 0.5 * c + 1.3)
    fig = Figure(figsize=(panel_w * min(k, 4), 3.3 * math.ceil(k / 4)), layout="constrained")
    rng = np.random.default_rng(0)  # fixed jitter: the same inputs give the same picture
    x = np.arange(c)
    dot_alpha = float(np.clip(25.0 / n_samples, 0.15, 0.8))
    q = [(1 - credible) / 2, (1 + credible) / 2]
    for ax, i in zip(_grid(fig, k, 4), idx):
        ps = s[:, i, :]
        mean = ps.mean(0)
        lo, hi = np.quantile(ps, q, axis=0)
        gold = int(y[i])
        colors = ["tab:green" if cls == gold else "0.7" for cls in range(c)]
        ax.bar(x, mean, 0.7, color=colors, edgecolor="black", lw=0.6, alpha=0.8, zorder=1)
        jitter = rng.uniform(-0.25, 0.25, size=ps.shape)
        ax.scatter(x[None, :] + jitter, ps, s=9, color="C0", alpha=dot_alpha, lw=0, zorder=2)
        # Centre the bar on the interval, not the mean: the mean of a skewed
        # sample can fall outside its own central interval.
        ax.errorbar(x, (lo + hi) / 2, yerr=(hi - lo) / 2, fmt="none", ecolor="black", capsize=4, lw=1.3, zorder=3)
        pred = int(mean.argmax())
        verdict = "correct" if pred == gold else f"predicts {names[pred]}"
        ax.set_title(f"example {i}\ngold: {names[gold]} ({verdict})", fontsize=9)
        long_names = max(map(len, names)) > 4
        ax.set_xticks(x, names, rotation=30 if long_names else 0, ha="right" if long_names else "center")
        ax.set_ylim(0, 1.03)
        ax.set_ylabel("p(y | x, θ)")
        ax.grid(axis="y", alpha=0.25)
    # One shared legend outside the panels, where it cannot hide any dots.
    fig.legend(
        handles=[
            Line2D([], [], ls="", marker="o", color="C0", label=f"posterior samples (S={n_samples})"),
            Patch(facecolor="0.7", edgecolor="black", label="MC mean"),
            Patch(facecolor="tab:green", edgecolor="black", label="MC mean, gold class"),
            Line2D([], [], color="black", marker="_", markersize=8, label=f"central {100 * credible:g}% interval"),
        ],
        loc="outside lower center", ncols=4, fontsize=8, frameon=False,
    )
    _caption(fig, "How to read: green bar = gold class; scattered dots / wide intervals = the posterior disagrees "
                  "(epistemic); a flat mean with tight dots = the input is ambiguous (aleatoric).")
    return _finish(fig, path)


def uncertainty_histograms(
    in_dist: Mapping[str, ArrayLike],
    shifted: Mapping[str, ArrayLike],
    path: str | Path | None = None,
    bins: int = 30,
) -> Figure:
    """Overlaid histograms of uncertainty scores, in-distribution vs shifted inputs.

    One panel per key present in both dicts (typically the output of
    :func:`metrics.uncertainty_decomposition`: ``predictive_entropy`` and
    ``mutual_information``), as densities on shared bins so unequal set sizes
    compare fairly. The title gives the AUROC of separating the two sets by that
    score (:func:`metrics.ood_auroc`).
    """
    keys = [key for key in in_dist if key in shifted]
    if not keys:
        raise ValueError(
            f"in_dist and shifted share no keys (got {sorted(in_dist)} and {sorted(shifted)}); "
            "expected e.g. 'predictive_entropy' and 'mutual_information'"
        )
    fig = Figure(figsize=(4.0 * min(len(keys), 3), 3.2 * math.ceil(len(keys) / 3)), layout="constrained")
    for ax, key in zip(_grid(fig, len(keys), 3), keys):
        a = _np(in_dist[key], f"in_dist[{key!r}]").reshape(-1)
        b = _np(shifted[key], f"shifted[{key!r}]").reshape(-1)
        if a.size == 0 or b.size == 0:
            raise ValueError(f"{key!r} is empty in {'in_dist' if a.size == 0 else 'shifted'}")
        edges = np.histogram_bin_edges(np.concatenate([a, b]), bins=bins)
        auroc = metrics.ood_auroc(a, b)
        for values, color, label in ((a, "C0", "in-distribution"), (b, "C3", "shifted")):
            ax.hist(values, bins=edges, density=True, histtype="stepfilled", alpha=0.35, color=color)
            ax.hist(values, bins=edges, density=True, histtype="step", lw=1.4, color=color,
                    label=f"{label} (n={values.size}, mean={values.mean():.3g})")
            ax.axvline(values.mean(), color=color, ls="--", lw=1)
        ax.set(title=f"{_PRETTY.get(key, key)}\nAUROC(shifted vs in) = {auroc:.3f}", xlabel="nats", ylabel="density")
        ax.ticklabel_format(axis="both", style="sci", scilimits=(-3, 4))  # MI can be ~1e-4 nats
        ax.legend(fontsize=7, framealpha=0.9)
        ax.grid(alpha=0.25)
    _caption(fig, "How to read: the shifted inputs (red) should sit to the right, more uncertain; "
                  "AUROC 0.5 = no separation, 1 = perfect.")
    return _finish(fig, path)


def risk_coverage_curve(
    results: Mapping[str, tuple[ArrayLike, ArrayLike]],
    path: str | Path | None = None,
) -> Figure:
    """Risk (error rate) on the most confident fraction of examples, one line per method.

    A well-ranked model's curve starts low and rises slowly as coverage grows:
    lower is better, and the legend gives each method's area under the
    risk-coverage curve (AURC, lower is better), see :func:`metrics.risk_coverage`.
    """
    _require_results(results)
    fig = Figure(figsize=(5.2, 3.8), layout="constrained")
    ax = fig.subplots()
    for j, (name, (probs, labels)) in enumerate(results.items()):
        rc = metrics.risk_coverage(probs, labels)
        aurc = metrics.area_under_risk_coverage(probs, labels)
        # plot the risk (1 - accuracy) so the curve and its area, AURC, read the same way: lower is better
        ax.plot(rc["coverage"].numpy(), 1.0 - rc["accuracy"].numpy(), color=f"C{j % 10}", lw=1.8,
                label=f"{name} (AURC = {aurc:.3f})")
    ax.set(xlim=(0, 1), xlabel="coverage (fraction of examples kept, most confident first)",
           ylabel="risk: error rate on kept examples (lower is better)",
           title="Selective prediction: risk vs coverage (lower is better)")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8, framealpha=0.9)
    _caption(fig, "How to read: a curve that stays low while coverage grows ranks its own errors as least confident.")
    return _finish(fig, path)
