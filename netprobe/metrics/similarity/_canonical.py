"""Canonical correlation analysis from covariances, the core of CCA, SVCCA and PWCCA.

:func:`_cca_factors` gives the canonical correlations (and PWCCA's directions) as the singular
values (and vectors) of the whitened cross-covariance; :func:`_svcca_factors` the mean correlation
of the principal subspaces; :func:`_pwcca_weighted` the projection-weighted mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ._factors import _Factors
from ._inputs import _need_samples, _need_two


@dataclass
class _CCA:
    rho: torch.Tensor  # (r,) descending
    wx: torch.Tensor  # (dx', kx) whitener
    wy: torch.Tensor  # (dy', ky)
    vx: Optional[torch.Tensor]  # (dx', kx) kept eigenvectors of S_xx (eigen-whitening only)
    vy: Optional[torch.Tensor]  # (dy', ky)
    rot: torch.Tensor  # (min(kx, ky), r) singular vectors of W_x^T S_xy W_y, smaller side (x on a tie); or empty
    sxx: torch.Tensor
    syy: torch.Tensor


def _cca_factors(fx: _Factors, fy: _Factors, sxy: torch.Tensor, n: int, *, rank_tol: float, what: str,
                 vectors: bool = True, eigvecs: bool = False) -> _CCA:
    """CCA of the covariances held by ``fx``, ``fy`` and cross-covariance ``sxy``. ``eigvecs``: whiten
    both sides by eigendecomposition (google's PWCCA weights need the eigenvectors; and when SVCCA
    decomposes the covariances anyway, this whitening costs nothing more). ``vectors``: also the
    singular vectors of the smaller side (:func:`_gram_vectors`), else the correlations only
    (:func:`_gram_values`)."""
    kx_mask, ky_mask = fx.mask(), fy.mask()
    _need_two(n, what)
    if not bool(kx_mask.any()) or not bool(ky_mask.any()):
        side = "x" if not bool(kx_mask.any()) else "y"
        raise ValueError(
            f"Every unit of `{side}` is constant over the samples; {what} is undefined. Check the layer "
            "(dead ReLUs?) or the probe inputs."
        )
    if not fx.all_kept():
        sxy = sxy[kx_mask]
    if not fy.all_kept():
        sxy = sxy[:, ky_mask]
    if n < 2:
        raise ValueError(f"{what} needs at least 2 samples, but got n={n}.")
    # Cholesky whitening when it provably equals the truncated eigen-whitening (no direction near
    # the cutoff). Either side's full whitening may pair with the other's truncated one: the
    # correlations are the singular values of W_x^T S_xy W_y, unchanged by rotating either
    # full-rank whitening.
    wx, vx = fx.whitener(rank_tol, eigen=eigvecs)
    wy, vy = fy.whitener(rank_tol, eigen=eigvecs)
    sxx, syy = fx.kept(), fy.kept()
    if wx.shape[1] == 0 or wy.shape[1] == 0:
        raise ValueError(f"A representation has no variance above `rank_tol`; {what} is undefined.")
    _need_samples(n, wx.shape[1], wy.shape[1], what)
    m = wx.T @ sxy @ wy
    rho, rot = _gram_vectors(m) if vectors else (_gram_values(m)[0], m.new_zeros(0))
    return _CCA(rho, wx, wy, vx, vy, rot, sxx, syy)


# The singular values of the whitened cross-covariance m (kx, ky) are the canonical correlations
# rho; PWCCA also needs the singular vectors of its smaller side. The squares rho^2 are the
# eigenvalues of the smaller Gram matrix (m m^T when kx <= ky, else m^T m) and those singular
# vectors its eigenvectors: a symmetric eigenproblem of size min(kx, ky), cheaper than the SVD of m
# (docs/benchmarks.md). Squaring costs accuracy only for small correlations: a
# value's rounding error is ~ eps / rho_i instead of ~ eps, and a vector's ~ eps / (rho_i^2 - rho_j^2)
# instead of ~ eps / (rho_i - rho_j) for its nearest value rho_j (both up to the scale rho_1).

#: singular vectors of correlations below this fraction of the largest are recomputed from an SVD
#: of their (small) part of ``m`` (:func:`_gram_vectors`)
_REFINE = 1 / 64

#: SVCCA uses the SVD's values when the Gram route's rounding could move its mean correlation by more
#: than this (:func:`_gram_values`)
_GRAM_TOL = 1e-10


def _gram_values(m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(rho, drho)``: the singular values of ``m`` ``(a, b)`` from the eigenvalues of its smaller
    Gram matrix (descending, clipped to ``[0, 1]``), and a bound on each one's rounding error.

    The eigenvalues ``lam = rho^2`` are off by at most ``e = 4 (a + b) eps lam_max``: forming the
    Gram matrix and the symmetric eigensolver perturb it by ``O(k eps lam_max)``, which moves no
    eigenvalue further (Weyl); measured, below ``1.4 k eps lam_max`` at k=8 and ``0.1 k eps
    lam_max`` at k=256, so the bound has a margin of 6x or more. Hence ``|drho_i| <= min(sqrt(e),
    e / rho_i)``: ~1e-13 above 1e-3, up to ~1e-8 near 0 (d ~ 100)."""
    g = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    lam = torch.linalg.eigvalsh((g + g.T) / 2).flip(0)
    rho = lam.clamp_min(0.0).sqrt()
    e = 4.0 * (m.shape[0] + m.shape[1]) * torch.finfo(m.dtype).eps * max(float(lam[0]), 0.0)
    drho = torch.minimum(torch.full_like(rho, e**0.5), e / rho.clamp_min(torch.finfo(m.dtype).tiny))
    return rho.clamp_max(1.0), drho


