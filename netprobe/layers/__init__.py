"""Layers: finding modules in a model (:mod:`~netprobe.layers.resolve`), reading their outputs
(:mod:`~netprobe.layers.outputs`), and deciding, for every call site, which axis of an output holds
the batch and which the units (:mod:`~netprobe.layers.layouts`, from what is observed,
:mod:`~netprobe.layers.observe`, and followed, :mod:`~netprobe.layers.follow`). Shared by the
capture engine and the metrics that run a model; knows nothing of Lightning."""

from netprobe.layers.follow import batch_first_of, track_layouts, unit_dim
from netprobe.layers.hooks import eager_hook, evaluating, observing
from netprobe.layers.layouts import LAYOUTS, Layouts, LayoutSpec, check_layout, per_layer_layout
from netprobe.layers.observe import LayoutDecisions
from netprobe.layers.outputs import INPUT_KEYS, NESTED_MESSAGE, TARGET_KEYS, select_output, split_batch
from netprobe.layers.resolve import LayerSpec, glob_regex, resolve_layer, resolve_layers

__all__ = ["LayerSpec", "resolve_layers", "resolve_layer", "glob_regex", "unit_dim", "track_layouts", "evaluating",
           "eager_hook", "observing", "Layouts", "LayoutDecisions", "LAYOUTS", "LayoutSpec", "check_layout",
           "per_layer_layout", "batch_first_of", "select_output", "split_batch", "INPUT_KEYS", "TARGET_KEYS", "NESTED_MESSAGE"]
