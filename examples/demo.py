"""netprobe demo (plain PyTorch): train an MLP on scikit-learn's digits with a probe on its hidden layers.

Run with `make demo` (sets up .venv first). Uses one torch thread on purpose: this 2-core
machine slows down badly under intra-op thread contention.
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import netprobe

torch.set_num_threads(1)


def main(epochs: int = 15, seed: int = 0) -> None:
    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    print(f"netprobe {netprobe.__version__} demo: MLP on load_digits, torch threads = {torch.get_num_threads()}")

    # Capture the two hidden ReLU layers (by type), with targets, in 1024-row ring buffers.
    p = netprobe.probe(model, [nn.ReLU], capacity=1024, store_targets=True)
    print(f"probing layers {p.layers}")
    header = f"{'epoch':>5} {'loss':>7} {'train':>6} {'test':>6} | " + " | ".join(
        f"layer {n}: rows  dead%  mean" for n in p.layers
    )
    print(header)
    t0 = time.perf_counter()
    with p:
        for epoch in range(1, epochs + 1):
            model.train()
            p.reset()  # capture this epoch's last 1024 training rows
            for i in range(0, len(x_train), 64):
                xb, yb = x_train[i : i + 64], y_train[i : i + 64]
                p.set_targets(yb)
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with p.paused(), torch.no_grad():
                model.eval()
                train_acc = (model(x_train).argmax(1) == y_train).float().mean().item()
                test_acc = (model(x_test).argmax(1) == y_test).float().mean().item()
            cells = []
            for name in p.layers:
                a = p[name]
                dead = (a.amax(0) <= 0).float().mean().item() * 100
                cells.append(f"{a.shape[0]:>13} {dead:5.1f} {a.mean().item():5.3f}")
            print(f"{epoch:>5} {loss.item():7.4f} {train_acc:6.3f} {test_acc:6.3f} | " + " | ".join(cells))
    print(f"\ncaptured {', '.join(f'{n}: {tuple(p[n].shape)}' for n in p.layers)}; "
          f"targets {tuple(p.targets(p.layers[0]).shape)}")
    print(f"probe memory: {p.nbytes} bytes (exact; capacity x width x 4 bytes + capacity x 8 for targets)")
    print(f"hooks left on the model after the block: {sum(len(m._forward_hooks) for m in model.modules())}")
    print(f"total {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
