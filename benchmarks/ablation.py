"""Ablation curve: vectorized (masks stacked into large batches, layers before the ablated one run
once) vs a loop with one forward pass per mask, side by side on an MLP. ONE torch thread.

    .venv/bin/python benchmarks/ablation.py [--quick]

Target: >= 3x. Also checks the two give identical curves.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from _timing import best_of_alternating
from netprobe.metrics import ablation_curve


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n = 512 if args.quick else 2048
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.randn(n, 64), torch.randint(0, 10, (n,))
    data = [(x[i : i + 256], y[i : i + 256]) for i in range(0, n, 256)]
    print(f"ablation benchmark: MLP 64-256-256-256-10, {n} samples in batches of 256, 11 fractions x 3 orders, "
          f"cpu, torch threads = {torch.get_num_threads()}")
    macs = [m.in_features * m.out_features for m in net if isinstance(m, nn.Linear)]  # per example

    def bound(layer: str) -> float:
        """Most the vectorized form can gain by arithmetic alone on one CPU thread: the loop runs the
        whole net once per mask (33 = 11 fractions x 3 orders); the vectorized form runs the layers
        before the ablated one once, the ones after once per distinct mask (29: fractions 0 and 1
        are shared), plus one statistics pass over the whole net."""
        before = sum(macs[: (int(layer) + 1) // 2])
        return 33 * sum(macs) / (sum(macs) + before + 29 * (sum(macs) - before))

    for layer in ("1", "3", "5"):
        kw = lambda: dict(repeats=3, generator=torch.Generator().manual_seed(0))  # noqa: E731
        t_vec, t_loop, a, b = best_of_alternating(lambda: ablation_curve(net, layer, data, **kw()),
                                           lambda: ablation_curve(net, layer, data, vectorize=False, expand="input", **kw()), 5)
        same = torch.equal(a.correct, b.correct)
        print(f"layer {layer}: vectorized {t_vec * 1e3:7.1f} ms   loop over masks {t_loop * 1e3:7.1f} ms   "
              f"speed-up {t_loop / t_vec:5.2f}x (target >= 3x; arithmetic bound {bound(layer):5.2f}x)   identical curves: {same}")


if __name__ == "__main__":
    main()
