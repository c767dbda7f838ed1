"""CCA and PWCCA: netprobe vs a plain numpy implementation of the google/svcca recipe, side by side.

The reference is written here from the recipe (not copied): covariance with np.cov, inverse square
roots by eigendecomposition of the pseudo-inverse, SVD of the whitened cross-covariance, then
PWCCA's weights from the QR of the (unwhitened) projected activations. float64, CPU, ONE thread
(both sides: torch.set_num_threads(1) and OMP_NUM_THREADS=1 for numpy's BLAS).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/similarity.py [--quick]

Target: netprobe >= 2x faster. Also checks both give the same CCA correlations.

    .venv/bin/python benchmarks/similarity.py --cka [--quick] [--reps 3] [--no-memory] [--threads N]

Linear CKA (biased and debiased) against peers' recipes written here from their formulas
(Kornblith et al.'s numpy code, anatome, torch-cka/ckatorch, pytorch-cka, cka-pytorch), at (10000,
512) and (2000, 8192), float64 and float32 input, time and extra peak memory side by side.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time

# --cka --threads N (default 1): both sides' BLAS threads, set before numpy and torch load
_THREADS = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv[:-1] else "1"
os.environ.setdefault("OMP_NUM_THREADS", _THREADS)
os.environ.setdefault("OPENBLAS_NUM_THREADS", _THREADS)
os.environ.setdefault("MKL_NUM_THREADS", _THREADS)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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


# ----------------------------------------------------------------------------- CKA vs peer recipes
# Each peer's recipe is written here from its formula (not copied), in the library and precision
# the peer computes in: float32 input stays float32 for the peers; netprobe accumulates in float64.
def _np(a):
    return a.numpy()


def kornblith_feature(x, y, debiased=False):
    """Kornblith et al.'s reference numpy code, feature space: centre (copies), ||X^T Y||_F^2 /
    (||X^T X||_F ||Y^T Y||_F); debiased with the row norms (Song's estimator, closed form)."""
    x, y = _np(x), _np(y)
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    xy, xx, yy = np.linalg.norm(x.T @ y) ** 2, np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    if not debiased:
        return xy / (xx * yy)
    n = x.shape[0]
    rx, ry = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)

    def h(c, a, b):
        return c - n / (n - 2) * a.dot(b) + a.sum() * b.sum() / ((n - 1) * (n - 2))

    return h(xy, rx, ry) / np.sqrt(h(xx**2, rx, rx) * h(yy**2, ry, ry))


def kornblith_gram(x, y, debiased=False):
    """Kornblith et al.'s reference numpy code, Gram form: K = X X^T (numpy takes syrk), centred by
    H K H through row/column means (U-centring when debiased), HSIC = <K~, L~>_F."""
    def gram(a):
        a = _np(a)
        return a @ a.T

    def centre(k):
        k = k.copy()
        n = k.shape[0]
        if debiased:
            np.fill_diagonal(k, 0)
            means = k.sum(0) / (n - 2)
            means -= means.sum() / (2 * (n - 1))
            k -= means[:, None]
            k -= means[None, :]
            np.fill_diagonal(k, 0)
        else:
            means = k.mean(0)
            means -= means.mean() / 2
            k -= means[:, None]
            k -= means[None, :]
        return k

    kx = centre(gram(x))
    ky = centre(gram(y))
    xy = kx.ravel().dot(ky.ravel())
    return xy / (np.linalg.norm(kx) * np.linalg.norm(ky))


def anatome(x, y):
    """anatome's linear CKA (torch): centre both (copies), ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)."""
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    return (y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm())


def ckatorch(x, y):
    """torch-cka / ckatorch (torch): minibatch CKA with the unbiased HSIC of Song et al. on linear
    Gram matrices with zeroed diagonals; here one minibatch of all n rows (then equal to debiased CKA)."""
    def hsic1(k, l):
        n = k.shape[0]
        return ((k * l).sum() + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (k.sum(0) @ l.sum(0))) / (n * (n - 3))

    k, l = x @ x.T, y @ y.T
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    return hsic1(k, l) / (hsic1(k, k) * hsic1(l, l)).sqrt()