def _gram_vectors(m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(rho, rot)``: the singular values of ``m`` ``(a, b)`` (descending, clipped to ``[0, 1]``) and
    the singular vectors of its smaller side ``(min(a, b), r)`` (left ones when ``a <= b``), as an
    SVD gives them to rounding, from ``eigh`` of the smaller Gram matrix.

    The vectors whose correlation is below ``_REFINE`` times the largest (where squaring loses
    accuracy; usually none or a few) are recomputed by an SVD of ``m`` projected on their span,
    ``t^T m`` (``(s, b)`` for ``s`` of them): the span itself is accurate (the tail of the spectrum is
    separated from the rest), and within it that SVD resolves the small correlations and their
    vectors with rounding relative to their own size instead of ``rho_1``. Every vector's rounding
    is then at most about ``1 / _REFINE`` times the SVD's (``eps / (rho_i - rho_j)``)."""
    left = m.shape[0] <= m.shape[1]
    g = m @ m.T if left else m.T @ m
    lam, vec = torch.linalg.eigh((g + g.T) / 2)
    lam, vec = lam.flip(0), vec.flip(1)
    rho = lam.clamp_min(0.0).sqrt()
    cut = int((rho >= _REFINE * rho[0]).sum())
    if cut < rho.shape[0]:
        tail = vec[:, cut:]
        q, sv, _ = torch.linalg.svd(tail.T @ m if left else tail.T @ m.T, full_matrices=False)
        vec = torch.cat([vec[:, :cut], tail @ q], 1)
        rho = torch.cat([rho[:cut], sv])
    return rho.clamp_max(1.0), vec


def _cca_core(sxx: torch.Tensor, syy: torch.Tensor, sxy: torch.Tensor, n: int, *, rank_tol: float, what: str,
              vectors: bool = True, eigvecs: bool = False) -> _CCA:
    return _cca_factors(_Factors(sxx), _Factors(syy), sxy, n, rank_tol=rank_tol, what=what, vectors=vectors, eigvecs=eigvecs)


def _svcca_factors(fx: _Factors, fy: _Factors, sxy: torch.Tensor, n: int, keep: Union[float, int],
                   rank_tol: float) -> torch.Tensor:
    _need_two(n, "SVCCA")
    # on the kept units, like CCA (constant ones have no principal direction; nearly constant
    # ones, below VAR_TOL of the largest variance, hold no fraction of the variance worth keeping)
    (px, lx), (py, ly) = fx.principal(keep, rank_tol), fy.principal(keep, rank_tol)
    if not fx.all_kept():
        sxy = sxy[fx.mask()]
    if not fy.all_kept():
        sxy = sxy[:, fy.mask()]
    _need_samples(n, px.shape[1], py.shape[1], "SVCCA")
    # The kept directions are principal axes: the reduced covariances are diag(l), so whitening
    # is a scaling (no second eigendecomposition), and the kept variances are above rank_tol.
    wx, wy = px * lx.rsqrt(), py * ly.rsqrt()
    m = wx.T @ sxy @ wy
    rho, drho = _gram_values(m)
    if float(drho.mean()) > _GRAM_TOL:  # correlations near 0: the SVD's values
        rho = torch.linalg.svdvals(m).clamp(0.0, 1.0)
    return rho.mean()


def _pwcca_weighted(r: _CCA, method: str) -> torch.Tensor:
    use_x = r.wx.shape[1] <= r.wy.shape[1]  # fewer kept (whitened) dimensions; x on a tie
    w, rot, s = (r.wx, r.rot, r.sxx) if use_x else (r.wy, r.rot, r.syy)
    if method == "paper":
        # <h_i, x_j> with h_i = Xc W rot_i / sqrt(n-1) (unit norm) equals sqrt(n-1) (rot^T W^T S)_ij;
        # the common factor cancels in the normalized weights.
        alpha = (rot.T @ w.T @ s).abs().sum(1)
    else:  # google/svcca's compute_pwcca on centered inputs
        # google whitens with the symmetric inverse square root S^{-1/2} = V L^{-1/2} V^T, so its
        # left singular vectors are R = V U, and it applies them to the *unwhitened* centered
        # activations: dirns = R^T Xc^T, P = qr(Xc R), weights_i = sum_j |P_i^T x_j|. With
        # R^T S R = L L^T (Cholesky), P = Xc R L^{-T} / sqrt(n-1) up to column signs, hence
        # P^T x_j = sqrt(n-1) (L^{-1} R^T S)_ij; the common factor cancels.
        vv = r.vx if use_x else r.vy
        if vv is None:  # pragma: no cover - the google route always whitens by eigendecomposition
            raise RuntimeError("google PWCCA needs the eigen-whitening")
        rr = vv @ rot
        g = rr.T @ s @ rr
        chol = torch.linalg.cholesky((g + g.T) / 2)
        alpha = torch.linalg.solve_triangular(chol, rr.T @ s, upper=False).abs().sum(1)
    total = alpha.sum()
    if not bool(total > 0):
        raise ValueError("PWCCA weights are all zero (degenerate representations); use `cca` to inspect.")
    return ((alpha / total) * r.rho).sum().clamp(0.0, 1.0)
