"""Quickstart, plain PyTorch: capture hidden layers with `netprobe.probe`, then measure them.

    .venv/bin/python examples/quickstart_pytorch.py
"""

import argparse

import torch
from torch import nn

import netprobe
from netprobe.metrics import ablation_curve, class_selectivity, linear_cka, pwcca

from _common import digits, mlp, one_thread, train

ap = argparse.ArgumentParser(description="netprobe quickstart, plain PyTorch")
ap.add_argument("--smoke", action="store_true", help="tiny run (used by the test suite)")
ap.add_argument("--logdir", default=None, help="unused here (the quickstart writes no logs)")
args = ap.parse_args()
print(f"quickstart_pytorch.py: {one_thread()}")
data = digits(seed=0)
x, y = data["x_train"], data["y_train"]
model = mlp(64, [128, 128], 10)
train(model, x, y, epochs=3 if args.smoke else 30, generator=torch.Generator().manual_seed(0))

# 1. capture: every ReLU, with the labels beside the rows
with netprobe.probe(model, [nn.ReLU], capacity=len(x), store_targets=True) as p:
    model.eval()
    with torch.no_grad():
        p.set_targets(y)
        model(x)
print(f"captured {[(n, tuple(p[n].shape)) for n in p.layers]}, {p.nbytes} bytes")

# 2. metrics on the captured rows
sel = class_selectivity(p["relu2"], p.targets("relu2"), num_classes=10)
print(f"relu2 mean class selectivity {float(sel.mean):.3f} ({sel.num_dead} dead units)")
print(f"PWCCA(relu1, relu2) = {float(pwcca(p['relu1'], p['relu2'])):.3f}, "
      f"linear CKA = {float(linear_cka(p['relu1'], p['relu2'])):.3f}")

# 3. reliance on single directions: cumulative ablation of relu2's units, on the training data
curve = ablation_curve(model, "relu2", (x, y), generator=torch.Generator().manual_seed(0))
print("fraction ablated:", [round(float(f), 1) for f in curve.fractions])
print("accuracy        :", [round(float(a), 3) for a in curve.accuracy])
print(f"reliance AUC (1.0 = ablation does not hurt): {float(curve.auc):.3f}")
