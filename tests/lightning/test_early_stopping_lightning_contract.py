"""The private parts of Lightning's ``EarlyStopping`` that ``RelianceEarlyStopping`` relies on exist,
with the signatures netprobe calls, on both installed packages' classes: a Lightning upgrade that
changes one fails here, by name, rather than in a training run."""

import importlib
import importlib.util
import inspect
import logging
import re
from types import SimpleNamespace

import pytest
import torch

from netprobe.lightning.early_stopping import _LIGHTNING_PRIVATE, RelianceEarlyStopping

PACKAGES = ["pytorch_lightning", "lightning.pytorch"]

#: attributes of EarlyStopping that RelianceEarlyStopping reads or writes
ATTRIBUTES = ("wait_count", "stopped_epoch", "stopping_reason_message", "best_score", "monitor_op", "check_finite",
              "verbose", "log_rank_zero_only", "strict", "monitor", "patience", "min_delta")


def _package(name):
    try:
        return importlib.import_module(name)
    except ImportError:
        pytest.skip(f"{name} is not installed")


def _early_stopping(pkg):
    return importlib.import_module(f"{pkg}.callbacks").EarlyStopping


def _fitting_trainer(pkg, **kw):
    fn = importlib.import_module(f"{pkg}.trainer.states").TrainerFn.FITTING
    return SimpleNamespace(state=SimpleNamespace(fn=fn), sanity_checking=False, world_size=1, global_rank=0, **kw)


def test_the_contract_lists_every_private_early_stopping_member_netprobe_uses():
    src = inspect.getsource(importlib.import_module("netprobe.lightning.early_stopping"))
    used = set(re.findall(r"self\.(_[a-z]\w*)", src)) | set(re.findall(r"def (_[a-z]\w*)\(self", src))
    for pkg in PACKAGES:
        if importlib.util.find_spec(pkg.split(".")[0]) is None:
            continue
        cls = _early_stopping(pkg)
        lightning_members = set(dir(cls)) | set(vars(cls(monitor="m")))
        assert used & lightning_members == set(_LIGHTNING_PRIVATE), pkg


@pytest.mark.parametrize("pkg", PACKAGES)
@pytest.mark.parametrize("name", sorted(_LIGHTNING_PRIVATE))
def test_private_method_exists_with_the_signature_netprobe_calls(pkg, name):
    _package(pkg)
    cls = _early_stopping(pkg)
    assert hasattr(cls, name), f"{pkg}.callbacks.EarlyStopping has no `{name}` (netprobe's RelianceEarlyStopping uses it)"
    params = [p for p in inspect.signature(getattr(cls, name)).parameters.values()]
    assert all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params), (pkg, name, params)
    assert tuple(p.name for p in params) == _LIGHTNING_PRIVATE[name], f"{pkg}: EarlyStopping.{name}{inspect.signature(getattr(cls, name))}"
    if name == "_log_info":
        assert isinstance(inspect.getattr_static(cls, name), staticmethod), f"{pkg}: EarlyStopping._log_info is no staticmethod"


@pytest.mark.parametrize("pkg", PACKAGES)
def test_public_hooks_call_run_early_stopping_check(pkg):
    """RelianceEarlyStopping overrides _run_early_stopping_check: Lightning's hooks must still call it."""
    _package(pkg)
    cls = _early_stopping(pkg)
    for on_train_epoch_end in (True, False):
        es = cls(monitor="m", check_on_train_epoch_end=on_train_epoch_end)
        calls = []
        es._run_early_stopping_check = calls.append
        trainer = _fitting_trainer(pkg)
        es.on_train_epoch_end(trainer, None)
        es.on_validation_end(trainer, None)
        assert calls == [trainer], (pkg, on_train_epoch_end, calls)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_private_methods_behave_as_netprobe_reads_them(pkg, caplog):
    _package(pkg)
    es = _early_stopping(pkg)(monitor="m", mode="max", patience=2, strict=False)
    for attr in ATTRIBUTES:
        assert hasattr(es, attr), f"{pkg}: EarlyStopping has no attribute `{attr}`"
    assert es._validate_condition_metric({"m": torch.tensor(0.5)}) is True
    assert es._validate_condition_metric({}) is False  # strict=False: no raise
    first = es._evaluate_stopping_criteria(torch.tensor(0.5))
    assert isinstance(first, tuple) and len(first) == 2 and first[0] is False and isinstance(first[1], str)
    assert float(es.best_score) == 0.5 and es.wait_count == 0
    assert es._evaluate_stopping_criteria(torch.tensor(0.4))[0] is False and es.wait_count == 1
    stop, reason = es._evaluate_stopping_criteria(torch.tensor(0.4))
    assert stop is True and isinstance(reason, str) and es.wait_count == 2
    with caplog.at_level(logging.INFO):
        es._log_info(_fitting_trainer(pkg), "netprobe contract message", es.log_rank_zero_only)
    assert "netprobe contract message" in caplog.text


def test_reliance_early_stopping_builds_on_an_installed_early_stopping():
    bases = [importlib.import_module(f"{p}.callbacks").EarlyStopping for p in PACKAGES
             if importlib.util.find_spec(p.split(".")[0]) is not None]
    assert any(issubclass(RelianceEarlyStopping, b) for b in bases)
