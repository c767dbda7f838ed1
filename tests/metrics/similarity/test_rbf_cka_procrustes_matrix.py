"""RBF CKA, orthogonal Procrustes, similarity matrices, and CKA without float64 copies: against the
numpy references in tests/reference_similarity.py (Kornblith's RBF Gram and HSIC, Ding et al.'s
Procrustes, solved explicitly) and properties."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netprobe.metrics import (SimilarityAccumulator, SimilarityMatrix, cca, linear_cka, procrustes, pwcca, rbf_cka,
                              similarity_matrix, svcca)
from reference_similarity import cka_debiased_ref, cka_ref, procrustes_ref, rbf_cka_ref
from reference_similarity import related_pair as _pair

T = lambda a: torch.tensor(a)  # noqa: E731


def _orthogonal(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


# ----------------------------------------------------------------------------- references
@pytest.mark.parametrize("n,dx,dy,seed", [(50, 4, 7, 0), (121, 12, 3, 1), (200, 30, 30, 2), (40, 300, 500, 3)])
@pytest.mark.parametrize("threshold", [0.2, 0.5, 1.0])
def test_rbf_cka_against_kornblith_recipe(n, dx, dy, seed, threshold):
    x, y = _pair(n, dx, dy, seed)
    assert float(rbf_cka(T(x), T(y), threshold=threshold)) == pytest.approx(rbf_cka_ref(x, y, threshold), abs=1e-10)
    got = float(rbf_cka(T(x), T(y), threshold=threshold, debiased=True))
    assert got == pytest.approx(rbf_cka_ref(x, y, threshold, debiased=True), abs=1e-10)


def test_rbf_cka_debiased_can_fall_below_zero_and_is_near_zero_for_unrelated_data():
    rng = np.random.default_rng(3)
    vals = [float(rbf_cka(T(rng.normal(size=(60, 5))), T(rng.normal(size=(60, 5))), debiased=True)) for _ in range(20)]
    assert min(vals) < 0 < max(vals) and abs(np.mean(vals)) < 0.02
    assert np.all(np.isfinite(vals))


@pytest.mark.parametrize("n,dx,dy,seed", [(200, 5, 8, 0), (500, 12, 4, 1), (30, 40, 60, 2), (20, 300, 7, 3), (64, 64, 64, 4)])
def test_procrustes_against_the_explicit_procrustes_problem(n, dx, dy, seed):
    x, y = _pair(n, dx, dy, seed)
    ref = procrustes_ref(x, y)
    assert float(procrustes(T(x), T(y))) == pytest.approx(ref, abs=1e-10)
    assert float(procrustes(T(y), T(x))) == pytest.approx(ref, abs=1e-10)
    # Ding et al.'s distance
    assert float(2 - 2 * procrustes(T(x), T(y))) == pytest.approx(2 - 2 * ref, abs=1e-9)


@pytest.mark.parametrize("n,d", [(30, 200), (300, 20)])
def test_procrustes_gram_and_feature_routes_agree(n, d, monkeypatch):
    from netprobe.metrics.similarity import cka, orthogonal_procrustes

    x, y = _pair(n, d, d + 3, 5)
    a = float(procrustes(T(x), T(y)))
    for module in (cka, orthogonal_procrustes):  # each looks the rule up in its own namespace
        monkeypatch.setattr(module, "_use_gram", lambda n, dx, dy: not (n * (dx + dy) < dx * dx + dy * dy + 2 * dx * dy))
    assert float(procrustes(T(x), T(y))) == pytest.approx(a, abs=1e-11)
    assert float(linear_cka(T(x), T(y))) == pytest.approx(cka_ref(x, y), abs=1e-11)
    assert float(linear_cka(T(x), T(y), debiased=True)) == pytest.approx(cka_debiased_ref(x, y), abs=1e-11)


# ----------------------------------------------------------------------------- properties
seeds = st.integers(0, 10_000)


@settings(max_examples=20, deadline=None)
@given(seed=seeds, dx=st.integers(2, 8), dy=st.integers(1, 8), scale=st.floats(0.01, 100), shift=st.floats(-50, 50),
       threshold=st.sampled_from([0.3, 1.0, 2.0]))
def test_rbf_cka_invariances_and_bounds(seed, dx, dy, scale, shift, threshold):
    x, y = _pair(60, dx, dy, seed)
    q = _orthogonal(dx, seed)
    for debiased in (False, True):
        base = float(rbf_cka(T(x), T(y), threshold=threshold, debiased=debiased))
        moved = float(rbf_cka(T(scale * x @ q + shift), T(y), threshold=threshold, debiased=debiased))
        assert moved == pytest.approx(base, abs=1e-9)
        assert base <= 1.0 and (debiased or base >= 0.0)
        assert float(rbf_cka(T(x), T(x), threshold=threshold, debiased=debiased)) == pytest.approx(1.0, abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=seeds, dx=st.integers(1, 8), dy=st.integers(1, 8), scale=st.floats(0.01, 100), shift=st.floats(-50, 50),
       n=st.integers(3, 80))
def test_procrustes_invariances_and_bounds(seed, dx, dy, scale, shift, n):
    x, y = _pair(n, dx, dy, seed)
    q = _orthogonal(dx, seed)
    base = float(procrustes(T(x), T(y)))
    assert 0.0 <= base <= 1.0
    assert float(procrustes(T(scale * x @ q + shift), T(y))) == pytest.approx(base, abs=1e-9)
    assert float(procrustes(T(x), T(x @ q))) == pytest.approx(1.0, abs=1e-9)
    # not invariant to a general invertible map (unlike CCA): stretching one unit moves it
    if dx >= 2 and n > 2 * dx:
        stretch = np.ones(dx)
        stretch[0] = 30.0
        assert abs(float(procrustes(T(x * stretch), T(x))) - 1.0) > 1e-3


@settings(max_examples=15, deadline=None)
@given(seed=seeds, cuts=st.lists(st.integers(1, 299), max_size=6, unique=True))
def test_procrustes_streaming_equals_functional_for_any_split(seed, cuts):
    x, y = _pair(300, 7, 5, seed)
    acc = SimilarityAccumulator()
    edges = [0, *sorted(cuts), 300]
    for a, b in zip(edges[:-1], edges[1:]):
        acc.update(T(x[a:b]), T(y[a:b]))
    want = float(procrustes(T(x), T(y)))
    assert float(acc.procrustes()) == pytest.approx(want, abs=1e-12)
    values, errors = acc.compute(("procrustes", "cka", "pwcca"))
    assert errors == {} and float(values["procrustes"]) == pytest.approx(want, abs=1e-12)
    assert float(values["cka"]) == pytest.approx(float(linear_cka(T(x), T(y))), abs=1e-12)


def test_procrustes_through_y_stats_reuse_equals_no_reuse():
    x, y = _pair(400, 6, 6, 11)
    prev = SimilarityAccumulator().update(T(y), T(x))
    prev.compute(("procrustes",))
    nxt = SimilarityAccumulator().update(T(x + 0.1 * y), T(y), y_stats=prev.side("x"))
    plain = SimilarityAccumulator().update(T(x + 0.1 * y), T(y))
    assert float(nxt.procrustes()) == pytest.approx(float(plain.procrustes()), abs=1e-13)


# ----------------------------------------------------------------------------- similarity matrix
PAIRWISE = {
    "cka": linear_cka,
    "cka_debiased": lambda a, b: linear_cka(a, b, debiased=True),
    "rbf_cka": lambda a, b: rbf_cka(a, b, threshold=0.7),
    "procrustes": procrustes,
    "svcca": lambda a, b: svcca(a, b, keep=0.95),
    "pwcca": pwcca,
    "cca": lambda a, b: cca(a, b).mean(),
}


def _layers(n, widths, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    return {f"l{i}": T(np.tanh(z @ rng.normal(size=(4, w))) + 0.4 * rng.normal(size=(n, w)) + i) for i, w in enumerate(widths)}


@pytest.mark.parametrize("method", list(PAIRWISE))
@pytest.mark.parametrize("n,widths", [(400, (6, 9, 6, 4)), (30, (60, 45, 80))])
def test_matrix_equals_a_loop_over_pairs(method, n, widths):
    reps = _layers(n, widths, n)
    if n < sum(widths) and method in ("svcca", "pwcca", "cca"):
        with pytest.raises(ValueError, match=r"undefined for the pair \('l0', 'l1'\)"):
            similarity_matrix(reps, method=method, keep=0.95)
        return
    m = similarity_matrix(reps, method=method, keep=0.95, threshold=0.7)
    assert isinstance(m, SimilarityMatrix) and m.labels == tuple(reps) and m.method == method
    assert m.values.dtype == torch.float64 and m.values.shape == (len(widths),) * 2
    names = list(reps)
    loop = np.array([[1.0 if a == b else float(PAIRWISE[method](reps[a], reps[b])) for b in names] for a in names])
    np.testing.assert_allclose(m.values.numpy(), loop, atol=1e-10, rtol=0)
    np.testing.assert_array_equal(np.diag(m.values.numpy()), 1.0)
    if method != "pwcca":
        assert torch.equal(m.values, m.values.T)
    assert float(m["l0", "l1"]) == pytest.approx(loop[0, 1], abs=1e-10)


def test_matrix_routes_agree(monkeypatch):
    import netprobe.metrics.similarity as S

    reps = list(_layers(50, (20, 35, 12), 3).values())
    for method in ("cka", "cka_debiased", "procrustes"):
        gram = S._matrix_gram_pairs(reps, (0, 1, 2), method, 1.0)
        mom = S._matrix_moment_pairs(reps, (0, 1, 2), method, keep=0.99, rank_tol=S.RANK_TOL, pwcca_method="paper")
        for i, j in ((0, 1), (0, 2), (1, 2)):
            assert float(gram(i, j)) == pytest.approx(float(mom(i, j)), abs=1e-11), method


def test_pwcca_matrix_is_not_symmetric_and_rows_are_x():
    # well separated correlations (0.3 to 0.95): nearly tied ones would make PWCCA's weights, hence
    # both orders, depend on rounding (see `pwcca`)
    rng = np.random.default_rng(7)
    z = rng.normal(size=(2000, 6))
    a = z @ rng.normal(size=(6, 6))
    b = (z + rng.normal(size=(2000, 6)) * np.array([0.3, 0.6, 1.0, 1.6, 2.5, 3.0])) @ rng.normal(size=(6, 6))
    m = similarity_matrix([T(a), T(b)], method="pwcca")
    assert abs(float(m.values[0, 1] - m.values[1, 0])) > 1e-3  # equal widths: each row's own weights
    assert float(m.values[0, 1]) == pytest.approx(float(pwcca(T(a), T(b))), abs=1e-10)
    assert float(m.values[1, 0]) == pytest.approx(float(pwcca(T(b), T(a))), abs=1e-10)


def test_matrix_inputs_and_errors():
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    m = similarity_matrix([x], method="svcca")
    assert m.values.tolist() == [[1.0]] and m.labels == (0,)
    assert similarity_matrix((x, 2 * x), method="cka").labels == (0, 1)
    with pytest.raises(TypeError, match="list or dict"):
        similarity_matrix(x)
    with pytest.raises(ValueError, match="at least one"):
        similarity_matrix({})
    with pytest.raises(ValueError, match="same number of samples"):
        similarity_matrix({"a": x, "b": x[:10]})
    with pytest.raises(ValueError, match=r"Expected `method` to be one of"):
        similarity_matrix([x, x], method="cosine")
    with pytest.raises(ValueError, match="2-D"):
        similarity_matrix({"a": x, "conv": x[:, :, None]})
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        similarity_matrix([x, bad], method="cka")
    with pytest.raises(ValueError, match=r"undefined for the pair \('a', 'dead'\).*constant"):
        similarity_matrix({"a": x, "dead": torch.ones(50, 3)}, method="cka")
    with pytest.raises(ValueError, match="median pairwise distance is 0"):
        similarity_matrix({"a": x, "dead": torch.ones(50, 3)}, method="rbf_cka")
    with pytest.raises(ValueError, match="max_samples"):
        similarity_matrix([x, x], method="rbf_cka", max_samples=20)
    with pytest.raises(KeyError, match="label among"):
        similarity_matrix({"a": x, "b": x})["a", "c"]


# ----------------------------------------------------------------------------- errors
def test_rbf_and_procrustes_errors():
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="max_samples"):
        rbf_cka(x, x, max_samples=39)
    with pytest.raises(ValueError, match="max_samples"):
        rbf_cka(x, x, max_samples=2.5)
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="threshold"):
            rbf_cka(x, x, threshold=bad)
    with pytest.raises(ValueError, match="at least 4 samples"):
        rbf_cka(x[:3], x[:3], debiased=True)
    dup = torch.cat([x[:1].repeat(30, 1), x[:10]])  # more than half the distances 0
    with pytest.raises(ValueError, match="median pairwise distance is 0"):
        rbf_cka(dup, x)
    with pytest.raises(ValueError, match="constant"):
        procrustes(x, torch.full((40, 2), 3.0))
    with pytest.raises(ValueError, match="at least 2 samples"):
        procrustes(x[:1], x[:1])
    with pytest.raises(ValueError, match="n=0"):
        procrustes(x[:0], x[:0])
    bad = x.clone()
    bad[0, 0] = float("inf")
    for fn in (rbf_cka, procrustes):
        with pytest.raises(ValueError, match="1 Inf"):
            fn(x, bad)
    with pytest.raises(TypeError, match="positional"):
        rbf_cka(x, x, 0.5)  # options are keyword-only


def test_low_precision_inputs_give_float64():
    x, y = _pair(100, 5, 6, 2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xl, yl = T(x).to(dtype), T(y).to(dtype)
        xd, yd = xl.double().numpy(), yl.double().numpy()
        assert rbf_cka(xl, yl).dtype == torch.float64 and procrustes(xl, yl).dtype == torch.float64
        assert float(rbf_cka(xl, yl)) == pytest.approx(rbf_cka_ref(xd, yd), abs=1e-10)
        assert float(procrustes(xl, yl)) == pytest.approx(procrustes_ref(xd, yd), abs=1e-10)


# ----------------------------------------------------------------------------- memory
@pytest.mark.parametrize("n,d", [(100_000, 48), (200, 6000)])
def test_cka_and_procrustes_never_allocate_a_float64_copy_of_the_inputs(n, d):
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)  # float32
    calls = [lambda: linear_cka(x, y), lambda: linear_cka(x, y, debiased=True), lambda: procrustes(x, y)]
    for call in calls:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
        largest = max(e.cpu_memory_usage for e in prof.events())
        assert 0 < largest < x.numel() * 8 // 4  # a float64 copy of x would be numel * 8 bytes


# ----------------------------------------------------------------------------- linear CKA's raw float64 route
# A float64 CPU input whose means are small next to its spread is used as it is (numpy's syrk/gemm on
# the raw data, centred afterwards); larger offsets, other dtypes and other layouts are centred first.
def _centred_refs(x, y):
    # CKA is translation invariant: centring first (float64, numpy) keeps the references themselves
    # free of the cancellation that large offsets cause in x @ x.T
    xc, yc = x - x.mean(0), y - y.mean(0)
    return cka_ref(xc, yc), cka_debiased_ref(xc, yc)


def _spy_routes(monkeypatch):
    import netprobe.metrics.similarity as S
    from netprobe.metrics.similarity import cka

    used = []
    for name in ("_raw_products", "_raw_gram", "_centred_gram"):  # as linear_cka looks them up
        real = getattr(cka, name)
        monkeypatch.setattr(cka, name, lambda *a, _r=real, _n=name, **k: (used.append((_n, _r(*a, **k) is not None)), _r(*a, **k))[1])
    monkeypatch.setattr(S._Moments, "of", staticmethod(lambda *a, _r=S._Moments.of, **k: (used.append(("moments", True)), _r(*a, **k))[1]))
    return used


@pytest.mark.parametrize("n,dx,dy", [(300, 20, 30), (40, 150, 90)])
@pytest.mark.parametrize("offset,route", [(0.0, "raw"), (0.05, "raw"), (1e4, "centred")])
def test_linear_cka_raw_and_centred_routes_against_references(n, dx, dy, offset, route, monkeypatch):
    import netprobe.metrics.similarity as S

    monkeypatch.setattr(S.config, "numpy_blas", True)  # the numpy BLAS route (the CPU default; NETPROBE_NUMPY_BLAS=0 turns it off)
    x, y = _pair(n, dx, dy, 7)
    x, y = x + offset, y + 2.0 - offset  # _pair puts y near -2
    ref, ref_d = _centred_refs(x, y)
    used = _spy_routes(monkeypatch)
    assert float(linear_cka(T(x), T(y))) == pytest.approx(ref, rel=1e-12, abs=1e-13)
    assert float(linear_cka(T(x), T(y), debiased=True)) == pytest.approx(ref_d, rel=1e-12, abs=1e-13)
    took_raw = any(name.startswith("_raw") and ok for name, ok in used)
    assert took_raw == (route == "raw"), used


def test_linear_cka_raw_route_refused_after_the_fact_when_later_rows_carry_a_large_mean(monkeypatch):
    # the first rows look centred (the guess from them says "try raw"), 95% of the rows sit far off:
    # the exact growth factor from the traces (~1 + 0.95/0.05 > 16) refuses the raw product, and the
    # centred route gives the value of the pre-centred data (raw route there; the references at
    # n=5000 would need 5000 x 5000 products)
    import netprobe.metrics.similarity as S
    from netprobe.metrics.similarity._grams import _raw_gram

    monkeypatch.setattr(S.config, "numpy_blas", True)
    x, y = _pair(5000, 6, 5, 3)
    x[256:] += 1e4
    y[256:] -= 3e3
    assert S._raw_candidate(T(x)) and S._raw_candidate(T(y))
    xc, yc = T(x - x.mean(0)), T(y - y.mean(0))
    ref, ref_d = float(linear_cka(xc, yc)), float(linear_cka(xc, yc, debiased=True))
    used = _spy_routes(monkeypatch)
    assert float(linear_cka(T(x), T(y))) == pytest.approx(ref, rel=1e-12, abs=1e-13)
    assert float(linear_cka(T(x), T(y), debiased=True)) == pytest.approx(ref_d, rel=1e-12, abs=1e-13)
    assert used == [("_raw_products", False), ("moments", True)] * 2, used
    # the Gram route's guard is the same test on the traces of X X^T before and after centring
    w = np.random.default_rng(0).normal(size=(400, 500))
    assert _raw_gram(T(w)) is not None
    w[20:] += 1e3
    assert _raw_gram(T(w)) is None


@pytest.mark.parametrize("n,d", [(400, 12), (30, 100)])
def test_linear_cka_layouts_and_blas_switch_agree(n, d, monkeypatch):
    import netprobe.metrics.similarity as S

    monkeypatch.setattr(S.config, "numpy_blas", True)
    x, y = _pair(n, d, d + 2, 11)
    ref, ref_d = _centred_refs(x, y)
    tx, ty = T(x), T(y)
    fortran = (tx.T.contiguous().T, ty.T.contiguous().T)  # raw route through the transposed layout
    strided = (T(np.repeat(x, 2, axis=1))[:, ::2], T(np.repeat(y, 2, axis=1))[:, ::2])  # centred route
    for a, b in ((tx, ty), fortran, strided):
        assert float(linear_cka(a, b)) == pytest.approx(ref, rel=1e-12, abs=1e-13)
        assert float(linear_cka(a, b, debiased=True)) == pytest.approx(ref_d, rel=1e-12, abs=1e-13)
    monkeypatch.setattr(S.config, "numpy_blas", False)  # every product in torch
    assert float(linear_cka(tx, ty)) == pytest.approx(ref, rel=1e-12, abs=1e-13)
    assert float(linear_cka(tx, ty, debiased=True)) == pytest.approx(ref_d, rel=1e-12, abs=1e-13)


def test_linear_cka_raw_route_errors_stay_worded():
    x, y = _pair(100, 5, 6, 1)
    bad = T(x)
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        linear_cka(bad, T(y))
    with pytest.raises(ValueError, match="constant"):
        linear_cka(torch.ones(100, 5, dtype=torch.float64), T(y))
    with pytest.raises(ValueError, match="constant"):
        linear_cka(torch.full((10, 50), 3.0, dtype=torch.float64), T(_pair(10, 5, 60, 1)[1]))


@pytest.mark.parametrize("n,d", [(20_000, 40), (150, 3000)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_cka_numpy_scratch_stays_far_below_a_copy(n, d, dtype, monkeypatch):
    # numpy's allocations (invisible to torch's profiler) are traced by tracemalloc
    import tracemalloc

    import netprobe.metrics.similarity as S

    monkeypatch.setattr(S.config, "numpy_blas", True)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)
    for debiased in (False, True):
        tracemalloc.start()
        linear_cka(x, y, debiased=debiased)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < n * d * 8 // 4  # a float64 copy of x would be n d 8 bytes


def test_numpy_blas_is_the_cpu_default_and_can_be_switched_off():
    import subprocess
    import sys

    code = "import netprobe.metrics.similarity as S; print(S.config.numpy_blas)"
    env = {k: v for k, v in __import__("os").environ.items() if k != "NETPROBE_NUMPY_BLAS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr
    for off in ("0", "off", "False"):
        out = subprocess.run([sys.executable, "-c", code], env={**env, "NETPROBE_NUMPY_BLAS": off}, capture_output=True,
                             text=True, timeout=120)
        assert out.stdout.strip() == "False", (off, out.stderr)


@pytest.mark.parametrize("torch_threads", [1, 2])
@pytest.mark.parametrize("n,d", [(300, 20), (40, 150)])  # moments and Gram routes
def test_numpy_blas_threads_follow_torch_during_linear_cka(torch_threads, n, d, monkeypatch):
    # numpy's BLAS is set to another thread count outside; inside linear_cka's products it runs
    # torch.get_num_threads() threads, and the outside setting is back afterwards
    from threadpoolctl import threadpool_info, threadpool_limits

    import netprobe.metrics.similarity as S
    from netprobe.metrics.similarity import _blas, cka

    monkeypatch.setattr(S.config, "numpy_blas", True)
    seen = []

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and i["internal_api"] != "mkl"}

    # every route of numpy products, patched where it is looked up
    for module, name in ((cka, "_raw_products"), (cka, "_raw_gram"), (_blas, "_np_gram_into")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name, **k: (seen.append((_n, blas_threads())), _r(*a, **k))[1])
    real_of = S._Moments._of_numpy
    monkeypatch.setattr(S._Moments, "_of_numpy", staticmethod(
        lambda *a, **k: (seen.append(("_of_numpy", blas_threads())), real_of(*a, **k))[1]))
    outside = 3 - torch_threads
    x, y = (T(a) for a in _pair(n, d, d + 1, 5))
    strided = T(np.repeat(x.numpy(), 2, axis=1))[:, ::2]  # the centred (blockwise) route
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        with threadpool_limits(limits=outside, user_api="blas"):
            linear_cka(x, y)
            linear_cka(strided, y, debiased=True)
            after = blas_threads()
    finally:
        torch.set_num_threads(before)
    names = {name for name, _ in seen}
    assert ("_raw_products" in names or "_raw_gram" in names) and names & {"_np_gram_into", "_of_numpy"}, names
    assert after == {outside}
    assert all(t == {torch_threads} for _, t in seen), seen
