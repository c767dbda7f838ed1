"""The probe: layer selection, reductions, output types, targets, safety, compile parity."""

import copy

import pytest
import torch
from torch import nn

import netprobe
from netprobe import Probe


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(Block(6), Block(6))
        self.drop = nn.Dropout(0.3)
        self.bn = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.bn(self.drop(self.encoder(x))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


def _hook_dicts(model):
    return {
        n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks),
            dict(getattr(m, "_forward_hooks_with_kwargs", {})))
        for n, m in model.named_modules()
    }


# ---------------------------------------------------------------- layer selection
def test_selection_mixed_names_globs_types_deduplicated():
    m = Net()
    p = Probe(m, ["encoder.0.fc", "encoder.*.fc", nn.BatchNorm1d, m.head, "head"])
    assert p.layers == ["encoder.0.fc", "encoder.1.fc", "bn", "head"]


def test_unknown_name_lists_close_names():
    with pytest.raises(ValueError, match=r"Unknown layer 'encoder.0.fcc'.*encoder.0.fc"):
        Probe(Net(), ["encoder.0.fcc"])


def test_pattern_and_type_matching_nothing_raise():
    with pytest.raises(ValueError, match="matches no module"):
        Probe(Net(), ["decoder.*"])
    with pytest.raises(ValueError, match="No module of type Conv2d"):
        Probe(Net(), [nn.Conv2d])
    with pytest.raises(ValueError, match="not a submodule"):
        Probe(Net(), [nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="at least one"):
        Probe(Net(), [])
    with pytest.raises(TypeError, match="entry of `layers`"):
        Probe(Net(), [3])


def test_bad_options():
    with pytest.raises(ValueError, match="capacity"):
        Probe(Net(), ["head"], capacity=0)
    with pytest.raises(ValueError, match="dtype"):
        Probe(Net(), ["head"], dtype=torch.int64)
    with pytest.raises(ValueError, match="reduce"):
        Probe(Net(), ["head"], reduce="median")
    with pytest.raises(ValueError, match="positions"):
        Probe(Net(), ["head"], reduce="sample")
    with pytest.raises(ValueError, match="not probed"):
        Probe(Net(), ["head"], reduce={"bn": "mean"})
    with pytest.raises(TypeError, match="Generator"):
        Probe(Net(), ["head"], generator=0)


# ---------------------------------------------------------------- capture values
def test_captures_exact_outputs_oldest_first():
    torch.manual_seed(0)
    m = Net().eval()
    xs = [torch.randn(5, 6) for _ in range(3)]
    with netprobe.probe(m, ["encoder.1", "head"], capacity=12) as p:
        outs = [m(x) for x in xs]
    assert torch.equal(p["head"], torch.cat(outs)[-12:])
    enc = torch.cat([m.encoder(x) for x in xs])[-12:]
    assert torch.equal(p["encoder.1"], enc)
    assert p.num_rows("head") == 12


def test_module_called_twice_records_one_block_per_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(self.fc(x))

    m = Twice()
    x = torch.randn(4, 3)
    with netprobe.probe(m, ["fc"]) as p:
        y = m(x)
    assert p["fc"].shape == (8, 3)
    assert torch.equal(p["fc"][:4], m.fc(x).detach())
    assert torch.equal(p["fc"][4:], y.detach())


def test_conv_reductions_against_direct_computation():
    torch.manual_seed(0)
    m = CNN()
    x = torch.randn(3, 2, 5, 5)
    out = m.relu(m.conv(x)).detach()
    with netprobe.probe(m, ["relu"], reduce="mean") as p:
        m(x)
    torch.testing.assert_close(p["relu"], out.mean(dim=(2, 3)), rtol=0, atol=1e-6)
    with netprobe.probe(m, ["relu"], reduce="flatten") as p:
        m(x)
    assert torch.equal(p["relu"], out.reshape(3, -1))
    g = torch.Generator().manual_seed(3)
    with netprobe.probe(m, ["relu"], reduce="sample", positions=4, generator=g) as p:
        m(x)
    rows = p["relu"]
    assert rows.shape == (12, 4)
    flat = out.flatten(2).transpose(1, 2)  # (N, HW, C)
    for i in range(3):
        block = rows[4 * i : 4 * i + 4]
        # every sampled row is one spatial position of input i, and the 4 positions are distinct
        matches = [int(((flat[i] - r).abs().sum(1) == 0).nonzero()[0]) for r in block]
        assert len(set(matches)) == 4


def test_sampling_is_reproducible_and_leaves_global_rng_alone():
    m = CNN()
    x = torch.randn(3, 2, 5, 5)
    state = torch.random.get_rng_state()
    res = []
    for _ in range(2):
        with netprobe.probe(m, ["conv"], reduce="sample", positions=5, generator=torch.Generator().manual_seed(7)) as p:
            m(x)
        res.append(p["conv"])
    assert torch.equal(res[0], res[1])
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError, match="at most 25"):
        with netprobe.probe(m, ["conv"], reduce="sample", positions=26):
            m(x)


