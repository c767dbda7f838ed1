"""Which axis of a module's output holds the units, from what the code knows: the module's type,
and the operations of an observed forward pass followed from a known layout (elementwise
modules and functions, residual sums, slices, padding, concatenations, permuted views)."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from netprobe.layers.hooks import _state, eager_hook

__all__ = ["track_layouts", "unit_dim", "batch_first_of"]


# Modules whose 3-D output is (N, C, L) (channels first) whatever their input.
_CHANNELS_FIRST_3D = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,  # incl. SyncBatchNorm (Trainer(sync_batchnorm=True))
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.Upsample,
    nn.modules.pooling.MaxPool1d,
    nn.modules.pooling.AvgPool1d,
    nn.modules.pooling.AdaptiveAvgPool1d,
    nn.modules.pooling.AdaptiveMaxPool1d,
    nn.modules.padding.ReflectionPad1d,
    nn.modules.padding.ReplicationPad1d,
    nn.modules.padding.ConstantPad1d,
)

# Modules whose output of any rank >= 3 is channels first, (N, C, ...) (2-D/3-D pooling too).
_CHANNELS_FIRST = _CHANNELS_FIRST_3D + (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)

# Modules whose output has its units on the last axis (a Linear's out_features), whatever its rank.
# Modules whose output has its units on the last axis (a Linear's out_features), whatever its rank.
_UNITS_LAST = (nn.Linear, nn.Bilinear, nn.Embedding)

# Normalizations over trailing axes: their output has their input's layout; a LayerNorm over one
# axis of an input whose layout is unknown normalizes the features: units last.
_NORM_LAST = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

# Modules applied elementwise (their output has their input's shape and layout): the only modules
# whose output inherits their input's layout when their forward itself is not followed (compiled).
_ELEMENTWISE = tuple(
    c for c in vars(nn.modules.activation).values()
    if isinstance(c, type) and issubclass(c, nn.Module) and c is not nn.Module and c is not nn.MultiheadAttention
    and c.__module__ == nn.modules.activation.__name__
) + (nn.modules.dropout._DropoutNd, nn.Identity)


def _units_last_module(module: nn.Module) -> bool:
    """A Linear-like module (units on the last axis): ``nn.Linear``, ``nn.Bilinear``,
    ``nn.Embedding``, and Hugging Face's ``Conv1D`` (GPT-2's transposed Linear)."""
    if isinstance(module, _UNITS_LAST):
        return True
    cls = type(module)
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers.") for c in cls.__mro__)


def _typed_unit(module: nn.Module, nd: int) -> Optional[int]:
    """The units axis of a rank-``nd`` batch-first output that ``module``'s type gives, or ``None``."""
    if nd <= 2:
        return nd - 1
    if isinstance(module, _CHANNELS_FIRST if nd > 3 else _CHANNELS_FIRST_3D):
        return 1
    if _units_last_module(module):
        return nd - 1
    return None


# Units axes of the tensors (rank >= 3) of the forward pass being observed: outputs of the modules
# above and of the functions in _FN_CHANNELS_FIRST / _FN_UNITS_LAST, and what follows from them:
# outputs of elementwise functions (activations, dropout, a residual sum of two tensors of one
# layout), of slices, padding and concatenations, and permuted views (followed by their strides).
# Keyed by memory and layout, holding the tensor itself: every marked tensor stays alive until the
# observed pass ends (then the marks are cleared), so no key can meet reused memory, and a lookup
# depends on nothing but the forward pass.
_MARKS: Dict[Any, Tuple[torch.Tensor, int]] = {}


def _layout_key(t: torch.Tensor) -> Any:
    return (t.data_ptr(), t.device, tuple(t.shape), tuple(t.stride()))


def _mark(t: torch.Tensor, unit: int) -> None:
    _MARKS[_layout_key(t)] = (t, unit)


def _clear_marks() -> None:
    _MARKS.clear()


def _mark_of(t: torch.Tensor) -> Optional[int]:
    """The units axis of a tensor (rank >= 3) of the forward pass being followed, or ``None``.

    A permuted view of a marked tensor (``conv(x).transpose(1, 2)``, ``x.permute(0, 2, 3, 1)``: same
    memory, its axes' sizes and strides a permutation of the marked tensor's) is followed: its unit
    axis is the one with the marked unit axis's size and stride, when those pairs are distinct."""
    if not _state.tracking or not _MARKS or t.ndim < 3 or t.is_nested:
        return None
    e = _MARKS.get(_layout_key(t))
    if e is not None:
        return e[1]
    nd = t.ndim
    pairs = list(zip(t.shape, t.stride()))
    if len(set(pairs)) != nd:
        return None
    ptr, dev = t.data_ptr(), t.device
    for (kptr, kdev, kshape, kstride), (_, unit) in list(_MARKS.items()):
        if kptr != ptr or kdev != dev or len(kshape) != nd:
            continue
        base = list(zip(kshape, kstride))
        if sorted(base) != sorted(pairs):
            continue
        return pairs.index(base[unit])
    return None


