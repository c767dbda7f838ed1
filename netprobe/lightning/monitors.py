"""The three netprobe monitors, importable from one module (each lives in its own file:
:mod:`~netprobe.lightning.selectivity`, :mod:`~netprobe.lightning.reliance`,
:mod:`~netprobe.lightning.convergence`; :mod:`netprobe.lightning.base` holds what they share)."""

from netprobe.lightning.convergence import ConvergenceMonitor
from netprobe.lightning.reliance import RELIANCE_FRACTIONS, RelianceMonitor
from netprobe.lightning.selectivity import SelectivityMonitor

__all__ = ["SelectivityMonitor", "RelianceMonitor", "ConvergenceMonitor", "RELIANCE_FRACTIONS"]