def test_sequence_reductions():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(4, 5)

        def forward(self, x):  # (N, T, 4)
            return self.emb(x)

    m = Seq()
    x = torch.randn(2, 7, 4)
    out = m(x).detach()
    for reduce, expected in [("mean", out.mean(1)), ("last", out[:, -1]), ("flatten", out.reshape(2, -1))]:
        with netprobe.probe(m, ["emb"], reduce=reduce) as p:
            m(x)
        torch.testing.assert_close(p["emb"], expected, rtol=0, atol=1e-6)
    with netprobe.probe(m, ["emb"], reduce="sample", positions=3) as p:
        m(x)
    assert p["emb"].shape == (6, 5)
    with netprobe.probe(m, ["emb"], reduce=lambda o: o.amax(1)) as p:
        m(x)
    assert torch.equal(p["emb"], out.amax(1))


def test_conv1d_uses_channels_and_last_is_rejected_for_conv():
    m = nn.Sequential(nn.Conv1d(3, 4, 3))
    x = torch.randn(2, 3, 9)
    with netprobe.probe(m, ["0"]) as p:
        m(x)
    torch.testing.assert_close(p["0"], m(x).detach().mean(2))
    with pytest.raises(ValueError, match="'last' is for sequence"):
        with netprobe.probe(m, ["0"], reduce="last"):
            m(x)


def test_activations_after_a_conv1d_use_channels_and_after_a_linear_positions():
    from netprobe.metrics import ablation_curve

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(1, 8, 5), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1), nn.Conv1d(8, 12, 5),
                        nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(12, 3)).eval()
    x, y = torch.randn(30, 1, 40), torch.randint(0, 3, (30,))
    with netprobe.probe(net, ["2", "3", "5"]) as p:
        net(x)
    h2 = net[2](net[1](net[0](x))).detach()
    torch.testing.assert_close(p["2"], h2.mean(2))  # (N, C, L): the 8 channels are the units
    assert p["3"].shape == (30, 8) and p["5"].shape == (30, 12)
    assert ablation_curve(net, "2", (x, y)).order.shape == (3, 8)  # channels ablated, not positions

    class ActsFirst(nn.Module):  # activations declared before the convs, in their own ModuleList
        def __init__(self):
            super().__init__()
            self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU()])
            self.convs = nn.ModuleList([nn.Conv1d(1, 8, 5), nn.Conv1d(8, 12, 5)])
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            return self.head(self.acts[1](self.convs[1](self.acts[0](self.convs[0](x)))).mean(2))

    m = ActsFirst()
    with netprobe.probe(m, ["acts.0", "acts.1"]) as p:
        m(x)
    assert p["acts.0"].shape == (30, 8) and p["acts.1"].shape == (30, 12)

    class Seq(nn.Module):  # (N, T, D): after a Linear, or a conv's output transposed to a sequence
        def __init__(self):
            super().__init__()
            self.emb, self.act = nn.Linear(4, 16), nn.GELU()
            self.conv, self.act2 = nn.Conv1d(4, 16, 1), nn.ReLU()

        def forward(self, x):
            return self.act(self.emb(x)) + self.act2(self.conv(x.transpose(1, 2)).transpose(1, 2))

    m = Seq()
    xs = torch.randn(5, 7, 4)
    with netprobe.probe(m, ["act", "act2"]) as p:
        m(xs)
    torch.testing.assert_close(p["act"], m.act(m.emb(xs)).detach().mean(1))
    assert p["act2"].shape == (5, 16)


