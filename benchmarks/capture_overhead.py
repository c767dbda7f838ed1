"""Training-step time with a probe capturing 4 layers every step vs without, side by side.

Target on CPU: ratio <= 1.05 (GPU: <= 1.02). Runs with ONE torch thread (this 2-core machine
slows down badly with intra-op thread contention); pass --threads to change that.

    .venv/bin/python benchmarks/capture_overhead.py [--quick] [--device cuda] [--threads N]

Method: the two variants alternate in rounds (A B B A ...) on the same model and data, so drift in
machine load hits both; each round times `steps` training steps; the ratio of each round pair is
collected and its median and inter-quartile range printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import netprobe


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 512), nn.ReLU(), nn.Linear(512, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, opt, x, y, steps, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return (time.perf_counter() - t0) / steps


def bench(name, make, x, y, layers, steps, rounds, device) -> None:
    torch.manual_seed(0)
    model = make().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = x.to(device), y.to(device)
    p = netprobe.probe(model, layers, capacity=4096)
    time_steps(model, opt, x, y, 3, device)  # warm-up
    with p:
        time_steps(model, opt, x, y, 3, device)
    base, probed, ratios = [], [], []
    for r in range(rounds):
        order = ("base", "probe") if r % 2 == 0 else ("probe", "base")
        t = {}
        for which in order:
            if which == "base":
                t[which] = time_steps(model, opt, x, y, steps, device)
            else:
                with p:
                    t[which] = time_steps(model, opt, x, y, steps, device)
        base.append(t["base"])
        probed.append(t["probe"])
        ratios.append(t["probe"] / t["base"])
    q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
    print(
        f"{name:<5} batch {x.shape[0]:>4}  layers {len(p.layers)} ({', '.join(p.layers)})  "
        f"step {statistics.median(base) * 1e3:8.3f} ms -> {statistics.median(probed) * 1e3:8.3f} ms  "
        f"ratio median {statistics.median(ratios):.3f}  IQR [{q[0]:.3f}, {q[2]:.3f}]  "
        f"({rounds} rounds x {steps} steps; probe memory {p.nbytes / 2**20:.2f} MiB)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds/steps (smoke run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rounds, steps = (4, 3) if args.quick else (12, 10)
    print(f"capture overhead benchmark: device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", torch {torch.__version__}, torch threads = {torch.get_num_threads()}")
    print("target: ratio <= 1.05 on CPU, <= 1.02 on GPU (probe captures 4 layers every step)")
    g = torch.Generator().manual_seed(0)
    bench("MLP", mlp, torch.randn(256, 784, generator=g), torch.randint(0, 10, (256,), generator=g),
          ["1", "3", "5", "6"], steps, rounds, device)
    bench("CNN", cnn, torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g),
          [nn.ReLU, "9"], steps, rounds, device)


if __name__ == "__main__":
    main()
