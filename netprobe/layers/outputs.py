"""Reading what a layer returned and what a batch holds: which tensor of a module's output
(``select=``) is read and how a changed tensor is put back, the keys of a dict batch's inputs
and targets, and the message for nested tensors."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Tuple

import torch

__all__ = ["INPUT_KEYS", "TARGET_KEYS", "NESTED_MESSAGE", "select_output", "split_batch"]


#: keys under which a batch dict holds its inputs and its class targets (first match wins)
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "data", "features")

TARGET_KEYS = ("y", "target", "targets", "label", "labels")

NESTED_MESSAGE = (
    "Layer {name!r} returned a nested tensor (the fast path of nn.TransformerEncoder with a src_key_padding_mask in "
    "eval mode): its sequences have different lengths, which netprobe does not reduce. Build the encoder with "
    "`nn.TransformerEncoder(..., enable_nested_tensor=False)` (its layers then return padded tensors), or probe a "
    "module outside the encoder."
)


class _Identity:
    """A key that compares by identity and holds its object, so the identity cannot be reused by
    another object while a decision keyed by it is kept."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj


def _select_key(select: Any) -> Any:
    """A hashable stand-in for a ``select=`` value: the value itself, or a callable by identity
    (held by the key, so a decision never passes to another callable that reuses its address)."""
    return select if isinstance(select, (int, str, type(None))) else ("callable", _Identity(select))


def select_output(output: Any, select: Any, name: str, *, require: bool = False) -> Tuple[torch.Tensor, bool, Callable[[torch.Tensor], Any]]:
    """The tensor of a layer's output to capture or perturb: ``(tensor, primary, rebuild)``.

    ``select``: ``None`` (a tensor output; for a tuple/list the first tensor, unless ``require``), an
    int index into a tuple/list (a named tuple too), a key of a dict-like output or a field name of a
    dataclass-like one, or a callable ``output -> tensor`` (capture only: it cannot be rebuilt).
    ``primary`` is whether the tensor is the output's first element (the one a module's
    ``batch_first`` describes). ``rebuild(new)`` returns the output with that tensor replaced and
    everything else unchanged (the same objects).
    """
    if select is not None and callable(select) and not isinstance(select, (str, int)):
        out = select(output)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"The selected output of layer {name!r} is a {type(out).__name__}, not a tensor.")

        def no_rebuild(new: torch.Tensor) -> Any:
            raise TypeError(f"A callable `select` cannot be used to perturb layer {name!r}: pass an int index or a key.")

        return out, out is output, no_rebuild
    if isinstance(output, torch.Tensor):  # (a `select` for tuple outputs of other layers is ignored here)
        return output, True, lambda new: new
    if isinstance(output, (tuple, list)):
        if select is None:
            idx = next((i for i, o in enumerate(output) if isinstance(o, torch.Tensor)), None)
            if idx is None:
                raise TypeError(f"Layer {name!r} returned a {type(output).__name__} with no tensor in it; pass `select=`.")
            if require:
                raise ValueError(
                    f"Layer {name!r} ({len(output)}-item {type(output).__name__} output) returns several values: pass "
                    f"`select=<index>` to choose the tensor to perturb (e.g. `select=0` for the sequence output of an RNN "
                    "or the attention output of nn.MultiheadAttention); the other items pass through unchanged."
                )
        else:
            if not isinstance(select, int) or isinstance(select, bool):
                raise TypeError(f"Layer {name!r} returns a {type(output).__name__}: `select` must be an int index, got {select!r}.")
            if not -len(output) <= select < len(output):
                raise IndexError(f"Layer {name!r} returns a {type(output).__name__} of {len(output)} items; `select={select}` is out of range.")
            idx = select % len(output)
        out = output[idx]

        def rebuild(new: torch.Tensor) -> Any:
            items = list(output)
            items[idx] = new
            if isinstance(output, list):
                return items
            return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)

        primary = idx == 0
    elif isinstance(output, Mapping) or (hasattr(output, "keys") and hasattr(output, "__getitem__")):
        keys = list(output.keys())
        if select is None:
            raise TypeError(f"Layer {name!r} returns a dict-like output with keys {keys}; pass `select=<key>` (or a dict {{layer: key}}) to choose one.")
        if select not in keys:
            raise KeyError(f"Layer {name!r} returns a dict-like output with keys {keys}; `select={select!r}` is not one of them.")
        out = output[select]

        def rebuild(new: torch.Tensor) -> Any:
            if isinstance(output, dict) and type(output) is dict:
                d = dict(output)
                d[select] = new
                return d
            import copy
            c = copy.copy(output)
            c[select] = new
            return c

        primary = keys[0] == select
    elif dataclasses.is_dataclass(output) and isinstance(select, str) and hasattr(output, select):
        out = getattr(output, select)
        primary = dataclasses.fields(output)[0].name == select

        def rebuild(new: torch.Tensor) -> Any:
            return dataclasses.replace(output, **{select: new})
    else:
        raise TypeError(
            f"Layer {name!r} returned {type(output).__name__}, which netprobe cannot capture: expected a tensor, a "
            "tuple/list of tensors, a dict-like output or a dataclass (with `select=<field>`), or pass `select=callable`."
        )
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"The selected output of layer {name!r} is a {type(out).__name__}, not a tensor.")
    return out, primary, rebuild


def split_batch(batch: Any, advice: str) -> Optional[Tuple[Any, Any]]:
    """``(inputs, targets)`` of a batch: the first two items of a tuple or list, or the
    :data:`INPUT_KEYS` and :data:`TARGET_KEYS` entries of a dict (the first key present of each);
    ``None`` for anything else. A dict without such keys raises ``ValueError`` naming its keys, the
    expected ones and ``advice``."""
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in TARGET_KEYS if k in batch), None)
        if x is None or y is None:
            raise ValueError(
                f"Cannot find inputs and targets in a batch dict with keys {list(batch)}: expected one of "
                f"{list(INPUT_KEYS)} and one of {list(TARGET_KEYS)}. {advice}"
            )
        return x, y
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    return None

