"""SimilarityAccumulator.compute (several metrics, one factorization per covariance) and the reuse of
one side's statistics as the next accumulator's y side (`side`, `update(..., y_stats=)`)."""

import os
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from netprobe.metrics import SimilarityAccumulator
from netprobe.metrics import similarity as sim
from netprobe.metrics.similarity import _moments as moments_module
from reference_similarity import leading_ref, pwcca_ref, svcca_ref

ALL = ("cca", "svcca", "pwcca", "cka")


def _layer(n, d, seed, *, dead=0, collinear=False):
    """ReLU-layer-like activations (float64): a low-rank signal plus noise, ``dead`` constant units,
    and with ``collinear`` a unit that nearly duplicates another (the Cholesky bound fails)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 8))
    a = np.maximum(z @ rng.normal(size=(8, d)) + 0.5 * rng.normal(size=(n, d)) + 0.3, 0.0)
    if dead:
        a[:, :dead] = 0.0
    if collinear:
        a[:, -1] = a[:, -2] + 1e-7 * rng.normal(size=n)
    return torch.tensor(a)


def _epochs(n, d, count, seed, **kw):
    """Activations of one layer over ``count`` epochs, each a small change of the previous one."""
    g = torch.Generator().manual_seed(seed)
    out = [_layer(n, d, seed, **kw)]
    for _ in range(count - 1):
        nxt = out[-1] + 0.05 * torch.randn(out[-1].shape, generator=g, dtype=torch.float64) * (out[-1] > 0)
        if kw.get("dead"):
            nxt[:, : kw["dead"]] = 0.0
        out.append(nxt)
    return out


def _acc(x, y, cuts=(), y_stats=None):
    acc = SimilarityAccumulator()
    bounds = [0, *cuts, x.shape[0]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc.update(x[a:b], y[a:b], y_stats=y_stats)
    return acc


# ----------------------------------------------------------------------------- compute
@pytest.mark.parametrize("case", ["generic", "dead", "collinear", "wide"])
@pytest.mark.parametrize("keep", [0.99, 5])
def test_compute_equals_the_single_metric_methods(case, keep):
    if case == "wide":  # above the recursive Gram's base block, several row blocks
        x, y = _layer(1300, 300, 1), _layer(1300, 150, 2)
        y = y + 0.5 * x[:, :150]
    else:
        x, y = _epochs(500, 40, 2, 3, dead=4 if case == "dead" else 0, collinear=case == "collinear")
    if case == "collinear":  # the eigen route is taken even without SVCCA
        assert sim._cholesky_whitener(torch.cov(x.T), sim.RANK_TOL) is None
    acc = _acc(x, y, cuts=(200,))
    values, errors = acc.compute(ALL, keep=keep)
    assert errors == {} and list(values) == list(ALL)
    np.testing.assert_allclose(values["cca"].numpy(), acc.cca().numpy(), atol=1e-9)
    assert float(values["svcca"]) == pytest.approx(float(acc.svcca(keep=keep)), abs=1e-9)
    assert float(values["pwcca"]) == pytest.approx(float(acc.pwcca()), abs=1e-9)
    assert float(values["cka"]) == pytest.approx(float(acc.linear_cka()), abs=1e-10)
    google, _ = acc.compute(("pwcca", "svcca"), method="google", keep=keep)
    assert float(google["pwcca"]) == pytest.approx(float(acc.pwcca(method="google")), abs=1e-8)
    for subset in (("pwcca",), ("cca", "pwcca"), ("svcca", "cka"), ("cka", "cca")):
        part, _ = SimilarityAccumulator().update(x, y).compute(subset, keep=keep)
        assert list(part) == list(subset)
        for m in subset:
            np.testing.assert_allclose(part[m].numpy(), values[m].numpy(), atol=1e-9)
    if case in ("generic", "wide"):  # and the independent references (no constant/collinear units)
        xn, yn = x.numpy(), y.numpy()
        assert float(values["pwcca"]) == pytest.approx(pwcca_ref(xn, yn), abs=1e-9)  # (the side with fewer units)
        assert float(values["svcca"]) == pytest.approx(svcca_ref(xn, yn, keep), abs=1e-9)


def test_compute_returns_each_metrics_error_and_still_computes_the_others():
    x, y = _epochs(60, 40, 2, 4)  # n=60 cannot support 40 + 40 directions; CKA has no such limit
    acc = SimilarityAccumulator().update(x, y)
    values, errors = acc.compute(("cca", "pwcca", "svcca", "cka"), keep=0.999999)
    assert list(values) == ["cka"] and sorted(errors) == ["cca", "pwcca", "svcca"]
    assert float(values["cka"]) == pytest.approx(float(acc.linear_cka()), abs=1e-12)
    for m, fn in (("cca", acc.cca), ("pwcca", acc.pwcca), ("svcca", lambda: acc.svcca(keep=0.999999))):
        assert isinstance(errors[m], ValueError)
        with pytest.raises(ValueError) as raised:
            fn()
        assert str(raised.value) == str(errors[m])  # the message the single method gives, per method
    assert str(errors["cca"]).startswith("CCA needs") and str(errors["pwcca"]).startswith("PWCCA needs")
    values, errors = acc.compute(("svcca", "cka"), keep=3)  # a reduction that fits: no error
    assert sorted(values) == ["cka", "svcca"] and errors == {}
    # all units constant on one side: every metric has its own error
    values, errors = SimilarityAccumulator().update(torch.ones(50, 3), y[:50, :3]).compute(ALL)
    assert values == {} and sorted(errors) == sorted(ALL)


def test_compute_argument_errors_raise_at_once():
    x, y = _epochs(100, 5, 2, 5)
    acc = SimilarityAccumulator().update(x, y)
    with pytest.raises(ValueError, match=r"Expected `methods` among \['cca', 'svcca', 'pwcca', 'cka', 'procrustes'\], but got \['linear_cka'\]"):
        acc.compute(("linear_cka",))
    with pytest.raises(ValueError, match="methods"):
        acc.compute(())
    with pytest.raises(TypeError, match="keep"):
        acc.compute(("svcca",), keep="all")
    with pytest.raises(ValueError, match="method"):
        acc.compute(("pwcca",), method="svcca")
    with pytest.raises(ValueError, match="rank_tol"):
        acc.compute(("cca",), rank_tol=2.0)
    with pytest.raises(ValueError, match="empty"):
        SimilarityAccumulator().compute(("cka",))
    assert list(acc.compute("cka")[0]) == ["cka"]  # one name is one metric
    assert list(acc.compute(("cka", "pwcca", "cka"))[0]) == ["cka", "pwcca"]  # repeats ignored


class _Count:
    """Counts calls of torch.linalg.eigh and torch.linalg.cholesky_ex (which the module looks up at call
    time): ``eigh`` of covariances, and apart (``gram``) PWCCA's eigh of its small Gram matrix."""

    def __init__(self, monkeypatch):
        self.eigh = self.chol = self.gram = 0
        eigh, chol = torch.linalg.eigh, torch.linalg.cholesky_ex

        def counted_eigh(*a, **k):
            if sys._getframe(1).f_code.co_name == "_gram_vectors":
                self.gram += 1
            else:
                self.eigh += 1
            return eigh(*a, **k)

        def counted_chol(*a, **k):
            self.chol += 1
            return chol(*a, **k)

        monkeypatch.setattr(torch.linalg, "eigh", counted_eigh)
        monkeypatch.setattr(torch.linalg, "cholesky_ex", counted_chol)

    def take(self):
        out = (self.eigh, self.chol)
        self.eigh = self.chol = 0
        return out

    def take_gram(self):
        out, self.gram = self.gram, 0
        return out


