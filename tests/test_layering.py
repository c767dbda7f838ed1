"""DESIGN.md's layering: metrics and capture import with Lightning, TensorBoard and matplotlib blocked."""

import subprocess
import sys

CODE = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'tensorboard', 'matplotlib', 'lightning_fabric'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import torch
import netprobe, netprobe.metrics, netprobe.capture
from netprobe.metrics import cca, svcca, pwcca, linear_cka, class_selectivity, mutual_information, ablation_curve, noise_curve, unit_importance, spearman
from netprobe.metrics import SimilarityAccumulator, SelectivityAccumulator, MutualInfoAccumulator
x = torch.randn(50, 3)
float(pwcca(x, x))
with netprobe.probe(torch.nn.Sequential(torch.nn.Linear(3, 2)), ['0']) as p:
    p.model(x)
bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'tensorboard', 'matplotlib')]
assert not bad, bad
print('ok')
"""


def test_metrics_and_capture_import_without_lightning_tensorboard_matplotlib():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
