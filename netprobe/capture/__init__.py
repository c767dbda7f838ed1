"""Capture engine: forward hooks that copy activations into on-device ring buffers.

Knows nothing of Lightning, TensorBoard or matplotlib.
"""

from netprobe.capture.distributed import gather
from netprobe.capture.probe import Probe, probe
from netprobe.capture.reductions import REDUCTIONS, reduce_output
from netprobe.capture.ring_buffer import RingBuffer

__all__ = ["Probe", "probe", "RingBuffer", "gather", "reduce_output", "REDUCTIONS"]
