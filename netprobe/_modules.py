"""The former home of :mod:`netprobe.layers` (resolution, outputs, layouts); its names are
importable from here too."""

from netprobe.layers import *  # noqa: F401,F403
from netprobe.layers import __all__  # noqa: F401
