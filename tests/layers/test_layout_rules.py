"""Layouts are known or refused, never guessed (sequence-first outputs, tuple outputs,
nested tensors, residual 1-D blocks) and the small "no silent wrong value" cases."""

import math

import pytest
import torch
from torch import nn

import netprobe
from netprobe.metrics import ablation_curve, noise_curve


def _enc(batch_first, d=16):
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 2, dim_feedforward=32, dropout=0.0, batch_first=batch_first),
                                 2, enable_nested_tensor=False).eval()


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_rows_are_batch_items(batch_first):
    enc = _enc(batch_first)
    x = torch.randn(12, 20, 16) if not batch_first else torch.randn(20, 12, 16)  # T=12, N=20
    with netprobe.probe(enc, ["layers.0", "layers.0.linear2", "layers.0.norm1"]) as p:
        enc(x)
    with torch.no_grad():
        h = enc.layers[0](x)
    seq = h if batch_first else h.transpose(0, 1)  # (N, T, D), by hand
    torch.testing.assert_close(p["layers.0"], seq.mean(1))
    assert p["layers.0.linear2"].shape == (20, 16) and p["layers.0.norm1"].shape == (20, 16)
    with netprobe.probe(enc, ["layers.0"], reduce="last") as p:
        enc(x)
    torch.testing.assert_close(p["layers.0"], seq[:, -1])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [False, True])
def test_rnn_rows_are_batch_items(cls, batch_first):
    torch.manual_seed(0)
    rnn = cls(8, 6, batch_first=batch_first)
    model = nn.Sequential(rnn)
    x = torch.randn(30, 15, 8) if batch_first else torch.randn(15, 30, 8)  # N=30, T=15
    with netprobe.probe(model, ["0"], store_targets=True) as p:
        p.set_targets(torch.arange(30))
        model(x)
    out = rnn(x)[0].detach()
    ref = (out if batch_first else out.transpose(0, 1)).mean(1)
    torch.testing.assert_close(p["0"], ref)
    assert p.targets("0").tolist() == list(range(30))


def test_multihead_attention_tuple_output():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2)  # batch_first=False: (L, N, E)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.head = mha, nn.Linear(8, 3)

        def forward(self, x):  # x (N, L, E), batch first at the model's entry
            s = x.transpose(0, 1)
            a, _ = self.att(s, s, s)
            return self.head(a.mean(0))

    m = M().eval()
    x = torch.randn(10, 7, 8)
    with netprobe.probe(m, ["att"]) as p:
        m(x)
    s = x.transpose(0, 1)
    torch.testing.assert_close(p["att"], mha(s, s, s)[0].detach().transpose(0, 1).mean(1))
    y = torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="select="):
        ablation_curve(m, "att", (x, y))
    r = ablation_curve(m, "att", (x, y), select=0, fractions=[0, 0.5, 1])
    assert r.order.shape == (3, 8)
    with torch.no_grad():
        base = (m(x).argmax(1) == y).double().mean()
        full = (m.head(torch.zeros(10, 8)).argmax(1) == y).double().mean()
    assert float(r.accuracy[0]) == pytest.approx(float(base)) and float(r.accuracy[-1]) == pytest.approx(float(full))
    noise_curve(m, "att", (x, y), select=0, scales=[0, 1.0])


