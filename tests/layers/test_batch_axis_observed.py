"""The batch axis of every call site is observed (two batch sizes, the axis that follows them),
explicit layouts are checked against it, and what has no batch axis is refused with advice that
works (``netprobe.layers.Layouts``)."""

import gc
import subprocess
import sys
import textwrap

import numpy as np

import pytest
import torch
from torch import nn

import netprobe
from netprobe.metrics import ablation_curve, noise_curve, unit_importance


class TokenNet(nn.Module):
    """Batch-first (N, T, D) -> Linear -> ReLU (units last) -> mean over T -> class scores."""

    def __init__(self, d=8, hidden=6, classes=3):
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.act(self.fc(x)).mean(1))


def _tokens(n=6, t=10, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_declared_layout_contradicting_the_observed_batch_axis_is_refused_everywhere():
    torch.manual_seed(0)
    m = TokenNet().eval()
    x, y = _tokens()  # (6, 10, 8): batch first
    with netprobe.probe(m, ["act"], layout="LNC"), pytest.raises(ValueError, match="batch is axis 0"):
        m(x)
    with pytest.raises(ValueError, match="batch is axis 0"):
        ablation_curve(m, "act", (x, y), layout="LNC")
    with pytest.raises(ValueError, match="batch is axis 0"):
        unit_importance(m, "act", (x, y), layout="CNL")
    with pytest.raises(ValueError, match="batch is axis 0"):
        noise_curve(m, "act", (x, y), layout="LNC", scales=[0, 1.0])
    # the layout that agrees is taken, and gives one row per input
    with netprobe.probe(m, ["act"], layout="NLC") as p:
        m(x)
    torch.testing.assert_close(p["act"], m.act(m.fc(x)).detach().mean(1))


def test_declared_units_contradicting_the_module_type_are_refused():
    m = TokenNet().eval()
    x, _ = _tokens()
    with netprobe.probe(m, ["fc"], layout="NCL"), pytest.raises(ValueError, match="units are on axis 2"):
        m(x)


class Windows(nn.Module):
    """Swin-style window partition: (N, 16, D) -> (N * 4, 4, D), no axis of the batch size."""

    def forward(self, x):
        n, t, d = x.shape
        return x.reshape(n * 4, t // 4, d)


class WindowNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.win, self.act, self.head = nn.Linear(8, 8), Windows(), nn.GELU(), nn.Linear(8, 3)

    def forward(self, x):
        h = self.act(self.win(self.fc(x)))
        return self.head(h.reshape(x.shape[0], -1, 8).mean(1))


def test_an_output_without_a_batch_axis_is_refused_with_or_without_layout():
    m = WindowNet().eval()
    x = torch.randn(6, 16, 8)  # (N, T, D); windows: (24, 4, 8)
    for layout in (None, "NCL", "NLC"):
        with netprobe.probe(m, ["act"], layout=layout), pytest.raises(ValueError, match="enclosing block.*reduce="):
            m(x)
    # the advice works: a callable reduce maps the windows back to rows per input
    with netprobe.probe(m, ["act"], reduce=lambda out: out.reshape(6, -1, 8).mean(1)) as p:
        m(x)
    assert p["act"].shape == (6, 8)


class MaskFirst(nn.Module):
    """forward(mask, x): the first tensor is an (L, L) attention mask, the batch is x's first axis."""

    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.act, self.head = nn.ReLU(), nn.Linear(8, 3)

    def forward(self, mask, x):
        a, _ = self.att(x, x, x, attn_mask=mask)
        return self.head(self.act(a).mean(1))


def test_a_mask_before_the_inputs_is_refused_never_read_as_the_batch():
    torch.manual_seed(0)
    m = MaskFirst().eval()
    mask = torch.zeros(10, 10, dtype=torch.bool)
    x = torch.randn(6, 10, 8)
    for layout in (None, "LNC"):
        with netprobe.probe(m, ["act"], layout=layout), pytest.raises(ValueError, match="observe=False"):
            m(mask, x)
    # the opt-out: nothing is run again, the declared batch axis is checked against the input rows
    with netprobe.probe(m, ["act"], observe=False, layout="NLC") as p:
        m(mask, x)
    assert p["act"].shape == (6, 8)


def test_relu_after_batch_first_attention_is_followed():
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.act, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.ReLU(), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.act(self.att(x, x, x)[0]).mean(1))

    m = M().eval()
    x = torch.randn(6, 10, 8)
    with netprobe.probe(m, ["act"]) as p:
        m(x)
    torch.testing.assert_close(p["act"], m.act(m.att(x, x, x)[0]).detach().mean(1))


class Reused(nn.Module):
    """One GELU after a Conv1d (N, C, L) and after a Linear (N, L, C), with C == L."""

    def __init__(self, c=6):
        super().__init__()
        self.conv, self.fc, self.act = nn.Conv1d(c, c, 3, padding=1), nn.Linear(c, c), nn.GELU()
        self.head = nn.Linear(c, 3)

    def forward(self, x):  # x (N, C, L)
        a = self.act(self.conv(x))  # (N, C, L): units on axis 1
        b = self.act(self.fc(a.transpose(1, 2).contiguous()))  # (N, L, C): units on axis 2
        return self.head(b.mean(1))


def test_a_module_used_at_two_call_sites_is_decided_per_call():
    torch.manual_seed(0)
    m = Reused().eval()
    x = torch.randn(5, 6, 6)
    with netprobe.probe(m, ["act"]) as p:
        m(x)
    with torch.no_grad():
        a = m.act(m.conv(x))
        b = m.act(m.fc(a.transpose(1, 2).contiguous()))
    torch.testing.assert_close(p["act"], torch.cat([a.mean(2), b.mean(1)]))


@torch.jit.script
def _scripted_swap(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).contiguous()


class Swap(nn.Module):
    """Swaps the last two axes of a square (N, C, C) tensor where netprobe cannot see it."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, h):
        if self.how == "script":
            return _scripted_swap(h)
        return torch.from_numpy(np.ascontiguousarray(h.detach().numpy().transpose(0, 2, 1)))


class SquareSwap(nn.Module):
    """conv (N, C, C) -> an unseen transpose (same shape) -> ReLU: the units are not known after it."""

    def __init__(self, how):
        super().__init__()
        self.conv, self.swap, self.act, self.head = nn.Conv1d(2, 6, 3, padding=1), Swap(how), nn.ReLU(), nn.Linear(36, 3)

    def forward(self, x):
        return self.head(self.act(self.swap(self.conv(x))).flatten(1))


@pytest.mark.parametrize("how", ["script", "numpy"])
@pytest.mark.parametrize("layer", ["swap", "act"])
def test_an_unseen_square_transpose_is_refused_not_read_channels_first(how, layer):
    m = SquareSwap(how).eval()
    x = torch.randn(4, 2, 6)
    with netprobe.probe(m, [layer]), pytest.raises(ValueError, match="layout="):
        m(x)


class ConvNeXtBlock(nn.Module):
    """The ConvNeXt block's layout changes, as its code writes them (each step rebinds ``x``):
    depthwise conv -> NHWC -> LayerNorm -> Linear -> GELU -> Linear -> NCHW (here to another
    width, as at a stage's end, so that nothing but the followed permutes can tell the layout)."""

    def __init__(self, c=8, out=12):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm, self.pw1, self.act, self.pw2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, out)

    def forward(self, x):
        x = self.dw(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.pw1(x)
        x = self.act(x)
        x = self.pw2(x)
        x = x.permute(0, 3, 1, 2)
        return x


class ConvNeXtNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.out_act = nn.Conv2d(1, 8, 2, stride=2), ConvNeXtBlock(), nn.GELU()
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.out_act(self.block(self.stem(x))).mean((2, 3)))


CONVNEXT_LAYERS = ["block.act", "block", "out_act"]


def _convnext_rows():
    torch.manual_seed(0)
    m = ConvNeXtNet().eval()
    x = torch.randn(4, 1, 8, 8)
    with netprobe.probe(m, CONVNEXT_LAYERS) as p:
        m(x)
    return {n: p[n] for n in CONVNEXT_LAYERS}, m, x


def test_convnext_block_is_followed_through_its_permutes():
    rows, m, x = _convnext_rows()
    with torch.no_grad():
        s = m.stem(x)
        act = m.block.act(m.block.pw1(m.block.norm(m.block.dw(s).permute(0, 2, 3, 1))))
        blk = m.block(s)
    torch.testing.assert_close(rows["block.act"], act.mean((1, 2)))  # units last (NHWC)
    torch.testing.assert_close(rows["block"], blk.mean((2, 3)))  # back to NCHW: channels
    torch.testing.assert_close(rows["out_act"], m.out_act(blk).mean((2, 3)))


_CONVNEXT_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_batch_axis_observed import _convnext_rows
    rows, _, _ = _convnext_rows()
    print({{n: tuple(r.shape) for n, r in rows.items()}}, round(float(sum(r.sum() for r in rows.values())), 4))
""")


@pytest.mark.slow
def test_convnext_pattern_decides_identically_in_fresh_processes():
    import os
    from concurrent.futures import ThreadPoolExecutor

    script = _CONVNEXT_SCRIPT.format(tests=os.path.dirname(__file__))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def one(_):
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        return r.stdout.strip() if r.returncode == 0 else "FAILED: " + r.stderr[-500:]

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(one, range(50)))
    assert len(set(outs)) == 1 and not outs[0].startswith("FAILED"), outs[:3]


def test_convnext_pattern_decides_identically_whatever_the_allocator_did():
    import gc

    first = None
    keep = []
    for i in range(20):
        keep.append(torch.randn(4 + i, 8, 4, 4))  # vary what the allocator holds
        gc.collect()
        rows, _, _ = _convnext_rows()
        sig = {n: r.clone() for n, r in rows.items()}
        if first is None:
            first = sig
        for n in CONVNEXT_LAYERS:
            torch.testing.assert_close(sig[n], first[n])


class SeqNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.act(self.fc(x)).mean(1))


def test_sequence_length_equal_to_the_probe_set_never_stops_a_fit():
    pl = pytest.importorskip("pytorch_lightning")
    from zoo_models import lit_class

    from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor

    torch.manual_seed(0)
    n, t = 64, 64  # T == num_samples == the measurement batch; the start-up check uses 16 rows
    x = torch.randn(n, t, 4)
    y = (x[:, :, 0].mean(1) > 0).long() + (x[:, :, 1].mean(1) > 0).long()
    mons = [SelectivityMonitor(["net.act"], num_samples=n), RelianceMonitor(["net.act"], num_samples=n, repeats=1),
            ConvergenceMonitor(["net.act"], num_samples=n)]
    tr = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, max_epochs=2, callbacks=mons)
    tr.fit(lit_class(pl)(SeqNet()), torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16))
    for key in ("netprobe/selectivity_mean", "netprobe/reliance_auc", "netprobe/cka_prev"):
        assert key in tr.callback_metrics, sorted(tr.callback_metrics)


def test_a_monitor_observes_each_layer_once_and_carries_the_decision(monkeypatch):
    pl = pytest.importorskip("pytorch_lightning")
    from lightning_helpers import digits, loader, make_module, trainer

    from netprobe.layers import Layouts
    from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor

    calls = []
    real = Layouts._observe

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(Layouts, "_observe", counted)
    x, y = digits(200)
    counts = []
    for epochs in (1, 3):
        calls.clear()
        mons = [SelectivityMonitor(["relu1"], num_samples=32), RelianceMonitor(["relu1", "relu2"], num_samples=32, repeats=1),
                ConvergenceMonitor(["relu2"], num_samples=32)]
        trainer(pl, max_epochs=epochs, callbacks=mons).fit(make_module(pl), loader(x, y))
        counts.append(len(calls))
    assert counts[0] == counts[1] > 0  # the later epochs' measurements observe nothing again


def test_a_module_used_at_two_call_sites_of_other_widths_is_refused_naming_why():
    class TwoWidths(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc, self.act = nn.Conv1d(6, 6, 3, padding=1), nn.Linear(6, 4), nn.GELU()
            self.head = nn.Linear(4, 3)

        def forward(self, x):  # x (N, 6, L)
            a = self.act(self.conv(x))  # 6 units
            b = self.act(self.fc(a.transpose(1, 2)))  # 4 units
            return self.head(b.mean(1))

    m = TwoWidths().eval()
    with netprobe.probe(m, ["act"]), pytest.raises(ValueError, match="4 units at this call, but 6 at an earlier one.*own module"):
        m(torch.randn(5, 6, 9))


class _Flip(nn.Module):
    """(N, D) rows, or their transpose when called with ``flip=True``."""

    def forward(self, x, flip=False):
        return x.t() if flip else x


class _FlipNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.flip = _Flip()

    def forward(self, x, flip=False):
        return self.flip(self.lin(x), flip=flip)


def test_a_plain_argument_that_changes_the_layout_is_observed_afresh():
    """The decision for ``flip=False`` is not carried to ``flip=True`` (the same tensor shapes, a
    square output): each is observed, and the rows read are one per input in both."""
    torch.manual_seed(0)
    net, x = _FlipNet().eval(), torch.randn(8, 8)
    seen = netprobe.LayoutDecisions()
    for flip in (False, True):
        with netprobe.probe(net, ["flip"], capacity=8, observe=seen) as p:
            with torch.no_grad():
                out = net(x, flip=flip)
        rows = p["flip"]
        torch.testing.assert_close(rows, out.t() if flip else out)


def test_a_callable_selector_is_never_confused_with_a_later_one():
    """Selectors made and dropped one after another (CPython reuses their addresses): each one's
    decision is its own, so every capture reads rows one per input."""

    class Pair(nn.Module):
        def forward(self, x):
            return x, x.t().contiguous()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            return self.pair(x)

    net, x = Net(), torch.randn(6, 6)
    seen = netprobe.LayoutDecisions()
    for i in range(6):
        want_first = i % 2 == 0
        select = (lambda out: out[0]) if want_first else (lambda out: out[1])
        with netprobe.probe(net, ["pair"], capacity=6, select=select, observe=seen) as p:
            a, b = net(x)
        torch.testing.assert_close(p["pair"], a if want_first else b.t())
        del select, p
        gc.collect()


def test_an_object_argument_the_forward_changes_is_not_shared_with_the_observed_passes():
    """A forward that appends to a list-like state object: the observed passes run on copies, so
    the user's object sees exactly the user's calls."""

    class Log:
        def __init__(self):
            self.calls = []

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x, log):
            log.calls.append(x.shape[0])
            return self.lin(x)

    net, log = Net(), Log()
    with netprobe.probe(net, ["lin"], capacity=10) as p:
        net(torch.randn(10, 4), log)
    assert log.calls == [10]
    assert p["lin"].shape == (10, 3)


class _TimeFirst(nn.Module):
    """A sequence model written for ``(T, N, D)`` inputs with no ``batch_first`` module inside."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.proj(x))


def test_a_time_first_model_is_refused_with_advice_that_works():
    """``(T, N, D)`` inputs with no ``batch_first`` module look batch-first to observation: the
    declared ``"LNC"`` is refused naming ``observe=False``, and with it the rows read are one per
    input (the mean over time), not one per time step."""
    torch.manual_seed(0)
    net, x = _TimeFirst(), torch.randn(9, 5, 4)  # T = 9, N = 5
    with pytest.raises(ValueError, match="observe=False"):
        with netprobe.probe(net, ["act"], capacity=5, layout="LNC"):
            net(x)
    with netprobe.probe(net, ["act"], capacity=5, layout="LNC", observe=False) as p:
        out = net(x)
    torch.testing.assert_close(p["act"], out.mean(0))


def test_observation_leaves_a_train_override_as_it_found_it():
    """A module whose ``train()`` does more than set flags (here: freezes a parameter in eval):
    after the observed passes, its ``train(True)`` has run again."""

    class Freezing(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def train(self, mode=True):
            super().train(mode)
            self.lin.weight.requires_grad_(mode)
            return self

        def forward(self, x):
            return self.lin(x)

    net = Freezing().train()
    with netprobe.probe(net, ["lin"], capacity=6) as p:
        net(torch.randn(6, 4))
    assert net.training and net.lin.weight.requires_grad
    assert p["lin"].shape == (6, 3)