def test_each_covariance_is_factorized_once_and_reused(monkeypatch):
    e = _epochs(400, 30, 4, 6)
    count = _Count(monkeypatch)
    acc = SimilarityAccumulator().update(e[1], e[0])
    acc.compute(("pwcca", "svcca", "cka", "cca"))
    assert count.take() == (2, 0)  # one eigh per side, shared by SVCCA's reduction and CCA/PWCCA's whitening
    acc.compute(("pwcca", "svcca"))
    acc.svcca(keep=3)
    acc.cca()  # Cholesky route (not asked for with SVCCA): computed once per side, then kept
    acc.cca()
    assert count.take() == (0, 2)
    nxt = SimilarityAccumulator().update(e[2], e[1], y_stats=acc.side("x"))
    nxt.compute(("pwcca", "svcca", "cka"))
    assert count.take() == (1, 0)  # the y side's eigh comes from the previous accumulator
    only_pw = SimilarityAccumulator().update(e[3], e[2], y_stats=nxt.side("x"))
    only_pw.compute(("pwcca", "cka"))
    assert count.take() == (0, 2)  # without SVCCA: Cholesky per side (bound holds), no eigh at all
    # without sharing, the single methods on a fresh accumulator decompose each side per metric
    fresh = SimilarityAccumulator().update(e[1], e[0])
    fresh.pwcca()
    SimilarityAccumulator().update(e[1], e[0]).svcca()
    assert count.take() == (2, 2)
    # and PWCCA's singular vectors: one eigh of its k x k Gram matrix per computation
    assert count.take_gram() == 5


