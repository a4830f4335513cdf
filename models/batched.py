"""The geometry of many factors at once, kept stacked.

A network has one :class:`~pyro_blora.models.geometry.InducingGeometry` per LoRA
factor, often hundreds, each a handful of ``9 x 9`` kernels: computed one by one,
the per-op and per-autograd-node overhead is larger than the arithmetic.
:func:`batch_geometries` groups the factors by shape (``p x q`` and
``m_r x m_c``, dtype, device) and computes, per group and side (rows, columns),

.. math::

    G = Z Z^\\top, \\qquad K = G + D^2, \\qquad L = \\mathrm{chol}(K), \\qquad T = K^{-1} Z

on stacked ``(n, m, w)`` tensors, with one batched Cholesky over every kernel of
the same size. Each factor gets a :class:`BatchedGeometry`: the same interface,
whose quantities are rows of the stacked tensors, taken only when a per-factor
computation asks for them. Batched consumers (:func:`gather`,
:func:`batch_matheron_noise`) take whole groups without splitting and
re-stacking them.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cached_property
from typing import Callable, Sequence

import torch
from torch import Tensor

from .geometry import InducingGeometry, batched_cholesky
from .packing import stack_parameters, take_rows

__all__ = [
    "BatchedGeometry",
    "GeometryBatch",
    "batch_geometries",
    "gather",
    "take_rows",
    "batch_matheron_parts",
    "batch_matheron_noise",
]


class GeometryBatch:
    """Stacked kernel quantities of factor groups: ``groups[key][name]`` is ``(n, ...)``.

    Names: ``z_rows``, ``z_cols`` (factor dtype), ``d_rows``, ``d_cols`` (factor dtype),
    ``z64_*``, ``gram_*``, ``kernel_*``, ``chol_*`` (float64), ``t_rows`` (``n x p x m_r``)
    and ``t_cols`` (``n x m_c x q``) in the factor dtype.
    """

    def __init__(self) -> None:
        self.groups: dict[tuple, dict[str, Tensor]] = {}


class BatchedGeometry(InducingGeometry):
    """An :class:`InducingGeometry` whose quantities are rows of a :class:`GeometryBatch`."""

    def __init__(self, batch: GeometryBatch, key: tuple, position: int, z_rows: Tensor, z_cols: Tensor,
                 jitter: float, name: str):
        self.z_rows = z_rows
        self.z_cols = z_cols
        self.jitter = jitter
        self.name = name
        self.batch = batch
        self.key = key
        self.position = position

    def _row(self, name: str) -> Tensor:
        return self.batch.groups[self.key][name][self.position]

    def _pair(self, name: str) -> tuple[Tensor, Tensor]:
        """This factor's ``(<name>_rows, <name>_cols)`` from the batch."""
        return self._row(f"{name}_rows"), self._row(f"{name}_cols")

    @cached_property
    def d_rows(self) -> Tensor:  # type: ignore[override]
        return self._row("d_rows")

    @cached_property
    def d_cols(self) -> Tensor:  # type: ignore[override]
        return self._row("d_cols")

    @cached_property
    def _z64(self) -> tuple[Tensor, Tensor]:
        return self._pair("z64")

    @cached_property
    def gram(self) -> tuple[Tensor, Tensor]:
        return self._pair("gram")

    @cached_property
    def kernels(self) -> tuple[Tensor, Tensor]:
        return self._pair("kernel")

    @cached_property
    def cholesky(self) -> tuple[Tensor, Tensor]:
        return self._pair("chol")

    @cached_property
    def projections(self) -> tuple[Tensor, Tensor]:
        return self._pair("t")


