"""Similarity metrics against numpy references (tests/reference_similarity.py) and properties."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netprobe.metrics import SimilarityAccumulator, cca, linear_cka, pwcca, svcca
from reference_similarity import cca_ref, cka_debiased_ref, cka_ref, pwcca_google_ref, pwcca_ref, svcca_ref
from reference_similarity import related_pair as _pair

T = lambda a: torch.tensor(a)  # noqa: E731


# ----------------------------------------------------------------------------- references
@pytest.mark.parametrize("n,dx,dy,seed", [(200, 5, 8, 0), (500, 12, 4, 1), (300, 10, 10, 2), (1000, 30, 25, 3)])
def test_against_numpy_references(n, dx, dy, seed):
    x, y = _pair(n, dx, dy, seed)
    np.testing.assert_allclose(cca(T(x), T(y)).numpy(), cca_ref(x, y), atol=1e-9)
    assert float(pwcca(T(x), T(y))) == pytest.approx(pwcca_ref(x, y), abs=1e-9)
    assert float(pwcca(T(x), T(y), method="google")) == pytest.approx(pwcca_google_ref(x, y), abs=1e-8)
    assert float(svcca(T(x), T(y), keep=0.99)) == pytest.approx(svcca_ref(x, y, 0.99), abs=1e-9)
    assert float(svcca(T(x), T(y), keep=3)) == pytest.approx(svcca_ref(x, y, 3), abs=1e-9)
    assert float(linear_cka(T(x), T(y))) == pytest.approx(cka_ref(x, y), abs=1e-10)
    assert float(linear_cka(T(x), T(y), debiased=True)) == pytest.approx(max(0.0, cka_debiased_ref(x, y)), abs=1e-10)


def test_google_mode_is_not_the_paper_formula_and_moves_with_constants_only_in_google_code():
    x, y = _pair(400, 6, 9, 5)
    paper, google = float(pwcca(T(x), T(y))), float(pwcca(T(x), T(y), method="google"))
    assert abs(paper - google) > 1e-4  # the two weightings differ on generic data
    # our google mode is on centered inputs, so a constant shift does not move it either
    assert float(pwcca(T(x + 5.0), T(y), method="google")) == pytest.approx(google, abs=1e-10)
    # and it is defined when the first argument has more units (the original raises IndexError)
    assert 0.0 <= float(pwcca(T(y), T(x), method="google")) <= 1.0


# ----------------------------------------------------------------------------- properties
arrays = st.integers(0, 10_000)


@settings(max_examples=25, deadline=None)
@given(seed=arrays, dx=st.integers(1, 8), dy=st.integers(1, 8))
def test_cca_invariant_to_invertible_maps(seed, dx, dy):
    x, y = _pair(150, dx, dy, seed)
    rng = np.random.default_rng(seed + 1)

    def invertible(d):  # a general invertible map with condition number <= 25: rotation x scaling x rotation
        q1, _ = np.linalg.qr(rng.normal(size=(d, d)))
        q2, _ = np.linalg.qr(rng.normal(size=(d, d)))
        return q1 @ np.diag(rng.uniform(0.2, 5.0, size=d)) @ q2

    # (maps so ill-conditioned that a covariance eigenvalue falls below RANK_TOL x the largest have
    # that direction treated as collinear, by design: see `cca`'s rank_tol)
    a, b = invertible(dx), invertible(dy)
    base = cca(T(x), T(y)).numpy()
    np.testing.assert_allclose(cca(T(x @ a), T(y @ b + 7)).numpy(), base, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(seed=arrays, dx=st.integers(2, 8), dy=st.integers(2, 8), scale=st.floats(0.01, 100))
def test_cka_invariant_to_orthogonal_maps_and_isotropic_scaling(seed, dx, dy, scale):
    x, y = _pair(80, dx, dy, seed)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dx, dx)))
    for debiased in (False, True):
        base = float(linear_cka(T(x), T(y), debiased=debiased))
        assert float(linear_cka(T(scale * x @ q), T(y), debiased=debiased)) == pytest.approx(base, abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(seed=arrays, dx=st.integers(1, 10), dy=st.integers(1, 10), n=st.integers(30, 200))
def test_bounds_self_similarity_permutation_and_constants(seed, dx, dy, n):
    x, y = _pair(n, dx, dy, seed)
    tx, ty = T(x), T(y)
    values = [pwcca(tx, ty), svcca(tx, ty), linear_cka(tx, ty), pwcca(tx, ty, method="google"), *cca(tx, ty)]
    assert all(0.0 <= float(v) <= 1.0 for v in values)
    assert float(pwcca(tx, tx)) == pytest.approx(1.0, abs=1e-9)
    assert float(linear_cka(tx, tx)) == pytest.approx(1.0, abs=1e-12)
    assert float(svcca(tx, tx)) == pytest.approx(1.0, abs=1e-9)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    assert float(pwcca(tx[perm], ty[perm])) == pytest.approx(float(pwcca(tx, ty)), abs=1e-9)
    assert float(linear_cka(tx[perm], ty[perm])) == pytest.approx(float(linear_cka(tx, ty)), abs=1e-12)
    shift = T(np.random.default_rng(seed).normal(size=dx) * 10)
    assert float(pwcca(tx + shift, ty - 3)) == pytest.approx(float(pwcca(tx, ty)), abs=1e-9)


def test_wide_layers_across_row_blocks_match_the_references():
    # widths above the recursive Gram's base block and n spanning several row blocks (partial last one)
    x, y = _pair(1300, 300, 150, 11, shared=20)
    np.testing.assert_allclose(cca(T(x), T(y)).numpy(), cca_ref(x, y), atol=1e-9)
    assert float(pwcca(T(x), T(y))) == pytest.approx(pwcca_ref(x, y), abs=1e-9)
    assert float(linear_cka(T(x), T(y))) == pytest.approx(cka_ref(x, y), abs=1e-10)
    acc = SimilarityAccumulator().update(T(x[:700]), T(y[:700])).update(T(x[700:]), T(y[700:]))
    assert float(acc.pwcca()) == pytest.approx(pwcca_ref(x, y), abs=1e-9)


def test_cholesky_whitening_is_used_only_when_it_equals_the_truncated_eigen_whitening():
    from netprobe.metrics.similarity import RANK_TOL, _cca_core, _cholesky_whitener, _Moments, _cov

    x, y = _pair(2000, 40, 30, 12)
    sxx, syy, sxy = _cov(_Moments.of(T(x), T(y)))
    assert _cholesky_whitener(sxx, RANK_TOL) is not None  # well conditioned: the fast route is taken
    fast = _cca_core(sxx, syy, sxy, 2000, rank_tol=RANK_TOL, what="CCA")
    eig = _cca_core(sxx, syy, sxy, 2000, rank_tol=RANK_TOL, what="CCA", eigvecs=True)
    np.testing.assert_allclose(fast.rho.numpy(), eig.rho.numpy(), atol=1e-12)
    w = fast.wx
    np.testing.assert_allclose((w.T @ sxx @ w).numpy(), np.eye(40), atol=1e-9)
    # a spectrum reaching down to the cutoff is left to eigh (which truncates it)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(20, 20)))
    spectrum = lambda low: T((q * np.geomspace(1.0, low, 20)) @ q.T)  # noqa: E731
    assert _cholesky_whitener(spectrum(1e-4), RANK_TOL) is not None
    for low in (1e-11, 1e-16):
        assert _cholesky_whitener(spectrum(low), RANK_TOL) is None


@settings(max_examples=40, deadline=None)
@given(seed=arrays, d=st.integers(1, 12), decades=st.floats(0, 14), rank_tol=st.sampled_from([1e-10, 1e-6, 1e-3]),
       scale=st.sampled_from([1.0, 1e-170, 1e-84, 1e80]))
def test_cholesky_whitener_never_skips_a_truncation(seed, d, decades, rank_tol, scale):
    from netprobe.metrics.similarity import _cholesky_whitener, _tol

    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = 10.0 ** -(rng.uniform(0, decades, size=d))
    cov = T((q * lam) @ q.T)
    cov = (cov + cov.T) / 2 * scale  # tiny scales: squared entries would underflow
    w = _cholesky_whitener(cov, rank_tol)
    evals = torch.linalg.eigvalsh(cov)
    if w is not None:  # only when eigh would keep every direction, with room to spare
        assert float(evals[0]) > _tol(rank_tol, cov) * float(evals[-1])
        np.testing.assert_allclose((w.T @ cov @ w).numpy(), np.eye(d), atol=1e-6)


@pytest.mark.parametrize("scale", [1e-84, 1e-30, 1e30, 1e80])  # covariances ~1e-168 .. 1e160
def test_cca_truncation_does_not_depend_on_the_scale_of_the_data(scale):
    rng = np.random.default_rng(14)
    z = rng.normal(size=(500, 3))
    x = np.stack([z[:, 0], z[:, 0] + 1e-6 * z[:, 1]], 1)  # nearly collinear: one direction is cut
    y = z[:, :1] + rng.normal(size=(500, 1))
    base = cca(T(x), T(y)).numpy()
    assert base.shape == (1,)
    np.testing.assert_allclose(cca(T(x * scale), T(y)).numpy(), base, rtol=1e-9)
    np.testing.assert_allclose(cca(T(x), T(y * scale)).numpy(), base, rtol=1e-9)


def test_cca_precision_as_documented_also_for_correlations_near_zero():
    # y's first columns are made exactly uncorrelated with x in the sample: true correlations 0
    rng = np.random.default_rng(13)
    x = rng.normal(size=(3000, 8))
    y = rng.normal(size=(3000, 6))
    xc = x - x.mean(0)
    y[:, :3] -= xc @ np.linalg.lstsq(xc, y[:, :3] - y[:, :3].mean(0), rcond=None)[0]
    y[:, 3:] += 0.3 * x[:, :3]
    got, ref = cca(T(x), T(y)).numpy(), cca_ref(x, y)
    big = ref > 1e-3
    assert big.sum() >= 3 and (~big).sum() >= 3
    np.testing.assert_allclose(got[big], ref[big], atol=1e-10)
    np.testing.assert_allclose(got[~big], ref[~big], atol=1e-7)


def test_moments_never_allocate_a_float64_copy_of_the_inputs():
    from torch.profiler import ProfilerActivity, profile

    from netprobe.metrics.similarity import _Moments

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(100_000, 64, generator=g), torch.randn(100_000, 32, generator=g)  # float32
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        m = _Moments.of(x, y)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest < x.numel() * 8 // 4  # a float64 copy of x would be 51 MB; blocks are <= 8 MB
    xd = x.double()
    torch.testing.assert_close(m.mx, xd.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(m.cxx, (xd - xd.mean(0)).T @ (xd - xd.mean(0)), rtol=1e-12, atol=1e-8)


def test_activations_that_require_grad_are_accepted():
    x, y = _pair(200, 4, 5, 15)
    xg, yg = T(x).requires_grad_(), T(y).requires_grad_()
    assert float(pwcca(xg, yg)) == pytest.approx(float(pwcca(T(x), T(y))), abs=1e-12)
    assert float(linear_cka(xg, yg)) == pytest.approx(float(linear_cka(T(x), T(y))), abs=1e-12)
    assert float(SimilarityAccumulator().update(xg, yg).cca()[0]) == pytest.approx(float(cca(T(x), T(y))[0]), abs=1e-12)


@pytest.mark.parametrize("offset", [0.0, 1e4, 1e8])
def test_moments_are_exact_when_the_first_rows_are_unrepresentative(offset):
    from netprobe.metrics.similarity import _Moments

    # sorted or drifting data: the first block (the shift) far from the overall mean
    rng = np.random.default_rng(16)
    x = rng.normal(size=(3000, 5)) + np.where(np.arange(3000) < 600, 0.0, offset)[:, None] + offset
    y = rng.normal(size=(3000, 3)) * 1e-3 + x[:, :3] * 1e-6
    m = _Moments.of(T(x), T(y))
    xc, yc = x - x.mean(0), y - y.mean(0)
    np.testing.assert_allclose(m.mx.numpy(), x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(m.cxx.numpy(), xc.T @ xc, rtol=1e-11, atol=1e-9 * np.abs(xc.T @ xc).max())
    np.testing.assert_allclose(m.cyy.numpy(), yc.T @ yc, rtol=1e-9, atol=1e-9 * np.abs(yc.T @ yc).max())
    np.testing.assert_allclose(m.cxy.numpy(), xc.T @ yc, rtol=1e-9, atol=1e-9 * np.abs(xc.T @ yc).max())


def test_collinear_and_constant_units_give_the_remaining_subspace():
    x, y = _pair(300, 4, 5, 7)
    base = cca(T(x), T(y)).numpy()
    x_dup = np.concatenate([x, x[:, :2] * 2 + 1, np.full((300, 1), 3.0)], axis=1)  # duplicates + a constant
    got = cca(T(x_dup), T(y)).numpy()
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, base, atol=1e-7)
    # duplicated units legitimately re-weight PWCCA (alpha sums over units); it stays finite and bounded
    assert 0.0 <= float(pwcca(T(x_dup), T(y))) <= 1.0
    x_const = np.concatenate([x, np.full((300, 2), -4.0)], axis=1)  # constant units carry no weight
    assert float(pwcca(T(x_const), T(y))) == pytest.approx(float(pwcca(T(x), T(y))), abs=1e-9)
    near = np.concatenate([x, x[:, :1] + 1e-9 * np.random.default_rng(0).normal(size=(300, 1))], axis=1)
    assert np.all(np.isfinite(cca(T(near), T(y)).numpy()))


def test_low_precision_inputs_are_computed_in_float64():
    x, y = _pair(300, 6, 6, 9)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        xl, yl = T(x).to(dtype), T(y).to(dtype)
        out = pwcca(xl, yl)
        assert out.dtype == torch.float64
        ref = pwcca_ref(xl.double().numpy(), yl.double().numpy())  # same rounded inputs, float64 math
        assert float(out) == pytest.approx(ref, abs=1e-9)
        assert cca(xl, yl).dtype == torch.float64 and linear_cka(xl, yl).dtype == torch.float64


# ----------------------------------------------------------------------------- streaming
@settings(max_examples=20, deadline=None)
@given(seed=arrays, cuts=st.lists(st.integers(1, 299), max_size=6, unique=True))
def test_streaming_equals_functional_for_any_split(seed, cuts):
    x, y = _pair(300, 7, 5, seed)
    tx, ty = T(x) * 1e3 + 1e4, T(y)  # large offsets: a naive running sum would cancel
    bounds = [0, *sorted(cuts), 300]
    acc = SimilarityAccumulator()
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc.update(tx[a:b], ty[a:b])
        parts.append(SimilarityAccumulator().update(tx[a:b], ty[a:b]))
    merged = parts[0]
    for p in reversed(parts[1:]):  # merge order does not matter
        merged.merge(p)
    for a in (acc, merged):
        assert a.n == 300
        np.testing.assert_allclose(a.cca().numpy(), cca(tx, ty).numpy(), atol=1e-9)
        assert float(a.pwcca()) == pytest.approx(float(pwcca(tx, ty)), abs=1e-9)
        assert float(a.pwcca(method="google")) == pytest.approx(float(pwcca(tx, ty, method="google")), abs=1e-8)
        assert float(a.svcca(keep=0.95)) == pytest.approx(float(svcca(tx, ty, keep=0.95)), abs=1e-9)
        assert float(a.linear_cka()) == pytest.approx(float(linear_cka(tx, ty)), abs=1e-10)


def test_accumulator_state_dict_roundtrip_and_errors():
    x, y = _pair(200, 4, 3, 1)
    acc = SimilarityAccumulator().update(T(x), T(y))
    other = SimilarityAccumulator()
    other.load_state_dict(acc.state_dict())
    assert float(other.pwcca()) == float(acc.pwcca())
    assert acc.all_reduce() is acc  # no-op without torch.distributed
    with pytest.raises(ValueError, match="empty"):
        SimilarityAccumulator().cca()
    with pytest.raises(ValueError, match="widths"):
        acc.update(T(x[:, :2]), T(y))
    with pytest.raises(ValueError, match="Debiased"):
        acc.linear_cka(debiased=True)
    with pytest.raises(TypeError, match="SimilarityAccumulator"):
        acc.merge(3)


# ----------------------------------------------------------------------------- errors
def test_input_errors():
    x, y = T(np.random.default_rng(0).normal(size=(50, 4))), T(np.random.default_rng(1).normal(size=(50, 3)))
    with pytest.raises(ValueError, match="2-D"):
        cca(x[:, 0], y)
    with pytest.raises(ValueError, match=r"same number of samples.*50 and 49"):
        pwcca(x, y[:49])
    bad = x.clone()
    bad[0, 0], bad[1, 1], bad[2, 2] = float("nan"), float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 NaN and 1 Inf"):
        svcca(bad, y)
    with pytest.raises(ValueError, match=r"n=50 samples for d_x=49 and d_y=3 .*at least 53 samples.*svcca"):
        cca(T(np.random.default_rng(2).normal(size=(50, 60))), y)
    with pytest.raises(ValueError, match="constant"):
        pwcca(torch.ones(50, 3), y)
    with pytest.raises(ValueError, match="method"):
        pwcca(x, y, method="svcca")
    with pytest.raises(ValueError, match="keep"):
        svcca(x, y, keep=1.5)
    with pytest.raises(TypeError, match="keep"):
        svcca(x, y, keep="all")
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x[:3], y[:3], debiased=True)
    with pytest.raises(TypeError, match="torch.Tensor"):
        cca(np.zeros((5, 2)), y)


def test_svcca_reduces_before_the_sample_check():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(60, 3))
    x = z @ rng.normal(size=(3, 100)) + 1e-3 * rng.normal(size=(60, 100))  # n < d, low intrinsic rank
    y = z @ rng.normal(size=(3, 80))
    assert float(svcca(T(x), T(y), keep=3)) == pytest.approx(1.0, abs=1e-3)
    assert float(linear_cka(T(x), T(y))) > 0.5  # CKA has no n > d requirement


def test_too_few_samples_for_both_sides_together_is_refused_not_a_spurious_one():
    # centered, n samples span n-1 dimensions: with d_x + d_y > n - 1 some correlations are 1
    # whatever the data (unrelated random x and y here)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(11, 10, generator=g, dtype=torch.float64), torch.randn(11, 10, generator=g, dtype=torch.float64)
    for fn in (cca, pwcca):
        with pytest.raises(ValueError, match=r"n=11 samples for d_x=10 and d_y=10.*at least 21"):
            fn(x, y)
    with pytest.raises(ValueError, match="SVCCA.*n=11"):
        svcca(x, y, keep=0.999999)
    # n - 1 == d_x + d_y is the smallest accepted size; the reference agrees there
    x, y = torch.randn(15, 7, generator=g, dtype=torch.float64), torch.randn(15, 7, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(np.sort(cca(x, y).numpy())[::-1], np.sort(cca_ref(x.numpy(), y.numpy()))[::-1][:7], atol=1e-8)
    with pytest.raises(ValueError, match="at least 15"):
        cca(x[:14], y[:14])


@pytest.mark.parametrize("n,dx,dy", [(20, 300, 500), (40, 30, 900), (200, 20, 30)])
def test_linear_cka_gram_and_feature_forms_both_match_the_reference(n, dx, dy):
    # n < d takes the n x n Gram form, n > d the d x d feature form; both equal the Gram reference
    rng = np.random.default_rng(n + dx)
    z = rng.normal(size=(n, 5))
    x = z @ rng.normal(size=(5, dx)) + rng.normal(size=(n, dx)) + 3.0
    y = np.tanh(z @ rng.normal(size=(5, dy))) + 0.5 * rng.normal(size=(n, dy))
    assert float(linear_cka(T(x), T(y))) == pytest.approx(cka_ref(x, y), abs=1e-9)
    assert float(linear_cka(T(x), T(y), debiased=True)) == pytest.approx(max(0.0, cka_debiased_ref(x, y)), abs=1e-9)
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        linear_cka(T(bad), T(y))


def test_rank_tol_zero_never_whitens_by_rounding_noise():
    g = torch.Generator().manual_seed(0)
    xr = torch.randn(300, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 20, generator=g, dtype=torch.float64)
    assert float(svcca(xr, xr, keep=20, rank_tol=0.0)) == pytest.approx(1.0, abs=1e-9)
    assert float(pwcca(xr, xr, rank_tol=0.0)) == pytest.approx(1.0, abs=1e-9)


# ----------------------------------------------------------------------------- Gram route vs SVD
# PWCCA's correlations and directions come from eigh of the smaller Gram matrix of the whitened
# cross-covariance M (SVCCA's correlations from its eigenvalues), not from an SVD of M. Compared here
# with numpy's SVD of the very matrices the functions use (same whitening).
def _same_whitening(x, y, *, eigvecs):
    """The kept-unit blocks and the whitening that `pwcca(x, y)` (``eigvecs=False``) or its google mode
    (``eigvecs=True``) uses, as numpy arrays."""
    from netprobe.metrics import similarity as sim

    sxx, syy, sxy = sim._cov(sim._Moments.of(T(x), T(y)))
    fx, fy = sim._Factors(sxx), sim._Factors(syy)
    r = sim._cca_factors(fx, fy, sxy, x.shape[0], rank_tol=sim.RANK_TOL, what="PWCCA", eigvecs=eigvecs)
    as_np = lambda t: None if t is None else t.numpy()  # noqa: E731
    return dict(wx=r.wx.numpy(), wy=r.wy.numpy(), vx=as_np(r.vx), vy=as_np(r.vy), sxx=r.sxx.numpy(), syy=r.syy.numpy(),
                sxy=sxy[fx.mask()][:, fy.mask()].numpy())


def _pwcca_by_numpy_svd(wx, wy, vx, vy, sxx, syy, sxy, google=False):
    u, rho, vt = np.linalg.svd(wx.T @ sxy @ wy, full_matrices=False)
    use_x = wx.shape[1] <= wy.shape[1]
    w, rot, s, v = (wx, u, sxx, vx) if use_x else (wy, vt.T, syy, vy)
    if google:  # weights on the QR basis of the unwhitened directions R = V rot (see pwcca's google mode)
        rr = v @ rot
        chol = np.linalg.cholesky(rr.T @ s @ rr)
        alpha = np.abs(np.linalg.solve(chol, rr.T @ s)).sum(1)
    else:
        alpha = np.abs(rot.T @ w.T @ s).sum(1)
    return float(np.sum(alpha * np.clip(rho, 0, 1)) / np.sum(alpha))


def _svcca_by_numpy_svd(x, y, keep):
    from netprobe.metrics import similarity as sim

    sxx, syy, sxy = sim._cov(sim._Moments.of(T(x), T(y)))
    fx, fy = sim._Factors(sxx), sim._Factors(syy)
    (px, lx), (py, ly) = fx.principal(keep, sim.RANK_TOL), fy.principal(keep, sim.RANK_TOL)
    wx, wy = (px * lx.rsqrt()).numpy(), (py * ly.rsqrt()).numpy()
    return float(np.clip(np.linalg.svd(wx.T @ sxy[fx.mask()][:, fy.mask()].numpy() @ wy, compute_uv=False), 0, 1).mean())


def _weak_block(n, d, eps, seed):
    """y: half its units strongly correlated with x, half exactly uncorrelated in the sample up to
    ``eps`` x (canonical correlations ~eps beside strong ones: where squaring loses accuracy)."""
    rng = np.random.default_rng(seed)
    z, w = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    zc, wc = z - z.mean(0), w - w.mean(0)
    perp = wc - zc @ np.linalg.lstsq(zc, wc, rcond=None)[0]
    h = d // 2
    return z, np.concatenate([z[:, :h] + 0.3 * perp[:, :h], perp[:, h:] + eps * z[:, h:]], axis=1)


def _gram_cases():
    rng = np.random.default_rng(21)
    x, y = _pair(600, 40, 40, 21, shared=10)
    yield "generic", x, y, 1e-11
    x, y = _pair(300, 48, 20, 22, shared=6)
    yield "y narrower", x, y, 1e-11
    yield "x narrower", y, x, 1e-11
    xd = np.concatenate([x[:, :30], np.full((300, 3), 2.0), x[:, :1] + 1e-7 * rng.normal(size=(300, 1)),
                         x[:, 1:2] + 1e-4 * rng.normal(size=(300, 1))], axis=1)  # dead, truncated, ill-conditioned
    yield "dead and nearly collinear", xd, y, 1e-11
    z = rng.normal(size=(500, 32))
    q, _ = np.linalg.qr(rng.normal(size=(32, 32)))
    yield "rotated + 1e-6 noise (correlations tied near 1)", z, z @ q + 1e-6 * rng.normal(size=(500, 32)), 1e-11
    yield "block of correlations ~1e-5", *_weak_block(500, 32, 1e-5, 23), 1e-10


@pytest.mark.parametrize("case", list(_gram_cases()), ids=lambda c: c[0])
def test_pwcca_and_svcca_equal_an_svd_of_the_same_matrices(case):
    _, x, y, tol = case
    for google in (False, True):
        ref = _pwcca_by_numpy_svd(**_same_whitening(x, y, eigvecs=google), google=google)
        assert float(pwcca(T(x), T(y), method="google" if google else "paper")) == pytest.approx(ref, abs=tol)
    for keep in (0.99, 8):
        assert float(svcca(T(x), T(y), keep=keep)) == pytest.approx(_svcca_by_numpy_svd(x, y, keep), abs=1e-12)


def test_small_correlations_are_refined_by_a_small_svd(monkeypatch):
    x, y = _weak_block(500, 32, 1e-5, 24)
    shapes = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda a, *k, **kw: (shapes.append(tuple(a.shape)), svd(a, *k, **kw))[1])
    values, _ = SimilarityAccumulator().update(T(x), T(y)).compute(("cca", "pwcca"))
    assert shapes == [(16, 32)]  # only the 16 weak correlations' part of M, never the whole M
    exact = cca_ref(x, y)
    weak = exact < 1e-3
    assert weak.sum() == 16
    # the refined small correlations keep an SVD's absolute accuracy (squared, they would be off by ~1e-8)
    np.testing.assert_allclose(values["cca"].numpy(), exact, rtol=0, atol=1e-13)
    shapes.clear()
    pwcca(*map(T, _pair(400, 10, 12, 25)))  # ordinary data: no correlation is small, no SVD at all
    assert shapes == []


def test_svcca_takes_the_svd_for_correlations_near_zero(monkeypatch):
    # three correlations exactly 0 in the sample: their square roots of eigenvalues would be off by ~1e-8
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(3000, 8)), rng.normal(size=(3000, 6))
    xc = x - x.mean(0)
    y[:, :3] -= xc @ np.linalg.lstsq(xc, y[:, :3] - y[:, :3].mean(0), rcond=None)[0]
    y[:, 3:] += 0.3 * x[:, :3]
    calls = []
    svdvals = torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda a: (calls.append(a.shape), svdvals(a))[1])
    assert float(svcca(T(x), T(y), keep=1.0)) == pytest.approx(_svcca_by_numpy_svd(x, y, 1.0), abs=1e-14)
    assert len(calls) == 1
    calls.clear()
    x, y = _pair(400, 10, 12, 26)
    assert float(svcca(T(x), T(y), keep=1.0)) == pytest.approx(_svcca_by_numpy_svd(x, y, 1.0), abs=1e-12)
    assert calls == []  # ordinary data: eigenvalues only


def test_tied_correlations_make_pwcca_depend_on_rounding_with_any_factorization():
    # Half of y is a rotation of half of x (16 correlations exactly 1, tied), the rest unrelated: the
    # canonical directions of the tie are not unique, and the weights change with the basis the
    # factorization picks. Permuting the units (an invariance in exact arithmetic) moves numpy's
    # SVD-based value as much as the Gram route differs from it: neither is more right.
    rng = np.random.default_rng(27)
    z, w = rng.normal(size=(400, 32)), rng.normal(size=(400, 32))
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    x, y = z, np.concatenate([z[:, :16] @ q, w[:, 16:]], axis=1)
    # 16 unit orders sample how far the basis moves the SVD's value (a few orders underestimate it)
    refs = []
    for seed in range(16):
        p = np.random.default_rng(seed).permutation(32) if seed else np.arange(32)
        refs.append(_pwcca_by_numpy_svd(**_same_whitening(x[:, p], y, eigvecs=False)))
    ours = float(pwcca(T(x), T(y)))
    spread = max(refs) - min(refs)
    assert spread > 1e-5  # the SVD's value is basis dependent here
    assert min(refs) - spread <= ours <= max(refs) + spread
