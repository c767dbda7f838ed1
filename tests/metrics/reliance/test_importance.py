"""unit_importance against a plain loop (one forward per unit, a hand-written hook), and spearman
against scipy.stats.spearmanr."""

import copy
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from netprobe.metrics import ablation_curve
from netprobe.metrics.ablation import NonFiniteError, score
from netprobe.metrics.importance import ImportanceResult, spearman, unit_importance


# ----------------------------------------------------------------------------- reference
def _reference(model, module, x, y, *, mode="zero", unit_axis=-1, pick=None):
    """Per unit: one plain eval-mode forward with that unit overwritten by a forward hook (0, or its
    mean over samples and positions from an unablated pass); accuracy and mean cross-entropy
    computed in numpy float64. `pick(out) -> tensor` selects the tensor of a tuple output (item 0)."""
    pick = pick or (lambda o: o)
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    seen = []
    h = module.register_forward_hook(lambda mod, a, out: seen.append(pick(out).detach().clone()))
    with torch.no_grad():
        base_out = model(x)
    h.remove()
    act = seen[0].double()
    d = act.shape[unit_axis]
    fill = act.movedim(unit_axis, -1).reshape(-1, d).mean(0).float()

    def stats(out):
        o = out.double().numpy()
        top = o.max(1, keepdims=True)
        lse = np.log(np.exp(o - top).sum(1)) + top[:, 0]
        yy = y.numpy()
        return float((o.argmax(1) == yy).mean()), float((lse - o[np.arange(len(yy)), yy]).mean())

    acc, loss = [], []
    for u in range(d):
        def hook(mod, args, out, u=u):
            t = pick(out).clone()
            idx = [slice(None)] * t.ndim
            idx[unit_axis] = u
            t[tuple(idx)] = 0.0 if mode == "zero" else fill[u]
            return t if pick(out) is out else (t,) + tuple(out[1:])

        h = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                a, l_ = stats(model(x))
        finally:
            h.remove()
        acc.append(a)
        loss.append(l_)
    for m, t in was:
        m.training = t
    base_acc, base_loss = stats(base_out)
    return base_acc, base_loss, np.array(acc), np.array(loss)


def _fit(model, x, y, steps=60, lr=1e-2):
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _mlp_task(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Dropout(0.3), nn.Linear(20, 4))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    return _fit(m, x, y), x, y


def _conv_task():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                      nn.Linear(24, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2, 5, 5, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1, :2].mean((1, 2)) > 0).long()
    return _fit(m, x, y, steps=40), x, y


