"""Streaming moments in float64: the count, the means and the centred co-moment matrices.

:class:`_Moments` holds them for a pair ``x`` ``(n, d_x)``, ``y`` ``(n, d_y)``, formed in one pass over
row blocks converted to float64 and shifted on the fly (no ``(n, d)`` float64 copy of the data),
corrected to the exact mean and checked finite; two of them merge exactly (Chan et al.).
:func:`_joint_comoments` forms the co-moment blocks of ``M`` representations in one such pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from netprobe._validation import check_finite

from ._blas import _cross_into, _gram_into, _mirror_blocks
from ._config import _F64, config
from ._inputs import _need_rows


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


def _cov(mom: _Moments) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = max(mom.n - 1, 1)
    return mom.cxx / d, mom.cyy / d, mom.cxy / d


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