def test_per_layer_reduce_and_bad_callable():
    m = CNN()
    x = torch.randn(2, 2, 4, 4)
    with netprobe.probe(m, ["conv", "fc"], reduce={"conv": "flatten"}) as p:
        m(x)
    assert p["conv"].shape == (2, 64) and p["fc"].shape == (2, 3)
    with pytest.raises(ValueError, match="must return a 2-D"):
        with netprobe.probe(m, ["conv"], reduce=lambda o: o):
            m(x)


def test_storage_dtype_and_nbytes_exact():
    m = Net().eval()
    with netprobe.probe(m, ["encoder.0", "head"], capacity=10, dtype=torch.bfloat16) as p:
        assert p.nbytes == 0
        m(torch.randn(4, 6))
    assert p["head"].dtype == torch.bfloat16
    assert p.nbytes == 10 * 6 * 2 + 10 * 3 * 2


# ---------------------------------------------------------------- output types
class Multi(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.inner = nn.Linear(3, 3)

    def forward(self, x):
        h = self.inner(x)
        if self.kind == "tuple":
            return (h, h * 2)
        if self.kind == "dict":
            return {"a": h, "b": h * 2}
        return "not a tensor"


class Wrap(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.m = Multi(kind)

    def forward(self, x):
        return self.m(x)


def test_tuple_dict_and_other_outputs():
    x = torch.randn(2, 3)
    w = Wrap("tuple")
    with netprobe.probe(w, ["m"]) as p:
        out = w(x)
    assert torch.equal(p["m"], out[0].detach())
    with netprobe.probe(w, ["m"], select=1) as p:
        out = w(x)
    assert torch.equal(p["m"], out[1].detach())
    w = Wrap("dict")
    with netprobe.probe(w, ["m"], select={"m": "b"}) as p:
        out = w(x)
    assert torch.equal(p["m"], out["b"].detach())
    with pytest.raises(TypeError, match="dict-like output with keys"):
        with netprobe.probe(w, ["m"]):
            w(x)
    w = Wrap("other")
    with pytest.raises(TypeError, match=r"Layer 'm' returned str"):
        with netprobe.probe(w, ["m"]):
            w(x)


# ---------------------------------------------------------------- targets
def test_targets_stored_beside_rows_and_missing_targets_reported():
    m = CNN()
    with netprobe.probe(m, ["conv", "fc"], store_targets=True, reduce={"conv": "sample"}, positions=2) as p:
        for b in range(3):
            p.set_targets(torch.tensor([b, b + 10]))
            m(torch.randn(2, 2, 4, 4))
    assert p.targets("fc").tolist() == [0, 10, 1, 11, 2, 12]
    assert p.targets("conv").tolist() == [0, 0, 10, 10, 1, 1, 11, 11, 2, 2, 12, 12]
    p.reset()
    with p:
        m(torch.randn(2, 2, 4, 4))  # no targets set
    with pytest.raises(ValueError, match="no targets were set"):
        p.targets("fc")
    with pytest.raises(ValueError, match="store_targets"):
        netprobe.probe(m, ["fc"]).set_targets(torch.zeros(2))


def test_unknown_and_empty_reads():
    p = Probe(Net(), ["head"])
    with pytest.raises(KeyError, match="not a probed layer"):
        p["haed"]
    with pytest.raises(ValueError, match="captured nothing"):
        p["head"]


# ---------------------------------------------------------------- safety
def test_outputs_and_gradients_bit_identical():
    torch.manual_seed(0)
    m1 = Net()
    m2 = copy.deepcopy(m1)
    x = torch.randn(16, 6)
    y = torch.randint(0, 3, (16,))
    torch.manual_seed(1)
    loss1 = nn.functional.cross_entropy(m1(x), y)
    loss1.backward()
    with netprobe.probe(m2, ["encoder.*", nn.BatchNorm1d, "head"], reduce="flatten") as p:
        torch.manual_seed(1)  # same dropout mask
        loss2 = nn.functional.cross_entropy(m2(x), y)
        loss2.backward()
    assert torch.equal(loss1, loss2)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(a.grad, b.grad), n
    for a, b in zip(m1.buffers(), m2.buffers()):
        assert torch.equal(a, b)
    assert not p["head"].requires_grad and p["head"].grad_fn is None


def test_hooks_removed_after_exception_and_user_hooks_untouched():
    m = Net()
    user = m.head.register_forward_hook(lambda *a: None)
    before = _hook_dicts(m)
    with pytest.raises(RuntimeError, match="boom"):
        with netprobe.probe(m, ["encoder.*", "head"]):
            m(torch.randn(2, 6))
            raise RuntimeError("boom")
    assert _hook_dicts(m) == before
    user.remove()
    # and when the forward itself fails inside the probe
    with pytest.raises(RuntimeError):
        with netprobe.probe(m, ["head"]):
            m(torch.randn(2, 5))  # wrong width
    assert all(not m._forward_hooks for m in m.modules())


def test_attach_detach_explicit_and_double_attach():
    m = Net()
    p = Probe(m, ["head"])
    p.attach()
    with pytest.raises(RuntimeError, match="already attached"):
        p.attach()
    m(torch.randn(2, 6))
    p.detach()
    p.detach()  # idempotent
    m(torch.randn(2, 6))
    assert p.num_rows("head") == 2 and not p.attached


def test_pause_without_removing_hooks():
    m = Net().eval()
    with netprobe.probe(m, ["head"]) as p:
        m(torch.randn(2, 6))
        n_hooks = len(m.head._forward_hooks)
        with p.paused():
            m(torch.randn(3, 6))
            assert len(m.head._forward_hooks) == n_hooks
        p.enabled = False
        m(torch.randn(3, 6))
        p.enabled = True
        m(torch.randn(1, 6))
    assert p.num_rows("head") == 3


def test_compile_parity():
    torch.manual_seed(0)
    m = Net().eval()
    xs = [torch.randn(4, 6) for _ in range(3)]
    with netprobe.probe(m, ["encoder.0", "head"]) as eager:
        ref = [m(x) for x in xs]
    p = Probe(m, ["encoder.0", "head"]).attach()  # attach before compiling
    try:
        cm = torch.compile(m, backend="aot_eager")
        got = [cm(x) for x in xs]
        with p.paused():
            cm(xs[0])
        cm(xs[1])
    finally:
        p.detach()
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(p["head"][:12], eager["head"])
    torch.testing.assert_close(p["encoder.0"][:12], eager["encoder.0"])
    torch.testing.assert_close(p["head"][12:], eager["head"][4:8])  # paused call left no rows
    assert p.num_rows("head") == 16


def test_pausing_does_not_recompile():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(4, 6)
    p = Probe(m, ["encoder.0", "head"]).attach()
    try:
        cm = torch.compile(m, backend="aot_eager")
        cm(x)
        frames = counters["stats"]["unique_graphs"]
        assert frames >= 1  # the counter sees compilation at all
        for _ in range(3):  # toggling capture off and on many times
            with p.paused():
                cm(x)
            p.enabled = False
            cm(x)
            p.enabled = True
            cm(x)
        assert counters["stats"]["unique_graphs"] == frames  # no new graph per toggle
    finally:
        p.detach()
    assert p.num_rows("head") == 4 * 4  # the first call and the 3 re-enabled ones


def test_hook_path_never_synchronises(monkeypatch):
    """No .item()/.tolist()/.cpu()/bool() of a tensor inside the hooks (host-sync free on GPU)."""
    m = CNN().eval()
    x = torch.randn(3, 2, 5, 5)
    p = netprobe.probe(m, ["conv", "relu", "fc"], reduce={"conv": "sample"}, positions=3, store_targets=True)
    p.set_targets(torch.arange(3))

    def forbidden(*a, **k):
        raise AssertionError("host synchronisation inside the capture path")

    with p:
        for attr in ("item", "tolist", "cpu", "__bool__", "numpy"):
            monkeypatch.setattr(torch.Tensor, attr, forbidden)
        try:
            for _ in range(5):
                m(x)
        finally:
            monkeypatch.undo()
    assert p["fc"].shape == (15, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_buffers_stay_on_device_without_sync():
    m = CNN().cuda()
    x = torch.randn(8, 2, 6, 6, device="cuda")
    with netprobe.probe(m, ["relu", "fc"], capacity=20, reduce={"relu": "sample"}, positions=4) as p:
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(4):
                m(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert p.buffers["relu"].device.type == "cuda" and p["fc"].shape == (20, 3)
    torch.testing.assert_close(p["fc"][-8:], m(x).detach())


@pytest.mark.slow
def test_compile_parity_inductor():
    torch.manual_seed(0)
    m = Net().eval()
    xs = [torch.randn(4, 6) for _ in range(2)]
    with netprobe.probe(m, ["encoder.1", "head"]) as eager:
        for x in xs:
            m(x)
    p = Probe(m, ["encoder.1", "head"]).attach()
    try:
        cm = torch.compile(m)
        for x in xs:
            cm(x)
    finally:
        p.detach()
    torch.testing.assert_close(p["head"], eager["head"])
    torch.testing.assert_close(p["encoder.1"], eager["encoder.1"])


def test_inference_mode_and_grad_mode_mix():
    """A first capture under torch.inference_mode() (Lightning's validation) must not break later ones."""
    m = nn.Sequential(nn.Linear(4, 3))
    xs = [torch.randn(2, 4) for _ in range(3)]
    with netprobe.probe(m, ["0"], store_targets=True) as p:
        for i, x in enumerate(xs):
            p.set_targets(torch.tensor([i, i]))
            if i % 2 == 0:
                with torch.inference_mode():
                    m(x)
            else:
                m(x).sum().backward()
    assert not p["0"].is_inference()
    torch.testing.assert_close(p["0"], m(torch.cat(xs)).detach())
    assert p.targets("0").tolist() == [0, 0, 1, 1, 2, 2]


def test_empty_batch_with_targets_and_ringbuffer_dim_are_checked():
    from netprobe import RingBuffer

    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with netprobe.probe(net, ["0"], capacity=8, store_targets=True) as p:
        p.set_targets(torch.zeros(0, dtype=torch.long))
        net(torch.zeros(0, 4))  # an empty batch is not an error
        p.set_targets(torch.tensor([1, 2]))
        net(torch.randn(2, 4))
    assert p["0"].shape == (2, 3) and p.targets("0").tolist() == [1, 2]
    with pytest.raises(ValueError, match="width 3 .*`dim`.*got 5"):
        RingBuffer(4, dim=3).write(torch.zeros(2, 5))


def test_small_misuses_are_named():
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    with pytest.raises(ValueError, match="only used with reduce='sample'"):
        netprobe.Probe(m, ["1"], positions=3)

    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 8)

        def forward(self, x):
            h = self.lin(x)
            return h, {"a": h}

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = TwoOut()

        def forward(self, x):
            return self.block(x)[0]

    w = Wrap()
    with pytest.raises(IndexError, match=r"'block' returns a tuple of 2 items; `select=5` is out of range"):
        with netprobe.probe(w, ["block"], select=5):
            w(torch.randn(3, 4))
    with pytest.warns(RuntimeWarning, match="already compiled"):
        netprobe.Probe(torch.compile(w), ["_orig_mod.block"])
