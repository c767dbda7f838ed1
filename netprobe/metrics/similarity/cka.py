"""Linear CKA (Kornblith et al. 2019), biased and debiased.

From ``d x d`` co-moments or from ``n x n`` Gram matrices, whichever costs less; on CPU the float64
products may go through numpy's BLAS (:data:`config.numpy_blas`), with the same values.
"""

from __future__ import annotations

import contextlib

import torch

from ._blas import _blas_threads
from ._config import config
from ._grams import _centred_gram, _flat_dot, _raw_candidate, _raw_gram, _raw_products, _row_sq_norms, _use_gram
from ._inputs import _need_rows, _prep
from ._moments import _Moments
from ._ratios import _cka_ratio, _debiased_ratio, _hsic_u


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