def test_reuse_does_not_compute_the_y_comoment(monkeypatch):
    e = _epochs(300, 20, 3, 7)
    prev = SimilarityAccumulator().update(e[1], e[0])
    grams = []
    real = moments_module._gram_into  # looked up there by _Moments.of
    monkeypatch.setattr(moments_module, "_gram_into", lambda at, out, *a: (grams.append(at.shape), real(at, out, *a))[1])
    acc = _acc(e[2], e[1], cuts=(100, 250), y_stats=prev.side("x"))
    assert len(grams) == 3  # one Gram (x's) per batch
    assert acc._m.cyy is None
    assert acc.side("y") is prev.side("x")


# ----------------------------------------------------------------------------- reuse
@pytest.mark.parametrize("cuts", [(), (128, 300, 301)])
@pytest.mark.parametrize("kw", [{}, {"dead": 3}, {"collinear": True}])
def test_reuse_equals_no_reuse_over_chained_epochs(cuts, kw):
    e = _epochs(500, 24, 6, 8, **kw)
    side = None
    for t in range(1, len(e)):
        for methods, opts in ((("pwcca", "svcca", "cka"), {}), (ALL, {"keep": 4}), (("pwcca", "cca"), {"method": "google"})):
            plain, plain_err = _acc(e[t], e[t - 1], cuts).compute(methods, **opts)
            if side is not None:
                reused = _acc(e[t], e[t - 1], cuts, y_stats=side)
                values, errors = reused.compute(methods, **opts)
                assert sorted(errors) == sorted(plain_err) == []
                for m in methods:  # bit for bit: same co-moments, same factorizations
                    assert torch.equal(values[m], plain[m]), (t, m)
        acc = _acc(e[t], e[t - 1], cuts, y_stats=side)
        acc.compute(("pwcca", "svcca", "cka"))
        side = acc.side("x")  # epoch t's statistics, reused at t + 1
        assert side.n == 500 and torch.equal(side.mean, acc._m.mx)


def test_reuse_with_other_batches_agrees_to_rounding():
    e = _epochs(600, 32, 3, 9)
    a1 = _acc(e[1], e[0], cuts=(300,))
    a1.compute(("pwcca", "svcca", "cka"))
    values, errors = _acc(e[2], e[1], cuts=(50, 51, 400), y_stats=a1.side("x")).compute(ALL)
    plain, _ = _acc(e[2], e[1]).compute(ALL)
    assert errors == {}
    for m in ALL:
        np.testing.assert_allclose(values[m].numpy(), plain[m].numpy(), rtol=0, atol=1e-12)


def test_x_moments_do_not_depend_on_y_and_equal_the_same_rows_as_y():
    e = _epochs(1500, 70, 3, 10)  # several row blocks, widths above the Gram's base block
    m_no_yy = sim._Moments.of(e[1], e[0], yy=False)
    m_other = sim._Moments.of(e[1], e[2])
    m_as_y = sim._Moments.of(e[2], e[1])
    for a, b in ((m_no_yy.cxx, m_other.cxx), (m_no_yy.mx, m_other.mx), (m_no_yy.cxx, m_as_y.cyy), (m_no_yy.mx, m_as_y.my)):
        assert torch.equal(a, b)
    assert torch.equal(m_no_yy.cxy, sim._Moments.of(e[1], e[0]).cxy) and m_no_yy.cyy is None


