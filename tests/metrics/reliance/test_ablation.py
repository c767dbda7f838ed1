"""Ablation and noise curves against direct (unvectorized, hand-written) computations."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from netprobe.metrics import CurveResult, ablation_curve, noise_curve


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Dropout(0.3), nn.Linear(20, 4))


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()


def _trained(seed=0):
    m = _mlp(seed)
    x, y = _data()
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(60):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m, x, y


def _direct_accuracy(model, layer_mod, x, y, ablate_idx, fill=None, unit_dim=1):
    """Reference: one plain forward with the given units overwritten (0 or `fill`)."""

    def hook(mod, args, out):
        out = out.clone()
        idx = [slice(None)] * out.ndim
        idx[unit_dim] = ablate_idx
        out[tuple(idx)] = 0.0 if fill is None else fill[ablate_idx].reshape(
            [-1 if i == unit_dim else 1 for i in range(out.ndim)])
        return out

    was = model.training
    model.eval()
    h = layer_mod.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        h.remove()
        model.train(was)
    return float((out.argmax(1) == y).double().mean()), float(nn.functional.cross_entropy(out, y))


def test_matches_direct_computation_for_a_given_order():
    m, x, y = _trained()
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    fr = [0.0, 0.25, 0.5, 0.75, 1.0]
    r = ablation_curve(m, "2", (x, y), fractions=fr, order=perm)
    for j, f in enumerate(fr):
        acc, loss = _direct_accuracy(m, m[2], x, y, perm[: round(f * 20)])
        assert float(r.accuracy[j]) == pytest.approx(acc, abs=1e-12)
        assert float(r.loss[j]) == pytest.approx(loss, rel=1e-5)
    # normalized trapezoidal AUC from the formula
    acc = r.accuracy.numpy()
    assert float(r.auc) == pytest.approx(np.trapezoid(acc, fr) / acc[0], rel=1e-12)


def test_fraction_zero_is_unablated_and_one_is_whole_layer_zeroed():
    m, x, y = _trained()
    r = ablation_curve(m, m[2], (x, y), generator=torch.Generator().manual_seed(0))
    m.eval()
    with torch.no_grad():
        base = float((m(x).argmax(1) == y).double().mean())
    m.train()
    assert float(r.accuracy[0]) == base
    assert (r.accuracy_per_repeat[:, 0] == base).all()
    full, _ = _direct_accuracy(m, m[2], x, y, torch.arange(20))
    assert (r.accuracy_per_repeat[:, -1] == full).all()
    assert base > 0.6  # the trained net is well above chance, so the test means something


def test_mean_mode_matches_direct_computation():
    m, x, y = _trained()
    m.eval()
    with torch.no_grad():
        h = m[1](m[0](x))
        acts = m[2](h)
    m.train()
    perm = torch.arange(20).flip(0)
    r = ablation_curve(m, "2", (x, y), fractions=[0.0, 0.5, 1.0], order=perm, mode="mean")
    for j, f in enumerate([0.0, 0.5, 1.0]):
        acc, _ = _direct_accuracy(m, m[2], x, y, perm[: round(f * 20)], fill=acts.double().mean(0).float())
        assert float(r.accuracy[j]) == pytest.approx(acc, abs=1e-12)


@pytest.mark.parametrize("max_batch", [7, 96, 200, 10_000])  # 7: fewer than the masks, so they are chunked
def test_vectorized_equals_loop(max_batch):
    m, x, y = _trained()
    kw = dict(repeats=4, generator=torch.Generator().manual_seed(5))
    a = ablation_curve(m, "2", (x, y), max_batch=max_batch, **kw)
    b = ablation_curve(m, "2", (x, y), vectorize=False, repeats=4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.correct, b.correct)
    torch.testing.assert_close(a.loss_sum, b.loss_sum, rtol=1e-5, atol=1e-5)
    na = noise_curve(m, "2", (x, y), max_batch=max_batch, generator=torch.Generator().manual_seed(1))
    nb = noise_curve(m, "2", (x, y), vectorize=False, generator=torch.Generator().manual_seed(1))
    assert torch.equal(na.correct, nb.correct)


def test_reproducible_and_global_rng_untouched_and_model_left_as_found():
    m, x, y = _trained()
    m.train()
    m[3].eval()  # a mixed-mode model must come back mixed
    user = m[2].register_forward_hook(lambda *a: None)
    state = copy.deepcopy(m.state_dict())
    hooks = {n: dict(mod._forward_hooks) for n, mod in m.named_modules()}
    flags = {n: mod.training for n, mod in m.named_modules()}
    rng = torch.random.get_rng_state()
    r1 = ablation_curve(m, "2", (x, y), generator=torch.Generator().manual_seed(9))
    r2 = ablation_curve(m, "2", (x, y), generator=torch.Generator().manual_seed(9))
    n1 = noise_curve(m, "2", (x, y), generator=torch.Generator().manual_seed(9))
    n2 = noise_curve(m, "2", (x, y), generator=torch.Generator().manual_seed(9))
    assert torch.equal(r1.correct, r2.correct) and torch.equal(r1.order, r2.order)
    assert torch.equal(n1.correct, n2.correct)
    r3 = ablation_curve(m, "2", (x, y), generator=torch.Generator().manual_seed(10))
    assert not torch.equal(r1.order, r3.order)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert {n: mod.training for n, mod in m.named_modules()} == flags
    assert {n: dict(mod._forward_hooks) for n, mod in m.named_modules()} == hooks
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    user.remove()


def test_conv_channels_are_ablated_whole_and_dataloader_input():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, 5, 5, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    perm = torch.tensor([4, 1, 5, 0, 2, 3])
    r = ablation_curve(net, "1", (x, y), fractions=[0.0, 0.5, 1.0], order=perm)
    for j, f in enumerate([0.0, 0.5, 1.0]):
        acc, _ = _direct_accuracy(net, net[1], x, y, perm[: round(f * 6)], unit_dim=1)
        assert float(r.accuracy[j]) == acc
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    rl = ablation_curve(net, "1", loader, fractions=[0.0, 0.5, 1.0], order=perm)
    assert torch.equal(rl.correct, r.correct) and rl.count == 40
    torch.testing.assert_close(rl.loss_sum, r.loss_sum)


def test_selectivity_order_and_noise_scale_zero():
    m, x, y = _trained()
    desc = ablation_curve(m, "2", (x, y), order="selectivity_desc")
    asc = ablation_curve(m, "2", (x, y), order="selectivity_asc")
    assert desc.order.shape == (1, 20) and torch.equal(desc.order[0].sort().values, torch.arange(20))
    assert not torch.equal(desc.order, asc.order)
    n = noise_curve(m, "2", (x, y), scales=[0.0, 1.0, 4.0])
    assert float(n.accuracy[0]) == float(desc.accuracy[0])  # scale 0 = unablated
    assert float(n.accuracy[-1]) < float(n.accuracy[0])  # heavy noise hurts a trained net


def test_curve_result_all_reduce_is_noop_and_auc_of_zero_accuracy():
    r = CurveResult(torch.tensor([0.0, 1.0], dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64),
                    torch.zeros(1, 2, dtype=torch.float64), 10, "ablation", "fc")
    assert r.all_reduce() is r
    with pytest.warns(RuntimeWarning, match="Unablated accuracy"):
        assert float(r.auc) == 0.0


def test_errors():
    m, x, y = _trained()
    with pytest.raises(ValueError, match="Unknown layer 'relu'"):
        ablation_curve(m, "relu", (x, y))
    with pytest.raises(ValueError, match="start at 0"):
        ablation_curve(m, "2", (x, y), fractions=[0.1, 0.5])
    with pytest.raises(ValueError, match="increasing"):
        ablation_curve(m, "2", (x, y), fractions=[0.0, 0.5, 0.4])
    with pytest.raises(ValueError, match="mode"):
        ablation_curve(m, "2", (x, y), mode="drop")
    with pytest.raises(ValueError, match="order"):
        ablation_curve(m, "2", (x, y), order="largest")
    with pytest.raises(ValueError, match="permutation of the layer's 20 units"):
        ablation_curve(m, "2", (x, y), order=torch.arange(19))
    with pytest.raises(ValueError, match="repeats"):
        noise_curve(m, "2", (x, y), repeats=0)
    with pytest.raises(TypeError, match="iterable of such batches"):
        ablation_curve(m, "2", 3)
    with pytest.raises(ValueError, match="per-sample losses"):
        ablation_curve(m, "2", (x, y), loss_fn=lambda o, t: nn.functional.cross_entropy(o, t))
    with pytest.raises(ValueError, match="same first dimension"):
        ablation_curve(m, "2", (x, y[:5]))
    with pytest.raises(ValueError, match="non-negative"):
        ablation_curve(m, "1", (x, y), order="selectivity_desc")  # BatchNorm output: negative values


class _Residual(nn.Module):
    """A skip connection around the ablated layer: expanding at the layer must fall back."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.relu = nn.ReLU()
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(x + self.relu(self.fc(x)))


