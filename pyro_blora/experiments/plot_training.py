"""Figures of how a fit went: training curves and the marginals of q(U).

Re-exported by :mod:`pyro_blora.experiments.plots`; import them from there.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pyro_blora.experiments.plot_base import _PRETTY, _PRIOR_LABEL, _caption, _finish, _grid, _moving_average, _np
from pyro_blora.metrics import ArrayLike

__all__ = ["training_curves", "posterior_marginals"]


def _num_data(history: Mapping[str, Sequence[float]]) -> float | None:
    """The training-set size ``N`` behind ``loss = N * nll + beta * kl``, read back from the history."""
    try:
        loss, nll, kl, beta = (_np(history[k], k).reshape(-1) for k in ("loss", "nll", "kl", "beta"))
    except KeyError:
        return None
    if not loss.shape == nll.shape == kl.shape == beta.shape:
        return None
    ok = np.isfinite(loss) & np.isfinite(kl) & np.isfinite(beta) & (nll > 0)
    return float(np.median((loss[ok] - beta[ok] * kl[ok]) / nll[ok])) if ok.any() else None


def _readable_curves(history: Mapping[str, Sequence[float]], has_posterior: bool | None,
                     num_data: float | None) -> dict[str, tuple[str, np.ndarray]]:
    """``{key: (panel title, values)}``: per-example NLL, a KL per example that shows its change, the rest.

    A flow's conditional KL carries a large constant (~1e6) that swamps the
    ELBO and flattens the raw KL panel, so: no ELBO/loss panel when the NLL is
    logged, the KL divided by ``N`` and shown as its change from the first step
    (the constant goes in the title), and no KL at all without a posterior (MAP).
    """
    skip = {"step", "lr", "elbo", "loss", "nll", "kl", "beta"}
    out: dict[str, tuple[str, np.ndarray]] = {}
    if "nll" in history:
        out["nll"] = ("NLL per training example (lower is better)", _np(history["nll"], "history['nll']").reshape(-1))
    else:
        skip -= {"elbo", "loss"}
    kl = _np(history["kl"], "history['kl']").reshape(-1) if "kl" in history else np.array([])
    finite = kl[np.isfinite(kl)]
    live = has_posterior if has_posterior is not None else bool(finite.size and np.abs(finite).max() > 0)
    if live and finite.size:
        n = num_data or 1.0
        per = kl / n
        start = float(per[np.isfinite(per)][0])
        what = "per training example" if num_data else "(N unknown)"
        out["kl"] = (f"KL(q || p) {what}\nminus its start value {start:.4g}", per - start)
    beta = _np(history.get("beta", []), "history['beta']").reshape(-1)
    if live and beta.size and np.ptp(beta) > 0:  # a constant KL weight says nothing
        out["beta"] = ("KL weight β (annealing)", beta)
    for key in history:
        if key not in skip:
            out[key] = (_PRETTY.get(key, key), _np(history[key], f"history[{key!r}]").reshape(-1))
    return out


def training_curves(history: Mapping[str, Sequence[float]], path: str | Path | None = None,
                    has_posterior: bool | None = None, num_data: float | None = None) -> Figure:
    """Readable training curves from a fit history (``result.history`` or a saved ``history.json``).

    Panels: the per-example NLL, the KL per training example as its change
    from the first step (see :func:`_readable_curves` for why), the KL weight
    when it is annealed, and any other logged key. Curves are plotted against
    ``history["step"]`` when of the same length, otherwise against their record
    index; long noisy curves get a moving average on a faint raw trace.

    Args:
        history: ``{"step", "nll", "kl", "loss", "beta", ...: values}``.
        path: where to save the PNG, if anywhere.
        has_posterior: ``False`` for MAP / delta (no q, so no KL panel); ``None``
            decides from the history (a KL that is all NaN or zero means no q).
        num_data: training-set size ``N``; ``None`` reads it back from ``loss``,
            ``nll``, ``kl`` and ``beta``.
    """
    curves = _readable_curves(history, has_posterior, num_data if num_data is not None else _num_data(history))
    if not curves:
        raise ValueError("history has no curves to plot; expected keys like 'nll', 'kl', 'loss'")
    steps = _np(history["step"], "history['step']").reshape(-1) if "step" in history else None
    k = len(curves)
    fig = Figure(figsize=(3.8 * min(k, 3), 3.1 * math.ceil(k / 3) + 0.4), layout="constrained")
    for j, (ax, (key, (label, y))) in enumerate(zip(_grid(fig, k, 3), curves.items())):
        aligned = steps is not None and steps.shape[0] == y.shape[0]
        x = steps if aligned else np.arange(y.shape[0])
        color = f"C{j % 10}"
        if y.shape[0] > 20:
            window = max(2, y.shape[0] // 20)
            ax.plot(x, y, color=color, lw=0.8, alpha=0.35, label="raw")
            ax.plot(x[window - 1:], _moving_average(y, window), color=color, lw=2, label=f"moving avg ({window})")
            ax.legend(fontsize=7, framealpha=0.9)
        else:
            ax.plot(x, y, color=color, lw=1.5, marker="o", markersize=3)
        ax.set(title=label, xlabel="step" if aligned else "record", ylabel=_PRETTY.get(key, key))
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.25)
    _caption(fig, "How to read: the NLL should fall and level off; the KL change shows q moving away from "
                  "the prior (rising) or back (falling)." if "kl" in curves else
                  "How to read: the NLL should fall and level off (no KL: this method has no posterior q).")
    return _finish(fig, path)


def _kde(x: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """Gaussian KDE with Scott's bandwidth; ``None`` when it is undefined (one value)."""
    if x.size > 4000:  # the curve is a guide to the eye; a subsample keeps it O(grid * 4000)
        x = np.random.default_rng(0).choice(x, 4000, replace=False)
    std = x.std()
    if x.size < 2 or std == 0:
        return None
    bw = 1.06 * std * x.size ** (-0.2)
    z = (grid[:, None] - x[None, :]) / bw
    return np.exp(-0.5 * z**2).sum(1) / (x.size * bw * math.sqrt(2 * math.pi))


