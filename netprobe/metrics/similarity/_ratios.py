"""Metric values from their sufficient statistics.

Linear CKA from squared Frobenius norms, the unbiased HSIC (Song et al. 2012) and the debiased
CKA ratio, the Procrustes similarity from a nuclear norm and two traces. The unbiased HSIC has one
implementation, :func:`_hsic_unbiased`, which linear and RBF CKA, the similarity matrix and
:class:`~netprobe.metrics.similarity.MinibatchCKA` all reach through the two forms of its terms
below. Each ratio refuses with a ``ValueError`` where its denominator vanishes (a representation
without variance).
"""

from __future__ import annotations

import torch

from ._grams import _flat_dot


def _cka_ratio(xy2: torch.Tensor, xx2: torch.Tensor, yy2: torch.Tensor) -> torch.Tensor:
    """CKA from squared Frobenius norms ``||X^T Y||^2``, ``||X^T X||^2``, ``||Y^T Y||^2`` (of either form)."""
    den = xx2.sqrt() * yy2.sqrt()
    if not bool(den > 0):
        raise ValueError("Linear CKA is undefined: a representation is constant over the samples.")
    return (xy2 / den).clamp(0.0, 1.0)


def _hsic_unbiased(kl: torch.Tensor, k1: torch.Tensor, l1: torch.Tensor, n: int) -> torch.Tensor:
    """The unbiased HSIC estimator (Song et al. 2012) times ``n (n-3)``, from its terms.

    For kernels ``K~``, ``L~`` ``(n, n)`` with zero diagonals: ``tr(K~ L~) + (1^T K~ 1)(1^T L~ 1) /
    ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1``. Every unbiased HSIC of the package is this function.

    Args:
        kl: ``tr(K~ L~)``, i.e. ``<K~, L~>_F`` (0-d).
        k1: the row sums ``K~ 1`` ``(n,)``.
        l1: the row sums ``L~ 1`` ``(n,)``.
        n: the number of samples (``n >= 4``).

    Returns:
        0-d tensor: ``n (n-3)`` times the estimate.
    """
    return kl + k1.sum() * l1.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (k1 @ l1)


def _hsic_u(xy: torch.Tensor, rx: torch.Tensor, ry: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`_hsic_unbiased` of two linear kernels of centred data, from ``<K, L>_F = ||X_c^T
    Y_c||_F^2`` and the kernels' diagonals (squared row norms of the centred data, ``rx``, ``ry``).
    With ``K 1 = 0`` and ``K~ = K - diag(rx)``: ``tr(K~ L~) = <K, L> - rx.ry`` and ``K~ 1 = -rx``."""
    return _hsic_unbiased(xy - rx @ ry, -rx, -ry, n)


def _hsic_zero_diag(k: torch.Tensor, l: torch.Tensor, k1: torch.Tensor, l1: torch.Tensor) -> torch.Tensor:
    """:func:`_hsic_unbiased` of kernels ``k``, ``l`` ``(n, n)`` with zero diagonals, given their row
    sums ``k1 = K 1``, ``l1 = L 1``; no ``n x n`` temporary."""
    return _hsic_unbiased(_flat_dot(k, l), k1, l1, k.shape[0])


def _debiased_ratio(hxy: torch.Tensor, hxx: torch.Tensor, hyy: torch.Tensor, what: str = "Debiased linear CKA") -> torch.Tensor:
    if not bool(hxx > 0) or not bool(hyy > 0):
        raise ValueError(f"{what} is undefined here: a representation has no estimable variance.")
    # No clip at 0: an unbiased estimate clipped is biased (it can fall slightly below 0). The
    # unbiased HSIC is the inner product <K~, L~> / (n (n-3)) of the U-centered Gram matrices
    # (Szekely & Rizzo 2014), so |hxy| <= sqrt(hxx hyy) exactly: clamping at 1 only removes rounding.
    return (hxy / (hxx.sqrt() * hyy.sqrt())).clamp_max(1.0)


def _procrustes_ratio(nuclear: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """``||X_c^T Y_c||_* / (||X_c||_F ||Y_c||_F)`` from the nuclear norm and the squared Frobenius norms."""
    den = tx.sqrt() * ty.sqrt()
    if not bool(den > 0):
        raise ValueError("The Procrustes similarity is undefined: a representation is constant over the samples.")
    return (nuclear / den).clamp(0.0, 1.0)
