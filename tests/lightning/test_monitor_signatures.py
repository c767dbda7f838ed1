"""The monitors' shared options are explicit keyword-only parameters of each monitor's ``__init__``."""

import inspect

import pytest
import torch

from netprobe.lightning import ConvergenceMonitor, RelianceMonitor, SelectivityMonitor
from netprobe.lightning.base import NetprobeMonitor

MONITORS = [SelectivityMonitor, RelianceMonitor, ConvergenceMonitor]
BASE = inspect.signature(NetprobeMonitor.__init__).parameters


@pytest.mark.parametrize("cls", MONITORS, ids=lambda c: c.__name__)
def test_every_shared_option_is_in_the_signature_with_the_base_default(cls):
    params = inspect.signature(cls.__init__).parameters
    assert not [p for p in params.values() if p.kind is inspect.Parameter.VAR_KEYWORD], "no **kwargs"
    for name, base in BASE.items():
        assert name in params, f"{cls.__name__}.__init__ lacks `{name}`"
        assert params[name].kind is base.kind, (cls.__name__, name, params[name].kind, base.kind)
        assert params[name].default == base.default, (cls.__name__, name, params[name].default, base.default)


@pytest.mark.parametrize("cls", MONITORS, ids=lambda c: c.__name__)
def test_shared_options_reach_the_base(cls):
    probe = (torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    given = dict(num_samples=64, every_n_epochs=3, probe_data=probe, batch_size=16, seed=7, num_classes=3,
                 media_every=2, layout="NC", select=0)
    mon = cls(["fc1"], **given)
    for name, value in given.items():
        assert getattr(mon, name) is value, (cls.__name__, name)


@pytest.mark.parametrize("cls", MONITORS, ids=lambda c: c.__name__)
def test_an_unknown_keyword_is_a_type_error_naming_it(cls):
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_sample'"):
        cls(["fc1"], num_sample=64)
