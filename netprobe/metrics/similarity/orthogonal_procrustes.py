"""The orthogonal Procrustes similarity ``||X_c^T Y_c||_* / (||X_c||_F ||Y_c||_F)``.

From the cross-covariance and the covariances' traces, or, with fewer samples than units, from the
``n x n`` Gram matrices' square roots (the same singular values).
"""

from __future__ import annotations

import torch

from ._compute import _from_moments
from ._grams import _centred_gram, _gram_root, _use_gram
from ._inputs import _need_rows, _prep
from ._moments import _Moments
from ._ratios import _procrustes_ratio


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
