"""reduce="sample": within one forward pass, the layers of one spatial size share the drawn positions.

Row i of two sampled layers of the same spatial size is the same input and the same position, so a
row-wise similarity between them is meaningful (before, each layer drew its own positions: linear
CKA between a layer and 2 * layer + 1 came out near 0 instead of 1).
"""

import copy

import pytest
import torch
from torch import nn

import netprobe
from netprobe.metrics import linear_cka

K = 5  # positions per input


class Affine(nn.Module):
    """An elementwise module: ``2 x + 1`` (linear CKA with its input is exactly 1)."""

    def forward(self, x):
        return 2 * x + 1


class TwoScales(nn.Module):
    """8x8 layers (conv1, aff, act) then 4x4 layers (pool, conv2)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.aff = Affine()
        self.act = nn.Tanh()
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h = self.act(self.aff(self.conv1(x)))
        h = self.conv2(self.pool(h))
        return self.head(h.mean(dim=(2, 3)))


LAYERS = ["conv1", "aff", "act", "pool", "conv2"]
SIZE = {"conv1": 64, "aff": 64, "act": 64, "pool": 16, "conv2": 16}


def _positions(rows: torch.Tensor, full: torch.Tensor, n: int) -> torch.Tensor:
    """Which position of its input each sampled row is: ``(n, K)`` indices, from the same layer's
    full ``(n, C * P)`` capture (``reduce="flatten"``) of the same forward pass."""
    c = rows.shape[1]
    grid = full.reshape(n, c, -1).transpose(1, 2)  # (n, P, C)
    blocks = rows.reshape(n, K, c)
    same = (blocks[:, :, None, :] == grid[:, None, :, :]).all(-1)  # (n, K, P): exactly equal rows
    assert torch.all(same.sum(-1) == 1), "a sampled row is not exactly one position of its input"
    return same.int().argmax(-1)


def _capture(model, x, *, passes=1, generator=None):
    """Sampled rows and the positions they came from, per layer and per forward pass."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    sampled = netprobe.probe(model, LAYERS, reduce="sample", positions=K, generator=g, capacity=10_000)
    full = netprobe.probe(model, LAYERS, reduce="flatten", capacity=10_000)
    with sampled, full, torch.no_grad():
        for _ in range(passes):
            model(x)
    n = x.shape[0]
    out = []
    for t in range(passes):
        rows = {name: sampled[name][t * n * K:(t + 1) * n * K] for name in LAYERS}
        pos = {name: _positions(rows[name], full[name][t * n:(t + 1) * n], n) for name in LAYERS}
        out.append((rows, pos))
    return out


def test_layers_of_one_spatial_size_sample_the_same_positions():
    torch.manual_seed(0)
    model = TwoScales()
    x = torch.randn(4, 3, 8, 8)
    [(rows, pos)] = _capture(model, x)
    # 8x8: conv1, its elementwise successors; 4x4: the pool and the conv after it
    assert torch.equal(pos["conv1"], pos["aff"]) and torch.equal(pos["conv1"], pos["act"])
    assert torch.equal(pos["pool"], pos["conv2"])
    torch.testing.assert_close(rows["aff"], 2 * rows["conv1"] + 1)
    torch.testing.assert_close(rows["act"], torch.tanh(rows["aff"]))
    # layers of different spatial sizes still work: distinct positions within an input, in range
    for name in LAYERS:
        assert rows[name].shape[0] == 4 * K
        assert all(len(set(r.tolist())) == K for r in pos[name])
        assert int(pos[name].max()) < SIZE[name]


def test_linear_cka_between_a_layer_and_an_affine_function_of_it_is_one():
    torch.manual_seed(1)
    model = TwoScales()
    x = torch.randn(16, 3, 8, 8)
    with netprobe.probe(model, ["conv1", "aff"], reduce="sample", positions=8,
                        generator=torch.Generator().manual_seed(3)) as p, torch.no_grad():
        model(x)
        model(torch.randn(16, 3, 8, 8))
    assert p["conv1"].shape == (2 * 16 * 8, 6)
    cka = float(linear_cka(p["conv1"], p["aff"]))
    assert cka == pytest.approx(1.0, abs=1e-6)


