"""CCA and PWCCA: netprobe vs a plain numpy implementation of the google/svcca recipe, side by side.

The reference is written here from the recipe (not copied): covariance with np.cov, inverse square
roots by eigendecomposition of the pseudo-inverse, SVD of the whitened cross-covariance, then
PWCCA's weights from the QR of the (unwhitened) projected activations. float64, CPU, ONE thread
(both sides: torch.set_num_threads(1) and OMP_NUM_THREADS=1 for numpy's BLAS).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/similarity.py [--quick]

Target: netprobe >= 2x faster. Also checks both give the same CCA correlations.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _timing import best_of_alternating  # noqa: E402
from netprobe.metrics import cca, pwcca  # noqa: E402


def google_recipe(a1, a2, *, pw):
    """a1 (d1, n), a2 (d2, n) as google/svcca expects."""
    d1 = a1.shape[0]
    cov = np.cov(a1, a2)
    sxx, sxy, syy = cov[:d1, :d1], cov[:d1, d1:], cov[d1:, d1:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)

    def inv_sqrt(s):
        w, v = np.linalg.eigh(np.linalg.pinv(s))
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    u, s, _ = np.linalg.svd(inv_sqrt(sxx) @ sxy @ inv_sqrt(syy))
    if not pw:
        return s
    m1 = a1.mean(1, keepdims=True)
    dirns = u.T @ (a1 - m1) + m1
    p, _ = np.linalg.qr(dirns.T)
    w = np.abs(p.T @ a1.T).sum(1)
    w = w / w.sum()
    return float(np.sum(w * s))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--small", action="store_true", help="only the (10000, 512, 512) case")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sizes = [(2000, 128, 128)] if args.quick else [(10000, 512, 512)] if args.small else [(10000, 512, 512), (20000, 2048, 2048)]
    print(f"similarity benchmark: cpu, float64, torch {torch.__version__} threads = {torch.get_num_threads()}, "
          f"numpy {np.__version__} (OMP/OPENBLAS threads = {os.environ['OPENBLAS_NUM_THREADS']})")
    rng = np.random.default_rng(0)
    for n, d1, d2 in sizes:
        z = rng.normal(size=(n, 64))
        x = z @ rng.normal(size=(64, d1)) + rng.normal(size=(n, d1))
        y = np.tanh(z @ rng.normal(size=(64, d2))) + rng.normal(size=(n, d2))
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)
        xt, yt = np.ascontiguousarray(x.T), np.ascontiguousarray(y.T)
        reps = 1 if d1 >= 2048 else 5
        ours_cca = cca(tx, ty).numpy()
        ref_cca = google_recipe(xt, yt, pw=False)
        err = np.max(np.abs(np.sort(ours_cca)[::-1][:50] - np.sort(ref_cca)[::-1][:50]))
        t_ours, t_ref, _, _ = best_of_alternating(lambda: cca(tx, ty), lambda: google_recipe(xt, yt, pw=False), reps)
        print(f"n={n:>6} d=({d1},{d2})  cca   netprobe {t_ours:7.3f}s  google-recipe numpy {t_ref:7.3f}s  "
              f"speed-up {t_ref / t_ours:5.2f}x  (max |diff| of top-50 correlations {err:.1e})")
        t_ours, t_ref, _, _ = best_of_alternating(lambda: pwcca(tx, ty), lambda: google_recipe(xt, yt, pw=True), reps)
        print(f"n={n:>6} d=({d1},{d2})  pwcca netprobe {t_ours:7.3f}s  google-recipe numpy {t_ref:7.3f}s  "
              f"speed-up {t_ref / t_ours:5.2f}x  (target >= 2x)")


if __name__ == "__main__":
    main()
