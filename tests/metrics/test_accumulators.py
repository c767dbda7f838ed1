"""The Accumulator contract, for each of the four streaming accumulators: merging halves equals
the functional form on all rows, reset returns to the just-constructed state, and a state_dict
snapshot restores the value and lets the stream continue."""

import io
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch

from netprobe.metrics import (
    Accumulator,
    MinibatchCKA,
    MutualInfoAccumulator,
    SelectivityAccumulator,
    SimilarityAccumulator,
    class_selectivity,
    linear_cka,
    mutual_information,
)
from netprobe.metrics.information import quantile_edges
from netprobe.metrics.similarity import cca, procrustes, pwcca, svcca

N, BATCH = 240, 40
SIMILARITY = ("cca", "svcca", "pwcca", "cka", "procrustes")


@dataclass
class Case:
    """One accumulator under test: how to build it, the batches, and the functional reference."""

    make: Callable[[], Accumulator]
    batches: List[Tuple[torch.Tensor, ...]]
    value: Callable[[Accumulator], Dict[str, torch.Tensor]]
    reference: Dict[str, torch.Tensor]
    other: List[Tuple[torch.Tensor, ...]]  # unrelated batches, of other widths where the options allow


def _split(*tensors: torch.Tensor) -> List[Tuple[torch.Tensor, ...]]:
    return [tuple(t[i:i + BATCH] for t in tensors) for i in range(0, N, BATCH)]


def _similarity() -> Case:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, generator=g, dtype=torch.float64) * 10 + 100  # offsets a running sum would cancel
    y = x[:, :4] @ torch.randn(4, 4, generator=g, dtype=torch.float64) + torch.randn(N, 4, generator=g, dtype=torch.float64)
    ref = {"cca": cca(x, y), "svcca": svcca(x, y), "pwcca": pwcca(x, y), "cka": linear_cka(x, y), "procrustes": procrustes(x, y)}
    other = _split(torch.randn(N, 3, generator=g), torch.randn(N, 2, generator=g))
    return Case(SimilarityAccumulator, _split(x, y), lambda a: a.compute(SIMILARITY)[0], ref, other)


def _minibatch_cka() -> Case:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 30, generator=g)
    y = x[:, :10] @ torch.randn(10, 20, generator=g) + torch.randn(N, 20, generator=g)
    batches = _split(x, y)
    whole = MinibatchCKA()  # the estimator depends on the batches: the reference is one accumulator given them all
    for b in batches:
        whole.update(*b)
    other = _split(torch.randn(N, 5, generator=g), torch.randn(N, 7, generator=g))
    return Case(MinibatchCKA, batches, lambda a: {"cka": a.compute()}, {"cka": whole.compute()}, other)


def _labelled(seed: int, d: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (N,), generator=g)
    acts = (torch.randn(N, d, generator=g, dtype=torch.float64) + 2.0 * (labels[:, None] == torch.arange(d) % 3)).clamp_min(0)
    acts[:, -1] = 0  # a dead unit: NaN selectivity
    return acts, labels


def _selectivity() -> Case:
    acts, labels = _labelled(2, 5)
    r = class_selectivity(acts, labels, num_classes=3)

    def value(a: Accumulator) -> Dict[str, torch.Tensor]:
        s = a.compute()
        return {"values": s.values, "mean": s.mean, "class_means": s.class_means, "dead": s.dead}

    ref = {"values": r.values, "mean": r.mean, "class_means": r.class_means, "dead": r.dead}
    return Case(lambda: SelectivityAccumulator(3), _split(acts, labels), value, ref, _split(*_labelled(3, 2)))


def _mutual_info() -> Case:
    acts, labels = _labelled(4, 4)
    edges = quantile_edges(acts, bins=6)  # the functional form's edges: those of all the rows
    ref = {"mi": mutual_information(acts, labels, num_classes=3, bins=6)}
    return Case(lambda: MutualInfoAccumulator(3, bins=6, edges=edges), _split(acts, labels),
                lambda a: {"mi": a.compute()}, ref, _split(*_labelled(5, 4)))


CASES = {
    "SimilarityAccumulator": _similarity,
    "MinibatchCKA": _minibatch_cka,
    "SelectivityAccumulator": _selectivity,
    "MutualInfoAccumulator": _mutual_info,
}


@pytest.fixture(params=sorted(CASES))
def case(request) -> Case:
    return CASES[request.param]()


def _fed(acc: Accumulator, batches) -> Accumulator:
    for b in batches:
        assert acc.update(*b) is acc
    return acc


