"""Plain numpy references for the similarity metrics, written from the papers' formulas.

Deliberately a different numerical route from netprobe's (covariance + eigh): CCA by the
Björck-Golub method (QR of the centered data, SVD of Q_x^T Q_y), CKA with n x n Gram matrices.
Data layout: (n, d) rows = samples.
"""

import numpy as np


def _orth(a):
    """Orthonormal basis of the column space of centered `a` (full column rank assumed)."""
    q, _ = np.linalg.qr(a - a.mean(0))
    return q


def cca_ref(x, y):
    """Canonical correlations: singular values of Qx^T Qy (Björck & Golub 1973)."""
    qx, qy = _orth(x), _orth(y)
    return np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0, 1)


def svcca_ref(x, y, keep=0.99):
    def reduce(a):
        ac = a - a.mean(0)
        u, s, _ = np.linalg.svd(ac, full_matrices=False)
        if isinstance(keep, int):
            k = keep
        else:
            frac = np.cumsum(s**2) / np.sum(s**2)
            k = int(np.searchsorted(frac, keep - 1e-12) + 1)
        return u[:, :k] * s[:k]

    return float(np.mean(cca_ref(reduce(x), reduce(y))))


def leading_ref(a, r):
    """SVCCA's reduction with a rank cut: the top ``r`` principal-component scores of ``a``'s centered
    rows (numpy SVD), its constant units left out first."""
    a = a[:, a.std(0) > 0]
    c = a - a.mean(0)
    u, s, _ = np.linalg.svd(c, full_matrices=False)
    return u[:, :r] * s[:r]


def pwcca_ref(x, y):
    """Morcos et al. 2018: alpha_i = sum_j |<h_i, x_j>|, h_i canonical variates of the side with fewer units."""
    if x.shape[1] > y.shape[1]:
        x, y = y, x
    qx, qy = _orth(x), _orth(y)
    u, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
    h = qx @ u  # (n, r): whitened, centered, unit-norm canonical variates of x
    alpha = np.abs(h.T @ (x - x.mean(0))).sum(1)
    return float(np.sum(alpha * np.clip(rho, 0, 1)) / np.sum(alpha))


def pwcca_google_ref(x, y):
    """google/svcca's compute_pwcca recipe on centered inputs (re-derived; transposed layout inside)."""
    a1, a2 = (x - x.mean(0)).T, (y - y.mean(0)).T  # (d, n) as google expects
    if a1.shape[0] > a2.shape[0]:
        a1, a2 = a2, a1  # google intends the smaller side; its else-branch indexes acts1 (a bug)
    d1 = a1.shape[0]
    cov = np.cov(a1, a2)
    sxx, sxy, syy = cov[:d1, :d1], cov[:d1, d1:], cov[d1:, d1:]

    def inv_sqrt(s):
        w, v = np.linalg.eigh(np.linalg.pinv(s))
        return v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T

    u, s, _ = np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy))
    dirns = u.T @ a1
    p, _ = np.linalg.qr(dirns.T)
    w = np.abs(p.T @ a1.T).sum(1)
    w = w / w.sum()
    return float(np.sum(w * s[: len(w)]))


def _center_gram(k):
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return h @ k @ h


def cka_ref(x, y):
    """Kornblith et al. 2019: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), linear kernels, Gram form."""
    k, l_ = x @ x.T, y @ y.T
    kc, lc = _center_gram(k), _center_gram(l_)
    return float(np.sum(kc * lc) / np.sqrt(np.sum(kc * kc) * np.sum(lc * lc)))


def _hsic_unbiased(k, l_):
    """Song et al. 2012 unbiased HSIC estimator (Gram form, zero diagonals)."""
    n = k.shape[0]
    kt, lt = k.copy(), l_.copy()
    np.fill_diagonal(kt, 0)
    np.fill_diagonal(lt, 0)
    one = np.ones(n)
    return (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ kt @ lt @ one)
    ) / (n * (n - 3))


def cka_debiased_ref(x, y):
    k, l_ = x @ x.T, y @ y.T
    return float(_hsic_unbiased(k, l_) / np.sqrt(_hsic_unbiased(k, k) * _hsic_unbiased(l_, l_)))


# ----------------------------------------------------------------------------- RBF CKA, Procrustes
def gram_rbf_ref(x, threshold=1.0):
    """Kornblith et al. 2019's Gaussian kernel: squared distances from the dot products, bandwidth
    sigma^2 = threshold^2 * median of the whole n x n squared-distance matrix (zero diagonal included),
    K = exp(-d^2 / (2 sigma^2)). Re-derived from the paper's recipe; float64."""
    x = np.asarray(x, dtype=np.float64)
    g = x @ x.T
    sq = np.diag(g)
    d2 = sq[:, None] + sq[None, :] - 2 * g
    return np.exp(-d2 / (2 * threshold**2 * np.median(d2)))


def _u_centre(k):
    """Székely & Rizzo's U-centring (zero diagonal): <U(K), U(L)> / (n (n-3)) is the unbiased HSIC."""
    n = k.shape[0]
    k = k.copy()
    np.fill_diagonal(k, 0.0)
    means = k.sum(0) / (n - 2)
    k = k - means[:, None] - means[None, :] + k.sum() / ((n - 1) * (n - 2))
    np.fill_diagonal(k, 0.0)
    return k


def cka_kernel_ref(k, l_, debiased=False):
    """CKA of two kernel matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)); biased with H K H
    (Gretton et al. 2005), debiased with U-centring (a different route from Song's closed form)."""
    if debiased:
        kc, lc = _u_centre(k), _u_centre(l_)
    else:
        kc, lc = _center_gram(k), _center_gram(l_)
    return float(np.sum(kc * lc) / np.sqrt(np.sum(kc * kc) * np.sum(lc * lc)))


def rbf_cka_ref(x, y, threshold=1.0, debiased=False):
    return cka_kernel_ref(gram_rbf_ref(x, threshold), gram_rbf_ref(y, threshold), debiased)


def procrustes_ref(x, y):
    """Ding, Denain & Steinhardt 2021: centre, scale to unit Frobenius norm, solve the orthogonal
    Procrustes problem min_Q ||X - Y Q||_F explicitly (Q = U V^T from the SVD of Y^T X, zero-padding
    the narrower side), and return 1 - min / 2 (their distance is min = 2 - 2 ||X^T Y||_*)."""
    xc = x - x.mean(0)
    yc = y - y.mean(0)
    xc, yc = xc / np.linalg.norm(xc), yc / np.linalg.norm(yc)
    d = max(xc.shape[1], yc.shape[1])
    xp = np.pad(xc, ((0, 0), (0, d - xc.shape[1])))
    yp = np.pad(yc, ((0, 0), (0, d - yc.shape[1])))
    u, _, vt = np.linalg.svd(yp.T @ xp)
    dist = np.linalg.norm(xp - yp @ (u @ vt)) ** 2
    return 1.0 - dist / 2.0


def related_pair(n, dx, dy, seed, shared=3, noise=0.5):
    """Test data, not a reference: ``(x, y)`` numpy ``(n, dx)``, ``(n, dy)`` sharing ``shared`` latent
    directions (``y`` through a tanh) plus noise, with column offsets (``y`` near -2)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, shared))
    x = z @ rng.normal(size=(shared, dx)) + noise * rng.normal(size=(n, dx)) + rng.normal(size=dx)
    y = np.tanh(z @ rng.normal(size=(shared, dy))) + noise * rng.normal(size=(n, dy)) - 2.0
    return x, y