class _SeqNet(nn.Module):
    """An LSTM over (T, N, D) inputs (batch_first=False), classified from its last step."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: (N, T, 3), batch first at the model's entry
        out, _ = self.lstm(x.transpose(0, 1))
        return self.head(out[-1])


def _seq_task():
    torch.manual_seed(2)
    m = _SeqNet()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 5, 3, generator=g)
    y = (x[:, :, 0].sum(1) > 0).long() + (x[:, -1, 1] > 0).long()
    return _fit(m, x, y, steps=40), x, y


def _check(r, ref, d):
    base_acc, base_loss, acc, loss = ref
    assert isinstance(r, ImportanceResult) and r.num_units == d
    assert r.accuracy_drop.shape == r.loss_rise.shape == (d,) and r.accuracy_drop.dtype == torch.float64
    assert float(r.base_accuracy) == pytest.approx(base_acc, abs=1e-12)
    assert float(r.base_loss) == pytest.approx(base_loss, rel=1e-5)
    np.testing.assert_allclose(r.accuracy.numpy(), acc, atol=1e-12)
    np.testing.assert_allclose(r.accuracy_drop.numpy(), base_acc - acc, atol=1e-12)
    np.testing.assert_allclose(r.loss.numpy(), loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.loss_rise.numpy(), loss - base_loss, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- against the loop
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_mlp_matches_the_one_unit_at_a_time_loop(mode):
    m, x, y = _mlp_task()
    ref = _reference(m, m[2], x, y, mode=mode)
    r = unit_importance(m, "2", (x, y), mode=mode)
    _check(r, ref, 20)
    assert r.layer == "2" and r.mode == mode and r.count == 96
    assert ref[0] > 0.7 and np.ptp(ref[3]) > 1e-3  # a trained net whose units differ: the test means something


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_conv_channels_match_the_loop(mode):
    m, x, y = _conv_task()
    ref = _reference(m, m[2], x, y, mode=mode, unit_axis=1)
    r = unit_importance(m, "2", (x, y), mode=mode, max_elements=None)
    _check(r, ref, 6)
    # tiny budgets: the masks are chunked and the samples split, same numbers
    small = unit_importance(m, "2", [(x[:13], y[:13]), (x[13:], y[13:])], mode=mode, max_batch=5)
    assert torch.equal(small.correct, r.correct) and torch.equal(small.base_correct, r.base_correct)
    torch.testing.assert_close(small.loss_sum, r.loss_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_sequence_first_lstm_matches_the_loop(mode):
    m, x, y = _seq_task()
    # the LSTM's output is (out, (h, c)); out is (T, N, H): units last, batch second (batch_first=False)
    ref = _reference(m, m.lstm, x, y, mode=mode, unit_axis=-1, pick=lambda o: o[0] if isinstance(o, tuple) else o)
    r = unit_importance(m, "lstm", (x, y), mode=mode, select=0)
    _check(r, ref, 8)
    # an explicit layout agrees with the one Layouts establishes from batch_first
    r2 = unit_importance(m, "lstm", (x, y), mode=mode, select=0, layout="LNC")
    assert torch.equal(r2.correct, r.correct)


def test_conv1d_with_explicit_layout_and_linear_on_sequence():
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv1d(2, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 7, 3))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 2, 7, generator=g)
    y = torch.randint(0, 3, (30,), generator=g)
    _fit(m, x, y, steps=30)
    ref = _reference(m, m[1], x, y, unit_axis=1)
    _check(unit_importance(m, "1", (x, y)), ref, 5)
    _check(unit_importance(m, "1", (x, y), layout="NCL"), ref, 5)
    # the same tensor read as a sequence (N, L, C): units are then the 7 positions' last axis
    ref_nlc = _reference(m, m[1], x, y, unit_axis=2)
    _check(unit_importance(m, "1", (x, y), layout="NLC"), ref_nlc, 7)


# ----------------------------------------------------------------------------- properties
def test_model_rng_modes_hooks_and_outputs_left_as_found():
    m, x, y = _mlp_task()
    m.train()
    m[3].eval()  # a mixed-mode model comes back mixed
    user = m[2].register_forward_hook(lambda *a: None)
    state = copy.deepcopy(m.state_dict())
    modes = [mod.training for mod in m.modules()]
    hooks = [len(mod._forward_hooks) for mod in m.modules()]
    m.eval()
    with torch.no_grad():
        before = m(x)
    m.train()
    m[3].eval()
    torch.manual_seed(123)
    rng = torch.random.get_rng_state()
    for mode in ("zero", "mean"):
        unit_importance(m, "2", (x, y), mode=mode)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert [mod.training for mod in m.modules()] == modes
    assert [len(mod._forward_hooks) for mod in m.modules()] == hooks
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), before)
    user.remove()


def test_budgets_vectorize_expand_data_forms_and_unablated_give_the_same_numbers():
    m, x, y = _mlp_task()
    ref = unit_importance(m, "2", (x, y))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=17)
    variants = [
        dict(max_batch=7), dict(max_batch=10_000, max_elements=None), dict(max_elements=50), dict(vectorize=False),
        dict(expand="input"), dict(expand="layer"), dict(unablated=score(m.eval()(x), y)),
    ]
    for kw in variants:
        r = unit_importance(m, "2", (x, y), **kw)
        assert torch.equal(r.correct, ref.correct) and float(r.base_correct) == float(ref.base_correct), kw
        torch.testing.assert_close(r.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r.base_loss_sum, ref.base_loss_sum, rtol=1e-5, atol=1e-5)
    r = unit_importance(m, m[2], loader)
    assert torch.equal(r.correct, ref.correct) and r.count == 96
    r = unit_importance(m, "2", [{"x": x[:50], "y": y[:50]}, {"x": x[50:], "y": y[50:]}])
    assert torch.equal(r.correct, ref.correct)
    assert r.all_reduce() is r  # not distributed: a no-op


def test_agrees_with_an_ablation_curve_that_ablates_that_unit_first():
    m, x, y = _mlp_task()
    r = unit_importance(m, "2", (x, y), mode="mean")
    for u in (0, 7, 19):
        order = torch.cat([torch.tensor([u]), torch.tensor([i for i in range(20) if i != u])])
        c = ablation_curve(m, "2", (x, y), fractions=[0.0, 1 / 20], order=order, mode="mean")
        assert float(c.correct[0, 1]) == float(r.correct[u]) and float(c.correct[0, 0]) == float(r.base_correct)
        assert float(c.loss_sum[0, 1]) == pytest.approx(float(r.loss_sum[u]), rel=1e-6)


def test_dead_unit_is_unimportant_under_zero_ablation():
    m, x, y = _mlp_task()
    with torch.no_grad():  # unit 4 never fires: its BN output is pinned far below 0
        m[1].weight[4] = 0.0
        m[1].bias[4] = -5.0
    r = unit_importance(m, "2", (x, y))
    assert float(r.accuracy_drop[4]) == 0.0 and float(r.loss_rise[4]) == 0.0


def test_residual_around_the_layer_falls_back_to_repeating_inputs():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4)

        def forward(self, x):
            return self.out(self.act(self.fc(x)) + x)

    torch.manual_seed(4)
    m = Res()
    _, x, y = _mlp_task()
    ref = _reference(m, m.act, x, y)
    _check(unit_importance(m, "act", (x, y)), ref, 6)


def test_errors_name_the_fix():
    m, x, y = _mlp_task()
    with pytest.raises(ValueError, match="`mode`"):
        unit_importance(m, "2", (x, y), mode="noise")
    with pytest.raises(ValueError, match="max_batch"):
        unit_importance(m, "2", (x, y), max_batch=0)
    with pytest.raises(ValueError, match="max_elements"):
        unit_importance(m, "2", (x, y), max_elements=-3)
    with pytest.raises(ValueError, match="`expand`"):
        unit_importance(m, "2", (x, y), expand="sideways")
    with pytest.raises(TypeError, match="one-shot iterator"):
        unit_importance(m, "2", iter([(x, y)]))
    with pytest.raises(ValueError, match="class-index targets"):
        unit_importance(m, "2", (x, y.float()))
    with pytest.raises(ValueError, match="same first dimension"):
        unit_importance(m, "2", (x, y[:5]))
    with pytest.raises(TypeError, match="`unablated`"):
        unit_importance(m, "2", (x, y), unablated=3.0)
    with pytest.raises(ValueError, match="Unknown layer"):
        unit_importance(m, "relu", (x, y))
    with pytest.raises(ValueError, match="names 3 axes"):
        unit_importance(m, "2", (x, y), layout="NCL")
    with pytest.raises(ValueError, match="no samples|never reached"):
        unit_importance(m, "2", (x[:0], y[:0]))
    one_logit = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1))
    with pytest.raises(ValueError, match="at least 2 classes"):
        unit_importance(one_logit, "1", (x, torch.zeros(96, dtype=torch.long)))
    with pytest.raises(ValueError, match="select="):
        unit_importance(_seq_task()[0], "lstm", (x[:, None].expand(96, 5, 6)[..., :3], y % 3))
    nan_net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    with torch.no_grad():
        nan_net[2].bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        unit_importance(nan_net, "1", (x, y))


# ----------------------------------------------------------------------------- spearman
def _scipy_rho(a, b):
    return float(scipy.stats.spearmanr(a, b).statistic)


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(-3, 3)), min_size=3, max_size=40))
def test_spearman_matches_scipy_with_ties(pairs):
    a = np.array([p[0] for p in pairs], float)
    b = np.array([p[1] for p in pairs], float)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        with pytest.warns(RuntimeWarning, match="constant"):
            assert torch.isnan(spearman(torch.tensor(a), torch.tensor(b)))
        return
    rho = spearman(torch.tensor(a, dtype=torch.float32), torch.tensor(b))
    assert rho.dtype == torch.float64 and rho.ndim == 0
    assert float(rho) == pytest.approx(_scipy_rho(a, b), abs=1e-12)


def test_spearman_properties_and_nan_policy():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    assert float(spearman(a, a.exp())) == pytest.approx(1.0)  # invariant to monotone maps
    assert float(spearman(a, -a ** 3)) == pytest.approx(-1.0)
    assert float(spearman(a, b)) == pytest.approx(float(spearman(b, a)), abs=1e-15)
    assert float(spearman(a, b)) == pytest.approx(_scipy_rho(a.numpy(), b.numpy()), abs=1e-12)
    b_nan = b.clone().double()
    b_nan[[3, 10]] = float("nan")
    with pytest.raises(ValueError, match="nan_policy='omit'"):
        spearman(a, b_nan)
    keep = ~torch.isnan(b_nan)
    assert float(spearman(a, b_nan, nan_policy="omit")) == pytest.approx(_scipy_rho(a[keep].numpy(), b[keep].numpy()), abs=1e-12)
    assert float(spearman([1, 2, 3], [3.0, 1.0, 2.0])) == pytest.approx(_scipy_rho([1, 2, 3], [3, 1, 2]))
    with pytest.raises(ValueError, match="same length"):
        spearman(a, b[:5])
    with pytest.raises(ValueError, match="1-D"):
        spearman(a[:, None], b[:, None])
    with pytest.raises(ValueError, match="nan_policy"):
        spearman(a, b, nan_policy="propagate")
    with pytest.raises(TypeError, match="real tensor"):
        spearman(a > 0, b)
    with pytest.raises(TypeError, match="1-D tensor of numbers"):
        spearman("abc", b)
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert torch.isnan(spearman(torch.tensor([1.0, float("nan")]), torch.tensor([2.0, 3.0]), nan_policy="omit"))


def test_no_warnings_on_a_regular_call():
    m, x, y = _mlp_task()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unit_importance(m, "2", (x, y))
