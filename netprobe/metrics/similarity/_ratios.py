"""Metric values from their sufficient statistics.

Linear CKA from squared Frobenius norms, the unbiased HSIC (Song et al. 2012) and the debiased
CKA ratio, the Procrustes similarity from a nuclear norm and two traces. Each refuses with a
``ValueError`` where its denominator vanishes (a representation without variance).
"""

from __future__ import annotations

import torch


def _cka_ratio(xy2: torch.Tensor, xx2: torch.Tensor, yy2: torch.Tensor) -> torch.Tensor:
    """CKA from squared Frobenius norms ``||X^T Y||^2``, ``||X^T X||^2``, ``||Y^T Y||^2`` (of either form)."""
    den = xx2.sqrt() * yy2.sqrt()
    if not bool(den > 0):
        raise ValueError("Linear CKA is undefined: a representation is constant over the samples.")
    return (xy2 / den).clamp(0.0, 1.0)


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


def _procrustes_ratio(nuclear: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """``||X_c^T Y_c||_* / (||X_c||_F ||Y_c||_F)`` from the nuclear norm and the squared Frobenius norms."""
    den = tx.sqrt() * ty.sqrt()
    if not bool(den > 0):
        raise ValueError("The Procrustes similarity is undefined: a representation is constant over the samples.")
    return (nuclear / den).clamp(0.0, 1.0)
