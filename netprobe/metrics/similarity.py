"""Representational similarity: CCA, SVCCA, PWCCA, linear and RBF CKA, orthogonal Procrustes, a
matrix of them over many representations, and a streaming accumulator.

All functions take ``x`` ``(n, d_x)`` and ``y`` ``(n, d_y)`` whose rows are the same ``n`` inputs
(google/svcca uses the transpose), compute in float64 on the inputs' device whatever their dtype,
and return similarities in ``[0, 1]`` (1 = identical up to the method's invariances).

Numerical route (one core shared by the functional and the streaming forms): everything is
computed from the centered (cross-)covariance blocks ``S_xx, S_yy, S_xy`` in float64. Each side is
whitened through ``eigh(S_xx)`` keeping only eigenvalues above ``rank_tol * max eigenvalue``
(a rank *truncation*, not a ridge: exactly or nearly collinear units give the correlations of the
remaining subspace, never NaN), and the canonical correlations are the singular values of
``M = W_x^T S_xy W_y``, taken (with the singular vectors PWCCA needs) from the symmetric
eigenproblem of the smaller of ``M M^T``, ``M^T M``, about 2x cheaper than the SVD; the accuracy
this costs near 0 is restored where it matters (see :func:`pwcca`, :func:`svcca`). When a cheap
bound proves a covariance has no eigenvalue near the cutoff (the usual case), it is whitened
through its Cholesky factor instead, which gives the same correlations about 5x faster. The
blocks are accumulated in one pass over row blocks that are converted and shifted on the fly
(then corrected to the exact mean), so no ``(n, d)`` float64 copy of the data is made. Squaring
the data into covariances costs precision only for directions whose variance is below ~1e-8 of the
largest, which the truncation removes anyway; in exchange, the same code serves data that never
fits in memory (:class:`SimilarityAccumulator`), batches and ranks merge exactly, and the cost
is one ``n d^2`` product plus ``d^3`` factorizations (faster than QR of ``(n, d)`` data for
``n >> d``; see ``benchmarks/similarity.py``).

Several metrics of one pair share each side's factorizations (one ``eigh`` per covariance when
SVCCA is among them, else Cholesky; :meth:`SimilarityAccumulator.compute`), and a side's statistics
with their factorizations can serve as the ``y`` side of a later pair (:meth:`SimilarityAccumulator.side`,
``update(..., y_stats=)``): e.g. this epoch's activations, compared with the next epoch's, are
reduced and factorized once. Sharing never changes a value: a factorization depends on its matrix
alone, and which one a metric uses depends only on the metrics asked for.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from netprobe import distributed as _dist
from netprobe._validation import check_2d, check_finite, check_same_n

__all__ = ["cca", "svcca", "pwcca", "linear_cka", "rbf_cka", "procrustes", "similarity_matrix", "SimilarityMatrix",
           "SimilarityAccumulator", "SideStats", "MinibatchCKA"]

#: Units whose variance is below this fraction of the largest variance (same side) are dropped.
VAR_TOL = 1e-10
#: Whitening keeps eigen-directions whose eigenvalue exceeds this fraction of the largest.
RANK_TOL = 1e-10

_F64 = torch.float64


# ----------------------------------------------------------------------------- input handling
def _prep(x: Any, y: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    x = check_2d(x, "x")
    y = check_2d(y, "y")
    check_same_n(x, y)
    if x.device != y.device:
        raise ValueError(f"Expected `x` and `y` on the same device, but got {x.device} and {y.device}.")
    _warn_if_grad(x, y)
    return x.detach(), y.detach()


def _warn_if_grad(*ts: torch.Tensor) -> None:
    """The similarities are measurements, not differentiable losses: inputs are detached. Say so
    when gradients are being recorded through an input (a term ``1 - cka`` added to a loss would
    otherwise contribute a silent zero gradient)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        warnings.warn(
            "netprobe's similarity metrics are not differentiable: the inputs are detached and the result "
            "carries no gradient (a term built from it adds nothing to a loss's gradient). To measure, "
            "call it under torch.no_grad() or pass `.detach()`ed tensors to silence this warning.",
            UserWarning, stacklevel=4)


def _check_moments_finite(m: "_Moments", x: torch.Tensor, y: torch.Tensor) -> None:
    # A NaN/Inf anywhere in a column makes that column's mean or sum of squares non-finite, so
    # checking the O(d) diagonals is enough; the O(n d) scan only runs to word the error.
    # (without y's co-moment, y's squares are checked through the cross co-moment: O(d^2))
    yy = m.cyy.diagonal() if m.cyy is not None else m.cxy
    if not bool(torch.isfinite(m.cxx.diagonal()).all() & torch.isfinite(yy).all()
                & torch.isfinite(m.mx).all() & torch.isfinite(m.my).all()):
        check_finite(x, "x")
        check_finite(y, "y")
        raise ValueError("Expected finite inputs, but their sums overflowed float64; rescale the activations.")


#: width below which a Gram block is one full product (and above which it is split in halves)
_GRAM_BASE = 64

# On CPU, linear CKA's float64 products go through numpy's BLAS (``numpy.matmul``: ``syrk`` for a
# block times its own transpose, half the work of a general product; torch has no ``syrk``, and its
# MKL ``gemm`` on the transposed layouts is slower): on our benchmark machine (one thread, AMD EPYC)
# the best pure-torch route is 1.16-1.30x the numpy recipe of Kornblith et al., this one
# 0.73-1.01x (``benchmarks/similarity.py --cka``). Same float64 numbers, same rounding model. During
# the products numpy's BLAS threads are set to ``torch.get_num_threads()`` (through threadpoolctl),
# so ``torch.set_num_threads`` governs them as it governs torch's own. ``NETPROBE_NUMPY_BLAS=0``
# (read at import) keeps every product in torch; so does a missing threadpoolctl.
@dataclass
class _Config:
    """Run-time switches of the similarity metrics: one instance, :data:`config`, read by every
    function when it runs (never copied into a module at import), so setting an attribute
    (``config.numpy_blas = False``) takes effect everywhere at once.

    Attributes:
        numpy_blas: on CPU, take linear CKA's float64 products through numpy's BLAS. Initialised
            from ``NETPROBE_NUMPY_BLAS`` at import (``0``, ``false``, ``off`` or ``no`` turn it off);
            set to ``False`` when threadpoolctl is missing.
    """

    numpy_blas: bool


#: the switches every similarity function reads when it runs
config = _Config(numpy_blas=os.environ.get("NETPROBE_NUMPY_BLAS", "1").strip().lower() not in ("0", "false", "off", "no"))
_BLAS_CONTROLLER: Any = None
# numpy's BLAS thread count is process-wide: the first of concurrent linear_cka calls (from several
# Python threads) sets it, the last one out restores it (not each call what it saw on entry)
_BLAS_LOCK = threading.Lock()
_BLAS_USERS = 0
_BLAS_LIMITER: Any = None


@contextlib.contextmanager
def _blas_threads() -> Any:
    """Context for numpy's products: its BLAS runs ``torch.get_num_threads()`` threads (the
    setting before the first of concurrent calls is restored when the last one leaves), and its
    floating-point warnings are silenced (a NaN/Inf input is refused afterwards with netprobe's own
    message). Disables the numpy route (``config.numpy_blas``) when threadpoolctl is not installed."""
    global _BLAS_CONTROLLER, _BLAS_USERS, _BLAS_LIMITER
    import numpy as np

    with _BLAS_LOCK:
        if _BLAS_CONTROLLER is None:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:
                config.numpy_blas = False
            else:
                _BLAS_CONTROLLER = ThreadpoolController()
        if _BLAS_CONTROLLER is not None:
            if _BLAS_USERS == 0:
                _BLAS_LIMITER = _BLAS_CONTROLLER.limit(limits=torch.get_num_threads(), user_api="blas")
            _BLAS_USERS += 1
    try:
        with np.errstate(all="ignore"):
            yield
    finally:
        if _BLAS_CONTROLLER is not None:
            with _BLAS_LOCK:
                _BLAS_USERS -= 1
                if _BLAS_USERS == 0:
                    _BLAS_LIMITER.restore_original_limits()
                    _BLAS_LIMITER = None


def _np_ok(t: torch.Tensor) -> bool:
    return config.numpy_blas and t.device.type == "cpu" and t.dtype == _F64


def _np_gram_into(a: Any, out: Any, base: int) -> None:
    """``out += a @ a.T`` (numpy views): the two diagonal halves by ``syrk`` (full blocks), the
    upper off-diagonal block by one product; the lower one is left for :func:`_mirror_blocks`
    (same split as :func:`_gram_into`, so the mirroring matches). Scratch: one half-size block."""
    import numpy as np

    d = a.shape[0]
    if d <= base:
        out += a @ a.T
        return
    h = d // 2
    tmp = np.empty(((d - h) * (d - h),), dtype=np.float64)
    upper = tmp[: h * h].reshape(h, h)
    np.matmul(a[:h], a[:h].T, out=upper)
    out[:h, :h] += upper
    lower = tmp.reshape(d - h, d - h)
    np.matmul(a[h:], a[h:].T, out=lower)
    out[h:, h:] += lower
    cross = tmp[: h * (d - h)].reshape(h, d - h)
    np.matmul(a[:h], a[h:].T, out=cross)
    out[:h, h:] += cross


def _gram_into(at: torch.Tensor, out: torch.Tensor, base: int = _GRAM_BASE, blas: bool = False) -> None:
    """``out += at @ at.T`` for ``at`` ``(d, c)``, computing only the upper block triangle (about
    half the work): the diagonal blocks recursively, the off-diagonal one as one product. Blocks
    below the diagonal are left for :func:`_mirror_blocks`. ``blas=True``: on CPU through numpy's
    BLAS (``config.numpy_blas``), ``syrk`` for the diagonal halves (linear CKA only: the CCA family
    keeps torch's products, whose rounding its tests pin where a value depends on it)."""
    if blas and _np_ok(at) and _np_ok(out):
        _np_gram_into(at.numpy(), out.numpy(), base)
        return
    d = at.shape[0]
    if d <= base:
        out.addmm_(at, at.T)
        return
    h = d // 2
    _gram_into(at[:h], out[:h, :h], base)
    _gram_into(at[h:], out[h:, h:], base)
    out[:h, h:].addmm_(at[:h], at[h:].T)


def _cross_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """``out += a @ b.T``."""
    out.addmm_(a, b.T)


def _mirror_blocks(out: torch.Tensor, base: int = _GRAM_BASE) -> torch.Tensor:
    """Fill the blocks :func:`_gram_into` leaves unset (below its off-diagonal products) by symmetry."""
    d = out.shape[0]
    if d > base:
        h = d // 2
        out[h:, :h] = out[:h, h:].T
        _mirror_blocks(out[:h, :h], base)
        _mirror_blocks(out[h:, h:], base)
    return out