def test_each_forward_pass_draws_new_positions():
    torch.manual_seed(2)
    model = TwoScales()
    x = torch.randn(4, 3, 8, 8)
    passes = _capture(model, x, passes=3)
    for rows, pos in passes:  # aligned within each pass
        assert torch.equal(pos["conv1"], pos["aff"]) and torch.equal(pos["pool"], pos["conv2"])
    # the same input, new positions in every pass
    for a in range(3):
        for b in range(a + 1, 3):
            assert not torch.equal(passes[a][1]["conv1"], passes[b][1]["conv1"])
            assert not torch.equal(passes[a][1]["pool"], passes[b][1]["pool"])


def test_equally_seeded_probes_on_two_networks_draw_the_same_positions():
    torch.manual_seed(3)
    a = TwoScales()
    b = copy.deepcopy(a)
    with torch.no_grad():
        for prm in b.parameters():  # same architecture, other weights
            prm.copy_(torch.randn_like(prm))
    x = torch.randn(4, 3, 8, 8)
    got = [_capture(m, x, passes=2, generator=torch.Generator().manual_seed(11)) for m in (a, b)]
    for (_, pos_a), (_, pos_b) in zip(*got):
        for name in LAYERS:
            assert torch.equal(pos_a[name], pos_b[name])
        assert torch.equal(pos_a["conv1"], pos_a["act"]) and torch.equal(pos_a["pool"], pos_a["conv2"])


def test_reset_keeps_alignment():
    torch.manual_seed(4)
    model = TwoScales()
    x = torch.randn(4, 3, 8, 8)
    with netprobe.probe(model, ["conv1", "aff"], reduce="sample", positions=K) as p, torch.no_grad():
        model(x)
        first = p["conv1"].clone()
        p.reset()
        assert p.num_rows("conv1") == 0
        model(x)
        torch.testing.assert_close(p["aff"], 2 * p["conv1"] + 1)
        assert not torch.equal(p["conv1"], first)


def test_compiled_model_aligns_rows_within_a_pass_and_draws_anew_per_pass():
    torch._dynamo.reset()
    torch.manual_seed(5)
    model = TwoScales().eval()
    x = torch.randn(4, 3, 8, 8)
    p = netprobe.Probe(model, ["conv1", "aff", "pool", "conv2"], reduce="sample", positions=K).attach()
    try:
        cm = torch.compile(model, backend="aot_eager")  # attached before compiling
        with torch.no_grad():
            for _ in range(3):
                cm(x)
    finally:
        p.detach()
    assert p["conv1"].shape == (3 * 4 * K, 6) and p["conv2"].shape == (3 * 4 * K, 5)
    torch.testing.assert_close(p["aff"], 2 * p["conv1"] + 1)
    blocks = p["conv1"].reshape(3, 4 * K, 6)
    assert not torch.equal(blocks[0], blocks[1]) and not torch.equal(blocks[1], blocks[2])
    # the 4x4 pair: conv2's rows are conv2 applied at the pooled map's sampled positions
    with torch.no_grad():
        pooled = model.pool(model.act(model.aff(model.conv1(x))))
        conv2 = model.conv2(pooled)
    pool_rows, conv2_rows = p["pool"].reshape(3, 4, K, 6), p["conv2"].reshape(3, 4, K, 5)
    grid_pool = pooled.flatten(2).transpose(1, 2)  # (4, 16, 6)
    grid_conv2 = conv2.flatten(2).transpose(1, 2)  # (4, 16, 5)
    for t in range(3):
        for i in range(4):
            at = torch.cdist(pool_rows[t, i].double(), grid_pool[i].double()).argmin(1)
            torch.testing.assert_close(conv2_rows[t, i], grid_conv2[i, at])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rows_aligned_without_sync():
    torch.manual_seed(6)
    model = TwoScales().cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    with netprobe.probe(model, ["conv1", "aff", "pool", "conv2"], reduce="sample", positions=K) as p, torch.no_grad():
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert p.buffers["aff"].device.type == "cuda"
    torch.testing.assert_close(p["aff"], 2 * p["conv1"] + 1)
    blocks = p["conv1"].reshape(3, 4 * K, 6)
    assert not torch.equal(blocks[0], blocks[1])