class SeqFirstClassifier(nn.Module):
    """Batch-first input (N, T, D), a sequence-first encoder inside."""

    def __init__(self, rnn=False):
        super().__init__()
        self.rnn = rnn
        self.enc = nn.LSTM(8, 8) if rnn else _enc(False, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.enc(x.transpose(0, 1))
        h = h[0] if self.rnn else h
        return self.head(h.mean(0))


@pytest.mark.parametrize("rnn", [False, True])
def test_ablation_on_sequence_first_layer_ablates_features(rnn):
    torch.manual_seed(0)
    m = SeqFirstClassifier(rnn).eval()
    x, y = torch.randn(29, 6, 8), torch.randint(0, 3, (29,))
    layer = "enc" if rnn else "enc.layers.0"
    kw = {"select": 0} if rnn else {}
    perm = torch.randperm(8)
    r = ablation_curve(m, layer, (x, y), order=perm, fractions=[0, 0.5], **kw)
    # by hand: zero the first 4 features of the order, in the (T, N, D) output
    mod = m.enc if rnn else m.enc.layers[0]

    def zero(_, __, out):
        o = out[0] if rnn else out
        o = o.clone()
        o[..., perm[:4]] = 0
        return (o,) + tuple(out[1:]) if rnn else o

    h = mod.register_forward_hook(zero)
    with torch.no_grad():
        acc = (m(x).argmax(1) == y).double().mean()
    h.remove()
    assert float(r.accuracy[1]) == pytest.approx(float(acc))
    rn = noise_curve(m, layer, (x, y), scales=[0, 1.0], **kw)
    assert rn.count == 29


def test_padding_mask_nested_fast_path_refused_and_padded_path_right():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2).eval()  # enable_nested_tensor=True: the fast path
    x = torch.randn(5, 9, 16)
    mask = torch.zeros(5, 9, dtype=torch.bool)
    mask[:, 6:] = True
    with torch.no_grad(), netprobe.probe(enc, ["layers.0"]) as p:
        with pytest.raises(ValueError, match="enable_nested_tensor=False"):
            enc(x, src_key_padding_mask=mask)
    enc2 = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    with torch.no_grad(), netprobe.probe(enc2, ["layers.0"]) as p:
        enc2(x, src_key_padding_mask=mask)
    with torch.no_grad():
        ref = enc2.layers[0](x, src_key_padding_mask=mask).mean(1)
    torch.testing.assert_close(p["layers.0"], ref)
    enc3 = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, 0.0), 2).eval()  # batch_first=False
    xs = x.transpose(0, 1)
    with torch.no_grad(), netprobe.probe(enc3, ["layers.0"]) as p:
        enc3(xs, src_key_padding_mask=mask)
    with torch.no_grad():
        ref = enc3.layers[0](xs, src_key_padding_mask=mask).transpose(0, 1).mean(1)
    torch.testing.assert_close(p["layers.0"], ref)


class ResBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.act = nn.Conv1d(6, 6, 3, padding=1), nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x) + x)


def _resnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), ResBlock(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(6, 3)).eval()


def test_residual_1d_block_relu_followed_through_the_sum():
    # relu(conv(x) + x): the sum is followed (a function of two tensors, one of known layout)
    net = _resnet()
    x, y = torch.randn(8, 2, 11), torch.randint(0, 3, (8,))
    with netprobe.probe(net, ["1.act", "1"]) as p:
        net(x)
    h = net[1](net[0](x)).detach()
    torch.testing.assert_close(p["1.act"], h.mean(2))  # channels are the units
    torch.testing.assert_close(p["1"], h.mean(2))  # the block: same tensor, same rows
    assert ablation_curve(net, "1.act", (x, y)).order.shape == (3, 6)
    direct = ablation_curve(net, "1.act", (x, y), layout="NCL")
    torch.testing.assert_close(ablation_curve(net, "1.act", (x, y)).accuracy, direct.accuracy)
    noise_curve(net, "1.act", (x, y), scales=[0, 1.0])


class StackSum(nn.Module):
    """A sum computed through torch.stack(...).sum(0): not followed (``conv``: a 1-D or 2-D conv)."""

    def __init__(self, conv):
        super().__init__()
        self.conv, self.act = conv, nn.ReLU()

    def forward(self, x):
        return self.act(torch.stack([self.conv(x), x]).sum(0))


