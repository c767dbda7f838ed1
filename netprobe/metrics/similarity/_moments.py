"""Streaming moments in float64: the count, the means and the centred co-moment matrices.

:class:`_Moments` holds them for a pair ``x`` ``(n, d_x)``, ``y`` ``(n, d_y)``, formed in one pass over
row blocks converted to float64 and shifted on the fly (no ``(n, d)`` float64 copy of the data),
corrected to the exact mean and checked finite; two of them merge exactly (Chan et al.).
:func:`_joint_comoments` forms the co-moment blocks of ``M`` representations in one such pass.
Every co-moment (the pair's, with torch's or numpy's products, and the ``M``-sided ones) comes from
the one loop :func:`_row_pass` and the one exact-mean correction in :func:`_comoments`; only the
block sizes, which the callers choose, differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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


def _pair_blocks(yy: bool) -> Tuple[Tuple[int, int], ...]:
    """The co-moment blocks of a pair ``(x, y)``: ``x``'s, ``y``'s (unless ``yy`` is false) and the cross one."""
    return ((0, 0), (1, 1), (0, 1)) if yy else ((0, 0), (0, 1))


def _row_pass(reps: Sequence[torch.Tensor], rows: int, piece: int, *, transposed: bool,
              add: Callable[[List[torch.Tensor]], None]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The one pass over row blocks that every co-moment of the package is formed in.

    Each representation ``(n, d_k)`` is shifted by the mean of its first ``rows`` rows; block by
    block its rows are converted to float64 and shifted into a reused buffer, ``(d_k, r)`` when
    ``transposed`` (written in pieces of ``piece`` rows, small enough for the cache) or ``(r, d_k)``
    otherwise, their column sums are added up, and ``add`` receives the blocks of every
    representation to accumulate its products from. Extra memory: one block per representation.

    Args:
        reps: tensors with the same ``n >= 1`` rows, on one device.
        rows: rows per block (``1 <= rows <= n``).
        piece: rows per transposed write (``transposed`` only).
        transposed: the layout of the blocks handed to ``add``.
        add: called once per block with the list of blocks, in the order of ``reps``.

    Returns:
        ``(shifts, sums)``: per representation the shift ``(d_k,)`` and the sum of its shifted rows.
    """
    n, dev = reps[0].shape[0], reps[0].device
    shifts = [r[:rows].sum(0, dtype=_F64) / rows for r in reps]
    sums = [torch.zeros(r.shape[1], dtype=_F64, device=dev) for r in reps]
    shapes = [(r.shape[1], rows) if transposed else (rows, r.shape[1]) for r in reps]
    bufs = [torch.empty(shape, dtype=_F64, device=dev) for shape in shapes]
    for start in range(0, n, rows):
        r = min(rows, n - start)
        blocks = []
        for rep, shift, total, buf in zip(reps, shifts, sums, bufs):
            if transposed:
                a = buf[:, :r]
                for j in range(0, r, piece):
                    torch.sub(rep[start + j : start + min(j + piece, r)].T, shift[:, None], out=a[:, j : j + piece])
                total += a.sum(1)
            else:
                a = buf[:r]
                torch.sub(rep[start : start + r], shift, out=a)
                total += a.sum(0)
            blocks.append(a)
        add(blocks)
    return shifts, sums