@pytest.mark.parametrize("make", [lambda: _trained()[0], lambda: _Residual()])
def test_expand_modes_agree_and_residual_falls_back(make):
    torch.manual_seed(0)
    m = make()
    x, y = _data()
    layer = "2" if isinstance(m, nn.Sequential) else "relu"
    kw = dict(repeats=3, generator=None)
    curves = {e: ablation_curve(m, layer, (x, y), expand=e, **kw) for e in ("auto", "input")}
    noises = {e: noise_curve(m, layer, (x, y), expand=e) for e in ("auto", "input")}
    assert torch.equal(curves["auto"].correct, curves["input"].correct)
    torch.testing.assert_close(curves["auto"].loss_sum, curves["input"].loss_sum, rtol=1e-5, atol=1e-5)
    assert torch.equal(noises["auto"].correct, noises["input"].correct)
    if isinstance(m, _Residual):
        with pytest.raises(RuntimeError):
            ablation_curve(m, layer, (x, y), expand="layer")
    else:
        assert torch.equal(ablation_curve(m, layer, (x, y), expand="layer").correct, curves["input"].correct)


@pytest.mark.parametrize("classes", [2, 10, 100])
def test_fast_cross_entropy_equals_torch(classes):
    from netprobe.metrics.reliance.result import _cross_entropy

    g = torch.Generator().manual_seed(classes)
    out = torch.randn(300, classes, generator=g) * torch.tensor([1.0, 1e3]).repeat(150)[:, None]  # large logits too
    y = torch.randint(0, classes, (300,), generator=g)
    torch.testing.assert_close(_cross_entropy(out, y), nn.functional.cross_entropy(out, y, reduction="none"), rtol=1e-5, atol=1e-4)
    y[0] = -100  # torch's ignore_index keeps its meaning
    torch.testing.assert_close(_cross_entropy(out, y), nn.functional.cross_entropy(out, y, reduction="none"))