@pytest.mark.parametrize("nd", [1, 2])
def test_unfollowable_output_refused_then_right_with_layout(nd):
    torch.manual_seed(0)
    if nd == 1:
        net = nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), StackSum(nn.Conv1d(6, 6, 3, padding=1)), nn.AdaptiveAvgPool1d(1),
                            nn.Flatten(), nn.Linear(6, 3)).eval()
        x, y, units = torch.randn(8, 2, 11), torch.randint(0, 3, (8,)), 6
        told, layout, spatial = "layout='NCL'", "NCL", (2,)
    else:
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), StackSum(nn.Conv2d(4, 4, 3, padding=1)), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 3)).eval()
        x, y, units = torch.randn(6, 1, 5, 5), torch.randint(0, 3, (6,)), 4
        told, layout, spatial = "layout='NCHW' or 'NHWC'", "NCHW", (2, 3)
    with netprobe.probe(net, ["1.act"]), pytest.raises(ValueError, match=told):
        net(x)
    with netprobe.probe(net, ["1.act"], layout=layout) as p:
        net(x)
    torch.testing.assert_close(p["1.act"], net[1](net[0](x)).detach().mean(spatial))
    with pytest.raises(ValueError, match=told):
        ablation_curve(net, "1.act", (x, y))
    assert ablation_curve(net, "1.act", (x, y), layout=layout).order.shape == (3, units)
    with pytest.raises(ValueError, match=told):
        noise_curve(net, "1.act", (x, y))
    noise_curve(net, "1.act", (x, y), layout=layout, scales=[0, 1.0])


def test_sequence_length_equal_to_batch_size_is_decided_by_observation():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act = nn.Linear(4, 5), nn.Tanh()

        def forward(self, x):
            return self.act(self.fc(x))

    m = M()
    x = torch.randn(6, 6, 4)  # N == T: one call cannot tell the axes apart; two other batch sizes do
    with netprobe.probe(m, ["act"]) as p:
        m(x)
    torch.testing.assert_close(p["act"], m(x).detach().mean(1))
    with netprobe.probe(m, ["act"], layout="NLC") as p:
        m(x)
    torch.testing.assert_close(p["act"], m(x).detach().mean(1))
    # a declared sequence-first layout contradicts the observed batch axis: refused, naming the right one
    with netprobe.probe(m, ["act"], layout="LNC"), pytest.raises(ValueError, match="observed.*batch is axis 0.*'NCL' or 'NLC'"):
        m(x)


def test_no_axis_of_the_batch_size_raises():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):  # (N, T, 4) -> rows per token: (N * T, 3)
            return self.fc(x.reshape(-1, 4))

    m = Flat()
    with netprobe.probe(m, ["fc"]), pytest.raises(ValueError, match="layout="):
        m(torch.randn(5, 3, 4))


def test_bad_layout_strings():
    m = nn.Sequential(nn.Linear(4, 3))
    for bad in ["NN", "XC", "C", "NCQ"]:
        with pytest.raises(ValueError, match="layout"):
            netprobe.probe(m, ["0"], layout=bad)
    with pytest.raises(ValueError, match="not selected"):
        netprobe.probe(m, ["0"], layout={"1": "NC"})
    with netprobe.probe(m, ["0"], layout="NCL"), pytest.raises(ValueError, match="names 3 axes"):
        m(torch.randn(2, 4))


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()


def test_non_finite_points_refused():
    net = _mlp()
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    with pytest.raises(ValueError, match="finite `fractions`"):
        ablation_curve(net, "1", (x, y), fractions=[0, float("nan")])
    with pytest.raises(ValueError, match="finite `scales`"):
        noise_curve(net, "1", (x, y), scales=[0, math.inf])


def test_empty_data_refused():
    net = _mlp()
    x, y = torch.randn(0, 4), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="no samples"):
        ablation_curve(net, "1", (x, y))
    with pytest.raises(ValueError, match="no samples"):
        noise_curve(net, "1", (x, y))


def test_float16_overflow_refused():
    m = nn.Sequential(nn.Identity())
    with netprobe.probe(m, ["0"], dtype=torch.float16) as p:
        m(torch.full((3, 2), 1e5))
    with pytest.raises(ValueError, match="bfloat16"):
        p["0"]
    with netprobe.probe(m, ["0"], dtype=torch.bfloat16) as p:
        m(torch.full((3, 2), 1e5))
    assert torch.isfinite(p["0"]).all()


def test_float_targets_refused():
    m = nn.Sequential(nn.Linear(2, 2))
    p = netprobe.probe(m, ["0"], store_targets=True)
    with pytest.raises(TypeError, match=r"targets.long\(\)"):
        p.set_targets(torch.tensor([0.7, 1.7]))


def test_curves_leave_global_rng_as_found():
    class Sampling(nn.Module):  # samples in eval mode
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.act(self.fc(x)) + 0.01 * torch.randn(x.shape[0], 8))

    torch.manual_seed(0)
    m = Sampling().eval()
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    torch.manual_seed(123)
    ablation_curve(m, "act", (x, y), fractions=[0, 0.5])
    noise_curve(m, "act", (x, y), scales=[0, 1.0])
    a = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(a, torch.rand(3))


