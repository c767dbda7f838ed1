"""Lightning callbacks that log netprobe's signals every epoch (the only package importing Lightning).

Keys: ``netprobe/<metric>/<layer>`` and the mean over layers ``netprobe/<metric>`` (the one to
hand to ``EarlyStopping`` / ``ModelCheckpoint``); see the README's table.
"""

from netprobe.lightning.base import NetprobeMonitor
from netprobe.lightning.convergence import ConvergenceMonitor
from netprobe.lightning.early_stopping import RelianceEarlyStopping
from netprobe.lightning.reliance import RelianceMonitor
from netprobe.lightning.selectivity import SelectivityMonitor

__all__ = ["NetprobeMonitor", "SelectivityMonitor", "RelianceMonitor", "ConvergenceMonitor", "RelianceEarlyStopping"]