def _chunk_rows(x: torch.Tensor, y: torch.Tensor) -> Tuple[int, int]:
    """Rows per block of products, and per centering piece. On CPU small blocks (~2 MiB, at least
    512 rows) keep the float64 centered copy in cache; on a GPU few large ones (at most 2^23
    elements, 64 MiB, per side)."""
    d = max(x.shape[1], y.shape[1], 1)
    if x.device.type == "cpu":
        return max(512, 2**18 // d), max(128, 2**16 // d)
    rows = max(1, min(16384, 2**23 // d))
    return rows, rows


@dataclass
class _Moments:
    """n, means and centered co-moment matrices (sums of products, not yet divided by n-1);
    ``cyy`` is ``None`` when taken from given statistics instead (``y_stats``)."""

    n: int
    mx: torch.Tensor
    my: torch.Tensor
    cxx: torch.Tensor
    cyy: Optional[torch.Tensor]
    cxy: torch.Tensor

    @staticmethod
    def of(x: torch.Tensor, y: torch.Tensor, *, yy: bool = True, blas: bool = False) -> "_Moments":
        """Moments of ``x`` ``(n, d_x)``, ``y`` ``(n, d_y)`` (any real dtype) in float64, in one pass.

        Rows are converted to float64 and shifted by the first block's mean a block at a time, so
        no ``(n, d)`` float64 copy is ever made (extra memory ``O(d^2)`` plus one block); the
        products and sums accumulate block by block and are corrected to the exact mean at the
        end (``C = sum (x-s)(x-s)^T - n delta delta^T``, ``delta = mean - s``). The shift keeps this
        as accurate as centering by the mean itself: the correction's relative size is
        ``(delta/sigma)^2``, and a block's mean lies within ``sigma sqrt(n/b)`` of the overall one.

        ``blas=True`` takes the products through numpy's BLAS on CPU (:meth:`_of_numpy`; linear
        CKA). ``yy=False`` skips ``y``'s co-moment (``cyy = None``). Nothing computed for ``x`` depends on
        ``y`` beyond its width (through the block size), so ``x``'s moments are bit for bit those
        that any ``y`` of the same width gives, and those that the same rows give as ``y``:
        statistics of a side can be reused as the other side of a later pair.
        """
        n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
        _need_rows(n)
        if blas and config.numpy_blas and x.device.type == "cpu":
            return _Moments._of_numpy(x, y, yy)
        rows, piece = _chunk_rows(x, y)
        rows = min(rows, max(n, 1))
        # a block mean as the shift; summed blockwise, mean(dtype=float64) would copy all of x
        first = max(min(rows, n), 1)
        sx, sy = x[:rows].sum(0, dtype=_F64) / first, y[:rows].sum(0, dtype=_F64) / first
        cxx = torch.zeros((dx, dx), dtype=_F64, device=x.device)
        cyy = torch.zeros((dy, dy), dtype=_F64, device=x.device) if yy else None
        cxy = torch.zeros((dx, dy), dtype=_F64, device=x.device)
        tx = torch.zeros(dx, dtype=_F64, device=x.device)
        ty = torch.zeros(dy, dtype=_F64, device=x.device)
        # blocks laid out (d, rows): the recursive halves of the Gram are then contiguous row
        # blocks; converting, shifting and transposing happen in one pass into reused buffers
        bx = torch.empty((dx, rows), dtype=_F64, device=x.device)
        by = torch.empty((dy, rows), dtype=_F64, device=x.device)
        for i in range(0, n, rows):
            r = min(rows, n - i)
            a, b = bx[:, :r], by[:, :r]
            for j in range(0, r, piece):  # transposed writes in pieces small enough for the cache
                torch.sub(x[i + j : i + min(j + piece, r)].T, sx[:, None], out=a[:, j : j + piece])
                torch.sub(y[i + j : i + min(j + piece, r)].T, sy[:, None], out=b[:, j : j + piece])
            tx += a.sum(1)
            ty += b.sum(1)
            _gram_into(a, cxx)  # (two-argument calls: a test counts them)
            if cyy is not None:
                _gram_into(b, cyy)
            _cross_into(a, b, cxy)
        return _Moments._finish(x, y, sx, sy, tx, ty, _mirror_blocks(cxx),
                                None if cyy is None else _mirror_blocks(cyy), cxy)

    @staticmethod
    def _finish(x: torch.Tensor, y: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, tx: torch.Tensor,
                ty: torch.Tensor, cxx: torch.Tensor, cyy: Optional[torch.Tensor], cxy: torch.Tensor) -> "_Moments":
        """The moments from the shifted sums (``tx``, ``ty``: sums of ``x - sx``, ``y - sy``) and
        products: corrected to the exact mean (``C -= n delta delta^T``), checked finite."""
        n = x.shape[0]
        ex, ey = tx / n, ty / n  # mean - shift
        cxx.sub_(torch.outer(ex, ex), alpha=n)
        if cyy is not None:
            cyy.sub_(torch.outer(ey, ey), alpha=n)
        cxy.sub_(torch.outer(ex, ey), alpha=n)
        m = _Moments(n, sx + ex, sy + ey, cxx, cyy, cxy)
        _check_moments_finite(m, x, y)
        return m

    @staticmethod
    def _of_numpy(x: torch.Tensor, y: torch.Tensor, yy: bool) -> "_Moments":
        """:meth:`of` with the products through numpy's BLAS (CPU, ``config.numpy_blas``; linear CKA):
        row blocks converted and shifted into reused ``(rows, d)`` float64 buffers (no transposed
        writes; 8 MiB a side, 16 MiB with several threads, at least 512 rows), then ``b^T b`` by ``syrk`` (numpy takes it for a
        matrix times its own transpose) and ``a^T b`` by ``gemm``, each added to the float64 sums.
        Extra memory: the ``d x d`` sums, one block a side and one product's (reused) result."""
        import numpy as np

        n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
        # 8 MiB a side with one thread, 16 MiB with more (the products then need larger blocks to
        # pay for waking the BLAS threads: (10000, 512) float32, 2 threads: 0.21 s vs 0.30 s at 4 MiB)
        rows = min(max(512, (2**20 if torch.get_num_threads() == 1 else 2**21) // max(dx, dy, 1)), n)
        sx, sy = x[:rows].sum(0, dtype=_F64) / rows, y[:rows].sum(0, dtype=_F64) / rows
        cxx, cxy = np.zeros((dx, dx)), np.zeros((dx, dy))
        cyy = np.zeros((dy, dy)) if yy else None
        tmp = np.empty(max(dx * dx, dx * dy, dy * dy if yy else 0))  # one product's result, reused
        tx, ty = torch.zeros(dx, dtype=_F64), torch.zeros(dy, dtype=_F64)
        bx, by = torch.empty((rows, dx), dtype=_F64), torch.empty((rows, dy), dtype=_F64)
        for i in range(0, n, rows):
            r = min(rows, n - i)
            a, b = bx[:r], by[:r]
            torch.sub(x[i : i + r], sx, out=a)
            torch.sub(y[i : i + r], sy, out=b)
            tx += a.sum(0)
            ty += b.sum(0)
            an, bn = a.numpy(), b.numpy()
            for acc, p, q in ((cxx, an, an), (cyy, bn, bn), (cxy, an, bn)):
                if acc is not None:
                    out = tmp[: acc.size].reshape(acc.shape)
                    np.matmul(p.T, q, out=out)  # syrk when p is q
                    acc += out
        return _Moments._finish(x, y, sx, sy, tx, ty, torch.from_numpy(cxx),
                                None if cyy is None else torch.from_numpy(cyy), torch.from_numpy(cxy))

    def merge(self, o: "_Moments") -> "_Moments":
        """Chan et al.'s pairwise update: exact, order-independent up to rounding. Each co-moment
        merges on its own (the cross one needs both sides' means, not their co-moments)."""
        if o.n == 0:
            return self
        if self.n == 0:
            return o
        n = self.n + o.n
        dx, dy = o.mx - self.mx, o.my - self.my
        f = self.n * o.n / n
        return _Moments(
            n,
            self.mx + dx * (o.n / n),
            self.my + dy * (o.n / n),
            self.cxx + o.cxx + f * torch.outer(dx, dx),
            None if self.cyy is None or o.cyy is None else self.cyy + o.cyy + f * torch.outer(dy, dy),
            self.cxy + o.cxy + f * torch.outer(dx, dy),
        )


def _need_rows(n: int) -> None:
    """Refuse inputs with no rows before any statistic is formed (their means would be 0/0)."""
    if n == 0:
        raise ValueError(
            "Expected `x` and `y` to hold samples (rows), but got n=0 samples: there is nothing to compare. "
            "Pass activations of shape (n, d) with n > d_x + d_y for the CCA family (or n >= 2 for "
            "`linear_cka`, n >= 4 with `debiased=True`), e.g. check that the probe buffer was filled."
        )


# ----------------------------------------------------------------------------- per-sample forms
# CKA's Gram form, its debiased correction and the RBF kernel need per-sample quantities: these
# are formed from blocks converted to float64 on the fly, never from an (n, d) float64 copy.
def _gram_cols(x: torch.Tensor, blas: bool = False) -> int:
    """Columns per block of :func:`_centred_gram`: on CPU 256 with torch's products (measured fastest
    at n=2000, 1 thread: 0.78 s vs 1.3 s with 512), 512 with numpy's (``blas=True``; 1.6 s vs 2.2 s
    with 256 for a float32 (2000, 8192) pair, and 1024 no faster while 8 MiB larger), 1024 with
    numpy's and several threads (a float32 (2000, 4096) pair, 2 threads: 0.51 s vs 0.70 s with 512,
    torch's route 0.52 s), on a GPU at most 2^23 elements (64 MiB)."""
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


def _hsic_u(xy: torch.Tensor, rx: torch.Tensor, ry: torch.Tensor, n: int) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) of two linear kernels, times ``n (n-3)``, from
    ``<K, L>_F = ||X_c^T Y_c||_F^2`` and the kernels' diagonals (squared row norms of the centred
    data, ``rx``, ``ry``). With ``K 1 = 0`` (centred data) Song's terms reduce to: ``tr(K~ L~) = <K, L>
    - rx.ry``, ``1^T K~ 1 = -sum rx``, ``1^T K~ L~ 1 = rx.ry`` (``K~``: ``K`` with a zero diagonal)."""
    return xy - n / (n - 2) * (rx @ ry) + rx.sum() * ry.sum() / ((n - 1) * (n - 2))


def _debiased_ratio(hxy: torch.Tensor, hxx: torch.Tensor, hyy: torch.Tensor, what: str = "Debiased linear CKA") -> torch.Tensor:
    if not bool(hxx > 0) or not bool(hyy > 0):
        raise ValueError(f"{what} is undefined here: a representation has no estimable variance.")
    # No clip at 0: an unbiased estimate clipped is biased (it can fall slightly below 0). The
    # unbiased HSIC is the inner product <K~, L~> / (n (n-3)) of the U-centered Gram matrices
    # (Szekely & Rizzo 2014), so |hxy| <= sqrt(hxx hyy) exactly: clamping at 1 only removes rounding.
    return (hxy / (hxx.sqrt() * hyy.sqrt())).clamp_max(1.0)


def _need_samples(n: int, kx: int, ky: int, what: str) -> None:
    """Centered, ``n`` samples span ``n - 1`` dimensions: when the two sides' independent directions
    ``kx + ky`` exceed that, ``kx + ky - (n - 1)`` canonical correlations are 1 by construction,
    whatever the data. Refuse instead of returning a spurious similarity."""
    if n - 1 < kx + ky:
        raise ValueError(
            f"{what} needs more samples than the two representations have dimensions together, but got "
            f"n={n} samples for d_x={kx} and d_y={ky} linearly independent directions (constant and collinear "
            f"units removed): with so few samples {kx + ky - (n - 1)} correlations would be 1 by construction. "
            f"Use at least {kx + ky + 1} samples (10x that is safer), reduce the units first "
            f"(`svcca(..., keep=0.99)` or an int `keep`, or a spatial-mean reduction), or use `linear_cka`, "
            f"which has no such limit."
        )


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
    About 5x cheaper than ``eigh`` for large ``d``."""
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
# vectors its eigenvectors: a symmetric eigenproblem of size min(kx, ky), about 2x cheaper than the
# SVD (d = 128 to 256; 4x at d = 2048). Squaring costs accuracy only for small correlations: a
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


def _cov(mom: _Moments) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = max(mom.n - 1, 1)
    return mom.cxx / d, mom.cyy / d, mom.cxy / d


def _check_rank_tol(rank_tol: float) -> float:
    if not isinstance(rank_tol, (int, float)) or not (0.0 <= float(rank_tol) < 1.0):
        raise ValueError(f"Expected `rank_tol` in [0, 1), but got {rank_tol!r}.")
    return float(rank_tol)


def _check_keep(keep: Union[float, int]) -> Union[float, int]:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"Expected `keep` to be a float in (0, 1] or an int >= 1, but got {type(keep).__name__}.")
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"Expected an int `keep` >= 1 (directions kept), but got {keep}.")
    elif not (0.0 < keep <= 1.0):
        raise ValueError(f"Expected a float `keep` in (0, 1] (fraction of variance kept), but got {keep}.")
    return keep


def _check_method(method: str) -> str:
    if method not in ("paper", "google"):
        raise ValueError(f"Expected `method` to be 'paper' or 'google', but got {method!r}.")
    return method


# ----------------------------------------------------------------------------- from factors
def _need_two(n: int, what: str) -> None:
    if n < 2:
        raise ValueError(
            f"{what} needs samples to vary over, but got n={n} sample: with one row every unit is constant "
            f"and {what} is undefined. Pass activations of more inputs (n > d_x + d_y for the CCA family)."
        )


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


def _cka_factors(fx: _Factors, fy: _Factors, sxy: torch.Tensor, n: int) -> torch.Tensor:
    if n < 2:
        raise ValueError(f"Linear CKA needs at least 2 samples, but got n={n}.")
    return _cka_ratio(torch.linalg.matrix_norm(sxy) ** 2, fx.sq_norm(), fy.sq_norm())


def _procrustes_ratio(nuclear: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """``||X_c^T Y_c||_* / (||X_c||_F ||Y_c||_F)`` from the nuclear norm and the squared Frobenius norms."""
    den = tx.sqrt() * ty.sqrt()
    if not bool(den > 0):
        raise ValueError("The Procrustes similarity is undefined: a representation is constant over the samples.")
    return (nuclear / den).clamp(0.0, 1.0)


def _procrustes_factors(fx: _Factors, fy: _Factors, sxy: torch.Tensor, n: int) -> torch.Tensor:
    if n < 2:
        raise ValueError(f"The Procrustes similarity needs at least 2 samples, but got n={n}.")
    # constant units have zero rows/columns in sxy and zero variance: they change neither norm
    return _procrustes_ratio(torch.linalg.svdvals(sxy).sum(), fx.trace(), fy.trace())


#: the metrics :meth:`SimilarityAccumulator.compute` knows
_COMPUTE_METHODS = ("cca", "svcca", "pwcca", "cka", "procrustes")


def _compute(fx: _Factors, fy: _Factors, sxy: torch.Tensor, n: int, methods: Sequence[str], *,
             keep: Union[float, int], rank_tol: float, method: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, ValueError]]:
    """Every metric in ``methods`` from one set of factorizations per side; a ``ValueError`` of one
    metric (data it is undefined for) is returned for that metric and does not stop the others.

    Which whitening CCA and PWCCA use depends only on ``methods`` (never on what ``fx``, ``fy``
    happen to hold already), so a value is the same whether a factorization is fresh or reused:
    by eigendecomposition when SVCCA (or google's PWCCA) needs it anyway, else by Cholesky where it
    provably gives the same correlations. CCA with PWCCA reads the correlations off the
    eigenproblem that gives PWCCA's vectors (:func:`_gram_vectors`)."""
    eigen = "svcca" in methods or ("pwcca" in methods and method == "google")
    vectors = "pwcca" in methods
    core: Dict[str, _CCA] = {}

    def cca_result(what: str) -> _CCA:
        if "r" not in core:  # on an error the next metric retries, for its own message
            core["r"] = _cca_factors(fx, fy, sxy, n, rank_tol=rank_tol, what=what, vectors=vectors, eigvecs=eigen)
        return core["r"]

    run: Dict[str, Callable[[], torch.Tensor]] = {
        "cca": lambda: cca_result("CCA").rho,
        "pwcca": lambda: _pwcca_weighted(cca_result("PWCCA"), method),
        "svcca": lambda: _svcca_factors(fx, fy, sxy, n, keep, rank_tol),
        "cka": lambda: _cka_factors(fx, fy, sxy, n),
        "procrustes": lambda: _procrustes_factors(fx, fy, sxy, n),
    }
    values: Dict[str, torch.Tensor] = {}
    errors: Dict[str, ValueError] = {}
    for m in methods:
        try:
            values[m] = run[m]()
        except ValueError as err:
            errors[m] = err
    return values, errors


def _check_methods(methods: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(dict.fromkeys(methods))  # unique, in the order given
    bad = [m for m in methods if m not in _COMPUTE_METHODS]
    if not methods or bad:
        raise ValueError(
            f"Expected `methods` among {list(_COMPUTE_METHODS)}, but got {list(methods)}."
        )
    return methods


# ----------------------------------------------------------------------------- from moments
def _from_moments(mom: _Moments, methods: Sequence[str], *, keep: Union[float, int] = 0.99,
                  rank_tol: float = RANK_TOL, method: str = "paper") -> Dict[str, torch.Tensor]:
    """The functional forms: one metric (or several), raising its error."""
    sxx, syy, sxy = _cov(mom)
    values, errors = _compute(_Factors(sxx), _Factors(syy), sxy, mom.n, methods, keep=keep, rank_tol=rank_tol, method=method)
    for err in errors.values():
        raise err
    return values


# ----------------------------------------------------------------------------- public API
def cca(x: torch.Tensor, y: torch.Tensor, *, rank_tol: float = RANK_TOL) -> torch.Tensor:
    """Canonical correlations between two representations of the same inputs.

    Args:
        x: ``(n, d_x)`` activations (rows = inputs, columns = units).
        y: ``(n, d_y)`` activations of the same ``n`` inputs, in the same order.
        rank_tol: whitening keeps eigen-directions with eigenvalue above ``rank_tol`` times the
            largest; collinear directions below it are truncated (not regularized). The invariance
            to invertible maps holds for maps that keep every direction above this cutoff (the
            covariance's condition number, the map's squared, below ``1 / rank_tol``).

    Returns:
        ``(r,)`` float64 correlations in ``[0, 1]``, descending, ``r = min(rank_x, rank_y)``.
        Units whose variance is below ``1e-10`` times the largest are dropped first. Computed as
        square roots of eigenvalues (faster than an SVD), which adds errors of ~1e-13 to
        correlations above 1e-3 and up to ~1e-8 near 0 (far inside the sampling error of any
        estimate); beyond that, accuracy is set by the conditioning of the data, as for any method.

    Raises:
        ValueError: non-2-D input, different ``n``, NaN/Inf, all units constant, or
            ``n <= k_x + k_y`` (the two sides' independent directions together): centered, ``n``
            samples span ``n - 1`` dimensions, so with fewer samples some correlations are 1 by
            construction. Estimates stay biased upwards until ``n`` is several times ``k_x + k_y``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(500, 4, generator=g)
        >>> cca(x, x @ torch.randn(4, 4, generator=g)).round(decimals=6)   # invertible map
        tensor([1., 1., 1., 1.], dtype=torch.float64)
    """
    x, y = _prep(x, y)
    return _from_moments(_Moments.of(x, y), ("cca",), rank_tol=_check_rank_tol(rank_tol))["cca"]


def svcca(x: torch.Tensor, y: torch.Tensor, *, keep: Union[float, int] = 0.99, rank_tol: float = RANK_TOL) -> torch.Tensor:
    """SVCCA (Raghu et al. 2017): mean canonical correlation after an SVD reduction of each side.

    Each representation is centered and projected on its top singular directions explaining
    ``keep`` of its variance (squared singular values), or on its ``keep`` top directions when
    ``keep`` is an int; the result is the mean CCA correlation of the reduced pair. Units whose
    variance is below ``1e-10`` times the largest (same side) are dropped first, as in :func:`cca`.

    Args:
        x: ``(n, d_x)``. y: ``(n, d_y)``, same inputs.
        keep: float in ``(0, 1]`` (fraction of variance) or int ``>= 1`` (number of directions).

    Returns:
        0-d float64 tensor in ``[0, 1]``. The correlations are square roots of eigenvalues (faster
        than an SVD, as in :func:`cca`) when a bound on their rounding shows the mean within
        ``1e-10`` of the SVD's (correlations above ~1e-3 are off by ~1e-13), else (correlations
        near 0) the SVD's singular values: the value is the SVD's to ~1e-10 (measured ~1e-14).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(300, 8, generator=g)
        >>> round(float(svcca(x, 2 * x + 1, keep=0.99)), 9)
        1.0
    """
    x, y = _prep(x, y)
    return _from_moments(_Moments.of(x, y), ("svcca",), keep=_check_keep(keep), rank_tol=_check_rank_tol(rank_tol))["svcca"]


def pwcca(x: torch.Tensor, y: torch.Tensor, *, method: str = "paper", rank_tol: float = RANK_TOL) -> torch.Tensor:
    """Projection-weighted CCA (Morcos, Raghu & Bengio 2018).

    ``sum_i alpha_i rho_i / sum_i alpha_i`` with canonical correlations ``rho_i`` and weights
    ``alpha_i = sum_j |<h_i, x_j>|``, where ``h_i`` are the canonical variates (whitened, centered,
    unit norm) of the representation with fewer kept dimensions (``x`` on a tie) and ``x_j`` that
    representation's centered activation vector of unit ``j``. Invariant to adding constants, to
    the sign conventions of the factorizations and to the order of units (up to the caveat on tied
    correlations below).

    Numerics: the correlations and that side's canonical directions come from the symmetric
    eigenproblem of the smaller Gram matrix of the whitened cross-covariance (about 2x cheaper
    than its SVD), the directions of correlations below 1/64 of the largest recomputed by an SVD
    of their small part (squaring would blur them). Against the full SVD the value moves by
    1e-16 to 3e-13 (measured for d = 16 to 256, n = 2d+10 to 20d, with dead, nearly collinear or
    rotated units; 2e-11 with a block of correlations ~1e-5 beside strong ones). Where
    correlations are (nearly) tied, their directions, hence the weights, are not unique whatever
    the factorization: the value then depends on rounding, e.g. on the order of the units, with
    the SVD as much as here (measured: ~1e-3 when half the correlations are exactly 1 and the
    rest spread; up to 1e-7 for pairs within 1e-6 of each other, where a 60-digit reference
    shows the SVD off by as much). A tie at a value ``c`` matters in proportion to
    ``|c - pwcca|``: a converging layer, all correlations near 1, is unaffected.

    Args:
        x: ``(n, d_x)``. y: ``(n, d_y)``, same inputs.
        method: ``"paper"`` (default; the formula above) or ``"google"``: google/svcca's
            ``compute_pwcca`` on centered inputs, whose weights project the activations on the QR
            basis of *unwhitened* directions (``u^T (x - mean)``). Kept for comparing with numbers
            computed with that code; it is well defined here when ``x`` has more units too (the
            original indexes the wrong layer and raises ``IndexError`` then).

    Returns:
        0-d float64 tensor in ``[0, 1]``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(400, 6, generator=g)
        >>> round(float(pwcca(x, x + 3.0)), 9)
        1.0
    """
    _check_method(method)
    x, y = _prep(x, y)
    return _from_moments(_Moments.of(x, y), ("pwcca",), method=method, rank_tol=_check_rank_tol(rank_tol))["pwcca"]


def _cka_ratio(xy2: torch.Tensor, xx2: torch.Tensor, yy2: torch.Tensor) -> torch.Tensor:
    """CKA from squared Frobenius norms ``||X^T Y||^2``, ``||X^T X||^2``, ``||Y^T Y||^2`` (of either form)."""
    den = xx2.sqrt() * yy2.sqrt()
    if not bool(den > 0):
        raise ValueError("Linear CKA is undefined: a representation is constant over the samples.")
    return (xy2 / den).clamp(0.0, 1.0)


def linear_cka(x: torch.Tensor, y: torch.Tensor, *, debiased: bool = False) -> torch.Tensor:
    """Linear centered kernel alignment (Kornblith et al. 2019).

    ``CKA = ||Y_c^T X_c||_F^2 / (||X_c^T X_c||_F ||Y_c^T Y_c||_F)`` with column-centered ``X_c``,
    ``Y_c``: invariant to orthogonal transforms and isotropic scaling of either side (not to
    arbitrary invertible maps, unlike CCA), and defined for any ``n >= 2`` (also ``n < d``).

    Args:
        x: ``(n, d_x)``. y: ``(n, d_y)``, same inputs.
        debiased: use the unbiased HSIC estimator (Song et al. 2012) in numerator and denominator,
            which removes CKA's upward bias when ``d`` is large relative to ``n``; needs ``n >= 4``.
            The debiased value is the estimate itself, not clipped at 0: for unrelated
            representations it scatters around 0 and can fall slightly below it (clipping would
            bias the unbiased estimator upwards). It is at most 1 (Cauchy-Schwarz for the inner
            product of U-centered Gram matrices that the unbiased HSIC is).

    Cost: ``n (d_x + d_y)^2 / 2`` multiply-adds from ``d x d`` co-moments when ``n >= d_x + d_y``,
    else ``n^2 (d_x + d_y) / 2`` from ``n x n`` Gram matrices. No float64 copy of the activations:
    a float64, contiguous CPU input whose column means are small next to its spread (error bound
    grown at most 16x, checked exactly) is multiplied as it is (numpy's ``syrk``/``gemm``) and
    centred afterwards; any other input (float32, float16, large offsets, strided, GPU) is
    converted and centred block by block, accumulating in float64. On CPU the float64 products go
    through numpy's BLAS (it has ``syrk``; torch does not), its threads set to
    ``torch.get_num_threads()`` for the call; ``NETPROBE_NUMPY_BLAS=0`` keeps them in torch.

    Returns:
        0-d float64 tensor in ``[0, 1]`` (``debiased=True``: in ``[-1, 1]``, near 0 or slightly
        below it for unrelated representations).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(100, 5, generator=g)
        >>> q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
        >>> round(float(linear_cka(x, 3 * x @ q)), 6)
        1.0
    """
    x, y = _prep(x, y)
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    _need_rows(n)
    if n < (4 if debiased else 2):
        raise ValueError(f"{'Debiased linear' if debiased else 'Linear'} CKA needs at least {4 if debiased else 2} samples, but got n={n}.")
    # Feature space costs n (dx^2 + dy^2)/2 + n dx dy and d x d memory; the n x n Gram matrices cost
    # n^2 (dx + dy)/2: the same value (||X^T Y||_F^2 = <X X^T, Y Y^T>_F), cheaper when n < d.
    # Neither makes an (n, d) float64 copy: both accumulate over blocks converted on the fly.
    # A float64 input whose means are small next to its spread (:func:`_raw_candidate`) is used as
    # it is (no copy at all): one syrk per side (and one gemm), centred afterwards.
    # numpy's BLAS (CPU, ``config.numpy_blas``) runs torch.get_num_threads() threads meanwhile
    with _blas_threads() if config.numpy_blas and x.device.type == "cpu" else contextlib.nullcontext():
        raw = _raw_candidate(x) and _raw_candidate(y)
        if _use_gram(n, dx, dy):
            kx = ky = None
            if raw and (kx := _raw_gram(x)) is not None:
                ky = _raw_gram(y)
            if ky is None:
                kx, ky = _centred_gram(x, "x", True), _centred_gram(y, "y", True)
            sxy, sxx, syy = _flat_dot(kx, ky), _flat_dot(kx, kx), _flat_dot(ky, ky)  # ||A^T B||_F^2 = <A A^T, B B^T>
            rx, ry = kx.diagonal(), ky.diagonal()  # squared row norms of the centred data
        else:
            prods = _raw_products(x, y) if raw else None
            if prods is None:
                mom = _Moments.of(x, y, blas=True)
                prods = mom.cxx, mom.cyy, mom.cxy, mom.mx, mom.my
            cxx, cyy, cxy, mx, my = prods
            sxy, sxx, syy = _flat_dot(cxy, cxy), _flat_dot(cxx, cxx), _flat_dot(cyy, cyy)
            if debiased:
                rx, ry = _row_sq_norms(x, mx), _row_sq_norms(y, my)
    if not debiased:
        return _cka_ratio(sxy, sxx, syy)
    return _debiased_ratio(_hsic_u(sxy, rx, ry, n), _hsic_u(sxx, rx, rx, n), _hsic_u(syy, ry, ry, n))


def _use_gram(n: int, dx: int, dy: int) -> bool:
    """Whether linear CKA is cheaper from ``n x n`` Gram matrices than from ``d x d`` moments."""
    return n * (dx + dy) < dx * dx + dy * dy + 2 * dx * dy


def procrustes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Orthogonal Procrustes similarity: ``||X_c^T Y_c||_* / (||X_c||_F ||Y_c||_F)``.

    With ``X``, ``Y`` centred and scaled to unit Frobenius norm, ``min_Q ||X - Y Q||_F^2`` over
    orthogonal ``Q`` (``d_y <= d_x``; zero-pad the narrower side otherwise) is
    ``2 - 2 ||X^T Y||_*`` (Schönemann 1966), the Procrustes distance of Ding, Denain & Steinhardt
    (2021); this function returns the similarity ``||X^T Y||_*`` (nuclear norm: the sum of the
    singular values), so their distance is ``2 - 2 * procrustes(x, y)``, in ``[0, 2]``. The
    similarity lies in ``[0, 1]`` (1: one representation is an orthogonal transform of the other,
    up to scale and translation), and is invariant to orthogonal maps, isotropic scaling and
    translation of either side, like linear CKA (not to arbitrary invertible maps, like CCA). Ding et
    al. find it sensitive both to the directions that carry most variance (as CKA) and to low-variance
    ones (as CCA).

    Computed from ``X_c^T Y_c`` ``(d_x, d_y)`` and the traces of the covariances (so the streaming
    :class:`SimilarityAccumulator` gives it too, ``compute(("procrustes",))``), or, when ``n`` is
    smaller than ``d_x + d_y``, from the ``n x n`` Gram matrices: the singular values of ``X_c^T
    Y_c`` are those of ``L_x^T L_y`` with ``X_c X_c^T = L_x L_x^T`` (eigendecomposition). Both in
    float64 over blocks converted on the fly (no float64 copy of the data).

    Args:
        x: ``(n, d_x)`` activations (rows = inputs, columns = units).
        y: ``(n, d_y)`` activations of the same ``n`` inputs, in the same order.

    Returns:
        0-d float64 tensor in ``[0, 1]``.

    Raises:
        ValueError: non-2-D input, different ``n``, ``n < 2``, NaN/Inf, or a constant representation.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(200, 6, generator=g)
        >>> q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
        >>> round(float(procrustes(x, 3 * x @ q + 1)), 6)
        1.0
        >>> d = 2 - 2 * procrustes(x, torch.randn(200, 6, generator=g))   # Ding et al.'s distance
        >>> bool(0 < d < 2)
        True
    """
    x, y = _prep(x, y)
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    _need_rows(n)
    if n < 2:
        raise ValueError(f"The Procrustes similarity needs at least 2 samples, but got n={n}.")
    if _use_gram(n, dx, dy):
        lx, tx = _gram_root(_centred_gram(x, "x"))
        ly, ty = _gram_root(_centred_gram(y, "y"))
        return _procrustes_ratio(torch.linalg.svdvals(lx.T @ ly).sum(), tx, ty)
    return _from_moments(_Moments.of(x, y), ("procrustes",))["procrustes"]


def _gram_root(k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(L, tr K)`` with ``K = L L^T`` (``L = U sqrt(lambda)`` from ``eigh``) for a centred Gram
    matrix ``K`` ``(n, n)``: ``L^T L'`` has the singular values of ``X_c^T Y_c``. Eigenvalues below the
    eigensolver's rounding level (``n eps lambda_max``; a centred Gram matrix has at least one exact
    zero) are set to 0: their square roots, ``~sqrt(eps)`` of the scale, would be noise."""
    evals, evecs = torch.linalg.eigh(k)
    cut = k.shape[0] * torch.finfo(k.dtype).eps * evals[-1].clamp_min(0.0)
    return evecs * torch.where(evals > cut, evals, 0.0).sqrt(), k.diagonal().sum()


#: :func:`rbf_cka` refuses more samples than this by default (peak memory ``24 n^2`` bytes: 2.4 GB)
RBF_MAX_SAMPLES = 10_000


def _check_threshold(threshold: float) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (0.0 < float(threshold) < float("inf")):
        raise ValueError(
            f"Expected `threshold` to be a positive finite number (the bandwidth as a multiple of the median "
            f"distance; Kornblith et al. use 0.2 to 1.0), but got {threshold!r}."
        )
    return float(threshold)


def _check_max_samples(n: int, max_samples: int) -> None:
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 4:
        raise ValueError(f"Expected `max_samples` to be an int >= 4, but got {max_samples!r}.")
    if n > max_samples:
        raise ValueError(
            f"Expected at most `max_samples`={max_samples} samples for RBF CKA, whose n x n kernel matrices take "
            f"about 24 n^2 bytes at peak ({24 * n * n / 2**30:.1f} GiB for n={n}), but got n={n}. Subsample the rows "
            f"(the same rows from both representations), use `linear_cka` (O(d^2) memory), or raise `max_samples` "
            "if the memory is there."
        )


def _median_all(k: torch.Tensor) -> torch.Tensor:
    """``np.median`` of every entry of ``k`` (the mean of the two middle values for an even count)."""
    flat = k.reshape(-1)
    m = flat.numel()
    if m % 2:
        return flat.kthvalue(m // 2 + 1).values
    return (flat.kthvalue(m // 2).values + flat.kthvalue(m // 2 + 1).values) / 2


def _rbf_kernel(x: torch.Tensor, threshold: float, name: str) -> torch.Tensor:
    """Gaussian kernel ``exp(-d_ij^2 / (2 sigma^2))`` ``(n, n)`` float64 with ``sigma^2 = threshold^2
    median(d^2)``, the median over all ``n^2`` entries of the squared-distance matrix, its zero
    diagonal included (Kornblith et al.'s ``gram_rbf``). Distances from the Gram matrix of the
    centred data (translation leaves them unchanged and centring keeps the cancellation in
    ``|a|^2 + |b|^2 - 2 a.b`` small), computed in place."""
    k = _centred_gram(x, name)
    sq = k.diagonal().clone()
    k.mul_(-2.0).add_(sq[:, None]).add_(sq[None, :]).clamp_min_(0.0)
    k.fill_diagonal_(0.0)
    med = _median_all(k)
    if not bool(med > 0):
        raise ValueError(
            f"RBF CKA is undefined for `{name}`: the median pairwise distance is 0 (a constant representation, or "
            "more than half of the rows identical), so the kernel bandwidth would be 0. Check the layer (dead units?) "
            "or the probe inputs (duplicated rows?)."
        )
    scale = 1.0 / (2.0 * threshold * threshold * float(med))
    top = float(k.max()) * scale
    if top < 1e-8:  # exp(-d^2 / 2 sigma^2) = 1 - O(top): the kernel's variation is below float64's resolution
        raise ValueError(
            f"RBF CKA cannot be computed at threshold={threshold:g} for `{name}`: the bandwidth is so far above the "
            f"pairwise distances that the kernel is constant to within {top:.1e}, below float64's precision. Use a "
            "threshold of order 0.1-10 (as the threshold grows, RBF CKA tends to linear CKA: use `linear_cka`)."
        )
    return k.mul_(-scale).exp_()


def _double_centre_(k: torch.Tensor) -> torch.Tensor:
    """``H K H`` in place for a symmetric ``K`` (``H = I - 11^T/n``)."""
    r = k.mean(0)
    k.sub_(r[:, None]).sub_(r[None, :]).add_(r.mean())
    return k


def _hsic1_flat(k: torch.Tensor, l: torch.Tensor, sk: torch.Tensor, sl: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) times ``n (n-3)`` of kernels with zero diagonals, given their
    row sums ``sk = K 1``, ``sl = L 1``; no ``n x n`` temporary."""
    n = k.shape[0]
    return _flat_dot(k, l) + sk.sum() * sl.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (sk @ sl)


def rbf_cka(x: torch.Tensor, y: torch.Tensor, *, threshold: float = 1.0, debiased: bool = False,
            max_samples: int = RBF_MAX_SAMPLES) -> torch.Tensor:
    """CKA with Gaussian (RBF) kernels (Kornblith et al. 2019).

    ``CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``K_ij = exp(-||x_i - x_j||^2 / (2 sigma_x^2))``
    and ``sigma_x = threshold * sqrt(median ||x_i - x_j||^2)``: the bandwidth is a fraction of the
    median distance, as in Kornblith et al.'s code, whose median runs over the whole ``n x n``
    squared-distance matrix, its zero diagonal included (so do we, for comparable numbers); the same
    for ``y``. Being a function of the distances scaled by their median, it is invariant to
    orthogonal maps, isotropic scaling and translation of either side. A small ``threshold`` makes
    the kernel local (similar neighbourhoods count; Kornblith et al. report 0.2 to 1.0 as close to
    linear CKA on their networks, smaller values departing from it); large ones approach linear CKA.

    Memory and cost: two ``n x n`` float64 kernel matrices and one of the same size while the median
    is selected, about ``24 n^2`` bytes at peak (240 MB at n=3162, 2.4 GB at n=10000); ``n^2 (d_x +
    d_y) / 2`` multiply-adds. ``n`` above ``max_samples`` is refused rather than exhausting memory.

    Args:
        x: ``(n, d_x)`` activations (rows = inputs, columns = units).
        y: ``(n, d_y)`` activations of the same ``n`` inputs, in the same order.
        threshold: the bandwidth as a multiple of the median distance; positive.
        debiased: use the unbiased HSIC estimator (Song et al. 2012) on the kernels with their
            diagonals zeroed, as :func:`linear_cka` does; needs ``n >= 4``. The value is the estimate
            itself (not clipped at 0): slightly below 0 is possible for unrelated representations.
        max_samples: the largest ``n`` accepted (default 10000).

    Returns:
        0-d float64 tensor in ``[0, 1]`` (``debiased=True``: at most 1, near 0 for unrelated data).

    Raises:
        ValueError: non-2-D input, different ``n``, too few samples (2; 4 debiased), ``n >
            max_samples``, NaN/Inf, a bad ``threshold``, or a median distance of 0 (constant rows).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(300, 8, generator=g)
        >>> q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
        >>> round(float(rbf_cka(x, 5 * x @ q - 2, threshold=0.5)), 6)
        1.0
        >>> float(rbf_cka(x, x.tanh())) > float(rbf_cka(x, torch.randn(300, 8, generator=g)))
        True
    """
    x, y = _prep(x, y)
    threshold = _check_threshold(threshold)
    n = x.shape[0]
    _need_rows(n)
    _check_max_samples(n, max_samples)
    if n < (4 if debiased else 2):
        raise ValueError(f"{'Debiased RBF' if debiased else 'RBF'} CKA needs at least {4 if debiased else 2} samples, but got n={n}.")
    kx = _rbf_kernel(x, threshold, "x")
    if not debiased:
        kx = _double_centre_(kx)
        ky = _double_centre_(_rbf_kernel(y, threshold, "y"))
        return _cka_ratio(_flat_dot(kx, ky), _flat_dot(kx, kx), _flat_dot(ky, ky))
    kx.fill_diagonal_(0.0)
    ky = _rbf_kernel(y, threshold, "y").fill_diagonal_(0.0)
    sx, sy = kx.sum(1), ky.sum(1)
    return _debiased_ratio(_hsic1_flat(kx, ky, sx, sy), _hsic1_flat(kx, kx, sx, sx), _hsic1_flat(ky, ky, sy, sy),
                           "Debiased RBF CKA")


# ----------------------------------------------------------------------------- similarity matrices
#: the methods :func:`similarity_matrix` knows
_MATRIX_METHODS = ("cka", "cka_debiased", "rbf_cka", "procrustes", "svcca", "pwcca", "cca")


@dataclass(frozen=True, eq=False)
class SimilarityMatrix:
    """The result of :func:`similarity_matrix`.

    Attributes:
        values: ``(M, M)`` float64 tensor; ``values[i, j]`` compares ``labels[i]`` with ``labels[j]``
            (for ``"pwcca"``, ``pwcca(reps[i], reps[j])``: row ``i`` is the ``x`` argument).
        labels: the ``M`` names, in order: a dict's keys in its order, or ``0 .. M-1`` for a list.
        method: the method that filled ``values``.

    Indexing by a pair of labels gives one value: ``m["fc1", "fc2"]`` (a 0-d tensor).
    """

    values: torch.Tensor
    labels: Tuple[Any, ...]
    method: str

    def __getitem__(self, pair: Tuple[Any, Any]) -> torch.Tensor:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"Expected a pair of labels, e.g. m[{self.labels[0]!r}, {self.labels[-1]!r}], but got {pair!r}.")
        idx = []
        for label in pair:
            if label not in self.labels:
                raise KeyError(f"Expected a label among {list(self.labels)}, but got {label!r}.")
            idx.append(self.labels.index(label))
        return self.values[idx[0], idx[1]]


def _check_reps(reps: Any) -> Tuple[Tuple[Any, ...], list]:
    if isinstance(reps, dict):
        labels, tensors = tuple(reps.keys()), list(reps.values())
    elif isinstance(reps, (list, tuple)):
        labels, tensors = tuple(range(len(reps))), list(reps)
    else:
        raise TypeError(
            f"Expected `reps` to be a list or dict of (n, d) tensors (e.g. {{'fc1': a1, 'fc2': a2}}), but got {type(reps).__name__}."
        )
    if not tensors:
        raise ValueError("Expected `reps` to hold at least one representation, but got none.")
    out = []
    for label, t in zip(labels, tensors):
        t = check_2d(t, f"reps[{label!r}]")
        if out:
            check_same_n(out[0], t, f"reps[{labels[0]!r}]", f"reps[{label!r}]")
            if t.device != out[0].device:
                raise ValueError(
                    f"Expected every representation on one device, but got {out[0].device} for reps[{labels[0]!r}] "
                    f"and {t.device} for reps[{label!r}]."
                )
        out.append(t)
    _warn_if_grad(*out)
    out = [t.detach() for t in out]
    _need_rows(out[0].shape[0])
    return labels, out


def _joint_comoments(reps: Sequence[torch.Tensor], labels: Optional[Sequence[Any]] = None
                     ) -> Tuple[int, list, Dict[Tuple[int, int], torch.Tensor]]:
    """``(n, means, C)``: every representation's mean and the centred co-moment blocks ``C[i, j] =
    X_i,c^T X_j,c`` for ``i <= j`` (float64), in one pass over row blocks converted and shifted on
    the fly as :meth:`_Moments.of` does (no float64 copy of the data; extra memory the blocks,
    ``sum_{i <= j} d_i d_j`` numbers, plus one row block of every representation)."""
    n, dev, m = reps[0].shape[0], reps[0].device, len(reps)
    dims = [r.shape[1] for r in reps]
    total, widest = max(sum(dims), 1), max(max(dims), 1)
    if dev.type == "cpu":
        rows, piece = max(512, 2**18 // total), max(128, 2**16 // widest)
    else:
        rows = piece = max(1, min(16384, 2**23 // total))
    rows = min(rows, n)
    shifts = [r[:rows].sum(0, dtype=_F64) / rows for r in reps]
    cs = {(i, j): torch.zeros((dims[i], dims[j]), dtype=_F64, device=dev) for i in range(m) for j in range(i, m)}
    sums = [torch.zeros(d, dtype=_F64, device=dev) for d in dims]
    bufs = [torch.empty((d, rows), dtype=_F64, device=dev) for d in dims]
    for start in range(0, n, rows):
        r = min(rows, n - start)
        blocks = []
        for k in range(m):
            a = bufs[k][:, :r]
            for j in range(0, r, piece):
                torch.sub(reps[k][start + j : start + min(j + piece, r)].T, shifts[k][:, None], out=a[:, j : j + piece])
            sums[k] += a.sum(1)
            blocks.append(a)
        for i in range(m):
            _gram_into(blocks[i], cs[i, i])
            for j in range(i + 1, m):
                cs[i, j].addmm_(blocks[i], blocks[j].T)
    deltas = [t / n for t in sums]
    for (i, j), c in cs.items():
        if i == j:
            _mirror_blocks(c)
        c.sub_(torch.outer(deltas[i], deltas[j]), alpha=n)
    means = [s + e for s, e in zip(shifts, deltas)]
    for k in range(m):
        if not bool(torch.isfinite(cs[k, k].diagonal()).all() & torch.isfinite(means[k]).all()):
            check_finite(reps[k], f"reps[{(k if labels is None else labels[k])!r}]")
            raise ValueError("Expected finite inputs, but their sums overflowed float64; rescale the activations.")
    return n, means, cs


def similarity_matrix(reps: Union[Sequence[torch.Tensor], Dict[Any, torch.Tensor]], *, method: str = "cka",
                      keep: Union[float, int] = 0.99, rank_tol: float = RANK_TOL, pwcca_method: str = "paper",
                      threshold: float = 1.0, max_samples: int = RBF_MAX_SAMPLES) -> SimilarityMatrix:
    """Similarity of every pair of ``M`` representations of the same inputs (layers of one network,
    or one layer of several networks), each representation's own statistics computed once.

    ``values[i, j]`` equals the pairwise function on ``(reps[i], reps[j])`` up to rounding (~1e-12):
    ``"cka"`` :func:`linear_cka`, ``"cka_debiased"`` ``linear_cka(debiased=True)``, ``"rbf_cka"``
    :func:`rbf_cka` (``threshold``), ``"procrustes"`` :func:`procrustes`, ``"svcca"`` :func:`svcca`
    (``keep``), ``"pwcca"`` :func:`pwcca` (``pwcca_method``), and ``"cca"`` the *mean* canonical
    correlation of :func:`cca` (one number per pair). The diagonal is 1 by definition (every method
    gives 1 for identical inputs, the debiased estimators included: their ratio is then exactly 1)
    and is not computed. Every method but PWCCA is symmetric, and its matrix is filled from the
    upper triangle, so exactly symmetric. PWCCA weights the canonical correlations by the side with
    fewer (kept) dimensions, ``x`` on a tie, so with equal widths ``values[i, j]`` and ``values[j,
    i]`` can differ: both are computed, as ``pwcca(reps[i], reps[j])`` (row = ``x``), and not
    symmetrized (``(m.values + m.values.T) / 2`` does that if wanted).

    What is shared: the co-moment blocks of all representations in one pass over the rows (a
    representation's covariance and its factorizations, e.g. its whitening, serve all ``M - 1``
    pairs it is in: the CCA family, linear CKA and Procrustes), or, when ``n`` is small next to the
    widths (linear CKA, Procrustes) and always for RBF CKA, each representation's ``n x n`` kernel
    matrix (and for Procrustes its eigendecomposition). Memory: ``sum_{i <= j} d_i d_j`` float64
    numbers for the co-moments, or ``M n^2`` for the kernels (RBF: ``n <= max_samples``). No float64
    copy of the data is made.

    Args:
        reps: a list (labels ``0 .. M-1``) or a dict (labels its keys, in order) of ``(n, d_i)``
            tensors over the same ``n`` inputs, in the same order, on one device.
        method: one of ``"cka"``, ``"cka_debiased"``, ``"rbf_cka"``, ``"procrustes"``, ``"svcca"``,
            ``"pwcca"``, ``"cca"``.
        keep: SVCCA's fraction of variance or number of directions (see :func:`svcca`).
        rank_tol: the CCA family's whitening cutoff (see :func:`cca`).
        pwcca_method: PWCCA's weighting, ``"paper"`` or ``"google"`` (see :func:`pwcca`'s ``method``).
        threshold: RBF CKA's bandwidth as a multiple of the median distance (see :func:`rbf_cka`).
        max_samples: RBF CKA's largest ``n`` (see :func:`rbf_cka`).

    Returns:
        A :class:`SimilarityMatrix`: ``values`` ``(M, M)`` float64, ``labels``, ``method``.

    Raises:
        TypeError: ``reps`` not a list or dict of tensors.
        ValueError: no representations, different ``n`` or devices, NaN/Inf, an unknown method or
            bad option, or a pair the method is undefined for (the message names the pair).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(500, 6, generator=g)
        >>> reps = {"in": x, "hidden": (x @ torch.randn(6, 10, generator=g)).relu(), "noise": torch.randn(500, 4, generator=g)}
        >>> m = similarity_matrix(reps, method="cka")
        >>> m.labels, tuple(m.values.shape), bool(torch.equal(m.values, m.values.T))
        (('in', 'hidden', 'noise'), (3, 3), True)
        >>> torch.allclose(m["in", "hidden"], linear_cka(x, reps["hidden"]))
        True
        >>> bool(m["in", "hidden"] > m["in", "noise"])
        True
    """
    labels, xs = _check_reps(reps)
    if method not in _MATRIX_METHODS:
        raise ValueError(f"Expected `method` to be one of {list(_MATRIX_METHODS)}, but got {method!r}.")
    keep, rank_tol, pwcca_method = _check_keep(keep), _check_rank_tol(rank_tol), _check_method(pwcca_method)
    if method == "rbf_cka":
        threshold = _check_threshold(threshold)
        _check_max_samples(xs[0].shape[0], max_samples)
    m, n, dims = len(xs), xs[0].shape[0], [x.shape[1] for x in xs]
    out = torch.eye(m, dtype=_F64, device=xs[0].device)
    if m == 1:
        check_finite(xs[0], f"reps[{labels[0]!r}]")
        return SimilarityMatrix(out, labels, method)
    total = sum(dims)
    if method in ("cka", "cka_debiased"):
        gram = n * (total + m * m) < total * total
    elif method == "procrustes":
        gram = n * m < 2 * total  # n below the mean width of a pair, as the pairwise rule
    else:
        gram = method == "rbf_cka"
    pair_value = _matrix_gram_pairs(xs, labels, method, threshold) if gram else \
        _matrix_moment_pairs(xs, labels, method, keep=keep, rank_tol=rank_tol, pwcca_method=pwcca_method)
    for i in range(m):
        for j in range(i + 1, m):
            try:
                out[i, j] = pair_value(i, j)
                out[j, i] = pair_value(j, i) if method == "pwcca" else out[i, j]
            except ValueError as err:
                raise ValueError(f"{method} is undefined for the pair ({labels[i]!r}, {labels[j]!r}): {err}") from err
    return SimilarityMatrix(out, labels, method)


def _matrix_gram_pairs(xs: list, labels: Tuple[Any, ...], method: str, threshold: float) -> Callable[[int, int], torch.Tensor]:
    """Per-representation ``n x n`` kernel data, and the function that gives a pair's value from it."""
    n = xs[0].shape[0]
    if n < (4 if method in ("cka_debiased",) else 2):
        need = 4 if method == "cka_debiased" else 2
        raise ValueError(f"{method} needs at least {need} samples, but got n={n}.")
    names = [f"reps[{lab!r}]" for lab in labels]
    if method == "rbf_cka":
        ks = [_double_centre_(_rbf_kernel(x, threshold, nm)) for x, nm in zip(xs, names)]
        sq = [_flat_dot(k, k) for k in ks]
        return lambda i, j: _cka_ratio(_flat_dot(ks[i], ks[j]), sq[i], sq[j])
    ks = [_centred_gram(x, nm) for x, nm in zip(xs, names)]
    if method == "procrustes":
        roots = [_gram_root(k) for k in ks]
        del ks
        return lambda i, j: _procrustes_ratio(torch.linalg.svdvals(roots[i][0].T @ roots[j][0]).sum(), roots[i][1], roots[j][1])
    sq = [_flat_dot(k, k) for k in ks]
    if method == "cka":
        return lambda i, j: _cka_ratio(_flat_dot(ks[i], ks[j]), sq[i], sq[j])
    rs = [k.diagonal() for k in ks]
    hs = [_hsic_u(s, r, r, n) for s, r in zip(sq, rs)]
    return lambda i, j: _debiased_ratio(_hsic_u(_flat_dot(ks[i], ks[j]), rs[i], rs[j], n), hs[i], hs[j])


def _matrix_moment_pairs(xs: list, labels: Tuple[Any, ...], method: str, *, keep: Union[float, int], rank_tol: float,
                         pwcca_method: str) -> Callable[[int, int], torch.Tensor]:
    """The joint co-moments, one :class:`_Factors` per representation (its factorizations computed
    once, on first use, for all its pairs), and the function that gives a pair's value."""
    n, means, cs = _joint_comoments(xs, labels)
    if method == "cka_debiased":
        if n < 4:
            raise ValueError(f"Debiased linear CKA needs at least 4 samples, but got n={n}.")
        norm2 = lambda c: torch.linalg.matrix_norm(c) ** 2  # noqa: E731
        rs = [_row_sq_norms(x, mu) for x, mu in zip(xs, means)]
        hs = [_hsic_u(norm2(cs[k, k]), rs[k], rs[k], n) for k in range(len(xs))]

        def debiased(i: int, j: int) -> torch.Tensor:
            return _debiased_ratio(_hsic_u(norm2(cs[i, j]), rs[i], rs[j], n), hs[i], hs[j])

        return debiased
    den = max(n - 1, 1)
    factors = [_Factors(cs[k, k] / den) for k in range(len(xs))]
    name = {"cka": "cka", "procrustes": "procrustes", "svcca": "svcca", "pwcca": "pwcca", "cca": "cca"}[method]

    def value(i: int, j: int) -> torch.Tensor:
        sxy = cs[i, j] / den if i < j else cs[j, i].T / den
        values, errors = _compute(factors[i], factors[j], sxy, n, (name,), keep=keep, rank_tol=rank_tol, method=pwcca_method)
        if name in errors:
            raise errors[name]
        v = values[name]
        return v.mean() if name == "cca" else v

    return value


#: how closely the means of the y rows must match the given ``y_stats`` (relative to each unit's
#: ``|mean| + std``): loose enough for activations stored in float32 (rounding ~6e-8), far tighter
#: than any other set of rows would match (a different sample's means differ by ~``std / sqrt(n)``)
_Y_MEAN_RTOL = 1e-6


@dataclass(frozen=True, eq=False)
class SideStats:
    """Statistics of one side of a :class:`SimilarityAccumulator`, with the factorizations computed
    from them so far: what a later accumulator needs to use these rows as its ``y`` side without
    recomputing their co-moments or factorizations (:meth:`SimilarityAccumulator.side`,
    ``update(..., y_stats=)``).

    Treat it as immutable: the cached factorizations (``eigh``, Cholesky data, at most about
    ``3 d^2`` float64 numbers, filled in by whichever metrics are computed with it) belong to these
    ``n``, ``mean`` and ``comoment``.

    Attributes:
        n: number of rows.
        mean: ``(d,)`` float64 means of the units.
        comoment: ``(d, d)`` float64 centered co-moment matrix ``sum_i (a_i - mean)(a_i - mean)^T``
            (the covariance times ``n - 1``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(100, 3, generator=g, dtype=torch.float64)
        >>> s = SimilarityAccumulator().update(a, a).side("x")
        >>> s.n, tuple(s.comoment.shape), torch.allclose(s.covariance, torch.cov(a.T))
        (100, (3, 3), True)
    """

    n: int
    mean: torch.Tensor
    comoment: torch.Tensor
    _factors: _Factors = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"Expected `n` to be an int >= 1, but got {self.n!r}.")
        if not isinstance(self.mean, torch.Tensor) or not isinstance(self.comoment, torch.Tensor):
            raise TypeError("Expected `mean` and `comoment` to be torch.Tensor.")
        d = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if d < 0 or tuple(self.comoment.shape) != (d, d) or self.comoment.device != self.mean.device:
            raise ValueError(
                f"Expected `mean` (d,) and `comoment` (d, d) on one device, but got {tuple(self.mean.shape)} on "
                f"{self.mean.device} and {tuple(self.comoment.shape)} on {self.comoment.device}."
            )
        object.__setattr__(self, "mean", self.mean.to(_F64))
        object.__setattr__(self, "comoment", self.comoment.to(_F64))
        # the covariance exactly as the metrics form it from an accumulator's co-moments (see _cov)
        object.__setattr__(self, "_factors", _Factors(self.comoment / max(self.n - 1, 1)))

    @property
    def covariance(self) -> torch.Tensor:
        """``(d, d)`` covariance, ``comoment / (n - 1)``."""
        return self._factors.cov


def _same_stats(a: Optional[SideStats], b: Optional[SideStats]) -> bool:
    if a is b:
        return True
    return (a is not None and b is not None and a.n == b.n and torch.equal(a.mean, b.mean)
            and torch.equal(a.comoment, b.comoment))


class SimilarityAccumulator:
    """Streaming CCA / SVCCA / PWCCA / linear CKA / Procrustes over paired batches, without storing activations.

    Keeps, in float64 on the inputs' device, the sample count, the means and the centered
    co-moment matrices of ``x`` and ``y``: memory ``8 * (d_x^2 + d_y^2 + d_x d_y + d_x + d_y)``
    bytes whatever the number of samples (with ``update(..., y_stats=)``, the ``y`` co-moment is
    that object's, not a copy). Batches are merged with Chan et al.'s pairwise update,
    which is exact (no running-sum cancellation), and ranks merge the same way
    (:meth:`all_reduce`), so the values equal the functional forms on the concatenated data.
    Computing a metric also keeps each side's covariance and the factorizations computed from it
    (at most about ``3 d^2`` float64 numbers per side, ``4 d^2`` with constant units dropped) until the
    next ``update``/``merge``/``all_reduce``, so that several metrics, or a later accumulator
    (:meth:`side`), factorize each covariance once.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(600, 5, generator=g), torch.randn(600, 3, generator=g)
        >>> acc = SimilarityAccumulator()
        >>> for i in range(0, 600, 128):
        ...     _ = acc.update(x[i:i + 128], y[i:i + 128])
        >>> torch.allclose(acc.pwcca(), pwcca(x, y))
        True
    """

    def __init__(self) -> None:
        self._m: Optional[_Moments] = None
        self._y_stats: Optional[SideStats] = None
        self._sides: Dict[str, Any] = {}  # the SideStats built from _m (and sxy), until _m changes

    @property
    def n(self) -> int:
        return 0 if self._m is None else self._m.n

    def update(self, x: torch.Tensor, y: torch.Tensor, *, y_stats: Optional[SideStats] = None) -> "SimilarityAccumulator":
        """Add a batch of paired rows ``x`` ``(b, d_x)``, ``y`` ``(b, d_y)``.

        Args:
            x: ``(b, d_x)`` activations.
            y: ``(b, d_y)`` activations of the same ``b`` inputs.
            y_stats: the statistics of *all* the ``y`` rows this accumulator will see (over every
                batch and, after :meth:`all_reduce`, every rank), e.g. ``prev_acc.side("x")`` of an
                earlier accumulator that had these rows as its ``x``. Then the ``y`` co-moment is not
                computed here (only ``x``'s, the cross one and the ``y`` means, which merging the
                cross one needs), and the metrics take ``y``'s co-moment and any factorization of it
                from ``y_stats``: the values are the same as without it. Pass the same object with
                every batch. Checked when a metric is computed: the row count must equal
                ``y_stats.n`` and the ``y`` means ``y_stats.mean`` (to ``1e-6`` of each unit's
                ``|mean| + std``, i.e. up to float32 rounding of the rows), else ``ValueError``.

        Returns:
            ``self``.

        Raises:
            ValueError: bad shapes, non-finite values, widths unlike the earlier batches', or a
                ``y_stats`` unlike the earlier batches' (or of another width or device than ``y``).
        """
        x, y = _prep(x, y)
        if y_stats is not None:
            if not isinstance(y_stats, SideStats):
                raise TypeError(f"Expected `y_stats` to be a SideStats (from `side`), but got {type(y_stats).__name__}.")
            if y_stats.mean.shape[0] != y.shape[1] or y_stats.mean.device != y.device:
                raise ValueError(
                    f"Expected `y` of the width and device of `y_stats` ({y_stats.mean.shape[0]} on {y_stats.mean.device}), "
                    f"but got {y.shape[1]} on {y.device}."
                )
        if self._m is not None and not _same_stats(self._y_stats, y_stats):
            raise ValueError("Expected the same `y_stats` (or none) with every batch of an accumulator, but got a different one.")
        if x.shape[0] == 0:
            return self
        batch = _Moments.of(x, y, yy=y_stats is None)
        if self._m is not None:
            if (self._m.mx.shape[0], self._m.my.shape[0]) != (x.shape[1], y.shape[1]):
                raise ValueError(
                    f"Expected batches of widths ({self._m.mx.shape[0]}, {self._m.my.shape[0]}) like the "
                    f"first one, but got ({x.shape[1]}, {y.shape[1]})."
                )
            self._m = self._m.merge(batch)
        else:
            self._m, self._y_stats = batch, y_stats
        self._sides = {}
        return self

    def merge(self, other: "SimilarityAccumulator") -> "SimilarityAccumulator":
        """Merge another accumulator's statistics into this one (in place); returns ``self``."""
        if not isinstance(other, SimilarityAccumulator):
            raise TypeError(f"Expected a SimilarityAccumulator, but got {type(other).__name__}.")
        if other._m is not None:
            if self._m is None:
                self._m, self._y_stats = other._m, other._y_stats
            else:
                mine, theirs = (self._m.mx.shape[0], self._m.my.shape[0]), (other._m.mx.shape[0], other._m.my.shape[0])
                if mine != theirs:
                    raise ValueError(f"Cannot merge statistics of widths {theirs} into an accumulator of widths {mine}.")
                if not _same_stats(self._y_stats, other._y_stats):
                    raise ValueError("Cannot merge statistics computed with a different `y_stats` (or with and without).")
                self._m = self._m.merge(other._m)
            self._sides = {}
        return self

    def reset(self) -> None:
        self._m, self._y_stats, self._sides = None, None, {}

    def _flat(self) -> torch.Tensor:
        m = self._need()
        has_yy = m.cyy is not None
        return torch.cat([
            torch.tensor([float(m.n), float(has_yy)], dtype=_F64, device=m.mx.device), m.mx, m.my,
            m.cxx.flatten(), *([m.cyy.flatten()] if has_yy else []), m.cxy.flatten(),
        ])

    @staticmethod
    def _unflat(t: torch.Tensor, dx: int, dy: int) -> _Moments:
        n, has_yy = int(t[0]), bool(t[1])
        o = 2
        mx = t[o : o + dx]; o += dx  # noqa: E702
        my = t[o : o + dy]; o += dy  # noqa: E702
        cxx = t[o : o + dx * dx].reshape(dx, dx); o += dx * dx  # noqa: E702
        cyy = None
        if has_yy:
            cyy = t[o : o + dy * dy].reshape(dy, dy); o += dy * dy  # noqa: E702
        cxy = t[o : o + dx * dy].reshape(dx, dy)
        return _Moments(n, mx, my, cxx, cyy, cxy)

    def all_reduce(self) -> "SimilarityAccumulator":
        """Merge the statistics of every rank, in rank order (every rank ends with the same values).

        A collective under ``torch.distributed`` (every rank must call it, each having seen at least
        one batch, all with ``y_stats`` or all without); a no-op otherwise. With ``y_stats``, only
        the ``x`` and cross co-moments and the means travel.
        """
        if not _dist.is_distributed():
            return self
        _dist.require_all(self._m is not None, "Every rank must `update` the accumulator at least once before `all_reduce`.")
        m = self._need()
        dx, dy = m.mx.shape[0], m.my.shape[0]
        parts = _dist.all_gather(self._flat())
        if len({bool(p[1]) for p in parts}) > 1:  # every rank sees the same parts: all raise alike
            raise ValueError("Every rank must pass `y_stats` to `update`, or none; they differ.")
        merged: Optional[_Moments] = None
        for part in parts:
            pm = self._unflat(part, dx, dy)
            merged = pm if merged is None else merged.merge(pm)
        self._m = merged
        self._sides = {}
        return self

    def state_dict(self) -> Dict[str, Any]:
        if self._m is None:
            return {"n": 0}
        m = self._m
        state: Dict[str, Any] = {"n": m.n, "mx": m.mx, "my": m.my, "cxx": m.cxx, "cxy": m.cxy}
        if m.cyy is not None:
            state["cyy"] = m.cyy
        if self._y_stats is not None:  # its factorizations are not saved (recomputed on use)
            ys = self._y_stats
            state["y_stats"] = {"n": ys.n, "mean": ys.mean, "comoment": ys.comoment}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.reset()
        if int(state.get("n", 0)) == 0:
            return
        ys = state.get("y_stats")
        if ys is not None:
            self._y_stats = SideStats(int(ys["n"]), ys["mean"], ys["comoment"])
        cyy = None if ys is not None else state["cyy"].to(_F64)
        self._m = _Moments(int(state["n"]), *(state[k].to(_F64) for k in ("mx", "my", "cxx")), cyy, state["cxy"].to(_F64))

    def _need(self) -> _Moments:
        if self._m is None:
            raise ValueError(
                "The accumulator is empty (no samples, n=0): call `update(x, y)` with at least one batch "
                "of one or more rows first (batches with 0 rows add nothing)."
            )
        return self._m

    def _pair(self) -> Tuple[SideStats, SideStats, torch.Tensor, int]:
        """Both sides' statistics (with their factorization caches) and the cross-covariance."""
        m = self._need()
        if not self._sides:
            ys = self._y_stats
            if ys is not None:
                _check_y_matches(m, ys)
            sides = {
                "x": SideStats(m.n, m.mx, m.cxx),
                "y": ys if ys is not None else SideStats(m.n, m.my, m.cyy),
                "sxy": m.cxy / max(m.n - 1, 1),
            }
            self._sides = sides
        s = self._sides
        return s["x"], s["y"], s["sxy"], m.n

    def side(self, which: str = "x") -> SideStats:
        """The statistics of one side of all rows seen, with every factorization computed so far.

        Meant to be handed to a later accumulator whose ``y`` rows are these rows
        (``update(..., y_stats=)``), which then reuses the co-moment and factorizations instead of
        recomputing them: e.g. a layer's activations this epoch, compared with the next epoch's.
        Take it after all updates (and :meth:`all_reduce`) and after computing the metrics, so
        that it holds their factorizations; computing more metrics later adds to it.

        Args:
            which: ``"x"`` or ``"y"`` (with ``y_stats``, the ``y`` side is that object).

        Returns:
            A :class:`SideStats` (``n``, ``mean`` ``(d,)``, ``comoment`` ``(d, d)``, cached
            factorizations), the same object until the accumulator changes.

        Raises:
            ValueError: empty accumulator, ``which`` not ``"x"``/``"y"``, or ``y`` rows that do not
                match the given ``y_stats``.

        Example:
            >>> g = torch.Generator().manual_seed(0)
            >>> epochs = [torch.randn(400, 6, generator=g, dtype=torch.float64)]
            >>> for _ in range(2):
            ...     epochs.append(epochs[-1] + 0.1 * torch.randn(400, 6, generator=g, dtype=torch.float64))
            >>> acc = SimilarityAccumulator().update(epochs[1], epochs[0])    # epoch 1 vs 0
            >>> _ = acc.compute(("pwcca", "svcca", "cka"))                   # (logged)
            >>> prev = acc.side("x")                                          # epoch 1's statistics
            >>> nxt = SimilarityAccumulator().update(epochs[2], epochs[1], y_stats=prev)
            >>> values, errors = nxt.compute(("pwcca", "svcca", "cka"))       # epoch 2 vs 1
            >>> plain, _ = SimilarityAccumulator().update(epochs[2], epochs[1]).compute(("pwcca", "svcca", "cka"))
            >>> all(torch.equal(values[m], plain[m]) for m in plain), errors
            (True, {})
        """
        if which not in ("x", "y"):
            raise ValueError(f"Expected `which` to be 'x' or 'y', but got {which!r}.")
        sx, sy, _, _ = self._pair()
        return sx if which == "x" else sy

    # -- the metrics -------------------------------------------------------------------
    def compute(self, methods: Sequence[str], *, keep: Union[float, int] = 0.99, rank_tol: float = RANK_TOL,
                method: str = "paper") -> Tuple[Dict[str, torch.Tensor], Dict[str, ValueError]]:
        """Several metrics of all rows seen, factorizing each covariance at most once.

        The values are those of the single-metric methods (:meth:`cca`, :meth:`svcca`,
        :meth:`pwcca`, :meth:`linear_cka`) up to rounding (~1e-13; CCA's correlations near 0 up to
        its documented ~1e-8, as with PWCCA it takes them from the eigenproblem that gives PWCCA's
        directions, whose small correlations are refined). Each
        side's covariance is decomposed once for all of them, by ``eigh`` when SVCCA needs it
        (CCA and PWCCA then whiten with the same decomposition), else by Cholesky where it provably
        gives the same correlations; factorizations kept from an earlier call, or from
        ``y_stats``, are reused. Which whitening is used depends only on ``methods``, never on
        what was computed before, so reuse does not change a value by a bit.

        Args:
            methods: any of ``"cca"`` (canonical correlations ``(r,)``), ``"svcca"``, ``"pwcca"``,
                ``"cka"`` (linear CKA), ``"procrustes"`` (see :func:`procrustes`; from the
                cross-covariance's singular values and the covariances' traces), in any order;
                repeats are ignored.
            keep: SVCCA's fraction of variance or number of directions (see :func:`svcca`).
            rank_tol: whitening cutoff (see :func:`cca`).
            method: PWCCA's weighting, ``"paper"`` or ``"google"`` (see :func:`pwcca`).

        Returns:
            ``(values, errors)``: ``values[m]`` the float64 tensor of each metric that is defined for
            this data, ``errors[m]`` the ``ValueError`` of each that is not (e.g. too few samples for
            PWCCA while CKA is fine), which :meth:`pwcca` etc. would raise.

        Raises:
            ValueError: empty accumulator, unknown method or bad option, or ``y`` rows that do
                not match the given ``y_stats``.

        Example:
            >>> g = torch.Generator().manual_seed(0)
            >>> x = torch.randn(500, 4, generator=g, dtype=torch.float64)
            >>> acc = SimilarityAccumulator().update(x, x @ torch.randn(4, 4, generator=g, dtype=torch.float64))
            >>> values, errors = acc.compute(("pwcca", "svcca", "cka"), keep=4)
            >>> round(float(values["pwcca"]), 9), round(float(values["svcca"]), 9), errors
            (1.0, 1.0, {})
            >>> values, errors = SimilarityAccumulator().update(x[:8], x[:8]).compute(("pwcca", "cka"))
            >>> sorted(values), sorted(errors)        # 8 samples cannot support 4 + 4 directions
            (['cka'], ['pwcca'])
        """
        methods = _check_methods(methods)
        keep, rank_tol, method = _check_keep(keep), _check_rank_tol(rank_tol), _check_method(method)
        sx, sy, sxy, n = self._pair()
        return _compute(sx._factors, sy._factors, sxy, n, methods, keep=keep, rank_tol=rank_tol, method=method)

    def _one(self, name: str, **options: Any) -> torch.Tensor:
        values, errors = self.compute((name,), **options)
        if name in errors:
            raise errors[name]
        return values[name]

    def cca(self, *, rank_tol: float = RANK_TOL) -> torch.Tensor:
        """Canonical correlations of all rows seen; see :func:`cca`."""
        return self._one("cca", rank_tol=rank_tol)

    def svcca(self, *, keep: Union[float, int] = 0.99, rank_tol: float = RANK_TOL) -> torch.Tensor:
        """See :func:`svcca`."""
        return self._one("svcca", keep=keep, rank_tol=rank_tol)

    def pwcca(self, *, method: str = "paper", rank_tol: float = RANK_TOL) -> torch.Tensor:
        """See :func:`pwcca`."""
        return self._one("pwcca", method=method, rank_tol=rank_tol)

    def procrustes(self) -> torch.Tensor:
        """The orthogonal Procrustes similarity of all rows seen; see :func:`procrustes`.

        Example:
            >>> g = torch.Generator().manual_seed(0)
            >>> x, y = torch.randn(600, 5, generator=g), torch.randn(600, 3, generator=g)
            >>> acc = SimilarityAccumulator()
            >>> for i in range(0, 600, 128):
            ...     _ = acc.update(x[i:i + 128], x[i:i + 128, :3] + y[i:i + 128])
            >>> torch.allclose(acc.procrustes(), procrustes(x, x[:, :3] + y))
            True
        """
        return self._one("procrustes")

    def linear_cka(self, *, debiased: bool = False) -> torch.Tensor:
        """See :func:`linear_cka`. The debiased form needs per-row norms and is not available here."""
        if debiased:
            raise ValueError(
                "Debiased linear CKA needs per-sample statistics that the streaming form does not keep; "
                "call `linear_cka(x, y, debiased=True)` on the activations instead."
            )
        return self._one("cka")


def _check_y_matches(m: _Moments, ys: SideStats) -> None:
    """The rows given as ``y`` must be those ``ys`` describes: same count, same means (to rounding)."""
    if m.n != ys.n:
        raise ValueError(
            f"The y side does not match the given statistics `y_stats`: the accumulator has seen n={m.n} rows, "
            f"`y_stats` describes n={ys.n} (pass the same rows, over all batches and ranks, then `all_reduce`)."
        )
    scale = ys.mean.abs() + (ys.comoment.diagonal().clamp_min(0) / max(ys.n - 1, 1)).sqrt()
    tol = _Y_MEAN_RTOL * scale + 1e-12 * scale.max()
    dev = (m.my - ys.mean).abs()
    if not bool((dev <= tol).all()):
        j = int((dev / tol.clamp_min(torch.finfo(_F64).tiny)).argmax())
        raise ValueError(
            "The y side does not match the given statistics `y_stats`: the means of the y rows differ from "
            f"`y_stats.mean` (unit {j}: {float(m.my[j]):.9g} vs {float(ys.mean[j]):.9g}); pass the rows `y_stats` "
            "was computed from, in the same order of units."
        )


class MinibatchCKA:
    """Streaming linear CKA for wide layers: the minibatch estimator of Nguyen, Raghu & Kornblith
    (2021), ``mean_b HSIC_1(X_b, Y_b) / sqrt(mean_b HSIC_1(X_b, X_b) mean_b HSIC_1(Y_b, Y_b))``,
    with ``HSIC_1`` the unbiased HSIC estimator (Song et al. 2012) on the linear Gram matrices of
    each minibatch of ``b >= 4`` rows.

    Memory and cost do not grow with the width's square: per batch ``O(b^2)`` memory and
    ``b^2 (d_x + d_y)`` multiply-adds (against ``O(d^2)`` memory and ``b d^2`` for
    :class:`SimilarityAccumulator`), so it serves layers of thousands of units. Only three sums and a
    count are kept: batches and ranks merge exactly (:meth:`merge`, :meth:`all_reduce`).

    It estimates a different quantity from :func:`linear_cka` (the debiased CKA, averaged over the
    batch partition): its value depends on the batch size (use the same one to compare), it is
    unbiased per batch, and, like ``linear_cka(debiased=True)``, it can fall slightly below 0 for
    unrelated representations.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(400, 3000, generator=g)
        >>> acc = MinibatchCKA()
        >>> for i in range(0, 400, 100):
        ...     _ = acc.update(x[i:i + 100], 2 * x[i:i + 100] + 1)
        >>> round(float(acc.compute()), 6)
        1.0
    """

    def __init__(self) -> None:
        self._sums: Optional[torch.Tensor] = None  # (hsic_xy, hsic_xx, hsic_yy) summed over batches
        self.batches = 0
        self.widths: Optional[Tuple[int, int]] = None  # (d_x, d_y) of the first minibatch: every one must have them

    def update(self, x: torch.Tensor, y: torch.Tensor) -> "MinibatchCKA":
        """Add one minibatch of paired rows ``x`` ``(b, d_x)``, ``y`` ``(b, d_y)``, ``b >= 4``."""
        x, y = _prep(x, y)
        b = x.shape[0]
        if b < 4:
            raise ValueError(f"Expected minibatches of at least 4 rows (the unbiased HSIC needs them), but got {b}.")
        self._check_widths((int(x.shape[1]), int(y.shape[1])))
        check_finite(x, "x")
        check_finite(y, "y")
        # the unbiased HSIC is invariant to constant shifts of the features; centering first keeps
        # the Gram matrices' rounding small
        xc = x.to(_F64) - x.to(_F64).mean(0)
        yc = y.to(_F64) - y.to(_F64).mean(0)
        k, l = xc @ xc.T, yc @ yc.T
        k.fill_diagonal_(0.0)
        l.fill_diagonal_(0.0)
        h = torch.stack([_hsic1(k, l), _hsic1(k, k), _hsic1(l, l)])
        self._sums = h if self._sums is None else self._sums + h.to(self._sums.device)
        self.batches += 1
        return self

    def _check_widths(self, widths: Tuple[int, int]) -> None:
        """Every minibatch holds rows of the same two representations: the same widths."""
        if self.widths is None:
            self.widths = widths
        elif widths != self.widths:
            raise ValueError(
                f"Expected every minibatch to have the widths of the first, (d_x, d_y) = {self.widths} (rows of the same two "
                f"representations), but got {widths}. Use one MinibatchCKA per pair of layers."
            )

    def merge(self, other: "MinibatchCKA") -> "MinibatchCKA":
        """Add another accumulator's batches (in place); returns ``self``."""
        if not isinstance(other, MinibatchCKA):
            raise TypeError(f"Expected a MinibatchCKA, but got {type(other).__name__}.")
        if other.widths is not None:
            self._check_widths(other.widths)
        if other._sums is not None:
            self._sums = other._sums.clone() if self._sums is None else self._sums + other._sums.to(self._sums.device)
            self.batches += other.batches
        return self

    def all_reduce(self) -> "MinibatchCKA":
        """Sum the batches of every rank (a collective under ``torch.distributed``; a no-op otherwise).
        Every rank must have seen at least one batch."""
        if not _dist.is_distributed():
            return self
        _dist.require_all(self._sums is not None, "Every rank must `update` the accumulator at least once before `all_reduce`.")
        assert self._sums is not None
        flat = _dist.all_reduce_sum(torch.cat([self._sums, self._sums.new_tensor([float(self.batches)])]))
        self._sums, self.batches = flat[:3], int(flat[3])
        return self

    def compute(self) -> torch.Tensor:
        """The minibatch CKA of every batch seen (0-d float64)."""
        if self._sums is None:
            raise ValueError("The accumulator is empty (no batches): call `update(x, y)` with minibatches of >= 4 rows first.")
        xy, xx, yy = self._sums
        if not bool(xx > 0) or not bool(yy > 0):
            raise ValueError("Minibatch CKA is undefined here: a representation has no estimable variance in its minibatches.")
        return xy / (xx.sqrt() * yy.sqrt())

    def state_dict(self) -> Dict[str, Any]:
        return {"sums": None if self._sums is None else self._sums.clone(), "batches": self.batches}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        sums = state.get("sums")
        self._sums = None if sums is None else sums.to(_F64).clone()
        self.batches = int(state.get("batches", 0))


def _hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC (Song et al. 2012) of Gram matrices with zero diagonals, ``(b, b)``."""
    b = k.shape[0]
    ones_k, ones_l = k.sum(0), l.sum(0)  # K 1, L 1 (symmetric)
    trace = (k * l).sum()
    return (trace + k.sum() * l.sum() / ((b - 1) * (b - 2)) - 2.0 / (b - 2) * (ones_k @ ones_l)) / (b * (b - 3))