def test_data_and_layer_misuse_get_clear_errors():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    with pytest.raises(TypeError, match="one-shot iterator.*list"):
        ablation_curve(net, "1", ((x[i:i + 10], y[i:i + 10]) for i in range(0, 30, 10)))
    with pytest.raises(ValueError, match=r"class-index targets.*argmax\(1\)"):
        noise_curve(net, "1", (x, nn.functional.one_hot(y, 3).float()))
    # the same nn.ReLU instance used twice in one forward
    relu = nn.ReLU()
    shared = nn.Sequential(nn.Linear(4, 8), relu, nn.Linear(8, 8), relu, nn.Linear(8, 3))
    with pytest.raises(ValueError, match="runs 2 times in one forward"):
        ablation_curve(shared, "1", (x, y))
    # a list of batches is fine, and equals the single pair
    a = ablation_curve(net, "1", [(x[:15], y[:15]), (x[15:], y[15:])], generator=torch.Generator().manual_seed(1))
    b = ablation_curve(net, "1", (x, y), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.correct, b.correct)


def test_selectivity_orders_follow_the_selectivity_index_and_random_curves_average_their_orders():
    from reference_selectivity import selectivity_ref

    m, x, y = _trained()
    m.eval()
    with torch.no_grad():
        acts = m[2](m[1](m[0](x)))  # the ReLU output, (96, 20)
    m.train()
    sel = np.asarray(selectivity_ref(acts.numpy(), y.numpy(), 4), dtype=float)
    key = np.where(np.isnan(sel), -1.0, sel)  # dead units (NaN) last when most selective first
    desc = ablation_curve(m, "2", (x, y), order="selectivity_desc")
    assert list(desc.order[0].numpy()) == list(np.argsort(-key, kind="stable"))
    asc = ablation_curve(m, "2", (x, y), order="selectivity_asc")  # least selective first, dead last
    assert list(asc.order[0].numpy()) == list(np.argsort(np.where(np.isnan(sel), 2.0, sel), kind="stable"))
    # random order: each repeat's curve is the direct computation for its order, and `accuracy` their mean
    fr = [0.0, 0.2, 0.5, 1.0]
    r = ablation_curve(m, "2", (x, y), fractions=fr, repeats=3, generator=torch.Generator().manual_seed(5))
    assert r.order.shape == (3, 20) and len({tuple(o.tolist()) for o in r.order}) == 3
    direct = np.array([[_direct_accuracy(m, m[2], x, y, r.order[k][: round(f * 20)])[0] for f in fr] for k in range(3)])
    np.testing.assert_allclose(r.accuracy_per_repeat.numpy(), direct, atol=1e-12)
    np.testing.assert_allclose(r.accuracy.numpy(), direct.mean(0), atol=1e-12)


