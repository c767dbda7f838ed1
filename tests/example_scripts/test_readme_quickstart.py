"""The README's Lightning quickstart runs as it stands: its code block, taken from README.md,
given only the two names it leaves to the reader (`model`, a LightningModule with layers `relu1`
and `relu2`, and `train_loader`), trains and stops or finishes without error."""

import re
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from lightning_helpers import digits, loader, make_module  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"


def _quickstart_block() -> str:
    text = README.read_text()
    section = text.split("## Lightning quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the quickstart section should hold one python block"
    return blocks[0]


def test_the_quickstart_block_uses_reliance_early_stopping_with_its_warmup():
    code = _quickstart_block()
    assert "RelianceEarlyStopping()" in code and "pl.callbacks.EarlyStopping" not in code
    from netprobe.lightning import RelianceEarlyStopping

    assert RelianceEarlyStopping().warmup_epochs == 5


def test_the_quickstart_block_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the block's default Trainer writes lightning_logs/ and checkpoints here
    torch.manual_seed(0)
    x, y = digits(400)  # more than the monitors' default probe set of 256
    names = {"model": make_module(pl), "train_loader": loader(x, y)}
    exec(compile(_quickstart_block(), str(README), "exec"), names)
    trainer = names["trainer"]
    stop = next(cb for cb in trainer.callbacks if type(cb).__name__ == "RelianceEarlyStopping")
    assert trainer.state.finished and trainer.current_epoch > stop.warmup_epochs
    stopped = stop.stopped_epoch > 0
    assert stopped or trainer.current_epoch == trainer.max_epochs
    assert stopped == (trainer.current_epoch < trainer.max_epochs)
    assert {"netprobe/reliance_auc", "netprobe/selectivity_mean", "netprobe/cka_prev"} <= set(trainer.callback_metrics)
    assert list(tmp_path.glob("lightning_logs/version_0/events.out.tfevents.*"))