def _assert_values(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], atol: float = 1e-10) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, equal_nan=True, msg=lambda m: f"{k}: {m}")


def _assert_same_state(a: Dict[str, Any], b: Dict[str, Any]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], dict):
            _assert_same_state(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _halves(case: Case) -> Tuple[List, List]:
    h = len(case.batches) // 2
    return case.batches[:h], case.batches[h:]


def test_every_accumulator_keeps_the_contract():
    for cls in (SimilarityAccumulator, MinibatchCKA, SelectivityAccumulator, MutualInfoAccumulator):
        assert issubclass(cls, Accumulator) and not getattr(cls, "__abstractmethods__", None), cls
    with pytest.raises(TypeError, match="abstract"):
        Accumulator()


def test_merge_of_two_halves_equals_the_functional_form(case):
    first, second = _halves(case)
    make = case.make
    a, b = _fed(make(), first), _fed(make(), second)
    before = b.state_dict()
    assert a.merge(b) is a
    _assert_values(case.value(a), case.reference)
    _assert_same_state(b.state_dict(), before)  # the other is unchanged
    _assert_values(case.value(_fed(make(), second).merge(_fed(make(), first))), case.reference)  # either order
    _assert_values(case.value(make().merge(a)), case.reference)  # an empty one is the identity
    _assert_values(case.value(a.merge(make())), case.reference)


def test_reset_then_update_equals_a_fresh_one(case):
    fresh = case.make()
    acc = _fed(case.make(), case.other)
    assert acc.reset() is acc
    _assert_same_state(acc.state_dict(), fresh.state_dict())  # back to the just-constructed state
    with pytest.raises(ValueError, match="empty"):
        case.value(acc)
    _fed(acc, case.batches)  # widths, units or edges of the other batches are forgotten
    _assert_values(case.value(acc), case.value(_fed(fresh, case.batches)), atol=0)
    _assert_values(case.value(acc), case.reference)


def test_state_dict_restores_the_value_in_a_fresh_one(case):
    acc = _fed(case.make(), case.batches)
    snapshot = acc.state_dict()
    buf = io.BytesIO()
    torch.save(snapshot, buf)  # tensors and plain values: a checkpoint stores it
    buf.seek(0)
    for state in (snapshot, torch.load(buf)):
        restored = case.make()
        assert restored.load_state_dict(state) is restored
        _assert_values(case.value(restored), case.value(acc), atol=0)
    empty = case.make().load_state_dict(case.make().state_dict())
    with pytest.raises(ValueError, match="empty"):
        case.value(empty)


def test_update_after_load_continues_the_stream(case):
    first, second = _halves(case)
    acc = _fed(case.make(), first)
    snapshot = acc.state_dict()
    _fed(acc, second)  # later updates do not change the snapshot
    restored = _fed(case.make().load_state_dict(snapshot), second)
    _assert_values(case.value(restored), case.value(acc), atol=0)
    _assert_values(case.value(restored), case.reference)


def test_minibatch_cka_state_keeps_the_widths():
    g = torch.Generator().manual_seed(0)
    acc = MinibatchCKA().update(torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g))
    restored = MinibatchCKA().load_state_dict(acc.state_dict())
    assert restored.widths == (5, 3)
    with pytest.raises(ValueError, match=r"widths of the first, \(d_x, d_y\) = \(5, 3\)"):
        restored.update(torch.randn(8, 4, generator=g), torch.randn(8, 3, generator=g))
    without = {"sums": acc.state_dict()["sums"], "batches": 1}  # no widths: the next minibatch fixes them
    assert MinibatchCKA().load_state_dict(without).widths is None


def test_mutual_info_reset_keeps_given_edges_and_forgets_edges_from_data():
    acts, labels = _labelled(6, 4)
    edges = quantile_edges(acts, bins=4)
    given = MutualInfoAccumulator(3, bins=4, edges=edges).update(acts * 2, labels)
    assert torch.equal(given.reset().edges, edges) and given.counts is None
    other, other_labels = _labelled(7, 2)
    learned = MutualInfoAccumulator(3, bins=4).update(other, other_labels)  # edges (and 2 units) from these rows
    assert learned.reset().edges is None and learned.counts is None
    learned.update(acts, labels)  # edges from the new first batch, as in a fresh one
    torch.testing.assert_close(learned.compute(), mutual_information(acts, labels, num_classes=3, bins=4), rtol=0, atol=0)
