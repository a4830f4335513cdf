"""The inducing-point geometry shared by the prior and the conditional W | U.

For a LoRA factor ``W`` of shape ``p x q`` (rows x columns) with row inducing
inputs ``Z_r`` (``m_r x p``), column inducing inputs ``Z_c`` (``m_c x q``) and
positive diagonals ``D_r``, ``D_c``, the joint Gaussian of ``W`` and the inducing
matrix ``U`` (``m_r x m_c``) is (Ritter et al., 2021, Sec. 3; Lin et al., 2026)::

    W ~ MN(0, I_p, I_q),     U = Z_r W Z_c^T + (independent noise),
    Cov(U) = K_r (x) K_c,    K_r = Z_r Z_r^T + D_r^2,   K_c = Z_c Z_c^T + D_c^2,
    Cov(W, U) = Z_r^T (x) Z_c^T.

Conditioning gives ``E[W | U] = T_r U T_c`` with ``T_r = Z_r^T K_r^{-1}``,
``T_c = K_c^{-1} Z_c`` and ``Cov(W | U) = Sigma = I - P_r (x) P_c`` where
``P_r = Z_r^T K_r^{-1} Z_r``. ``Sigma`` is the identity minus a Kronecker term of
rank ``m_r m_c``, so Woodbury and the matrix determinant lemma give its inverse
and log-determinant through the ``m_r m_c`` square matrix::

    S = K_r (x) K_c - G_r (x) G_c = G_r (x) D_c^2 + D_r^2 (x) K_c,   G = Z Z^T,
    Sigma^{-1} = I + V S^{-1} V^T,   V = Z_r^T (x) Z_c^T,
    log det Sigma = log det S - m_c log det K_r - m_r log det K_c.

``S`` is formed from its second expression, which has no cancellation. All the
``m x m`` algebra runs in float64; results come back in the factor's dtype.

:mod:`.batched` computes the same quantities for many factors at once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["InducingGeometry", "CholeskyError", "robust_cholesky", "batched_cholesky", "deferred_checks"]

_DEFERRED: Optional[list[tuple[str, Tensor]]] = None


@contextlib.contextmanager
def deferred_checks(flags: list[tuple[str, Tensor]]) -> Iterator[list[tuple[str, Tensor]]]:
    """Inside the block, Cholesky factorisations do not read their failure flag on the host.

    Each appends ``(description, failed)`` to ``flags`` (``failed`` a boolean tensor
    on the device) and returns the plain factor, without jitter retries; the caller
    reads the flags later (``TrainingState.flush``, every ``host_sync_every`` steps).
    Training uses it after a first step whose factorisations ran with the checks
    and retries, so that the steady-state step never waits for the device.
    """
    global _DEFERRED
    previous, _DEFERRED = _DEFERRED, flags
    try:
        yield flags
    finally:
        _DEFERRED = previous


def _deferred(factor: Tensor, info: Tensor, name: str) -> Tensor:
    assert _DEFERRED is not None
    _DEFERRED.append((f"the Cholesky factorisation of {name or 'an inducing kernel'}", (info != 0).any()))
    return factor


class CholeskyError(RuntimeError):
    """A kernel matrix stayed non-positive-definite after jitter was added."""


def robust_cholesky(matrix: Tensor, jitter: float = 1e-6, max_tries: int = 4, name: str = "") -> Tensor:
    """Cholesky factor of a symmetric PD matrix, adding growing diagonal jitter on failure.

    Jitter starts at ``jitter * mean(diag)`` and grows tenfold per retry, as
    GPyTorch's ``psd_safe_cholesky`` does. Raises :class:`CholeskyError` naming
    the layer and the ``jitter`` setting when every try fails.
    """
    factor, info = torch.linalg.cholesky_ex(matrix)
    if _DEFERRED is not None:
        return _deferred(factor, info, name)
    if not bool(info.any()):
        return factor
    if not torch.isfinite(matrix).all():
        raise CholeskyError(
            f"kernel matrix of {name or 'an inducing factor'} contains NaN or inf; "
            "the inducing inputs Z or diagonals D diverged (lower the learning rate or clip gradients)"
        )
    scale = matrix.diagonal().abs().mean().clamp_min(1e-12)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    added = jitter * scale
    for _ in range(max_tries):
        factor, info = torch.linalg.cholesky_ex(matrix + added * eye)
        if not bool(info.any()):
            return factor
        added = added * 10
    raise CholeskyError(
        f"Cholesky of the kernel matrix of {name or 'an inducing factor'} failed even with jitter "
        f"{float(added / 10):.3g}; raise BLoRAConfig.jitter (now {jitter:g}) or check Z and D for degeneracy"
    )


def batched_cholesky(
    matrices: Tensor, jitters: Sequence[float] | float = 1e-6, names: Sequence[str] | None = None
) -> Tensor:
    """Cholesky factors of a batch ``(n, m, m)`` of symmetric PD matrices in one call.

    Matrices the plain factorisation rejects are redone one by one with
    :func:`robust_cholesky` (growing jitter, an error naming the factor). One
    host synchronisation per batch reads the failure flags (none inside :func:`deferred_checks`).
    """
    factor, info = torch.linalg.cholesky_ex(matrices)
    if _DEFERRED is not None:
        return _deferred(factor, info, ", ".join(n for n in (names or []) if n))
    if not bool(info.any()):
        return factor
    count = matrices.shape[0]
    jitters = [float(jitters)] * count if isinstance(jitters, (int, float)) else list(jitters)
    names = list(names) if names is not None else [""] * count
    rows = list(factor.unbind(0))
    for index in info.nonzero().flatten().tolist():
        rows[index] = robust_cholesky(matrices[index], jitters[index], name=names[index])
    return torch.stack(rows)


@dataclass(eq=False)
class InducingGeometry:
    """Kernel quantities of one factor, computed once per forward from ``Z`` and ``D``.

    Args:
        z_rows: ``Z_r``, ``m_r x p``.
        z_cols: ``Z_c``, ``m_c x q``.
        d_rows: ``D_r``, positive, ``m_r``.
        d_cols: ``D_c``, positive, ``m_c``.
        jitter: relative jitter for :func:`robust_cholesky`.
        name: the factor's name, for error messages.
    """

    z_rows: Tensor
    z_cols: Tensor
    d_rows: Tensor
    d_cols: Tensor
    jitter: float = 1e-6
    name: str = ""

    @property
    def dtype(self) -> torch.dtype:
        return self.z_rows.dtype

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(p, q)`` of the factor W."""
        return self.z_rows.shape[-1], self.z_cols.shape[-1]

    @property
    def inducing_shape(self) -> tuple[int, int]:
        """Shape ``(m_r, m_c)`` of the inducing matrix U."""
        return self.z_rows.shape[0], self.z_cols.shape[0]

    @cached_property
    def _z64(self) -> tuple[Tensor, Tensor]:
        return self.z_rows.double(), self.z_cols.double()

    @cached_property
    def gram(self) -> tuple[Tensor, Tensor]:
        """``G_r = Z_r Z_r^T`` and ``G_c = Z_c Z_c^T`` in float64."""
        zr, zc = self._z64
        return zr @ zr.T, zc @ zc.T

    @cached_property
    def kernels(self) -> tuple[Tensor, Tensor]:
        """``K_r`` and ``K_c`` in float64."""
        gr, gc = self.gram
        return gr + torch.diag(self.d_rows.double() ** 2), gc + torch.diag(self.d_cols.double() ** 2)

    @cached_property
    def cholesky(self) -> tuple[Tensor, Tensor]:
        """Lower Cholesky factors ``L_r``, ``L_c`` of the kernels, float64."""
        kr, kc = self.kernels
        return (
            robust_cholesky(kr, self.jitter, name=f"{self.name} (rows)"),
            robust_cholesky(kc, self.jitter, name=f"{self.name} (columns)"),
        )

    @cached_property
    def projections(self) -> tuple[Tensor, Tensor]:
        """``T_r = Z_r^T K_r^{-1}`` (``p x m_r``) and ``T_c = K_c^{-1} Z_c`` (``m_c x q``), factor dtype."""
        zr, zc = self._z64
        lr, lc = self.cholesky
        t_rows = torch.cholesky_solve(zr, lr).T
        t_cols = torch.cholesky_solve(zc, lc)
        return t_rows.to(self.dtype), t_cols.to(self.dtype)

    def conditional_mean(self, inducing: Tensor) -> Tensor:
        """``T_r U T_c`` for ``U`` of shape ``(..., m_r, m_c)``."""
        t_rows, t_cols = self.projections
        return t_rows @ inducing @ t_cols

    @cached_property
    def schur(self) -> Tensor:
        """Cholesky factor of ``S = G_r (x) D_c^2 + D_r^2 (x) K_c`` (float64)."""
        gr, _ = self.gram
        _, kc = self.kernels
        s = torch.kron(gr, torch.diag(self.d_cols.double() ** 2)) + torch.kron(torch.diag(self.d_rows.double() ** 2), kc)
        return robust_cholesky(s, self.jitter, name=f"{self.name} (conditional covariance)")

    @cached_property
    def logdet_sigma(self) -> Tensor:
        """``log det Sigma`` of the unit-scale conditional covariance (float64 scalar)."""
        lr, lc = self.cholesky
        m_r, m_c = self.inducing_shape
        logdet_s = 2 * self.schur.diagonal().log().sum()
        logdet_kr = 2 * lr.diagonal().log().sum()
        logdet_kc = 2 * lc.diagonal().log().sum()
        return logdet_s - m_c * logdet_kr - m_r * logdet_kc

    def mahalanobis(self, residual: Tensor) -> Tensor:
        """``vec(X)^T Sigma^{-1} vec(X)`` for ``X`` of shape ``(..., p, q)``, in O(p q m), float64."""
        zr, zc = self._z64
        x = residual.double()
        projected = (zr @ x @ zc.T).flatten(-2)  # V^T vec(X)
        solved = torch.cholesky_solve(projected.unsqueeze(-1), self.schur).squeeze(-1)
        return x.pow(2).sum((-2, -1)) + (projected * solved).sum(-1)

    def matheron_noise(self, sample_shape: torch.Size = torch.Size()) -> Tensor:
        """A draw of ``W - E[W | U]`` under the unit-scale conditional prior, by Matheron's rule.

        Draw the joint ``(E, U_bar)`` of the prior (``E ~ MN(0, I, I)``,
        ``U_bar = Z_r E Z_c^T + Z_r E_2 D_c + D_r E_3 Z_c^T + D_r E_4 D_c``, whose
        covariance is ``K_r (x) K_c``) and return ``E - T_r U_bar T_c``
        (Wilson et al., 2020, "Efficiently sampling functions from GP posteriors").
        Cost O(p q m); no ``pq x pq`` matrix is formed.
        """
        p, q = self.shape
        m_r, m_c = self.inducing_shape
        zr, zc = self.z_rows, self.z_cols
        dr, dc = self.d_rows, self.d_cols
        kw = {"dtype": self.dtype, "device": zr.device}
        e = torch.randn(*sample_shape, p, q, **kw)
        e2 = torch.randn(*sample_shape, p, m_c, **kw)
        e3 = torch.randn(*sample_shape, m_r, q, **kw)
        e4 = torch.randn(*sample_shape, m_r, m_c, **kw)
        u_bar = zr @ e @ zc.T + (zr @ e2) * dc + dr.unsqueeze(-1) * (e3 @ zc.T) + dr.unsqueeze(-1) * e4 * dc
        return e - self.conditional_mean(u_bar)

    def dense_covariance(self) -> Tensor:
        """The dense ``pq x pq`` conditional covariance; for tests on small factors only."""
        zr, zc = self._z64
        lr, lc = self.cholesky
        p_rows = zr.T @ torch.cholesky_solve(zr, lr)
        p_cols = zc.T @ torch.cholesky_solve(zc, lc)
        p, q = self.shape
        return torch.eye(p * q, dtype=torch.float64, device=zr.device) - torch.kron(p_rows, p_cols)