def _first_tensor(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _layout_hook_impl(mod: nn.Module, args: Any, out: Any) -> None:
    if not _state.tracking:
        return
    if batch_first_of(mod) is not None:  # RNN, attention, transformer: the (first) output has its features last
        t = _first_tensor(out)
        if t is not None and t.ndim == 3 and not t.is_nested:
            _mark(t, 2)
        return
    if not isinstance(out, torch.Tensor) or out.ndim < 3 or out.is_nested:
        return
    unit = _typed_unit(mod, out.ndim)
    if unit is not None:
        _mark(out, unit)
    elif _mark_of(out) is None and args and isinstance(args[0], torch.Tensor):
        given = _mark_of(args[0])
        if given is not None and args[0].shape == out.shape and isinstance(mod, _ELEMENTWISE + _NORM_LAST):
            _mark(out, given)
        elif given is None and isinstance(mod, _NORM_LAST) and len(mod.normalized_shape) == 1:
            _mark(out, out.ndim - 1)

_layout_hook = eager_hook(_layout_hook_impl)

F = torch.nn.functional

# Functions whose output (rank >= 3) is channels first by definition.
_FN_CHANNELS_FIRST = {
    f for f in (
        getattr(F, n, None) for n in (
            "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
            "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
            "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
            "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
            "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
            "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
            "lp_pool1d", "lp_pool2d", "batch_norm", "instance_norm", "group_norm", "interpolate", "upsample",
            "pixel_shuffle", "pixel_unshuffle",
        )
    ) if f is not None
} | {getattr(torch, n) for n in ("conv1d", "conv2d", "conv3d", "batch_norm", "instance_norm", "group_norm",
                                  "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d") if hasattr(torch, n)}

# Functions whose output has its units last by definition.
_FN_UNITS_LAST = {F.linear, F.bilinear, F.embedding, torch.nn.functional.embedding_bag}

# Functions that keep their input's layout while changing its shape (padding, concatenation along
# any axis, a normalization over trailing axes).
_FN_SAME_LAYOUT = {F.pad, torch.cat, torch.concat, F.layer_norm, torch.Tensor.__getitem__, torch.narrow,
                   torch.Tensor.narrow, torch.split, torch.Tensor.split, torch.chunk, torch.Tensor.chunk}


if hasattr(F, "rms_norm"):
    _FN_SAME_LAYOUT.add(F.rms_norm)

# Functions whose same-shaped output is not their input's layout (a view reorders axes: followed
# by strides, or not at all; a contraction mixes axes).
_FN_NO_INHERIT = {
    torch.permute, torch.Tensor.permute, torch.transpose, torch.Tensor.transpose, torch.swapaxes,
    torch.Tensor.swapaxes, torch.swapdims, torch.Tensor.swapdims, torch.movedim, torch.Tensor.movedim,
    torch.moveaxis, torch.Tensor.moveaxis, torch.Tensor.view, torch.reshape, torch.Tensor.reshape,
    torch.Tensor.view_as, torch.Tensor.reshape_as, torch.flatten, torch.Tensor.flatten, torch.unflatten,
    torch.Tensor.unflatten, torch.Tensor.unfold, torch.as_strided, torch.Tensor.as_strided, torch.einsum,
    torch.bmm, torch.Tensor.bmm, torch.baddbmm, torch.tensordot, torch.t, torch.Tensor.t, torch.Tensor.mT,
    torch.Tensor.T, torch.Tensor.mH, torch.Tensor.H, torch.adjoint, torch.Tensor.adjoint,
    torch.Tensor.contiguous, torch.Tensor.clone, torch.clone,
}

_FN_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__}


def _slice_keeps_axes(args: Any) -> bool:
    """``x[...]`` with slices and ``...`` only (no int, ``None`` or tensor index): axes are kept."""
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(isinstance(i, slice) or i is Ellipsis for i in items)


def _copy_of_view(func: Any, args: Any, out: Any) -> Optional[int]:
    """``x.contiguous()`` / ``x.clone()`` of a followed tensor (a permuted view made contiguous):
    the copy has the view's axes, so its units axis."""
    if func in (torch.Tensor.contiguous, torch.Tensor.clone, torch.clone) and args and isinstance(args[0], torch.Tensor):
        if isinstance(out, torch.Tensor) and out.shape == args[0].shape:
            return _mark_of(args[0])
    return None


