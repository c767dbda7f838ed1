"""Settings shared by the similarity metrics: the tolerances and the run-time switches.

:data:`config` is the one place a switch lives. Every function reads its attributes when it runs
(none is copied into another module at import), so setting one, ``config.numpy_blas = False`` or a
test's ``monkeypatch.setattr(config, "numpy_blas", ...)``, takes effect in every module at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


#: Units whose variance is below this fraction of the largest variance (same side) are dropped.
VAR_TOL = 1e-10
#: Whitening keeps eigen-directions whose eigenvalue exceeds this fraction of the largest.
RANK_TOL = 1e-10

_F64 = torch.float64


@dataclass
class _Config:
    """Run-time switches of the similarity metrics: one instance, :data:`config`, read by every
    function when it runs (never copied into a module at import), so setting an attribute
    (``config.numpy_blas = False``) takes effect everywhere at once.

    Attributes:
        numpy_blas: on CPU, take linear CKA's float64 products through numpy's BLAS
            (``numpy.matmul``, which computes a block times its own transpose by ``syrk``, half the
            work of a general product; torch has no ``syrk``). The values are float64 products
            either way, with the same rounding model; only linear CKA takes this route, every other
            metric keeps torch's products.
            During the products numpy's BLAS runs ``torch.get_num_threads()`` threads (through
            threadpoolctl), so ``torch.set_num_threads`` governs them as it governs torch's own.
            Initialised from ``NETPROBE_NUMPY_BLAS`` at import (``0``, ``false``, ``off`` or ``no``
            turn it off); set to ``False`` when threadpoolctl is missing. Timings of both routes:
            ``docs/benchmarks.md``.
    """

    numpy_blas: bool


#: the switches every similarity function reads when it runs
config = _Config(numpy_blas=os.environ.get("NETPROBE_NUMPY_BLAS", "1").strip().lower() not in ("0", "false", "off", "no"))
