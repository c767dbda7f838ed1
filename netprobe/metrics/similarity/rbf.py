"""CKA with Gaussian (RBF) kernels (Kornblith et al. 2019), biased and debiased.

The bandwidth is a multiple of the median pairwise distance; the kernels are ``n x n`` float64
matrices, so ``n`` is bounded (:data:`RBF_MAX_SAMPLES` by default).
"""

from __future__ import annotations

import torch

from netprobe._validation import check_int

from ._grams import _centred_gram, _flat_dot
from ._inputs import _need_rows, _prep
from ._ratios import _cka_ratio, _debiased_ratio, _hsic_zero_diag

#: :func:`rbf_cka` refuses more samples than this by default (peak memory ``24 n^2`` bytes: 2.4 GB)
RBF_MAX_SAMPLES = 10_000


def _check_threshold(threshold: float, name: str = "threshold") -> float:
    """``threshold`` as a float when it is a positive finite number (``rbf_cka``'s bandwidth as a
    multiple of the median distance), else ``ValueError`` naming ``name``."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (0.0 < float(threshold) < float("inf")):
        raise ValueError(
            f"Expected `{name}` to be a positive finite number (rbf_cka's bandwidth as a multiple of the median "
            f"distance; Kornblith et al. use 0.2 to 1.0), but got {threshold!r}."
        )
    return float(threshold)


def _check_max_samples_option(max_samples: int, name: str = "max_samples") -> int:
    """``max_samples`` when it is an int >= 4 (the largest ``n`` ``rbf_cka`` accepts), else ``ValueError``."""
    return check_int(max_samples, name, 4)


def _check_max_samples(n: int, max_samples: int) -> None:
    _check_max_samples_option(max_samples)
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
    return _debiased_ratio(_hsic_zero_diag(kx, ky, sx, sy), _hsic_zero_diag(kx, kx, sx, sx), _hsic_zero_diag(ky, ky, sy, sy),
                           "Debiased RBF CKA")
