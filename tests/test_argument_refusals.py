"""Small inputs that used to give a raw error, a wrong value or a misleading message: each is now a
right value or a clear ValueError naming the fix."""

import pytest
import torch
from torch import nn

import netprobe
from netprobe.metrics import MinibatchCKA, linear_cka, noise_curve, rbf_cka


def test_noise_curve_index_offset_must_be_a_whole_index():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    for bad in (1.5, -1, True):
        with pytest.raises(ValueError, match="index_offset"):
            noise_curve(net, "1", (x, y), scales=[0, 1.0], index_offset=bad)
    noise_curve(net, "1", (x, y), scales=[0, 1.0], index_offset=3)


@pytest.mark.parametrize("seed", ["-1", "2.5", str(2**32)])
def test_rank_refuses_a_seed_numpy_cannot_take(seed, tmp_path, capsys):
    from netprobe.cli import main

    with pytest.raises(SystemExit) as e:
        main(["rank", str(tmp_path), "--seed", seed])
    assert e.value.code == 2 and "expected a seed" in capsys.readouterr().err


def test_minibatch_cka_refuses_a_batch_of_other_widths():
    g = torch.Generator().manual_seed(0)
    acc = MinibatchCKA().update(torch.randn(16, 5, generator=g), torch.randn(16, 7, generator=g))
    with pytest.raises(ValueError, match=r"\(5, 7\).*\(5, 6\)"):
        acc.update(torch.randn(16, 5, generator=g), torch.randn(16, 6, generator=g))
    other = MinibatchCKA().update(torch.randn(16, 4, generator=g), torch.randn(16, 7, generator=g))
    with pytest.raises(ValueError, match="widths"):
        acc.merge(other)


def test_rbf_cka_at_a_huge_threshold_names_the_threshold_and_tends_to_linear_cka():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = x @ torch.randn(5, 5, generator=g, dtype=torch.float64) + 0.3 * torch.randn(60, 5, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"threshold=1e\+09.*linear_cka"):
        rbf_cka(x, y, threshold=1e9)
    # below the refusal the value is computed, and approaches linear CKA as the bandwidth grows
    assert float(rbf_cka(x, y, threshold=300.0)) == pytest.approx(float(linear_cka(x, y)), abs=1e-4)


def test_hugging_face_conv1d_is_a_linear_with_units_last():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    net = nn.Sequential(pytorch_utils.Conv1D(6, 4), nn.GELU())
    x = torch.randn(5, 9, 4)
    with netprobe.probe(net, ["0", "1"]) as p:
        net(x)
    with torch.no_grad():
        h = net[0](x)
    torch.testing.assert_close(p["0"], h.mean(1))
    torch.testing.assert_close(p["1"], net[1](h).mean(1))
