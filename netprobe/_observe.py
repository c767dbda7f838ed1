"""The former home of :mod:`netprobe.layers.observe`; its names are importable from here too."""

from netprobe.layers.observe import *  # noqa: F401,F403
from netprobe.layers.observe import __all__  # noqa: F401
