"""Blocked Gram products and the numpy BLAS route for them.

:func:`_gram_into` adds ``A A^T`` to ``out`` computing only the upper block triangle (about half the
work of a full product), and :func:`_mirror_blocks` fills the blocks below by symmetry. With
``blas=True``, on CPU float64 tensors and while :data:`config.numpy_blas` is set, the products go
through numpy's BLAS (``syrk`` for a block times its own transpose); every numpy product runs inside
:func:`_blas_threads`, which sets numpy's BLAS to ``torch.get_num_threads()`` threads and silences
numpy's floating-point warnings. Torch's products are used everywhere else.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch

from ._config import _F64, config


#: width below which a Gram block is one full product (and above which it is split in halves)
_GRAM_BASE = 64


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