def pytorch_cka(x, y):
    """pytorch-cka (torch): H = I - 11^T/n as a matrix, HSIC = sum(H K H * H L H) with K = X X^T."""
    n = x.shape[0]
    h = torch.eye(n, dtype=x.dtype) - 1.0 / n

    def hsic(k, l):
        return ((h @ k @ h) * (h @ l @ h)).sum()

    k, l = x @ x.T, y @ y.T
    return hsic(k, l) / (hsic(k, k) * hsic(l, l)).sqrt()


def cka_pytorch(x, y):
    """cka-pytorch (torch): Gram matrices centred through their means (no H matrix), biased HSIC."""
    def centred(a):
        k = a @ a.T
        m = k.mean(0)
        return k - m[:, None] - m[None, :] + m.mean()

    kx, ky = centred(x), centred(y)
    return (kx * ky).sum() / (kx.norm() * ky.norm())


def _candidates(n, d):
    from netprobe.metrics import linear_cka

    import netprobe.metrics.similarity as S

    def pure_torch(fn):  # NETPROBE_NUMPY_BLAS=0: every product in torch
        def run(x, y):
            prev, S.config.numpy_blas = S.config.numpy_blas, False
            try:
                return fn(x, y)
            finally:
                S.config.numpy_blas = prev
        return run

    wide = n < d
    c = {
        "netprobe linear_cka": ("biased", lambda x, y: linear_cka(x, y)),
        "netprobe linear_cka(debiased)": ("debiased", lambda x, y: linear_cka(x, y, debiased=True)),
        "netprobe linear_cka [NETPROBE_NUMPY_BLAS=0]": ("biased", pure_torch(lambda x, y: linear_cka(x, y))),
        "netprobe linear_cka(debiased) [NETPROBE_NUMPY_BLAS=0]": ("debiased", pure_torch(
            lambda x, y: linear_cka(x, y, debiased=True))),
    }
    if wide:
        c["kornblith numpy gram"] = ("biased", kornblith_gram)
        c["kornblith numpy gram(debiased)"] = ("debiased", lambda x, y: kornblith_gram(x, y, True))
        c["pytorch-cka (H K H)"] = ("biased", pytorch_cka)
        c["cka-pytorch (mean-centred gram)"] = ("biased", cka_pytorch)
        c["ckatorch (1 batch, unbiased HSIC)"] = ("debiased", ckatorch)
    else:
        c["kornblith numpy feature"] = ("biased", kornblith_feature)
        c["kornblith numpy feature(debiased)"] = ("debiased", lambda x, y: kornblith_feature(x, y, True))
        c["anatome (feature)"] = ("biased", anatome)
        c["cka-pytorch (mean-centred gram)"] = ("biased", cka_pytorch)
        c["ckatorch (1 batch, unbiased HSIC)"] = ("debiased", ckatorch)
    return c


#: recipes not run at a size, and why (they do strictly more work there than one that is run)
SKIPPED = {
    "wide": "anatome (feature space: n d^2 = 1.3e11 multiply-adds and three d x d = 512 MiB matrices at d=8192)",
    "tall": "pytorch-cka (two n x n products with the H matrix per centring: 4 n^3 = 4e12 multiply-adds at n=10000)",
}


def _data(n, d, dtype):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, 32, generator=g, dtype=dtype)
    x = z @ torch.randn(32, d, generator=g, dtype=dtype) + torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.tanh(z @ torch.randn(32, d, generator=g, dtype=dtype)) + torch.randn(n, d, generator=g, dtype=dtype)
    return x, y


