"""MinibatchCKA (Nguyen, Raghu & Kornblith 2021) against a plain numpy implementation of the
unbiased HSIC (Song et al. 2012), written here from the paper's formula."""

import numpy as np
import pytest
import torch

from netprobe.metrics import MinibatchCKA, linear_cka


def _hsic1_numpy(x, y):
    """Song et al. (2012), eq. 5: unbiased HSIC of linear kernels with zeroed diagonals."""
    n = x.shape[0]
    k, l = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def _minibatch_cka_numpy(x, y, b):
    xy = xx = yy = 0.0
    for i in range(0, len(x), b):
        xb, yb = x[i:i + b], y[i:i + b]
        xy += _hsic1_numpy(xb, yb)
        xx += _hsic1_numpy(xb, xb)
        yy += _hsic1_numpy(yb, yb)
    return xy / np.sqrt(xx * yy)


@pytest.mark.parametrize("dx,dy", [(5, 7), (300, 40), (1000, 1000)])
def test_equals_the_numpy_reference(dx, dy):
    g = torch.Generator().manual_seed(dx)
    x = torch.randn(240, dx, generator=g, dtype=torch.float64)
    y = x[:, :1].repeat(1, dy) * 0.3 + torch.randn(240, dy, generator=g, dtype=torch.float64)
    acc = MinibatchCKA()
    for i in range(0, 240, 60):
        acc.update(x[i:i + 60], y[i:i + 60])
    assert acc.batches == 4
    assert float(acc.compute()) == pytest.approx(_minibatch_cka_numpy(x.numpy(), y.numpy(), 60), abs=1e-12)


def test_one_batch_is_the_debiased_linear_cka_and_unrelated_data_can_fall_below_zero():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(50, 20, generator=g), torch.randn(50, 30, generator=g)
    one = MinibatchCKA().update(x, y).compute()
    assert float(one) == pytest.approx(float(linear_cka(x, y, debiased=True)), abs=1e-10)
    vals = []
    for s in range(20):
        g = torch.Generator().manual_seed(s)
        vals.append(float(MinibatchCKA().update(torch.randn(40, 10, generator=g), torch.randn(40, 10, generator=g)).compute()))
    assert min(vals) < 0  # unbiased: not clipped


def test_invariances_merge_and_state():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 64, generator=g)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    a, b, c = MinibatchCKA(), MinibatchCKA(), MinibatchCKA()
    for i in range(0, 200, 50):
        a.update(x[i:i + 50], 3 * x[i:i + 50] @ q + 5)  # orthogonal map, isotropic scale, shift
        (b if i < 100 else c).update(x[i:i + 50], x[i:i + 50] * 2)
    assert float(a.compute()) == pytest.approx(1.0, abs=1e-12)
    whole = MinibatchCKA()
    for i in range(0, 200, 50):
        whole.update(x[i:i + 50], x[i:i + 50] * 2)
    merged = b.merge(c)
    assert merged.batches == 4 and torch.allclose(merged.compute(), whole.compute(), atol=1e-14)
    restored = MinibatchCKA()
    restored.load_state_dict(whole.state_dict())
    assert torch.equal(restored.compute(), whole.compute()) and restored.batches == 4


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least 4 rows"):
        MinibatchCKA().update(torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match="empty"):
        MinibatchCKA().compute()
    with pytest.raises(ValueError, match="finite"):
        MinibatchCKA().update(torch.full((8, 3), float("nan")), torch.randn(8, 3))
    with pytest.raises(ValueError, match="no estimable variance"):
        MinibatchCKA().update(torch.ones(8, 3), torch.randn(8, 3)).compute()


def _worker(rank, world, port, outdir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(300, 50, generator=g)
        y = x @ torch.randn(50, 20, generator=g) + torch.randn(300, 20, generator=g)
        acc = MinibatchCKA()
        for i in (range(0, 200, 50) if rank == 0 else range(200, 300, 50)):  # 4 batches and 2
            acc.update(x[i:i + 50], y[i:i + 50])
        acc.all_reduce()
        torch.save({"value": acc.compute(), "batches": acc.batches}, f"{outdir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_merge_exactly(tmp_path):
    import torch.multiprocessing as mp
    from free_port import free_port

    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 50, generator=g)
    y = x @ torch.randn(50, 20, generator=g) + torch.randn(300, 20, generator=g)
    whole = MinibatchCKA()
    for i in range(0, 300, 50):
        whole.update(x[i:i + 50], y[i:i + 50])
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["batches"] == 6 and float(got["value"]) == pytest.approx(float(whole.compute()), abs=1e-12)