def _follow(func: Any, args: Any, kwargs: Any, out: Any) -> None:
    """Mark ``out`` (a function's result) from the function and the marks of its inputs."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    outs = [o for o in outs if isinstance(o, torch.Tensor) and o.ndim >= 3 and not o.is_nested]
    if not outs:
        return
    if func in _FN_CHANNELS_FIRST:
        for o in outs:
            _mark(o, 1)
        return
    if func in _FN_UNITS_LAST:
        for o in outs:
            _mark(o, o.ndim - 1)
        return
    if func in _FN_NO_INHERIT:
        unit = _copy_of_view(func, args, out)
        if unit is not None:
            _mark(outs[0], unit)
        return  # views: followed by their strides when read
    ins: List[torch.Tensor] = []
    for a in list(args) + list(kwargs.values() if kwargs else ()):
        if isinstance(a, torch.Tensor):
            ins.append(a)
        elif isinstance(a, (list, tuple)):
            ins += [t for t in a if isinstance(t, torch.Tensor)]
    if func in _FN_MATMUL:
        # (..., D) @ (D, K): the first operand's layout, for a weight matrix on the right only
        if len(ins) != 2 or ins[1].ndim != 2 or func is torch.Tensor.__rmatmul__:
            return
        ins = ins[:1]
    same = func in _FN_SAME_LAYOUT
    if func is torch.Tensor.__getitem__ and not _slice_keeps_axes(args):
        return
    units = set()
    for o in outs:
        for t in ins:
            if t.ndim == o.ndim and (same or t.shape == o.shape) and not t.is_nested:
                units.add(_mark_of(t))
    if None in units and len(units) > 1:  # an unknown input beside a known one: only if all known agree
        units.discard(None)
    if len(units) != 1 or None in units:
        return
    (unit,) = units
    for o in outs:
        if _mark_of(o) is None:
            _mark(o, unit)


try:
    from torch.overrides import TorchFunctionMode as _TorchFunctionMode
except ImportError:  # pragma: no cover - torch < 1.13
    _TorchFunctionMode = None  # type: ignore[assignment,misc]


if _TorchFunctionMode is not None:
    class _FollowLayouts(_TorchFunctionMode):
        """Follows layouts through every torch function of an observed forward pass (a residual
        sum, a permute, a functional convolution), beside the module hooks. Changes no result."""

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if _state.tracking and isinstance(out, (torch.Tensor, tuple, list)):
                try:
                    _follow(func, args, kwargs, out)
                except Exception:  # a tensor it cannot read (a subclass, no storage): left unmarked, never a failed forward
                    pass
            return out


def _compiled(modules: Iterable[nn.Module]) -> bool:
    """Whether one of ``modules`` (a model's) is compiled (torch.compile / nn.Module.compile):
    function modes are not used there, only module hooks."""
    for m in modules:
        if type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None) is not None:
            return True
    return False


def track_layouts(model: nn.Module) -> List[Any]:
    """Hooks (handles; ``.remove()`` each) on every module of ``model`` that mark, while a forward
    pass is observed (``_state.tracking``), each rank >= 3 output whose units axis its module's type
    gives or its input's layout passes on (see :class:`Layouts`, which registers them for its
    observed passes only). They run before any other forward hook of their module."""
    return [m.register_forward_hook(_layout_hook, prepend=True) for m in model.modules()]


def unit_dim(module: nn.Module, output: torch.Tensor) -> int:
    """The dimension of a batch-first ``output`` that indexes units, as its module's type gives it
    (see :class:`Layouts` for the full decision, which observes the batch axis and follows layouts
    through the forward pass).

    * 2-D ``(N, D)``: dim 1.
    * ``(N, C, ...)`` of convolution, pooling and normalization modules: dim 1, the channel.
    * Linear, Embedding (and LayerNorm over one axis) outputs: the last.

    Raises:
        ValueError: the output has 3 or more axes and its module's type does not tell its layout.
    """
    nd = output.ndim
    unit = _typed_unit(module, nd)
    if unit is None and isinstance(module, _NORM_LAST) and len(module.normalized_shape) == 1:
        unit = nd - 1
    if unit is None:
        raise ValueError(
            f"The {type(module).__name__} output {tuple(output.shape)} has {nd} axes, and its module's type does not tell "
            "which holds the units; pass `dims=(batch_dim, unit_dim)` (or use netprobe.probe with `layout=`)."
        )
    return unit


def batch_first_of(module: nn.Module) -> Optional[bool]:
    """``module``'s own ``batch_first`` (RNNs, attention, transformer layers and stacks), or ``None``."""
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return batch_first_of(module.layers[0]) if len(module.layers) else None
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return bool(module.self_attn.batch_first)
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.Transformer)):
        bf = getattr(module, "batch_first", None)
        return bf if isinstance(bf, bool) else None
    return None  # a `batch_first` attribute of a user's module says nothing about its own output