def _float64_floor(n, d, reps):
    """The least time any exact-float64 recipe can take here: the multiply-adds its products need at
    the least (a Gram's upper triangle is half a product: ``syrk``), at the best float64 rate this
    machine showed, over numpy's ``syrk`` and ``gemm`` and torch's ``mm``, at the benchmark's shapes.

    Feature space (n >= 2d): ``n d^2 / 2`` per Gram and ``n d^2`` for the cross product; Gram space:
    ``n^2 d / 2`` per side (the cross term is the inner product of the two Grams, ``n^2``). The rate
    is measured, so the floor is a lower bound for this machine as far as its best kernel shows:
    on AVX2/FMA hardware float64 has half float32's lanes, so the float64 rate is at most half the
    float32 one and no recipe accumulating in float64 can reach float32 speed on the same products.
    """
    x64, y64 = _data(n, d, torch.float64)
    xn, yn = x64.numpy(), y64.numpy()
    macs = min(n * n * d, 2 * n * d * d)  # the cheaper of the two forms
    if n < d:
        kernels = {"numpy syrk": (lambda: xn @ xn.T, n * n * d / 2),
                   "torch mm": (lambda: torch.mm(x64, y64.T), n * n * d)}
    else:
        kernels = {"numpy syrk": (lambda: xn.T @ xn, n * d * d / 2), "numpy gemm": (lambda: xn.T @ yn, n * d * d),
                   "torch mm": (lambda: torch.mm(x64.T.contiguous(), y64), n * d * d)}
    # cache-sized blocks, the fastest shapes seen on this machine (torch's MKL and numpy's OpenBLAS)
    a, b = torch.randn(512, 256, dtype=torch.float64), torch.randn(512, 256, dtype=torch.float64)
    acc = torch.zeros(512, 512, dtype=torch.float64)
    an, bn = a.numpy(), b.numpy()
    kernels["torch addmm (512, 256) blocks"] = (lambda: [acc.addmm_(a, b.T) for _ in range(40)], 40 * 512 * 512 * 256)
    kernels["numpy (512, 256) blocks"] = (lambda: [an @ bn.T for _ in range(40)], 40 * 512 * 512 * 256)
    a32, b32, acc32 = a.float(), b.float(), acc.float()
    an32, bn32 = a32.numpy(), b32.numpy()
    single = {"torch addmm (512, 256) float32 blocks": (lambda: [acc32.addmm_(a32, b32.T) for _ in range(40)], 40 * 512 * 512 * 256),
              "numpy (512, 256) float32 blocks": (lambda: [an32 @ bn32.T for _ in range(40)], 40 * 512 * 512 * 256)}
    rate, rate32 = {}, {}
    for _ in range(max(2 * reps, 9)):  # the best of many: an under-measured rate would raise the floor
        for table, ks in ((rate, kernels), (rate32, single)):
            for k, (fn, m) in ks.items():
                t0 = time.perf_counter()
                fn()
                table[k] = max(table.get(k, 0.0), m / (time.perf_counter() - t0))
    best = max(rate, key=rate.get)
    return macs / rate[best], best, rate[best], max(rate32.values())


def _memory_child(n, d, dtype_name, name):
    """Run one candidate once in this (fresh) process; print its extra peak resident memory: the
    kernel's peak RSS (VmHWM, reset through /proc/self/clear_refs just before the call) minus the RSS
    then, with the inputs already allocated and a small call of the same candidate done (libraries,
    BLAS buffers loaded)."""
    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    _, fn = _candidates(n, d)[name]
    xs, ys = _data(64, 96 if n < d else 16, dtype)
    fn(xs, ys)
    x, y = _data(n, d, dtype)
    gc.collect()

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    fn(x, y)
    print(status("VmHWM") - before)


def _memory(n, d, dtype_name, name):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", str(n), str(d), dtype_name, name],
                         capture_output=True, text=True,
                         # large blocks from mmap, returned at free: RSS follows live memory (else memory
                         # freed while making the inputs is reused unseen, e.g. ~0 MiB for float32 peers)
                         env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
                                  MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0"))
    if out.returncode:
        raise RuntimeError(out.stderr)
    return int(out.stdout.strip().splitlines()[-1])