def test_probe_after_compile_names_the_cause():
    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    cm = torch.compile(m, backend="eager")
    cm(torch.randn(2, 4))
    with netprobe.probe(m, ["1"]) as p:
        cm(torch.randn(2, 4))
    if p.buffers["1"].allocated:
        pytest.skip("this torch version runs hooks added after compiling")
    with pytest.raises(ValueError, match="Attach the probe before compiling"):
        p["1"]


# ----------------------------------------------------------------------------- 4-D layouts followed
class NHWCBlock(nn.Module):
    """A ConvNeXt-style block: depthwise conv (NCHW), then LayerNorm / Linear / GELU / Linear on
    (N, H, W, C) after a permute, permuted back and added to the input."""

    def __init__(self, c=6):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)

    def forward(self, x):
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.fc2(self.act(self.fc1(self.norm(h))))
        return x + h.permute(0, 3, 1, 2)


class NHWCNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.relu = nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()
        self.block = NHWCBlock()
        self.out = nn.Identity()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.out(self.block(self.relu(self.stem(x))))
        return self.head(h.mean((2, 3)))


def test_channels_last_activations_followed_in_4d():
    torch.manual_seed(0)
    net = NHWCNet().eval()
    x, y = torch.randn(10, 1, 5, 7), torch.randint(0, 3, (10,))
    layers = ["relu", "block.act", "block.norm", "block", "out"]
    with netprobe.probe(net, layers) as p:
        net(x)
    with torch.no_grad():
        r = net.relu(net.stem(x))
        h = net.block.dw(r).permute(0, 2, 3, 1)
        nrm = net.block.norm(h)
        act = net.block.act(net.block.fc1(nrm))
        blk = net.block(r)
    torch.testing.assert_close(p["relu"], r.mean((2, 3)))  # channels first
    torch.testing.assert_close(p["block.act"], act.mean((1, 2)))  # (N, H, W, 24): the 24 are the units
    assert p["block.act"].shape == (10, 24)
    torch.testing.assert_close(p["block.norm"], nrm.mean((1, 2)))
    torch.testing.assert_close(p["block"], blk.mean((2, 3)))  # permuted back and summed: channels first
    torch.testing.assert_close(p["out"], blk.mean((2, 3)))
    # the curves read the same layouts: 24 units at the GELU
    assert ablation_curve(net, "block.act", (x, y)).order.shape[1] == 24
    assert ablation_curve(net, "block", (x, y)).order.shape[1] == 6


def test_layer_norm_over_chw_keeps_channels_first():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LayerNorm([4, 5, 5]), nn.Flatten(), nn.Linear(100, 3)).eval()
    x = torch.randn(6, 1, 5, 5)
    with netprobe.probe(net, ["1"]) as p:
        net(x)
    with torch.no_grad():
        h = net[1](net[0](x))
    torch.testing.assert_close(p["1"], h.mean((2, 3)))  # 4 channels, not the 5 columns


def test_model_input_refused_in_4d():
    # an Identity on the model's input: no module or function tells its layout
    net = nn.Sequential(nn.Identity(), nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(18, 3)).eval()
    with netprobe.probe(net, ["0"]), pytest.raises(ValueError, match="layout="):
        net(torch.randn(4, 1, 5, 5))


def test_layout_followed_once_then_decided():
    # after the first call the layer is decided: later forwards run without following (no mode, no marks)
    from netprobe.layers import follow

    torch.manual_seed(0)
    net = NHWCNet().eval()
    seen = []
    orig = follow._follow

    def spy(*a, **k):
        seen.append(1)
        return orig(*a, **k)

    follow._follow = spy
    try:
        with netprobe.probe(net, ["block.act"]) as p:
            net(torch.randn(4, 1, 5, 7))
            first = len(seen)
            net(torch.randn(4, 1, 5, 7))
            assert len(seen) == first > 0
        assert p["block.act"].shape == (8, 24)
    finally:
        follow._follow = orig


