"""Shared helpers of the figure modules: array conversion, grids, captions, saving.

Figures are built with :class:`~matplotlib.figure.Figure` directly (no ``pyplot``),
see :mod:`pyro_blora.experiments.plots`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from pyro_blora.metrics import ArrayLike

_PRETTY = {
    "elbo": "ELBO",
    "loss": "loss",
    "nll": "NLL",
    "kl": "KL(q || p)",
    "acc": "accuracy",
    "ece": "ECE",
    "lr": "learning rate",
    "predictive_entropy": "predictive entropy (total)",
    "expected_entropy": "expected entropy (aleatoric)",
    "mutual_information": "mutual information (epistemic)",
}

_PRIOR_LABEL = "prior N(0, {sd:g}²)"


def _np(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    try:
        return np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} could not be converted to a float array: {err}") from err


def _finish(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def _caption(fig: Figure, text: str) -> None:
    """A grey subtitle saying how to read the figure: a new user should not need the docs."""
    fig.suptitle(text, fontsize=8.5, color="0.3")


def _grid(fig: Figure, k: int, max_cols: int) -> list:
    """``k`` axes in a near-square grid; surplus cells are removed so ``len(fig.axes) == k``."""
    ncols = min(k, max_cols)
    nrows = math.ceil(k / ncols)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[k:]:
        fig.delaxes(ax)
    return axes[:k]


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    kernel = np.ones(window) / window
    return np.convolve(y, kernel, mode="valid")
