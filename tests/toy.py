"""Toy classification data and networks shared by the method tests (fit, ensemble, MC dropout, BLoB).

Three Gaussian clusters in 16 dimensions, far enough apart that a few optimiser
steps separate them; the networks are seeded so every test starts from the same
weights.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from pyro_blora import BLoRAConfig

N_FEATURES, N_CLASSES = 16, 3


def make_net(dropout: Optional[float] = None) -> nn.Module:
    """``Linear(16, 32) -> ReLU [-> Dropout(dropout)] -> Linear(32, 3)``; the adapted layers are "0" and "2" (or "3")."""
    torch.manual_seed(1234)
    middle = [nn.Dropout(dropout)] if dropout is not None else []
    return nn.Sequential(nn.Linear(N_FEATURES, 32), nn.ReLU(), *middle, nn.Linear(32, N_CLASSES))


def make_config(**changes) -> BLoRAConfig:
    """Rank 4 on both layers of :func:`make_net`, 4 x 4 inducing matrices, no dropout, prior sd 1."""
    values = dict(target_modules=["0", "2"], r=4, inducing_rows=4, inducing_cols=4, dropout=0.0, prior_sd=1.0)
    values.update(changes)
    return BLoRAConfig(**values)


def make_data(n: int = 48, seed: int = 0) -> list[dict]:
    """``n`` examples ``{"inputs", "labels"}`` with balanced labels; the cluster centres do not depend on ``seed``."""
    g = torch.Generator().manual_seed(seed)
    centers = 3.0 * torch.randn(N_CLASSES, N_FEATURES, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(n) % N_CLASSES
    x = centers[labels] + torch.randn(n, N_FEATURES, generator=g)
    return [{"inputs": x[i], "labels": int(labels[i])} for i in range(n)]