def test_noise_std_is_scale_times_the_units_std():
    # capture what the layer after the noised one receives: its input minus the clean activations is
    # the noise, whose per-unit std must be scale x that unit's std over the data (and mean ~0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with torch.no_grad():
        net[0].weight.mul_(torch.tensor([0.1, 1.0, 3.0, 0.5, 2.0])[:, None])  # units of very different spread
    x, y = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1)), torch.randint(0, 2, (4000,))
    with torch.no_grad():
        clean = net[1](net[0](x))
    seen = []
    h = net[2].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    try:
        scales = [0.0, 0.5, 2.0]
        noise_curve(net, "1", (x, y), scales=scales, repeats=1, vectorize=False, expand="input")
    finally:
        h.remove()
    # (the passes netprobe runs on 5 and 7 rows observe the layer's batch axis); then the statistics pass
    seen = [s for s in seen if s.shape[0] == len(x)][1:]
    assert len(seen) == len(scales)
    unit_std = clean.double().std(0)
    for s, got in zip(scales, seen):
        noise = got.double() - clean.double()
        torch.testing.assert_close(noise.std(0), s * unit_std, rtol=0.05, atol=1e-9)
        assert (noise.mean(0).abs() <= 0.1 * s * unit_std + 1e-9).all()


def test_uint8_targets_work_like_int64():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    a = ablation_curve(net, "1", (x, y.to(torch.uint8)), generator=torch.Generator().manual_seed(0))
    b = ablation_curve(net, "1", (x, y), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.correct, b.correct)
    torch.testing.assert_close(a.loss_sum, b.loss_sum)


def test_batch_formats_and_output_checks_name_the_fix():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    ref = ablation_curve(net, "1", (x, y))
    dicts = [{"image": x[:20], "label": y[:20]}, {"image": x[20:], "label": y[20:]}]  # the monitors' keys work here too
    assert torch.equal(ablation_curve(net, "1", dicts).correct, ref.correct)
    with pytest.raises(ValueError, match=r"keys \['img', 'label'\]"):
        ablation_curve(net, "1", [{"img": x, "label": y}])
    one = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(ValueError, match=r"single binary logit.*torch.cat\(\[-z, z\], 1\)"):
        ablation_curve(one, "1", (x, torch.zeros(40, dtype=torch.long)))
    with pytest.raises(ValueError, match="Targets reach class 2, but the model returns scores for 2 classes"):
        ablation_curve(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)), "1", (x, y.clamp(max=2)))


def test_non_finite_losses_away_from_the_unablated_point_only_warn():
    torch.manual_seed(0)

    class Normed(nn.Module):  # divides by the layer's norm: 0/0 once every unit is ablated
        def __init__(self):
            super().__init__()
            self.fc, self.relu, self.out = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)

        def forward(self, x):
            h = self.relu(self.fc(x))
            return self.out(h / h.norm(dim=1, keepdim=True))

    x, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    with pytest.warns(RuntimeWarning, match="not finite at some points of the ablation curve"):
        r = ablation_curve(Normed(), "relu", (x, y))
    assert math.isfinite(float(r.auc)) and math.isfinite(float(r.loss[0]))
    logp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.LogSoftmax(1))
    with torch.no_grad():
        logp[2].weight.mul_(1e4)  # -inf log-probabilities: an infinite loss, not a diverged network
    r = ablation_curve(logp, "1", (x, y))
    assert math.isfinite(float(r.auc))