def batch_geometries(
    z_rows: Sequence[Tensor],
    z_cols: Sequence[Tensor],
    log_d_rows: Sequence[Tensor],
    log_d_cols: Sequence[Tensor],
    jitters: Sequence[float],
    names: Sequence[str],
) -> list[BatchedGeometry]:
    """The geometries of many factors (``D = exp(log D)``), computed batched; see the module docstring.

    Values and gradients equal those of ``InducingGeometry(z_r, z_c, exp(log_d_r),
    exp(log_d_c))`` factor by factor (``tests/models/test_batched.py``); a kernel
    that needs jitter gets it alone, with the factor's name in any error.
    """
    count = len(z_rows)
    if not count == len(z_cols) == len(log_d_rows) == len(log_d_cols) == len(jitters) == len(names):
        raise ValueError("batch_geometries needs one z_rows, z_cols, log_d_rows, log_d_cols, jitter and name per factor")
    batch = GeometryBatch()
    members: dict[tuple, list[int]] = defaultdict(list)
    for index in range(count):
        zr, zc = z_rows[index], z_cols[index]
        members[(tuple(zr.shape), tuple(zc.shape), zr.dtype, zr.device)].append(index)

    by_size: dict[tuple, list[tuple[tuple, str]]] = defaultdict(list)  # kernels to factorise together
    for key, indices in members.items():
        group: dict[str, Tensor] = {}
        for side, zs, log_ds in (("rows", z_rows, log_d_rows), ("cols", z_cols, log_d_cols)):
            z = stack_parameters([zs[i] for i in indices])
            d = stack_parameters([log_ds[i] for i in indices]).exp()
            z64 = z.double()
            gram = z64 @ z64.transpose(-1, -2)
            group.update({f"z_{side}": z, f"d_{side}": d, f"z64_{side}": z64, f"gram_{side}": gram,
                          f"kernel_{side}": gram + torch.diag_embed(d.double() ** 2)})
            by_size[(z.shape[1], key[2], key[3])].append((key, side))
        batch.groups[key] = group

    for entries in by_size.values():
        kernels = torch.cat([batch.groups[key][f"kernel_{side}"] for key, side in entries])
        side_jitters, side_names = [], []
        for key, side in entries:
            label = "rows" if side == "rows" else "columns"
            side_jitters += [jitters[i] for i in members[key]]
            side_names += [f"{names[i]} ({label})" for i in members[key]]
        factors = batched_cholesky(kernels, side_jitters, side_names)
        sizes = [batch.groups[key][f"kernel_{side}"].shape[0] for key, side in entries]
        for (key, side), lower in zip(entries, factors.split(sizes)):
            group = batch.groups[key]
            group[f"chol_{side}"] = lower
            solved = torch.cholesky_solve(group[f"z64_{side}"], lower).to(key[2])  # K^{-1} Z, (n, m, w)
            group[f"t_{side}"] = solved.transpose(-1, -2) if side == "rows" else solved

    out: list[BatchedGeometry] = [None] * count  # type: ignore[list-item]
    for key, indices in members.items():
        for position, index in enumerate(indices):
            out[index] = BatchedGeometry(batch, key, position, z_rows[index], z_cols[index], jitters[index], names[index])
    return out


_PER_FACTOR: dict[str, Callable[[InducingGeometry], Tensor]] = {
    "z_rows": lambda g: g.z_rows,
    "z_cols": lambda g: g.z_cols,
    "d_rows": lambda g: g.d_rows,
    "d_cols": lambda g: g.d_cols,
    "chol_rows": lambda g: g.cholesky[0],
    "chol_cols": lambda g: g.cholesky[1],
    "t_rows": lambda g: g.projections[0],
    "t_cols": lambda g: g.projections[1],
}


def gather(geometries: Sequence[InducingGeometry], name: str) -> Tensor:
    """A quantity (a key of ``_PER_FACTOR``) of factors of one shape, stacked ``(n, ...)``.

    Taken from the batch in one op when the geometries are rows of one group,
    else stacked factor by factor.
    """
    first = geometries[0]
    if isinstance(first, BatchedGeometry) and all(
        isinstance(g, BatchedGeometry) and g.batch is first.batch and g.key == first.key for g in geometries
    ):
        return take_rows(first.batch.groups[first.key][name], [g.position for g in geometries])  # type: ignore[union-attr]
    return torch.stack([_PER_FACTOR[name](g) for g in geometries])


def batch_matheron_parts(geometries: Sequence[InducingGeometry]) -> tuple[Tensor, Tensor]:
    """The joint prior draw ``(E, U_bar)`` of Matheron's rule for ``n`` factors of one shape.

    ``E ~ MN(0, I, I)`` (``n x p x q``) and, with independent standard ``E_2, E_3, E_4``,
    ``U_bar = Z_r (E Z_c^T + E_2 D_c) + D_r (E_3 Z_c^T + E_4 D_c)`` (``n x m_r x m_c``),
    whose covariance is ``K_r (x) K_c`` and cross-covariance with ``E`` is
    ``Z_r (x) Z_c`` (Wilson et al., 2020). Then ``E - T_r U_bar T_c`` is a draw of
    ``W - E[W | U]`` under the unit-scale conditional prior.
    """
    first = geometries[0]
    count = len(geometries)
    p, q = first.shape
    m_r, m_c = first.inducing_shape
    zr = gather(geometries, "z_rows")
    zc_t = gather(geometries, "z_cols").transpose(-1, -2)
    dr = gather(geometries, "d_rows").unsqueeze(-1)
    dc = gather(geometries, "d_cols").unsqueeze(-2)
    kw = {"dtype": first.dtype, "device": zr.device}
    e = torch.randn(count, p, q, **kw)
    e2 = torch.randn(count, p, m_c, **kw)
    e3 = torch.randn(count, m_r, q, **kw)
    e4 = torch.randn(count, m_r, m_c, **kw)
    u_bar = zr @ (e @ zc_t + e2 * dc) + dr * (e3 @ zc_t + e4 * dc)
    return e, u_bar


def batch_matheron_noise(geometries: Sequence[InducingGeometry]) -> Tensor:
    """One draw of :meth:`InducingGeometry.matheron_noise` for each of ``n`` factors of one shape, ``(n, p, q)``."""
    e, u_bar = batch_matheron_parts(geometries)
    return e - gather(geometries, "t_rows") @ u_bar @ gather(geometries, "t_cols")