def _comoments(reps: Sequence[torch.Tensor], rows: int, piece: int, pairs: Sequence[Tuple[int, int]], *,
               numpy: bool = False) -> Tuple[List[torch.Tensor], Dict[Tuple[int, int], torch.Tensor]]:
    """``(means, C)``: the means of ``reps`` and the centred co-moment blocks ``C[i, j] = X_i,c^T
    X_j,c`` ``(d_i, d_j)`` float64 for ``(i, j)`` in ``pairs``, in one :func:`_row_pass`.

    The products of the shifted blocks are accumulated, then corrected to the exact means
    (``C -= n delta_i delta_j^T``, ``delta = mean - shift``). With torch's products the blocks are
    transposed, a diagonal block takes :func:`_gram_into` (its upper block triangle, mirrored at the
    end) and an off-diagonal one :func:`_cross_into`; ``numpy=True`` (CPU only) takes every product
    through numpy's BLAS from untransposed blocks (``syrk`` for ``i == j``), reusing one result
    buffer. Not checked finite: the callers word that error.
    """
    n, dims = reps[0].shape[0], [r.shape[1] for r in reps]
    if numpy:
        import numpy as np

        acc = {(i, j): np.zeros((dims[i], dims[j])) for i, j in pairs}
        tmp = np.empty(max(c.size for c in acc.values()))  # one product's result, reused

        def add(blocks: List[torch.Tensor]) -> None:
            arrays = [b.numpy() for b in blocks]
            for (i, j), c in acc.items():
                out = tmp[: c.size].reshape(c.shape)
                np.matmul(arrays[i].T, arrays[j], out=out)  # syrk when i == j
                c += out

        shifts, sums = _row_pass(reps, rows, piece, transposed=False, add=add)
        cs = {k: torch.from_numpy(c) for k, c in acc.items()}
    else:
        dev = reps[0].device
        cs = {(i, j): torch.zeros((dims[i], dims[j]), dtype=_F64, device=dev) for i, j in pairs}

        def add(blocks: List[torch.Tensor]) -> None:
            for (i, j), c in cs.items():
                if i == j:
                    _gram_into(blocks[i], c)
                else:
                    _cross_into(blocks[i], blocks[j], c)

        shifts, sums = _row_pass(reps, rows, piece, transposed=True, add=add)
        for (i, j), c in cs.items():
            if i == j:
                _mirror_blocks(c)
    deltas = [t / n for t in sums]
    for (i, j), c in cs.items():
        c.sub_(torch.outer(deltas[i], deltas[j]), alpha=n)
    return [s + e for s, e in zip(shifts, deltas)], cs


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
        n = x.shape[0]
        _need_rows(n)
        if blas and config.numpy_blas and x.device.type == "cpu":
            return _Moments._of_numpy(x, y, yy)
        rows, piece = _chunk_rows(x, y)
        means, cs = _comoments((x, y), min(rows, max(n, 1)), piece, _pair_blocks(yy))
        return _Moments._checked(x, y, means, cs)

    @staticmethod
    def _checked(x: torch.Tensor, y: torch.Tensor, means: list, cs: Dict[Tuple[int, int], torch.Tensor]) -> "_Moments":
        """The moments of the pair from :func:`_comoments`' means and blocks, checked finite."""
        m = _Moments(x.shape[0], means[0], means[1], cs[0, 0], cs.get((1, 1)), cs[0, 1])
        _check_moments_finite(m, x, y)
        return m

    @staticmethod
    def _of_numpy(x: torch.Tensor, y: torch.Tensor, yy: bool) -> "_Moments":
        """:meth:`of` with the products through numpy's BLAS (CPU, ``config.numpy_blas``; linear CKA):
        row blocks converted and shifted into reused ``(rows, d)`` float64 buffers (no transposed
        writes; 8 MiB a side, 16 MiB with several threads, at least 512 rows), then ``b^T b`` by ``syrk`` (numpy takes it for a
        matrix times its own transpose) and ``a^T b`` by ``gemm``, each added to the float64 sums.
        Extra memory: the ``d x d`` sums, one block a side and one product's (reused) result."""
        n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
        # 8 MiB a side with one thread, 16 MiB with more (larger blocks amortize waking the BLAS threads)
        rows = min(max(512, (2**20 if torch.get_num_threads() == 1 else 2**21) // max(dx, dy, 1)), n)
        means, cs = _comoments((x, y), rows, rows, _pair_blocks(yy), numpy=True)
        return _Moments._checked(x, y, means, cs)

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
    X_i,c^T X_j,c`` for ``i <= j`` (float64), in one :func:`_comoments` pass over row blocks sized
    for all ``M`` together (no float64 copy of the data; extra memory the blocks,
    ``sum_{i <= j} d_i d_j`` numbers, plus one row block of every representation)."""
    n, dev, m = reps[0].shape[0], reps[0].device, len(reps)
    dims = [r.shape[1] for r in reps]
    total, widest = max(sum(dims), 1), max(max(dims), 1)
    if dev.type == "cpu":
        rows, piece = max(512, 2**18 // total), max(128, 2**16 // widest)
    else:
        rows = piece = max(1, min(16384, 2**23 // total))
    rows = min(rows, n)
    means, cs = _comoments(reps, rows, piece, [(i, j) for i in range(m) for j in range(i, m)])
    for k in range(m):
        if not bool(torch.isfinite(cs[k, k].diagonal()).all() & torch.isfinite(means[k]).all()):
            check_finite(reps[k], f"reps[{(k if labels is None else labels[k])!r}]")
            raise ValueError("Expected finite inputs, but their sums overflowed float64; rescale the activations.")
    return n, means, cs
