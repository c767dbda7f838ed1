"""Layer globs match dotted names as pathlib matches paths: ``*`` within a segment, ``**`` across."""

import fnmatch
import re

import pytest
from torch import nn

from netprobe.layers import glob_regex, resolve_layers


def _bert_like():
    def layer():
        m = nn.Module()
        m.attention = nn.Module()
        m.attention.output = nn.Linear(2, 2)
        m.output = nn.Linear(2, 2)
        return m

    root = nn.Module()
    root.encoder = nn.Module()
    root.encoder.layer = nn.ModuleList([layer(), layer()])
    return root


def test_star_stays_within_one_segment():
    m = _bert_like()
    assert list(resolve_layers(m, "encoder.layer.*.output")) == ["encoder.layer.0.output", "encoder.layer.1.output"]


def test_double_star_crosses_segments_including_none():
    m = _bert_like()
    assert list(resolve_layers(m, "encoder.**.output")) == [
        "encoder.layer.0.attention.output", "encoder.layer.0.output", "encoder.layer.1.attention.output", "encoder.layer.1.output"]
    assert list(resolve_layers(m, "**.attention")) == ["encoder.layer.0.attention", "encoder.layer.1.attention"]
    assert "encoder.layer" in resolve_layers(m, "encoder.**.layer")  # zero segments


def test_a_pattern_matching_nothing_names_the_segment_rule():
    with pytest.raises(ValueError, match=r"`\*` matches within one dotted segment"):
        resolve_layers(_bert_like(), "encoder.*.output")


def _segment_reference(pattern, name):
    """Independent reference: fnmatch per segment, `**` as zero or more whole segments."""
    ps, ns = pattern.split("."), name.split(".")

    def match(i, j):
        if i == len(ps):
            return j == len(ns)
        if ps[i] == "**":
            return any(match(i + 1, k) for k in range(j, len(ns) + 1))
        return j < len(ns) and fnmatch.fnmatchcase(ns[j], ps[i]) and match(i + 1, j + 1)

    return match(0, 0)


@pytest.mark.parametrize("pattern", ["*", "**", "a.*", "a.**", "**.c", "a.**.c", "*.b.*", "a?.[bc]*", "[!a]*.**", "a.*.*.d"])
def test_whole_segment_patterns_match_the_segmentwise_reference(pattern):
    names = [".".join(p) for p in (("a",), ("a", "b"), ("a", "b", "c"), ("a1", "bx"), ("x", "b", "y"), ("a", "c"),
                                   ("a", "b", "c", "d"), ("b", "b"), ("a", "x", "y", "c"))]
    rx = glob_regex(pattern)
    for n in names:
        assert bool(rx.match(n)) == _segment_reference(pattern, n), (pattern, n)
    assert isinstance(rx, re.Pattern)
