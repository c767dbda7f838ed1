"""Every docstring example in the package runs and prints what it shows."""

import doctest
import importlib
import pkgutil

import pytest

import netprobe

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(netprobe.__path__, "netprobe.") if not m.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name} (run with -s to see them)"


def test_public_metrics_have_examples():
    from netprobe import metrics

    names = ["cca", "svcca", "pwcca", "linear_cka", "class_selectivity", "mutual_information", "ablation_curve", "noise_curve", "unit_importance", "spearman"]
    missing = [n for n in names if ">>>" not in (getattr(metrics, n).__doc__ or "")]
    assert not missing, f"public metrics without a docstring example: {missing}"