def test_unit_dim_refuses_an_untyped_module():
    from netprobe.layers import unit_dim

    assert unit_dim(nn.Conv2d(1, 2, 1), torch.zeros(2, 2, 3, 3)) == 1
    assert unit_dim(nn.Linear(2, 5), torch.zeros(2, 3, 3, 5)) == 3
    with pytest.raises(ValueError, match="dims="):
        unit_dim(nn.ReLU(), torch.zeros(2, 2, 3, 3))


class FunctionalConv1d(nn.Module):
    """A 1-D conv net without any Conv1d module: F.conv1d with its own weights."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 2, 3) * 0.3)
        self.act, self.mix = nn.ReLU(), nn.Tanh()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(torch.nn.functional.conv1d(x, self.w, padding=1))  # (N, 6, L): followed
        z = self.mix(torch.stack([h, h]).sum(0))  # not followed
        return self.head(z.mean(2))


def test_functional_conv1d_followed_and_its_unfollowable_outputs_refused():
    torch.manual_seed(0)
    net = FunctionalConv1d().eval()
    x = torch.randn(8, 2, 11)
    with netprobe.probe(net, ["act"]) as p:
        net(x)
    torch.testing.assert_close(p["act"], net.act(torch.nn.functional.conv1d(x, net.w, padding=1)).detach().mean(2))
    # (8, 6, 11) through a function not followed, in a model with (N, C, L) tensors: refused, not read as (N, T, D)
    with netprobe.probe(net, ["mix"]), pytest.raises(ValueError, match="layout='NCL'"):
        net(x)


def test_unmarked_3d_in_a_model_without_convolutions_is_refused():
    # (N, 2, 32) signals through an Identity, then a Linear over the last axis: the Identity's output is
    # the model's input, whose layout nothing tells (it used to be read as (N, T, D))
    net = nn.Sequential(nn.Identity(), nn.Linear(32, 16), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)).eval()
    x = torch.randn(8, 2, 32)
    with netprobe.probe(net, ["0"]), pytest.raises(ValueError, match="layout='NCL'"):
        net(x)
    with netprobe.probe(net, ["2"]) as p:  # after the Linear: units last (16)
        net(x)
    torch.testing.assert_close(p["2"], net[2](net[1](x)).detach().mean(1))
    with netprobe.probe(net, ["0"], layout="NCL") as p:
        net(x)
    torch.testing.assert_close(p["0"], x.mean(2))


def test_a_2d_layer_is_followed_once_only():
    # an MLP's ReLU: decided at the first call, so a probe left attached (plain PyTorch training)
    # does not follow every later forward pass
    from netprobe.layers import follow, hooks

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    seen = []
    orig = follow._follow

    def spy(*a, **k):
        seen.append(1)
        return orig(*a, **k)

    follow._follow = spy
    try:
        with netprobe.probe(net, ["1"]):
            net(torch.randn(5, 4))
            first = len(seen)
            for _ in range(3):
                net(torch.randn(5, 4))
            assert len(seen) == first
            assert hooks._state.tracking == 0
    finally:
        follow._follow = orig


def test_an_interrupted_forward_leaves_no_mode_and_the_probe_works_on():
    # a KeyboardInterrupt skips even always_call forward hooks: the mode netprobe pushed for the
    # undecided layer must not stay pushed, and the next call must see its own batch size
    from torch.overrides import _get_current_function_mode_stack

    from netprobe.layers import hooks

    class Interrupt(nn.Module):
        armed = True

        def forward(self, x):
            if self.armed:
                raise KeyboardInterrupt
            return x

    stop = Interrupt()
    net = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), stop, nn.Flatten(), nn.Linear(4 * 7, 3))
    with netprobe.probe(net, ["1"]) as p:
        with pytest.raises(KeyboardInterrupt):
            net(torch.randn(4, 2, 7))
        stop.armed = False
        net(torch.randn(10, 2, 7))  # another batch size: read afresh
        assert p["1"].shape[1] == 4 and len(_get_current_function_mode_stack()) == 0
        stop.armed = True
        with pytest.raises(KeyboardInterrupt):
            net(torch.randn(4, 2, 7))
    assert len(_get_current_function_mode_stack()) == 0 and hooks._state.tracking == 0