def posterior_marginals(
    samples: Mapping[str, ArrayLike],
    dims: Sequence[int] = (0, 1, 2, 3),
    path: str | Path | None = None,
    bins: int = 40,
    layer: str | None = None,
    prior_sd: float | None = 1.0,
) -> Figure:
    """Marginals of chosen coordinates of posterior samples, one panel per coordinate.

    Each guide's samples (``{guide name: (S, D)}``, e.g. flattened draws of the
    inducing weights ``U``) are drawn as a shaded density histogram on bins shared
    across guides plus a Gaussian KDE line, so mean-field, low-rank and flow
    guides can be compared for location, spread and skew/multimodality.

    Args:
        layer: the module the samples belong to, named in the title.
        prior_sd: overlay the prior ``N(0, prior_sd^2)`` as a dashed black line
            (the whitened prior of ``U_w`` is ``N(0, 1)``); ``None`` for none.
    """
    if not samples:
        raise ValueError("samples is empty; pass {guide name: (S, D) samples}")
    dims = [int(d) for d in dims]
    if not dims:
        raise ValueError("dims is empty; choose at least one dimension")
    arrays = {}
    for name, value in samples.items():
        arr = _np(value, f"samples[{name!r}]")
        if arr.ndim != 2 or arr.shape[0] == 0:
            raise ValueError(f"samples[{name!r}] must be a non-empty (S, D) array, got shape {arr.shape}")
        if any(d < 0 or d >= arr.shape[1] for d in dims):
            raise ValueError(f"dims {dims} out of range for samples[{name!r}] with D={arr.shape[1]}")
        arrays[name] = arr
    fig = Figure(figsize=(3.3 * min(len(dims), 4), 2.9 * math.ceil(len(dims) / 4)), layout="constrained")
    for ax, d in zip(_grid(fig, len(dims), 4), dims):
        column = {name: arr[:, d] for name, arr in arrays.items()}
        edges = np.histogram_bin_edges(np.concatenate(list(column.values())), bins=bins)
        pad = 0.1 * (edges[-1] - edges[0])
        grid = np.linspace(edges[0] - pad, edges[-1] + pad, 256)
        for j, (name, x) in enumerate(column.items()):
            color = f"C{j % 10}"
            density = _kde(x, grid)
            if density is None:
                # A point mass has no density; a histogram of it would dwarf the
                # other guides' y-scale, so mark its location only.
                ax.axvline(float(x[0]), color=color, lw=1.8, ls="--")
                continue
            ax.hist(x, bins=edges, density=True, histtype="stepfilled", alpha=0.25, color=color)
            ax.plot(grid, density, color=color, lw=1.8)
        if prior_sd is not None:
            z = grid / prior_sd
            ax.plot(grid, np.exp(-0.5 * z**2) / (prior_sd * math.sqrt(2 * math.pi)), color="black", ls="--",
                    lw=1.2, label=_PRIOR_LABEL.format(sd=prior_sd))
        ax.set(title=f"dimension {d}", xlabel="value", ylabel="density", xlim=(grid[0], grid[-1]))
        ax.grid(alpha=0.25)
    fig.legend(
        handles=[Line2D([], [], color=f"C{j % 10}", lw=2, ls="-" if arr.shape[0] > 1 and arr.std(0).any() else "--",
                        label=f"{name} (S={arr.shape[0]})")
                 for j, (name, arr) in enumerate(arrays.items())]
        + ([Line2D([], [], color="black", ls="--", lw=1.2, label=_PRIOR_LABEL.format(sd=prior_sd))]
           if prior_sd is not None else []),
        loc="outside lower center", ncols=min(len(arrays) + 1, 4), fontsize=8, frameon=False,
    )
    where = f"layer {layer}" if layer else "inducing weights"
    _caption(fig, f"q(U) marginals of {where}\nHow to read: a guide on top of the dashed prior learned nothing "
                  "there; a shifted or narrower curve is what the data taught.")
    return _finish(fig, path)
