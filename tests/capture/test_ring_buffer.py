"""RingBuffer against a collections.deque(maxlen=capacity) reference."""

from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netprobe import RingBuffer


def _rows(start, k, d):
    return torch.arange(start * d, (start + k) * d, dtype=torch.float32).reshape(k, d)


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 17),
    batches=st.lists(st.integers(0, 40), min_size=1, max_size=25),
    d=st.integers(1, 4),
    with_targets=st.booleans(),
)
def test_matches_deque_reference(capacity, batches, d, with_targets):
    buf = RingBuffer(capacity, store_targets=with_targets)
    ref = deque(maxlen=capacity)
    start = 0
    ptr = None
    for k in batches:
        rows = _rows(start, k, d)
        targets = torch.arange(start, start + k) if with_targets else None
        buf.write(rows, targets)
        for i in range(k):
            ref.append((rows[i].tolist(), start + i))
        start += k
        if buf.allocated:
            if ptr is None:
                ptr = buf.data_ptr()
            assert buf.data_ptr() == ptr  # never grows or moves
        assert len(buf) == len(ref)
        got = buf.read()
        assert got.tolist() == [r for r, _ in ref] or (len(ref) == 0 and got.numel() == 0)
        if with_targets:
            assert buf.read_targets().tolist() == [t for _, t in ref]
    assert buf.total_written == sum(batches)


def test_batch_larger_than_capacity_keeps_newest():
    buf = RingBuffer(3)
    buf.write(_rows(0, 2, 2))
    buf.write(_rows(2, 10, 2))
    assert buf.read().tolist() == _rows(9, 3, 2).tolist()


def test_storage_dtypes_and_nbytes():
    for dtype, size in [(torch.float32, 4), (torch.float16, 2), (torch.bfloat16, 2), (torch.float64, 8)]:
        buf = RingBuffer(10, dtype=dtype)
        assert buf.nbytes == 0
        buf.write(torch.randn(3, 5, dtype=torch.float64))
        assert buf.read().dtype == dtype
        assert buf.nbytes == 10 * 5 * size
    buf = RingBuffer(10, store_targets=True)
    buf.write(torch.randn(2, 5), torch.tensor([1, 2]))
    assert buf.nbytes == 10 * 5 * 4 + 10 * 8


def test_preallocation_and_reset_keep_storage():
    buf = RingBuffer(4, dim=3, device="cpu")
    assert buf.allocated and buf.nbytes == 48
    ptr = buf.data_ptr()
    buf.write(torch.ones(6, 3))
    buf.reset()
    assert len(buf) == 0 and buf.read().shape == (0, 3) and buf.data_ptr() == ptr
    buf.write(torch.full((1, 3), 2.0))
    assert buf.read().tolist() == [[2.0, 2.0, 2.0]]


def test_read_returns_copy():
    buf = RingBuffer(4)
    buf.write(torch.zeros(2, 2))
    out = buf.read()
    out += 5
    assert buf.read().sum() == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(capacity=0), "capacity"),
        (dict(capacity=2.5), "capacity"),
        (dict(capacity=4, dtype=torch.int32), "dtype"),
        (dict(capacity=4, dim=0), "dim"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RingBuffer(**kwargs)


def test_bad_writes():
    buf = RingBuffer(4)
    with pytest.raises(ValueError, match="2-D"):
        buf.write(torch.zeros(3))
    buf.write(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="width 3"):
        buf.write(torch.zeros(1, 4))
    tbuf = RingBuffer(4, store_targets=True)
    with pytest.raises(ValueError, match="targets"):
        tbuf.write(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        tbuf.write(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="store_targets"):
        buf.read_targets()
