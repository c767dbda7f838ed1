"""Class selectivity and mutual information against numpy references, plus properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netprobe.metrics import MutualInfoAccumulator, SelectivityAccumulator, class_selectivity, mutual_information
from netprobe.metrics.information import quantile_edges
from reference_selectivity import mi_ref, selectivity_ref


def _data(n, d, c, seed, dead=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    acts = np.maximum(rng.normal(size=(n, d)) + (labels[:, None] == np.arange(d)[None] % c) * 2, 0)
    if dead:
        acts[:, :dead] = 0
    return torch.tensor(acts), torch.tensor(labels)


@pytest.mark.parametrize("n,d,c,seed,dead", [(300, 7, 3, 0, 0), (1000, 20, 10, 1, 2), (50, 4, 5, 2, 1)])
def test_selectivity_against_reference(n, d, c, seed, dead):
    acts, labels = _data(n, d, c, seed, dead)
    r = class_selectivity(acts, labels, num_classes=c)
    ref = selectivity_ref(acts.numpy(), labels.numpy(), c)
    np.testing.assert_allclose(r.values.numpy(), ref, atol=1e-12, equal_nan=True)
    assert r.num_dead == dead == int(r.dead.sum())
    assert float(r.mean) == pytest.approx(np.nanmean(ref), abs=1e-12)
    assert r.values.dtype == torch.float64


def test_selectivity_properties_one_class_constant_dead():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    acts = torch.tensor([[5.0, 2.0, 0.0], [3.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [0, 2.0, 0], [0, 2.0, 0]])
    r = class_selectivity(acts, labels, num_classes=3)
    assert r.values[0] == 1.0 and r.values[1] == 0.0 and math.isnan(r.values[2])
    assert r.num_dead == 1 and float(r.mean) == 0.5
    allr = class_selectivity(torch.zeros(6, 2), labels, num_classes=3)
    assert allr.num_dead == 2 and math.isnan(float(allr.mean))


def test_absent_classes_take_no_part():
    acts, labels = _data(200, 5, 3, 4)
    r3 = class_selectivity(acts, labels, num_classes=3)
    r10 = class_selectivity(acts, labels, num_classes=10)  # classes 3..9 absent
    torch.testing.assert_close(r3.values, r10.values)
    assert r10.present.tolist() == [True] * 3 + [False] * 7
    assert torch.isnan(r10.class_means[5]).all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(1, 149), max_size=5, unique=True))
def test_selectivity_streaming_equals_functional_and_bounds(seed, cuts):
    acts, labels = _data(150, 6, 4, seed)
    full = class_selectivity(acts, labels, num_classes=4)
    bounds = [0, *sorted(cuts), 150]
    parts = [SelectivityAccumulator(4).update(acts[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    acc = parts[0]
    for p in parts[1:]:
        acc.merge(p)
    got = acc.compute()
    torch.testing.assert_close(got.values, full.values, equal_nan=True, rtol=0, atol=1e-12)
    live = full.values[~full.dead]
    assert bool(((live >= 0) & (live <= 1)).all())
    again = SelectivityAccumulator(4)
    again.load_state_dict(acc.state_dict())
    torch.testing.assert_close(again.compute().values, full.values, equal_nan=True)
    assert acc.all_reduce() is acc


def test_selectivity_errors():
    acts, labels = _data(20, 3, 2, 0)
    with pytest.raises(ValueError, match="non-negative.*after the ReLU|ReLU"):
        class_selectivity(acts - 1, labels, num_classes=2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_selectivity(acts, torch.zeros(20, dtype=torch.long), num_classes=2)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        class_selectivity(acts, labels + 5, num_classes=2)
    with pytest.raises(ValueError, match="20 entries"):
        class_selectivity(acts, labels[:5], num_classes=2)
    with pytest.raises(TypeError, match="integer"):
        class_selectivity(acts, labels.float(), num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        class_selectivity(acts, labels, num_classes=1)
    with pytest.raises(ValueError, match="empty"):
        SelectivityAccumulator(3).compute()


# ----------------------------------------------------------------------------- mutual information
@pytest.mark.parametrize("n,d,c,bins,seed", [(400, 5, 3, 8, 0), (1000, 3, 10, 16, 1), (97, 4, 4, 5, 2)])
def test_mi_against_reference(n, d, c, bins, seed):
    acts, labels = _data(n, d, c, seed)
    acts = acts - 0.5  # any sign is fine for MI
    got = mutual_information(acts, labels, num_classes=c, bins=bins)
    np.testing.assert_allclose(got.numpy(), mi_ref(acts.numpy(), labels.numpy(), c, bins), atol=1e-12)


def test_mi_perfect_code_constant_and_independent_units():
    labels = torch.arange(10).repeat(100)
    code = labels.double() * 3 + 1
    g = torch.Generator().manual_seed(0)
    acts = torch.stack([code, torch.full((1000,), 2.0), torch.rand(1000, generator=g, dtype=torch.float64)], 1)
    mi = mutual_information(acts, labels, num_classes=10, bins=10)
    assert float(mi[0]) == pytest.approx(math.log2(10), abs=1e-12)
    assert float(mi[1]) == 0.0
    bias = (10 - 1) * (10 - 1) / (2 * 1000 * math.log(2))
    assert 0 <= float(mi[2]) < 3 * bias  # independent unit: only the plug-in bias


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(1, 199), max_size=4, unique=True))
def test_mi_streaming_equals_functional_with_same_edges(seed, cuts):
    acts, labels = _data(200, 4, 3, seed)
    edges = quantile_edges(acts, bins=6)
    bounds = [0, *sorted(cuts), 200]
    acc = MutualInfoAccumulator(3, bins=6, edges=edges)
    for a, b in zip(bounds[:-1], bounds[1:]):
        acc.update(acts[a:b], labels[a:b])
    torch.testing.assert_close(acc.compute(), mutual_information(acts, labels, num_classes=3, bins=6))
    other = MutualInfoAccumulator(3, bins=6, edges=edges).update(acts[:50], labels[:50])
    other.merge(MutualInfoAccumulator(3, bins=6, edges=edges).update(acts[50:], labels[50:]))
    torch.testing.assert_close(other.compute(), acc.compute())
    assert bool((acc.compute() >= 0).all()) and bool((acc.compute() <= math.log2(3) + 1e-12).all())


def test_mi_errors():
    acts, labels = _data(30, 3, 3, 0)
    with pytest.raises(ValueError, match="bins"):
        mutual_information(acts, labels, num_classes=3, bins=1)
    with pytest.raises(ValueError, match=r"shape \(d, 3\)"):
        MutualInfoAccumulator(3, bins=4, edges=torch.zeros(3, 2))
    a = MutualInfoAccumulator(3, bins=4).update(acts, labels)
    with pytest.raises(ValueError, match="same bin edges"):
        a.merge(MutualInfoAccumulator(3, bins=4).update(acts * 2, labels))
    with pytest.raises(ValueError, match="3 units"):
        a.update(acts[:, :2], labels)
    with pytest.raises(ValueError, match="NaN"):
        mutual_information(acts * float("nan"), labels, num_classes=3)


def test_accumulators_refuse_mismatched_merges_and_snapshot_their_state():
    from netprobe.metrics import SimilarityAccumulator

    g = torch.Generator().manual_seed(0)
    a, labels = torch.rand(50, 7, generator=g), torch.arange(50) % 3
    s7 = SelectivityAccumulator(3).update(a, labels)
    with pytest.raises(ValueError, match="1 units into 7 units"):
        s7.merge(SelectivityAccumulator(3).update(a[:, :1], labels))
    snap = s7.state_dict()
    s7.update(a, labels)
    assert float(snap["counts"].sum()) == 50  # a snapshot, not the live tensors
    x, y = torch.randn(40, 6, generator=g), torch.randn(40, 5, generator=g)
    with pytest.raises(ValueError, match=r"widths \(1, 5\) into an accumulator of widths \(6, 5\)"):
        SimilarityAccumulator().update(x, y).merge(SimilarityAccumulator().update(x[:, :1], y))
    mi = MutualInfoAccumulator(3, bins=4).update(a, labels)
    empty = MutualInfoAccumulator(3, bins=4).merge(mi)  # takes over the edges
    torch.testing.assert_close(empty.compute(), mi.compute())
    with pytest.raises(ValueError, match="num_classes=3, bins=4; this accumulator num_classes=5, bins=8"):
        MutualInfoAccumulator(5, bins=8).load_state_dict(mi.state_dict())
    given = MutualInfoAccumulator(3, bins=4, edges=mi.edges).update(a[:0], labels[:0])  # zero counts, like the others
    assert given.counts is not None and float(given.counts.sum()) == 0
    with pytest.raises(ValueError, match="Expected 7 units"):
        MutualInfoAccumulator(3, bins=4, edges=mi.edges[:7]).update(torch.rand(0, 2), labels[:0])
    acc = MutualInfoAccumulator(3, bins=4).update(a[:0], labels[:0])  # an empty first batch adds nothing
    assert acc.counts is None and acc.edges is None
    with pytest.warns(RuntimeWarning, match="first batch of only 5 rows"):
        acc.update(a[:5], labels[:5])