def cka_main(sizes, reps, dtypes, memory=True, threads=1):
    torch.set_num_threads(threads)
    print(f"CKA benchmark: cpu, {threads} thread(s) (torch.set_num_threads({threads}), OMP/OPENBLAS/MKL = "
          f"{os.environ.get('OMP_NUM_THREADS')}; memory children: 1 thread), torch {torch.__version__}, "
          f"numpy {np.__version__}; best of {reps} alternating runs; memory = peak RSS during the call minus RSS before "
          "(fresh subprocess per candidate, inputs allocated and a small warm-up call done, /proc/self/clear_refs); "
          "|err| = distance to the float64 value of the same inputs")
    for n, d in sizes:
        floor, kernel, rate, rate32 = _float64_floor(n, d, reps)
        macs = min(n * n * d, 2 * n * d * d)
        for dtype in dtypes:
            x, y = _data(n, d, dtype)
            cands = _candidates(n, d)
            times = {k: [] for k in cands}
            vals = {}
            for _ in range(reps):  # round-robin: every candidate once per round
                for name, (_, fn) in cands.items():
                    t0 = time.perf_counter()
                    vals[name] = float(fn(x, y))
                    times[name].append(time.perf_counter() - t0)
            best = {k: min(v) for k, v in times.items()}
            # the exact value of these (rounded) inputs: float64 arithmetic on their float64 image
            from netprobe.metrics import linear_cka
            exact = {"biased": float(linear_cka(x.double(), y.double())),
                     "debiased": float(linear_cka(x.double(), y.double(), debiased=True))}
            mem = {k: _memory(n, d, str(dtype).split(".")[1], k) for k in cands} if memory else {}
            print(f"\nn={n} d={d} {dtype} (inputs {2 * x.numel() * x.element_size() / 2**20:.1f} MiB); skipped: "
                  f"{SKIPPED['wide' if n < d else 'tall']}")
            for form in ("biased", "debiased"):
                names = [k for k, (f, _) in cands.items() if f == form]
                mine = [k for k in names if k.startswith("netprobe")]
                peers = [k for k in names if k not in mine]
                fastest = min(peers, key=best.get)
                leanest = min(peers, key=mem.get) if mem else None
                for k in names:
                    m = f"{mem[k] / 2**20:8.1f} MiB" if mem else ""
                    err = abs(vals[k] - exact[form])
                    print(f"  {form:<8} {k:<52} {best[k]:8.3f} s  {m}  value {vals[k]:.10f}  |err| {err:.1e}")
                target = 1.0 if dtype == torch.float64 else 1.5
                for ours in mine:  # the default (numpy's BLAS on CPU) and NETPROBE_NUMPY_BLAS=0 (pure torch)
                    ratio = best[ours] / best[fastest]
                    line = (f"  {form:<8} time {ours} / fastest peer ({fastest}) = {ratio:.2f} "
                            f"(target <= {target}: {'met' if ratio <= target else 'NOT met'})")
                    if mem:
                        m = mem[ours] / max(mem[leanest], 1)
                        line += f"; memory / leanest peer ({leanest}) = {m:.2f} (target <= 2: {'met' if m <= 2 else 'NOT met'})"
                    print(line)
                print(f"  {form:<8} exact-float64 floor (the least multiply-adds, {macs:.2e}, at the best float64 rate "
                      f"measured, {rate / 1e9:.1f} G multiply-adds/s by {kernel}): {floor:.3f} s = "
                      f"{floor / best[fastest]:.2f} x the fastest peer")
                if dtype != torch.float64:
                    print(f"  {form:<8} (float32 multiply-adds run {rate32 / rate:.2f}x the float64 rate here: "
                          f"{rate32 / 1e9:.1f} vs {rate / 1e9:.1f} G/s)")
                # the floor is empirical (the best rate measured): any exact-float64 recipe faster than it
                # shows the rate was under-measured, and then the floor is no bound
                exact64 = mine + (peers if dtype == torch.float64 else [])
                under = [k for k in exact64 if best[k] < floor]
                if under:
                    print(f"  {form:<8} NOTE: {', '.join(under)} took less than the floor: the measured rate is "
                          "too low here, the floor is no bound")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--small", action="store_true", help="only the (10000, 512, 512) case")
    ap.add_argument("--cka", action="store_true", help="the CKA comparison instead (sizes (10000, 512), (2000, 8192))")
    ap.add_argument("--reps", type=int, default=3, help="CKA: alternating rounds")
    ap.add_argument("--no-memory", action="store_true", help="CKA: skip the memory subprocesses")
    ap.add_argument("--threads", type=int, default=1, help="CKA: torch and BLAS threads on both sides (default 1)")
    ap.add_argument("--memory-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        n, d, dt, name = args.memory_child
        return _memory_child(int(n), int(d), dt, name)
    if args.cka:
        sizes = [(1000, 128), (300, 2048)] if args.quick else [(10000, 512), (2000, 8192)]
        return cka_main(sizes, args.reps, (torch.float64, torch.float32), memory=not args.no_memory, threads=args.threads)
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
