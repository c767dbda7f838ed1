"""Factorizations of one covariance, and :class:`_Factors`, which computes each at most once.

Whitening keeps the eigen-directions above ``rank_tol`` times the largest eigenvalue (a truncation,
not a ridge); the Cholesky whitening is used only where a cheap bound proves it keeps the same
directions. SVCCA's principal directions come from the same eigendecomposition. A factorization
depends on its matrix alone, so sharing one between metrics or calls never changes a value.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

from ._config import VAR_TOL


def _tol(rank_tol: float, cov: torch.Tensor) -> float:
    """``rank_tol``, but never below the eigensolver's rounding level (``d * eps``): eigenvalues
    below that are noise, and whitening by them would blow rounding errors up (``rank_tol=0``)."""
    return max(rank_tol, cov.shape[0] * torch.finfo(cov.dtype).eps)


def _keep_units(cov: torch.Tensor) -> torch.Tensor:
    var = cov.diagonal()
    vmax = var.max() if var.numel() else torch.zeros((), dtype=cov.dtype, device=cov.device)
    return var > VAR_TOL * vmax


# The factorizations, as functions of their results (so that one result serves several uses):
def _eigen_whitener(evals: torch.Tensor, evecs: torch.Tensor, cov: torch.Tensor,
                    rank_tol: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(W, V)`` from ``eigh(cov)``: ``W`` (d, k) with ``W^T cov W = I_k`` (k = numerical rank), ``V``
    the kept eigenvectors."""
    top = evals[-1].clamp_min(0)
    keep = evals > _tol(rank_tol, cov) * top
    v = evecs[:, keep]
    return v * evals[keep].rsqrt(), v


def _whitener(cov: torch.Tensor, rank_tol: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(W, V)``: ``W`` (d, k) with ``W^T cov W = I_k`` (k = numerical rank), ``V`` the kept eigenvectors."""
    return _eigen_whitener(*torch.linalg.eigh(cov), cov, rank_tol)


#: what :func:`_cholesky_factor` returns: ``L^-1`` of the scaled covariance, the scale, the lower
#: bound on its smallest eigenvalue and its Frobenius norm (``None``: not positive definite)
_Chol = Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def _cholesky_factor(cov: torch.Tensor) -> _Chol:
    """The part of :func:`_cholesky_whitener` that does not depend on ``rank_tol``."""
    # on the covariance scaled to a unit largest variance: the test is then free of underflow
    # (squares of entries below ~1e-154 would vanish and make any matrix pass) and of overflow
    scale = cov.diagonal().max() if cov.numel() else cov.new_zeros(())
    if not bool(torch.isfinite(scale) & (scale > 0)):
        return None
    covn = cov / scale
    chol, info = torch.linalg.cholesky_ex(covn)
    if int(info) != 0:
        return None
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    linv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return linv, scale, 1.0 / (linv * linv).sum(), torch.linalg.matrix_norm(covn)


def _cholesky_from(factor: _Chol, cov: torch.Tensor, rank_tol: float) -> Optional[torch.Tensor]:
    if factor is None:
        return None
    linv, scale, lam_min_bound, norm = factor
    # 10x margin: near the cutoff, leave the decision to the eigenvalues themselves
    if not bool(lam_min_bound > 10.0 * _tol(rank_tol, cov) * norm):
        return None
    return linv.T * scale.rsqrt()


def _cholesky_whitener(cov: torch.Tensor, rank_tol: float) -> Optional[torch.Tensor]:
    """``W = L^{-T}`` (``W^T cov W = I``, all ``d`` directions) from the Cholesky factor ``cov = L L^T``,
    but only when ``cov`` provably has no eigenvalue at or below the whitening cutoff, so that
    :func:`_whitener` would keep every direction too and both give the same correlations (any two
    full whitenings differ by a rotation). The proof is cheap: ``lambda_min >= 1 / trace(cov^-1)
    = 1 / ||L^-1||_F^2`` and ``lambda_max <= ||cov||_F``. ``None`` when the bound does not show it
    (nearly collinear units, or not positive definite): then eigendecomposition truncates.
    Cheaper than ``eigh`` (``docs/benchmarks.md``)."""
    return _cholesky_from(_cholesky_factor(cov), cov, rank_tol)


def _principal(evals: torch.Tensor, evecs: torch.Tensor, cov: torch.Tensor, keep: Union[float, int],
               rank_tol: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top principal directions ``(d, k)`` of ``cov`` (from its ``eigh``) keeping ``keep`` of the
    variance (or ``keep`` of them), and their variances ``(k,)``, all above ``rank_tol`` times the largest."""
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    pos = int((evals > _tol(rank_tol, cov) * evals[0]).sum()) if evals.numel() and evals[0] > 0 else 0
    if pos == 0:
        raise ValueError("A representation has no variance at all (every unit constant); SVCCA is undefined.")
    if isinstance(keep, int):
        k = min(keep, pos)
    else:
        frac = evals.cumsum(0) / evals.sum()
        k = int((frac < keep - 1e-12).sum()) + 1
        k = min(k, pos)
    return evecs[:, :k], evals[:k]


class _Factors:
    """One covariance ``(d, d)`` and what the metrics derive from it, each computed at most once, on
    first use: the kept (non-constant) units, ``eigh`` of their block (CCA's eigen-whitening and
    SVCCA's principal directions), the Cholesky data, the squared Frobenius norm. Results depend on
    the matrix alone, so sharing them between metrics or across calls gives the values a fresh
    computation gives, bit for bit."""

    def __init__(self, cov: torch.Tensor) -> None:
        self.cov = cov
        self._cache: Dict[str, Any] = {}

    def _memo(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def mask(self) -> torch.Tensor:
        return self._memo("mask", lambda: _keep_units(self.cov))

    def all_kept(self) -> bool:
        return self._memo("all_kept", lambda: bool(self.mask().all()))

    def kept(self) -> torch.Tensor:
        """The covariance of the kept units."""
        if self.all_kept():
            return self.cov
        return self._memo("kept", lambda: self.cov[self.mask()][:, self.mask()])

    def eigh(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``eigh`` of the kept units' covariance."""
        return self._memo("eigh", lambda: torch.linalg.eigh(self.kept()))

    def whitener(self, rank_tol: float, *, eigen: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(W, V)`` of the kept block: Cholesky's (``V = None``) unless ``eigen`` or its bound fails."""
        if not eigen:
            w = _cholesky_from(self._memo("chol", lambda: _cholesky_factor(self.kept())), self.kept(), rank_tol)
            if w is not None:
                return w, None
        return _eigen_whitener(*self.eigh(), self.kept(), rank_tol)

    def principal(self, keep: Union[float, int], rank_tol: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return _principal(*self.eigh(), self.kept(), keep, rank_tol)

    def sq_norm(self) -> torch.Tensor:
        return self._memo("sq_norm", lambda: torch.linalg.matrix_norm(self.cov) ** 2)

    def trace(self) -> torch.Tensor:
        return self._memo("trace", lambda: self.cov.diagonal().sum())
