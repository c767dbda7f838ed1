"""The similarity metrics' inputs and their numpy BLAS route: numpy's floating-point warnings are not
printed before netprobe's own error for a non-finite input (CPU numpy BLAS route), inputs that
record gradients get a warning that the value is detached, similarity_matrix names a bad entry by
its key, and the CCA family says n=1 is the problem."""

import warnings

import pytest
import torch

import netprobe.metrics.similarity as S
from netprobe.metrics.similarity import _blas
from netprobe.metrics import cca, linear_cka, procrustes, pwcca, rbf_cka, similarity_matrix, svcca


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d", [(300, 8), (20, 60)])  # moments and Gram routes
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_input_gives_our_error_and_no_numpy_warning(dtype, n, d, bad, monkeypatch):
    monkeypatch.setattr(S.config, "numpy_blas", True)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)
    x[3, 5] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy RuntimeWarning would surface as an exception here
        for debiased in (False, True):
            with pytest.raises(ValueError, match="to be finite"):
                linear_cka(x, y, debiased=debiased)
            with pytest.raises(ValueError, match="to be finite"):
                linear_cka(y, x, debiased=debiased)


def test_numpy_errstate_is_restored_after_the_call(monkeypatch):
    import numpy as np

    monkeypatch.setattr(S.config, "numpy_blas", True)
    before = np.geterr()
    x = torch.randn(100, 4, dtype=torch.float64)
    x[0, 0] = float("inf")
    with pytest.raises(ValueError):
        linear_cka(x, torch.randn(100, 4, dtype=torch.float64))
    linear_cka(torch.randn(100, 4), torch.randn(100, 4))
    assert np.geterr() == before


@pytest.mark.parametrize("fn", [linear_cka, procrustes, rbf_cka, cca, svcca, pwcca,
                                lambda a, b: similarity_matrix([a, b])])
def test_inputs_recording_gradients_warn_that_the_value_is_detached(fn):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(80, 4, generator=g).requires_grad_()
    other = torch.randn(80, 3, generator=g)
    with pytest.warns(UserWarning, match="not differentiable"):
        fn(h, other)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            fn(h, other)  # measuring under no_grad: silent
        fn(h.detach(), other)  # or detached: silent


def test_the_warning_points_at_the_caller():
    h = torch.randn(30, 3).requires_grad_()
    with pytest.warns(UserWarning) as rec:
        linear_cka(h, torch.randn(30, 2))
    assert rec[0].filename == __file__


@pytest.mark.parametrize("method", ["cka", "pwcca", "procrustes", "cca", "svcca", "rbf_cka"])
def test_similarity_matrix_names_a_non_finite_entry_by_its_key(method):
    g = torch.Generator().manual_seed(2)
    bad = torch.randn(50, 4, generator=g)
    bad[7, 1] = float("nan")
    with pytest.raises(ValueError, match=r"reps\['fc2'\]"):
        similarity_matrix({"fc1": torch.randn(50, 4, generator=g), "fc2": bad}, method=method)


@pytest.mark.parametrize("fn", [cca, svcca, pwcca])
def test_cca_family_says_one_sample_is_the_problem(fn):
    with pytest.raises(ValueError, match="n=1"):
        fn(torch.randn(1, 3), torch.randn(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_numpy_moments_over_several_row_blocks_match_a_float64_reference(dtype, offset, monkeypatch):
    # d=1024 makes the numpy route's blocks 512 rows: n=1300 is 3 blocks, the last a partial one;
    # strided input (every other column of a wider tensor); against numpy on the float64 image
    import numpy as np

    monkeypatch.setattr(S.config, "numpy_blas", True)
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(1300, 2 * 1024, generator=g) * 2.0 + offset
    x = wide[:, ::2].to(dtype)
    y = (torch.randn(1300, 40, generator=g) - offset).to(dtype)
    m = S._Moments.of(x, y, blas=True)
    xr, yr = x.double().numpy(), y.double().numpy()
    xc, yc = xr - xr.mean(0), yr - yr.mean(0)
    scale = np.abs(xc).max() * np.abs(yc).max() * 1300
    np.testing.assert_allclose(m.mx.numpy(), xr.mean(0), rtol=0, atol=1e-12 * max(1.0, offset))
    np.testing.assert_allclose(m.cxx.numpy(), xc.T @ xc, rtol=0, atol=1e-11 * np.abs(xc).max() ** 2 * 1300)
    np.testing.assert_allclose(m.cyy.numpy(), yc.T @ yc, rtol=0, atol=1e-11 * np.abs(yc).max() ** 2 * 1300)
    np.testing.assert_allclose(m.cxy.numpy(), xc.T @ yc, rtol=0, atol=1e-11 * scale)
    ref = np.linalg.norm(xc.T @ yc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert float(linear_cka(x, y)) == pytest.approx(ref, rel=1e-10, abs=1e-12)


def test_concurrent_calls_restore_numpy_blas_threads(monkeypatch):
    # numpy's BLAS thread count is process-wide: calls overlapping from two Python threads must
    # leave the setting from before the first of them, and run with torch's count meanwhile
    import threading

    from threadpoolctl import threadpool_info, threadpool_limits

    monkeypatch.setattr(S.config, "numpy_blas", True)

    def blas():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas" and i["internal_api"] != "mkl"}

    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4000, 64, generator=g), torch.randn(4000, 64, generator=g)
    start = threading.Barrier(2)
    errors = []

    def work():
        try:
            start.wait()
            for _ in range(8):
                linear_cka(x, y)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=2, user_api="blas"):
            ts = [threading.Thread(target=work) for _ in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            after = blas()
    finally:
        torch.set_num_threads(before)
    assert not errors
    assert after == {2}
    assert _blas._BLAS_USERS == 0


@pytest.mark.parametrize("n,d", [(8000, 600), (300, 2500)])  # several row blocks; column blocks
def test_numpy_route_with_several_threads_matches_the_reference(n, d, monkeypatch):
    # more threads take larger blocks on the numpy route: the value must not move
    import numpy as np

    monkeypatch.setattr(S.config, "numpy_blas", True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, d, generator=g) + 3.0
    y = torch.tanh(x[:, : d // 2] @ torch.randn(d // 2, 40, generator=g) / 10) + torch.randn(n, 40, generator=g)
    xr, yr = x.double().numpy(), y.double().numpy()
    xc, yc = xr - xr.mean(0), yr - yr.mean(0)
    ref = np.linalg.norm(xc.T @ yc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert float(linear_cka(x, y)) == pytest.approx(ref, rel=1e-11)
    finally:
        torch.set_num_threads(before)
