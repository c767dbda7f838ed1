"""The one table of similarity methods: aliases mean their method (same values, same name in the
result), an unknown name lists the known ones, and the table agrees with what reads it."""

import pytest
import torch

from netprobe._keys import BEST_TRACKED, DIRECTIONS, metric_direction
from netprobe.metrics import SimilarityAccumulator, similarity_matrix
from netprobe.metrics.similarity._methods import SIMILARITY_METHODS, canonical_method, method_names
from netprobe.select import key_direction


def _reps():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64)
    return {"a": x, "b": (x @ torch.randn(5, 7, generator=g, dtype=torch.float64)).relu(),
            "c": torch.randn(60, 4, generator=g, dtype=torch.float64)}


def test_every_alias_gives_its_methods_matrix():
    aliases = [(a, m.name) for m in SIMILARITY_METHODS.values() for a in m.aliases]
    assert ("linear_cka", "cka") in aliases
    reps = _reps()
    for alias, name in aliases:
        via_alias, direct = similarity_matrix(reps, method=alias), similarity_matrix(reps, method=name)
        assert via_alias.method == name
        assert torch.equal(via_alias.values, direct.values), alias


def test_unknown_method_lists_the_known_ones_and_the_aliases():
    with pytest.raises(ValueError, match=r"Expected `method` to be one of") as err:
        similarity_matrix(_reps(), method="cosine")
    text = str(err.value)
    for name in method_names():
        assert repr(name) in text
    assert text.endswith("but got 'cosine' (a function's name is also accepted: 'linear_cka' for 'cka').")


def test_canonical_names():
    for name in method_names():
        assert canonical_method(name) == name
    assert canonical_method("linear_cka") == "cka"
    assert canonical_method("cosine") is None and canonical_method(["cka"]) is None and canonical_method(3) is None
    assert method_names(scalar=True) == tuple(n for n in method_names() if n != "cca")


def test_table_forms_agree_with_the_accumulator():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, generator=g), torch.randn(40, 4, generator=g)
    acc = SimilarityAccumulator().update(x, y)
    for m in SIMILARITY_METHODS.values():
        if m.streamed:
            values, errors = acc.compute([m.name])
            assert m.name in values and not errors, m.name
        else:
            assert m.whole_set, m.name  # not streamed: computed from the whole set
            with pytest.raises(ValueError):
                acc.compute([m.name])


def test_similarity_directions_are_the_logged_keys_directions():
    for m in SIMILARITY_METHODS.values():
        assert m.direction == "max"
        for suffix in ("prev", "ref"):
            assert metric_direction(f"{m.name}_{suffix}") == m.direction
            assert key_direction(f"netprobe/{m.name}_{suffix}/relu1") == m.direction
            assert key_direction(f"netprobe/best/{m.name}_{suffix}") == m.direction
    assert all(metric_direction(k) == "max" for k in BEST_TRACKED)  # a best so far is a maximum
    assert all(key_direction(f"netprobe/{k}") == d for k, d in DIRECTIONS.items())