def test_side_stats_api():
    e = _epochs(200, 6, 2, 11)
    acc = SimilarityAccumulator().update(e[1], e[0])
    sx, sy = acc.side("x"), acc.side()
    assert sx is sy and acc.side("y") is not sx
    assert torch.equal(acc.side("y").mean, acc._m.my)
    torch.testing.assert_close(sx.covariance, torch.cov(e[1].T), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="'x' or 'y'"):
        acc.side("z")
    with pytest.raises(ValueError, match="empty"):
        SimilarityAccumulator().side("x")
    # built by hand from saved statistics: usable as y_stats
    rebuilt = sim.SideStats(sx.n, sx.mean.clone(), sx.comoment.clone())
    a, _ = SimilarityAccumulator().update(e[0], e[1], y_stats=rebuilt).compute(ALL)
    b, _ = SimilarityAccumulator().update(e[0], e[1]).compute(ALL)
    assert all(torch.equal(a[m], b[m]) for m in ALL)
    with pytest.raises(ValueError, match=r"`mean` \(d,\) and `comoment` \(d, d\)"):
        sim.SideStats(3, torch.zeros(2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="n"):
        sim.SideStats(0, torch.zeros(2), torch.zeros(2, 2))
    # a new update forgets the sides (and their factorizations)
    acc.update(e[1][:10], e[0][:10])
    assert acc.side("x") is not sx and acc.side("x").n == 210


def test_mismatched_y_rows_are_refused():
    e = _epochs(300, 10, 3, 12)
    prev = SimilarityAccumulator().update(e[1], e[0])
    side = prev.side("x")
    other = _epochs(300, 10, 1, 99)[0]  # other rows of the same width
    for acc in (SimilarityAccumulator().update(e[2], other, y_stats=side),
                SimilarityAccumulator().update(e[2], e[1][torch.arange(300).roll(1)] + 1e-3, y_stats=side)):
        for call in (lambda: acc.compute(("cka",)), acc.pwcca, lambda: acc.side("y")):
            with pytest.raises(ValueError, match="y side does not match the given statistics"):
                call()
    short = SimilarityAccumulator().update(e[2][:299], e[1][:299], y_stats=side)  # one row missing
    with pytest.raises(ValueError, match=r"does not match.*n=299 rows.*n=300"):
        short.compute(ALL)
    # the same rows reordered (the means agree) pass; float32-rounded rows pass (to 1e-6 of |mean| + std)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    SimilarityAccumulator().update(e[2][perm], e[1][perm], y_stats=side).compute(ALL)
    SimilarityAccumulator().update(e[2], e[1].float(), y_stats=side).compute(ALL)
    with pytest.raises(ValueError, match="width"):
        SimilarityAccumulator().update(e[2], e[1][:, :5], y_stats=side)
    acc = SimilarityAccumulator().update(e[2][:100], e[1][:100], y_stats=side)
    with pytest.raises(ValueError, match="same `y_stats`"):
        acc.update(e[2][100:], e[1][100:])
    with pytest.raises(ValueError, match="same `y_stats`"):
        SimilarityAccumulator().update(e[2][:100], e[1][:100]).update(e[2][100:], e[1][100:], y_stats=side)
    with pytest.raises(ValueError, match="different `y_stats`"):
        acc.merge(SimilarityAccumulator().update(e[2][100:], e[1][100:]))
    with pytest.raises(TypeError, match="SideStats"):
        SimilarityAccumulator().update(e[2], e[1], y_stats={"n": 300})


def test_merge_and_state_dict_with_y_stats():
    e = _epochs(400, 12, 3, 13)
    prev = SimilarityAccumulator().update(e[1], e[0])
    side = prev.side("x")
    parts = [SimilarityAccumulator().update(e[2][a:b], e[1][a:b], y_stats=side) for a, b in ((0, 150), (150, 400))]
    merged = parts[0].merge(parts[1])
    whole = _acc(e[2], e[1], cuts=(150,), y_stats=side)
    a, _ = merged.compute(ALL)
    b, _ = whole.compute(ALL)
    assert all(torch.equal(a[m], b[m]) for m in ALL)
    restored = SimilarityAccumulator()
    restored.load_state_dict(whole.state_dict())
    assert "cyy" not in whole.state_dict()
    c, _ = restored.compute(ALL)
    assert all(torch.equal(c[m], b[m]) for m in ALL)
    restored.update(e[2][:5], e[1][:5], y_stats=restored.side("y"))  # the rebuilt y_stats is the one in use
    flat = whole._flat()
    un = SimilarityAccumulator._unflat(flat, 12, 12)
    assert un.cyy is None and torch.equal(un.cxy, whole._m.cxy) and torch.equal(un.cxx, whole._m.cxx)


# ----------------------------------------------------------------------------- two ranks
from free_port import free_port  # noqa: E402  (one helper for the two-rank tests)


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        e = _epochs(500, 16, 3, 14)
        sl = slice(0, 320) if rank == 0 else slice(320, 500)  # unequal shards
        a1 = SimilarityAccumulator().update(e[1][sl], e[0][sl]).all_reduce()
        first, _ = a1.compute(("pwcca", "svcca", "cka"))
        a2 = SimilarityAccumulator().update(e[2][sl], e[1][sl], y_stats=a1.side("x")).all_reduce()
        second, errors = a2.compute(("pwcca", "svcca", "cka"))
        mixed = SimilarityAccumulator().update(e[2][sl], e[1][sl], y_stats=a1.side("x") if rank == 0 else None)
        try:
            mixed.all_reduce()
            mixed_err = "no error"
        except ValueError as err:
            mixed_err = str(err)
        torch.save({"first": first, "second": second, "errors": errors, "mixed": mixed_err}, os.path.join(outdir, f"r{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_all_reduce_with_y_stats_equals_no_reuse_on_one_process(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    e = _epochs(500, 16, 3, 14)
    plain, _ = _acc(e[2], e[1], cuts=(320,)).compute(("pwcca", "svcca", "cka"))
    for rank in range(2):
        got = torch.load(tmp_path / f"r{rank}.pt", weights_only=False)
        assert got["errors"] == {}
        assert all(torch.equal(got["second"][m], plain[m]) for m in plain)  # rank-order merge = two batches
        assert "`y_stats`" in got["mixed"]


@pytest.mark.parametrize("n, d, r, dead", [(256, 128, 64, 0), (256, 512, 64, 3), (120, 40, 30, 2)])
def test_leading_equals_the_metrics_of_the_projected_rows(n, d, r, dead):
    x = _layer(n, d, 1, dead=dead).numpy()
    y = x + 0.3 * _layer(n, d, 2).numpy()
    acc = SimilarityAccumulator().update(torch.from_numpy(x), torch.from_numpy(y))
    red = acc.leading(r)
    px, py = leading_ref(x, r), leading_ref(y, r)
    assert red.n == n
    assert float(red.pwcca()) == pytest.approx(pwcca_ref(px, py), rel=1e-9)
    want_cca = np.linalg.svd(np.linalg.qr(px - px.mean(0))[0].T @ np.linalg.qr(py - py.mean(0))[0], compute_uv=False)
    np.testing.assert_allclose(np.sort(red.cca().numpy())[::-1], want_cca, rtol=1e-8, atol=1e-10)


def test_leading_keeps_each_sides_eigendecomposition_for_the_next_pair():
    a, b, c = (_layer(200, 120, s) for s in (3, 4, 5))
    first = SimilarityAccumulator().update(b, a)
    first.leading(40)
    side = first.side("x")  # b's statistics, with the eigendecomposition leading computed
    assert "eigh" in side._factors._cache
    second = SimilarityAccumulator().update(c, b, y_stats=side)
    plain = SimilarityAccumulator().update(c, b)
    assert float(second.leading(40).pwcca()) == pytest.approx(float(plain.leading(40).pwcca()), abs=1e-13)


def test_leading_with_every_direction_keeps_the_canonical_correlations():
    x, y = _layer(300, 20, 6), _layer(300, 20, 7)
    acc = SimilarityAccumulator().update(x, y)
    np.testing.assert_allclose(acc.leading(20).cca().numpy(), acc.cca().numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("r", [0, -1, 2.0, True])
def test_leading_refuses_a_rank_that_is_not_a_positive_int(r):
    acc = SimilarityAccumulator().update(torch.randn(50, 5), torch.randn(50, 5))
    with pytest.raises(ValueError, match="`r` to be an int >= 1"):
        acc.leading(r)
