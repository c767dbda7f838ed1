"""Per-sample forms: the ``n x n`` Gram matrices and per-row norms of centred data.

CKA's Gram form, its debiased correction, the RBF kernel and the Procrustes similarity of few
samples need per-sample quantities: these are formed from blocks converted to float64 on the fly,
never from an ``(n, d)`` float64 copy. A float64 CPU input whose means are small next to its spread
may instead be multiplied as it is and centred afterwards (the ``_raw_*`` functions, which return
``None`` where that would lose accuracy). :func:`_use_gram` says which form is cheaper.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from netprobe._validation import check_finite

from ._blas import _gram_into, _mirror_blocks
from ._config import _F64, config


def _gram_cols(x: torch.Tensor, blas: bool = False) -> int:
    """Columns per block of :func:`_centred_gram`: on CPU 256 with torch's products, 512 with
    numpy's (``blas=True``) on one thread and 1024 on several, on a GPU at most 2^23 elements
    (64 MiB). The width sets the speed and the scratch (one ``(n, c)`` float64 block) and, at the
    level of float64 rounding only, the order in which the columns' products are summed; the
    timings behind these widths are in ``docs/benchmarks.md``."""
    if x.device.type == "cpu":
        if blas and config.numpy_blas:
            return 512 if torch.get_num_threads() == 1 else 1024
        return 256
    return max(1, 2**23 // max(x.shape[0], 1))


def _centred_gram(x: torch.Tensor, name: str = "x", blas: bool = False) -> torch.Tensor:
    """``X_c X_c^T`` ``(n, n)`` float64 of the column-centred ``x`` ``(n, d)``, over column blocks.

    Each block of columns is copied into a reused float64 buffer and centred by its own column
    means (exact: a column's mean depends on that column alone), and its product added to the
    upper block triangle (:func:`_gram_into`, half the work of a full product). Extra memory: the
    ``(n, n)`` result and one ``(n, c)`` block; no ``(n, d)`` float64 copy. ``blas=True`` (linear
    CKA): products through numpy's BLAS on CPU, plus an ``(n/2, n/2)`` scratch block.
    """
    n, d = x.shape
    k = torch.zeros((n, n), dtype=_F64, device=x.device)
    c = min(_gram_cols(x, blas), max(d, 1))
    buf = torch.empty((n, c), dtype=_F64, device=x.device)
    for j in range(0, d, c):
        w = min(c, d - j)
        b = buf if w == c else buf[:, :w]
        b.copy_(x[:, j : j + w])
        b.sub_(b.mean(0))
        _gram_into(b, k, 128, blas)
    _mirror_blocks(k, 128)
    if not bool(torch.isfinite(k.diagonal()).all()):
        check_finite(x, name)
        raise ValueError(f"Expected finite inputs, but the squared norms of `{name}`'s rows overflowed float64; rescale the activations.")
    return k


#: The uncentred product of a float64 input is kept when it amplifies the rounding error bound at
#: most this much over centred data (see :func:`_raw_candidate`).
_RAW_GROWTH = 16.0


def _raw_candidate(x: torch.Tensor) -> bool:
    """Whether linear CKA's products may be taken from ``x`` ``(n, d)`` as it is (no copy, one BLAS
    call per product, centred afterwards) rather than from blocks converted and centred first.

    Only a float64, C- or Fortran-contiguous CPU tensor qualifies (``config.numpy_blas``); any other
    input is converted and centred block by block. Centring after the product (``X^T X - n m m^T``,
    or ``H X X^T H``) cancels: the rounding error of each product entry is bounded by ``gamma
    |x_i| |x_j|``, so the bound on the error of the whole product grows from ``gamma ||X_c||_F^2``
    (centred first) to ``gamma ||X||_F^2``: by the factor ``||X||_F^2 / ||X_c||_F^2 = 1 + n |m|^2 /
    ||X_c||_F^2`` (the mean's energy against the spread). The raw product is kept only when the
    exact factor, read off the traces of the product before and after centring
    (:func:`_raw_growth_ok`), is at most :data:`_RAW_GROWTH` (16: at most 4 of the 52 bits, e.g.
    every column's mean within ~4 standard deviations of 0); otherwise the centred route is taken
    (also for NaN/Inf or a constant representation, and that route words the errors). This cheap
    guess from the first rows only avoids trying the raw product where it would surely fail.
    """
    n = x.shape[0]
    if not (config.numpy_blas and x.device.type == "cpu" and x.dtype == _F64 and n >= 2 and x.shape[1] > 0):
        return False
    if not (x.is_contiguous() or x.T.is_contiguous()):
        return False
    head = x[:256]
    total = torch.linalg.vector_norm(head) ** 2
    spread = torch.linalg.vector_norm(head - head.mean(0)) ** 2
    return bool(torch.isfinite(total) & (spread * (_RAW_GROWTH / 2) > total))


def _raw_growth_ok(raw_trace: torch.Tensor, centred_trace: torch.Tensor) -> bool:
    """``||X||_F^2 / ||X_c||_F^2 <= _RAW_GROWTH`` from the traces of the raw and centred products
    (when it holds, the centred trace itself is accurate to ~16 eps)."""
    return bool(torch.isfinite(raw_trace) & (centred_trace * _RAW_GROWTH > raw_trace))


def _raw_products(x: torch.Tensor, y: torch.Tensor) -> Optional[Tuple[torch.Tensor, ...]]:
    """``(X_c^T X_c, Y_c^T Y_c, X_c^T Y_c, mean_x, mean_y)`` from the raw float64 data (numpy's
    ``syrk`` for the two Grams, one ``gemm``), corrected by the means: no copy of the data. ``None``
    when a side's mean is too large for that (:func:`_raw_candidate`)."""
    n = x.shape[0]
    out = []
    for a in (x, y):
        an = a.numpy()
        m = torch.from_numpy(an.mean(0))
        c = torch.from_numpy(an.T @ an)
        raw = c.trace()
        c.sub_(torch.outer(m, m), alpha=n)
        if not _raw_growth_ok(raw, c.trace()):
            return None
        out.append((an, m, c))
    (xn, mx, cxx), (yn, my, cyy) = out
    cxy = torch.from_numpy(xn.T @ yn).sub_(torch.outer(mx, my), alpha=n)
    return cxx, cyy, cxy, mx, my


def _raw_gram(x: torch.Tensor) -> Optional[torch.Tensor]:
    """``X_c X_c^T`` ``(n, n)`` from the raw float64 ``x`` (one ``syrk``), double-centred in place
    (``H K H``: subtract the row and column means, add back the grand mean); ``None`` when the mean
    is too large for that (:func:`_raw_candidate`)."""
    xn = x.numpy()
    k = torch.from_numpy(xn @ xn.T)
    raw = k.trace()
    r = k.mean(0)
    r -= r.mean() / 2
    k -= r[:, None]
    k -= r[None, :]
    return k if _raw_growth_ok(raw, k.trace()) else None


def _row_sq_norms(x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``||x_i - mean||^2`` ``(n,)`` float64 (the diagonal of the centred linear Gram matrix), over
    row blocks converted to float64 in a reused buffer (extra memory ``O(n)`` plus one block)."""
    n, d = x.shape
    rows = max(1, (2**17 if x.device.type == "cpu" else 2**23) // max(d, 1))
    rows = min(rows, max(n, 1))
    out = torch.empty(n, dtype=_F64, device=x.device)
    buf = torch.empty((rows, d), dtype=_F64, device=x.device)
    for i in range(0, n, rows):
        r = min(rows, n - i)
        b = buf[:r]
        torch.sub(x[i : i + r], mean, out=b)
        b.mul_(b)
        torch.sum(b, 1, out=out[i : i + r])
    return out


def _flat_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``<a, b>_F`` of two contiguous matrices without an elementwise temporary."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _use_gram(n: int, dx: int, dy: int) -> bool:
    """Whether linear CKA is cheaper from ``n x n`` Gram matrices than from ``d x d`` moments."""
    return n * (dx + dy) < dx * dx + dy * dy + 2 * dx * dy


def _gram_root(k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(L, tr K)`` with ``K = L L^T`` (``L = U sqrt(lambda)`` from ``eigh``) for a centred Gram
    matrix ``K`` ``(n, n)``: ``L^T L'`` has the singular values of ``X_c^T Y_c``. Eigenvalues below the
    eigensolver's rounding level (``n eps lambda_max``; a centred Gram matrix has at least one exact
    zero) are set to 0: their square roots, ``~sqrt(eps)`` of the scale, would be noise."""
    evals, evecs = torch.linalg.eigh(k)
    cut = k.shape[0] * torch.finfo(k.dtype).eps * evals[-1].clamp_min(0.0)
    return evecs * torch.where(evals > cut, evals, 0.0).sqrt(), k.diagonal().sum()
