"""CCA, SVCCA and PWCCA of two representations of the same inputs (the functional forms).

Each takes ``x`` ``(n, d_x)`` and ``y`` ``(n, d_y)``, forms their moments in one pass and computes its
metric from them; :class:`~netprobe.metrics.similarity.SimilarityAccumulator` gives the same values
from streamed batches.
"""

from __future__ import annotations

from typing import Union

import torch

from ._compute import _from_moments
from ._config import RANK_TOL
from ._inputs import _check_keep, _check_method, _check_rank_tol, _prep
from ._moments import _Moments


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
    eigenproblem of the smaller Gram matrix of the whitened cross-covariance (cheaper than its
    SVD), the directions of correlations below 1/64 of the largest recomputed by an SVD
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
