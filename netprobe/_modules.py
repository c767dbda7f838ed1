"""Finding modules in a model and knowing which dimension of their output holds the units.

Shared by the capture engine (``netprobe.capture``) and the ablation metrics
(``netprobe.metrics.ablation``); knows nothing of Lightning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import weakref
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from netprobe._validation import close_names

LayerSpec = Union[str, type, nn.Module]

__all__ = ["LayerSpec", "resolve_layers", "resolve_layer", "unit_dim", "evaluating", "Layouts", "AmbiguousLayoutError", "LAYOUTS", "check_layout",
           "batch_first_of", "select_output"]

_GLOB_CHARS = set("*?[")


def _named(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: mod for name, mod in model.named_modules() if name != ""}


def resolve_layers(model: nn.Module, layers: Union[LayerSpec, Iterable[LayerSpec]]) -> Dict[str, nn.Module]:
    """Resolve a mixed list of layer selectors to ``{qualified_name: module}``, in model order.

    Args:
        model: the model whose submodules are selected.
        layers: a selector or a list of selectors, mixed freely:

            * an exact qualified name from ``model.named_modules()`` (``"encoder.0.fc"``);
            * a glob pattern (``"encoder.*.fc"``; ``*`` also crosses dots, as in :mod:`fnmatch`);
            * a module class (``nn.Conv2d``): every submodule that is an instance of it;
            * a module object that is a submodule of ``model``.

    Returns:
        An ordered ``dict`` from qualified name to module, each module once, in the order of
        ``model.named_modules()``.

    Raises:
        ValueError: an unknown name (the message lists the closest existing names), a pattern or a
            class that matches nothing, a module that is not part of ``model``, or an empty selection.
        TypeError: a selector of another type.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> list(resolve_layers(m, ["0", nn.ReLU]))
        ['0', '1']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    if isinstance(layers, (str, type, nn.Module)):
        layers = [layers]
    try:
        specs: Sequence[LayerSpec] = list(layers)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            "Expected `layers` to be a name, glob pattern, module class, module, or a list of them, "
            f"but got {type(layers).__name__}."
        ) from None
    if not specs:
        raise ValueError("Expected `layers` to select at least one module, but got an empty list.")
    named = _named(model)
    if not named:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no submodules to probe; wrap it, e.g. "
            "`nn.Sequential(model)`, or probe a model that has layers."
        )
    by_id = {id(m): n for n, m in named.items()}
    selected: set[str] = set()
    for spec in specs:
        if isinstance(spec, str):
            if spec in named:
                selected.add(spec)
            elif _GLOB_CHARS & set(spec):
                hits = [n for n in named if fnmatch.fnmatchcase(n, spec)]
                if not hits:
                    raise ValueError(
                        f"Layer pattern {spec!r} matches no module of {type(model).__name__}. "
                        f"Closest names: {close_names(spec.replace('*', ''), named)}."
                    )
                selected.update(hits)
            else:
                raise ValueError(
                    f"Unknown layer {spec!r} in {type(model).__name__}. Did you mean one of "
                    f"{close_names(spec, named)}? (All names: `[n for n, _ in model.named_modules()]`.)"
                )
        elif isinstance(spec, type) and issubclass(spec, nn.Module):
            hits = [n for n, m in named.items() if isinstance(m, spec)]
            if not hits:
                kinds = sorted({type(m).__name__ for m in named.values()})
                raise ValueError(
                    f"No module of type {spec.__name__} in {type(model).__name__}; it has: {kinds}."
                )
            selected.update(hits)
        elif isinstance(spec, nn.Module):
            name = by_id.get(id(spec))
            if name is None:
                raise ValueError(
                    f"The {type(spec).__name__} module passed in `layers` is not a submodule of "
                    f"{type(model).__name__} (pass a name from `model.named_modules()` instead)."
                )
            selected.add(name)
        else:
            raise TypeError(
                "Expected each entry of `layers` to be a str (name or glob), an nn.Module subclass or a "
                f"submodule, but got {type(spec).__name__}: {spec!r}."
            )
    return {n: named[n] for n in named if n in selected}


def resolve_layer(model: nn.Module, layer: Union[str, nn.Module]) -> tuple[str, nn.Module]:
    """Resolve exactly one layer (a qualified name or a submodule) to ``(name, module)``."""
    if isinstance(layer, str) and _GLOB_CHARS & set(layer):
        raise ValueError(f"Expected one layer, but got the pattern {layer!r}; pass an exact name.")
    if not isinstance(layer, (str, nn.Module)) or isinstance(layer, type):
        raise TypeError(
            f"Expected `layer` to be a qualified module name or a submodule, but got {type(layer).__name__}."
        )
    ((name, mod),) = resolve_layers(model, [layer]).items()
    return name, mod


#: keys under which a batch dict holds its inputs and its class targets (first match wins)
INPUT_KEYS = ("x", "input", "inputs", "image", "images", "data", "features")
TARGET_KEYS = ("y", "target", "targets", "label", "labels")


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
# Of those, the ones that make a model "1-D convolutional" (a reason to follow layouts at all).
_CONV_LIKE_1D = (nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d)

# Modules whose output of any rank >= 3 is channels first, (N, C, ...) (2-D/3-D pooling too).
_CHANNELS_FIRST = _CHANNELS_FIRST_3D + (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)

try:
    _compiler_disable = torch.compiler.disable
except AttributeError:  # pragma: no cover - torch < 2.1
    def _compiler_disable(fn):  # type: ignore[no-redef]
        return fn
try:
    _is_compiling = torch.compiler.is_compiling
except AttributeError:  # pragma: no cover - torch < 2.3
    def _is_compiling() -> bool:  # type: ignore[misc]
        return False


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


_call_eagerly = _compiler_disable(_call)  # made once: building a disabled wrapper costs ~20 us
_IN_COMPILED = [False]  # an eager hook called from compiled code is running


def _from_compiled(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    _IN_COMPILED[0] = True
    try:
        return fn(*args, **kwargs)
    finally:
        _IN_COMPILED[0] = False


def eager_hook(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as a hook that is never traced: under ``torch.compile`` it runs through
    ``torch.compiler.disable`` (a graph break; the hook's side effects happen eagerly), and in
    eager mode it is called directly, because the disabling wrapper costs ~20 us a call (measured
    on an H200 host, torch 2.11), as much as a capture hook's own work."""

    def hook(*args: Any, **kwargs: Any) -> Any:
        if _is_compiling():
            return _call_eagerly(_from_compiled, fn, *args, **kwargs)
        return fn(*args, **kwargs)

    return hook



# Modules whose output has its units on the last axis (a Linear's out_features), whatever its rank.
_UNITS_LAST = (nn.Linear, nn.Bilinear, nn.Embedding)
# Normalizations over trailing axes: their output has their input's layout; a LayerNorm over one
# axis of an input whose layout is unknown normalizes the features: units last.
_NORM_LAST = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
# (a layout is known by the module's type alone)
_TYPED = _CHANNELS_FIRST + _UNITS_LAST

# Tensors (rank >= 3) whose layout is known in the forward pass running now: "C" channels first
# (N, C, ...) (outputs of the modules above and of the functions in _FN_CHANNELS_FIRST), "L" units
# last (outputs of Linear-like modules and functions), and what follows from them: outputs of
# elementwise modules and functions (activations, dropout, a residual sum of two tensors of one
# layout), of slices, padding and concatenations, and permuted views (followed by their strides).
# Keyed by memory and layout (so a detached alias matches too), holding a weak reference to the
# tensor: a key only counts while that tensor lives, so its memory cannot have been reused meanwhile.
_MARKS: Dict[Any, Tuple["weakref.ref[torch.Tensor]", str]] = {}
_PURGE_AT = [512]
_ACTIVE = [0]  # layout trackers attached now
_C3_SEEN = [False]  # a 3-D channels-first tensor was marked since the marks were last cleared


class _Tracking:
    """The hooks of one :func:`track_layouts` call; ``remove()`` removes them, and the last
    tracker to go clears the marks (so no tensor kept from one model is read for another)."""

    def __init__(self, handles: List[Any]) -> None:
        self.handles = handles
        _ACTIVE[0] += 1

    def remove(self) -> None:
        handles, self.handles = self.handles, []
        if handles:
            for h in handles:
                h.remove()
            _ACTIVE[0] -= 1
            if _ACTIVE[0] == 0:
                _MARKS.clear()
                _C3_SEEN[0] = False


def _layout_key(t: torch.Tensor) -> Any:
    return (t.data_ptr(), t.device, tuple(t.shape), tuple(t.stride()))


def _mark(t: torch.Tensor, kind: str) -> None:
    if len(_MARKS) > _PURGE_AT[0]:
        for k, (r, _) in list(_MARKS.items()):
            if r() is None:
                _MARKS.pop(k, None)
        _PURGE_AT[0] = max(512, 2 * len(_MARKS))  # many live entries: purge less often
    _MARKS[_layout_key(t)] = (weakref.ref(t), kind)
    if kind == "C" and t.ndim == 3:
        _C3_SEEN[0] = True  # (N, C, L) tensors exist in this model (a functional conv1d, say)


def _mark_of(t: torch.Tensor) -> Optional[str]:
    """"C" (channels first), "L" (units last) or None, for a tensor (rank >= 3) of the running forward.

    A permuted view of a marked tensor (``conv(x).transpose(1, 2)``, ``x.permute(0, 2, 3, 1)``: same
    memory, its axes' sizes and strides a permutation of the marked tensor's) is followed: its unit
    axis is the one with the marked unit axis's size and stride. Only if the batch axis stays first,
    the pairs are distinct and the unit axis lands second or last."""
    if not _ACTIVE[0] or not _MARKS or t.ndim < 3 or t.is_nested:  # marks count only while some tracking is on
        return None
    e = _MARKS.get(_layout_key(t))
    if e is not None:
        return e[1] if e[0]() is not None else None
    nd = t.ndim
    pairs = list(zip(t.shape, t.stride()))
    if len(set(pairs)) != nd:
        return None
    ptr, dev = t.data_ptr(), t.device
    for (kptr, kdev, kshape, kstride), (r, kind) in list(_MARKS.items()):
        if kptr != ptr or kdev != dev or len(kshape) != nd or r() is None:
            continue
        base = list(zip(kshape, kstride))
        if sorted(base) != sorted(pairs):
            continue
        unit = pairs.index(base[1 if kind == "C" else nd - 1])
        if pairs.index(base[0]) != 0:
            return None
        return "C" if unit == 1 else "L" if unit == nd - 1 else None
    return None


def _is_channels_first(t: torch.Tensor) -> bool:
    return _mark_of(t) == "C"


def _layout_hook_impl(mod: nn.Module, args: Any, out: Any) -> None:
    if isinstance(out, torch.Tensor) and out.ndim >= 3 and not out.is_nested and _TRACKING[0]:
        if isinstance(mod, _CHANNELS_FIRST if out.ndim > 3 else _CHANNELS_FIRST_3D):
            _mark(out, "C")
        elif isinstance(mod, _UNITS_LAST):
            _mark(out, "L")
        elif _mark_of(out) is None and args and isinstance(args[0], torch.Tensor):
            kind = _mark_of(args[0])
            if kind is not None and (args[0].shape == out.shape or isinstance(mod, _NORM_LAST)):
                _mark(out, kind)
            elif kind is None and isinstance(mod, _NORM_LAST) and len(mod.normalized_shape) == 1:
                _mark(out, "L")


_layout_hook = eager_hook(_layout_hook_impl)
_TRACKING = [0]  # forward passes now followed (their tensors marked)

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
}
_FN_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__}


def _slice_keeps_axes(args: Any) -> bool:
    """``x[...]`` with slices and ``...`` only (no int, ``None`` or tensor index): axes are kept."""
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(isinstance(i, slice) or i is Ellipsis for i in items)


def _follow(func: Any, args: Any, kwargs: Any, out: Any) -> None:
    """Mark ``out`` (a function's result) from the function and the marks of its inputs."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    outs = [o for o in outs if type(o) is torch.Tensor or isinstance(o, torch.Tensor)]
    outs = [o for o in outs if o.ndim >= 3 and not o.is_nested]
    if not outs:
        return
    if func in _FN_CHANNELS_FIRST:
        kinds = {"C"}
    elif func in _FN_UNITS_LAST:
        kinds = {"L"}
    elif func in _FN_NO_INHERIT:
        return  # views: followed by their strides when read
    else:
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
        kinds = set()
        for o in outs:
            for t in ins:
                if t.ndim == o.ndim and (same or t.shape == o.shape) and not t.is_nested:
                    kinds.add(_mark_of(t))
        if None in kinds and len(kinds) > 1:  # an unknown input beside a known one: only if all known agree
            kinds.discard(None)
        if len(kinds) != 1 or None in kinds:
            return
    (kind,) = kinds
    for o in outs:
        if _mark_of(o) is None:
            _mark(o, kind)


try:
    from torch.overrides import TorchFunctionMode as _TorchFunctionMode
except ImportError:  # pragma: no cover - torch < 1.13
    _TorchFunctionMode = None  # type: ignore[assignment,misc]

if _TorchFunctionMode is not None:
    class _FollowLayouts(_TorchFunctionMode):
        """Follows layouts through every torch function of a forward pass (a residual sum, a
        permute, a functional convolution), beside the module hooks. Changes no result."""

        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if _TRACKING[0] and isinstance(out, (torch.Tensor, tuple, list)):
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


def track_layouts(model: nn.Module, modules: Iterable[nn.Module]) -> List[Any]:
    """Hooks (a list of handles; ``.remove()`` each) that let :class:`Layouts` tell the layout of a
    rank >= 3 output that its module's type does not give (a ReLU after a Conv1d is ``(N, C, L)``, a
    GELU after a Linear on ``(N, H, W, C)`` has its units last), by following the tensors of each
    forward pass through every module of ``model``; :class:`Layouts` also follows them through torch
    functions (sums, permutes) while it needs to. Registered only when one of ``modules`` does not
    have its layout by type; they run before any other forward hook of their module."""
    mods = list(modules)
    if all(isinstance(m, _TYPED) for m in mods):
        return []
    return [_Tracking([m.register_forward_hook(_layout_hook, prepend=True) for m in model.modules()])]


def unit_dim(module: nn.Module, output: torch.Tensor) -> int:
    """The dimension of ``output`` that indexes units, for a batch-first output whose layout its
    module's type gives (see :class:`Layouts` for the full decision, which also follows layouts
    through the forward pass, finds the batch axis and refuses what it cannot establish).

    * 2-D ``(N, D)``: dim 1.
    * ``(N, C, ...)`` of convolution, pooling and normalization modules: dim 1, the channel.
    * Linear, Embedding (and LayerNorm over one axis) outputs: the last.

    Raises:
        ValueError: the output has 3 or more axes and neither its module's type nor the forward
            pass (while :class:`Layouts` follows it) tells its layout; pass the layout explicitly.
    """
    nd = output.ndim
    if nd <= 2:
        return nd - 1
    mark = _mark_of(output)
    if isinstance(module, _CHANNELS_FIRST if nd > 3 else _CHANNELS_FIRST_3D) or mark == "C":
        return 1
    if (isinstance(module, _UNITS_LAST) or mark == "L"
            or (isinstance(module, _NORM_LAST) and len(module.normalized_shape) == 1)):
        return nd - 1
    raise ValueError(
        f"The {type(module).__name__} output {tuple(output.shape)} has {nd} axes, and its module's type does not tell "
        "which holds the units; pass `dims=(batch_dim, unit_dim)` (or use netprobe.probe with `layout=`)."
    )


@contextlib.contextmanager
def evaluating(model: nn.Module, *, restore_rng: bool = False) -> Iterator[None]:
    """Eval mode under ``torch.no_grad()``; afterwards every submodule's ``training`` flag is what
    it was (a model may mix modes), and with ``restore_rng`` the global CPU and CUDA RNG states too."""
    flags = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.random.get_rng_state() if restore_rng else None
    cuda_rng = (torch.cuda.get_rng_state_all()
                if restore_rng and torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in flags:
            m.training = t
        if cpu_rng is not None:
            torch.random.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


# ----------------------------------------------------------------------------- layouts
#: Axis letters of a ``layout=`` string: ``N`` the batch, ``C`` the units (channels, features),
#: any of ``L T H W D`` a position axis (sequence, height, width, depth).
LAYOUT_POSITION_AXES = "LTHWD"
#: The layouts documented (any string of distinct axis letters with one ``N`` and one ``C`` is accepted).
LAYOUTS = ("NC", "NCL", "NLC", "LNC", "NCHW", "NHWC", "NCDHW", "NDHWC")

LayoutSpec = Union[str, Mapping[str, str], None]


def check_layout(layout: object, where: str = "layout") -> str:
    """Validate one layout string (``"NCL"``, ``"LNC"``, ...) and return it upper-cased."""
    if not isinstance(layout, str):
        raise TypeError(f"Expected `{where}` to be a layout string such as {list(LAYOUTS)}, but got {type(layout).__name__}.")
    s = layout.upper()
    ok = (1 <= len(s) <= 6 and s.count("N") == 1 and s.count("C") == 1 and len(set(s)) == len(s)
          and all(c in "NC" + LAYOUT_POSITION_AXES for c in s))
    if not ok:
        raise ValueError(
            f"Expected `{where}` to name each axis of the layer's output once: one 'N' (batch), one 'C' (units) and "
            f"position axes from {LAYOUT_POSITION_AXES!r}, e.g. {list(LAYOUTS)}; but got {layout!r}."
        )
    return s


def per_layer_layout(layout: LayoutSpec, names: Iterable[str], where: str = "layout") -> Dict[str, Optional[str]]:
    """``layout=`` (one string for every layer, a dict ``{layer: layout}``, or ``None``) -> ``{layer: layout or None}``."""
    names = list(names)
    if layout is None:
        return {n: None for n in names}
    if isinstance(layout, Mapping):
        unknown = [k for k in layout if k not in names]
        if unknown:
            raise ValueError(f"`{where}` names layers that are not selected: {unknown}. Selected layers: {names}.")
        return {n: (check_layout(layout[n], f"{where}[{n!r}]") if layout.get(n) is not None else None) for n in names}
    s = check_layout(layout, where)
    return {n: s for n in names}


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


def _sequence_context(mods: Mapping[str, nn.Module], name: str) -> Optional[bool]:
    """``batch_first`` of ``name`` itself or of its nearest ancestor that has one (its submodules see
    the same layout), ``None`` when none has (or when that ancestor is an attention module, whose
    internals run sequence-first whatever its ``batch_first``); ``mods``: the model's named modules."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        anc = ".".join(parts[:i])
        mod = mods.get(anc)
        if mod is None:
            continue
        bf = batch_first_of(mod)
        if bf is not None:
            if i < len(parts) and isinstance(mod, nn.MultiheadAttention):
                return None
            return bf
    return None


NESTED_MESSAGE = (
    "Layer {name!r} returned a nested tensor (the fast path of nn.TransformerEncoder with a src_key_padding_mask in "
    "eval mode): its sequences have different lengths, which netprobe does not reduce. Build the encoder with "
    "`nn.TransformerEncoder(..., enable_nested_tensor=False)` (its layers then return padded tensors), or probe a "
    "module outside the encoder."
)


class _Cleanup:
    """A handle whose ``remove()`` calls ``fn`` once."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn: Optional[Callable[[], None]] = fn

    def remove(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


class AmbiguousLayoutError(ValueError):
    """A layer's batch axis cannot be told from this forward call (a 3-D output whose first two
    axes both have the batch size): another call with another batch size may tell it."""


class Layouts:
    """The one place that decides, for every selected layer, which axis of its output holds the
    batch and which the units (used by the probe's reductions, ablation masks and noise).

    From, in this order:

    1. an explicit ``layout=`` of the layer (``"NC"``, ``"NCL"``, ``"NLC"``, ``"LNC"``, ``"NCHW"``,
       ``"NHWC"``, ``"NCDHW"``, ...; ``N`` batch, ``C`` units, ``L/T/H/W/D`` positions);
    2. the ``batch_first`` of the module (``nn.RNN/LSTM/GRU``, ``nn.MultiheadAttention``,
       transformer layers and stacks) or of its nearest ancestor that has one (``layers.0.linear1``
       inside a ``TransformerEncoderLayer``), for the first tensor of its output:
       ``(N, T, D)`` or ``(T, N, D)``;
    3. the module's type and the tensors it was applied to: 1-D conv/pool/norm outputs are
       ``(N, C, L)``, ``nn.Linear``/``LayerNorm``/``Embedding`` outputs have their units last, and an
       elementwise module (activation, dropout, any module whose output has its input's shape) keeps
       its input's layout; a sum or a concatenation (a residual connection) starts an unknown one;
    4. the batch size at the model's entry (the first dimension of the first tensor argument of the
       outermost probed-or-ancestor module called; the second for a sequence-first module): the
       batch axis must be dim 0 (dim 0 or 1 for units-last 3-D outputs) and be the only one of
       those of that size.

    3-D outputs in a model with 1-D convolutions whose layout 3. cannot follow (``relu(conv(x) + x)``)
    and outputs whose batch axis 4. cannot establish raise ``ValueError`` naming the ``layout=`` to
    pass: a layout is never guessed.
    """

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module], layout: LayoutSpec = None) -> None:
        self.model = model
        self.modules = dict(modules)
        self.layout = per_layer_layout(layout, self.modules)
        self._named = dict(model.named_modules())
        self.context = {n: _sequence_context(self._named, n) for n in self.modules}
        self.batch: Optional[int] = None
        self._depth = 0
        # forward passes begun (entries at depth 0): what shares one draw of sampled positions
        self.passes = 0
        self._conv1d = any(isinstance(m, _CONV_LIKE_1D) for m in self._named.values())
        self._seqfirst = any(batch_first_of(m) is False for m in self._named.values())
        self._decided: Dict[Tuple[str, bool, int], Tuple[int, int]] = {}  # established by an unambiguous call
        # layers whose layout neither `layout=`, their type nor a batch_first context gives: the
        # forward passes are followed (module hooks, and a function mode in eager mode) until each
        # has been decided once
        self._needs = [n for n, m in self.modules.items()
                       if self.layout[n] is None and self.context[n] is None and not isinstance(m, _TYPED)]
        self._compiled = _compiled(self._named.values())
        self._mode: Any = None
        self._tracking_now = False

    # -- hooks -------------------------------------------------------------------------
    def attach(self) -> List[Any]:
        """Register the hooks (entry batch size, layout tracking); returns handles to ``.remove()``."""
        named = self._named
        entries: Dict[int, nn.Module] = {id(self.model): self.model}
        for n in self.modules:
            parts = n.split(".")
            for i in range(len(parts) + 1):
                m = named.get(".".join(parts[:i]))
                if m is not None:
                    entries[id(m)] = m
        handles: List[Any] = []
        try:
            for m in entries.values():
                handles.append(m.register_forward_pre_hook(eager_hook(self._enter), with_kwargs=True))
                handles.append(m.register_forward_hook(eager_hook(self._leave), always_call=True))
            handles += track_layouts(self.model, [self.modules[n] for n in self._needs]) if self._needs else []
            handles.append(_Cleanup(self._reset_forward))  # removed last: no mode left pushed
        except BaseException:
            for h in handles:
                h.remove()
            raise
        return handles

    def _reset_forward(self) -> None:
        """Forget a forward pass that did not end (a KeyboardInterrupt skips even ``always_call``
        hooks): depth 0, and the function mode it pushed popped."""
        self._depth = 0
        if self._tracking_now:
            self._tracking_now = False
            _TRACKING[0] -= 1
            mode, self._mode = self._mode, None
            if mode is not None:
                try:
                    mode.__exit__(None, None, None)
                except Exception:  # pragma: no cover - the mode stack was changed under it
                    pass

    def _enter(self, mod: nn.Module, args: Any, kwargs: Any) -> None:
        if mod is self.model and self._depth:
            self._reset_forward()  # a new call of the model while an interrupted one is still counted
        if self._depth == 0:
            self.passes += 1
            self.batch = None
            first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is not None and first.ndim >= 1:
                dim = 1 if (first.ndim == 3 and not first.is_nested and batch_first_of(mod) is False) else 0
                self.batch = int(first.size(dim))
            known = {k[0] for k in self._decided}
            if any(n not in known for n in self._needs):
                self._tracking_now = True
                _TRACKING[0] += 1
                # not from compiled code: a mode pushed there changes what the compiled frames were
                # guarded on (recompiles, up to the limit); module hooks alone follow layouts then
                if _TorchFunctionMode is not None and not self._compiled and not _is_compiling() and not _IN_COMPILED[0]:
                    self._mode = _FollowLayouts()
                    self._mode.__enter__()
        self._depth += 1

    def _leave(self, mod: nn.Module, args: Any, out: Any) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self._reset_forward()

    # -- the decision ------------------------------------------------------------------
    def dims(self, name: str, module: nn.Module, out: torch.Tensor, *, primary: bool = True) -> Tuple[int, int]:
        """``(batch_dim, unit_dim)`` of ``out``, the output of layer ``name`` (``primary``: the first
        tensor of the module's output, the one ``batch_first`` describes)."""
        shape = tuple(out.shape) if not out.is_nested else None
        if out.is_nested:
            raise ValueError(NESTED_MESSAGE.format(name=name))
        lay = self.layout.get(name)
        nd = out.ndim
        if lay is not None:
            if len(lay) != nd:
                raise ValueError(
                    f"`layout={lay!r}` for layer {name!r} names {len(lay)} axes, but the layer's output {shape} has {nd}."
                )
            return lay.index("N"), lay.index("C")
        if nd == 0:
            raise ValueError(f"Layer {name!r} returned a scalar; there are no units to capture.")
        n = self.batch
        key = (name, primary, nd)
        hit = self._decided.get(key)
        if hit is not None and (n is None or shape[hit[0]] == n):  # type: ignore[index]
            return hit  # told by an earlier call of this layer (its forward is no longer followed)
        bf = self.context.get(name) if primary else None
        if nd == 3 and bf is not None:
            return (0, 2) if bf else (1, 2)
        suggest = {1: "'NC' after a reshape", 2: "'NC'", 3: "'NCL', 'NLC' or 'LNC'", 4: "'NCHW' or 'NHWC'",
                   5: "'NCDHW' or 'NDHWC'"}.get(nd, "a string naming each axis")
        seen = f"the batch size at the model's entry is {n}" if n is not None else "no batch size was seen at the model's entry"
        if nd == 3:
            mark = _mark_of(out)
            if isinstance(module, _CHANNELS_FIRST_3D) or mark == "C":
                if n is None or shape[0] == n:  # type: ignore[index]
                    self._decided[key] = (0, 1)
                    return 0, 1
            elif self._seqfirst:
                # a model with sequence-first modules, outside their context: its entry may be (T, N)
                # as well as (N, T) (an embedding before a batch_first=False encoder), so the batch size
                # seen there proves nothing
                raise ValueError(
                    f"Layer {name!r} ({type(module).__name__}) returned {shape} in a model with sequence-first modules "
                    "(batch_first=False), outside them: (N, T, D) and (T, N, D) are both possible. Pass `layout='LNC'` "
                    "(sequence first) or `layout='NLC'` (batch first) for this layer."
                )
            elif isinstance(module, _UNITS_LAST) or mark == "L":
                if n is not None and shape[0] == n and shape[1] != n:  # type: ignore[index]
                    self._decided[key] = (0, 2)
                    return 0, 2
                if n is not None and shape[0] == n and shape[1] == n:  # type: ignore[index]
                    if key in self._decided:  # an earlier call of this layer told it
                        return self._decided[key]
                    raise AmbiguousLayoutError(
                        f"Layer {name!r} ({type(module).__name__}) returned {shape}: both of its first two axes have the "
                        f"batch size {n}, so it may be (N, T, D) or (T, N, D). Pass `layout='NLC'` (batch first) or "
                        f"`layout='LNC'` (sequence first) for this layer."
                    )
                if n is not None and shape[1] == n:  # type: ignore[index]
                    raise ValueError(
                        f"Layer {name!r} ({type(module).__name__}) returned {shape}, whose second axis has the batch size "
                        f"{n}: a sequence-first (T, N, D) output? Pass `layout='LNC'` for this layer (or 'NLC' if the "
                        "batch is first after all)."
                    )
            else:
                where = ("in a model with 1-D convolutions" if (self._conv1d or _C3_SEEN[0])
                         else "computed by no module or function that tells its layout (a Linear, an embedding, a "
                              "LayerNorm, a 1-D convolution, or what follows them)")
                raise ValueError(
                    f"Layer {name!r} ({type(module).__name__}) returned {shape} {where}, and its layout cannot be followed "
                    "(e.g. the model's input itself, or a function netprobe does not follow): (N, C, L) and (N, L, C) are "
                    "both possible. Pass `layout='NCL'` (channels are the units) or `layout='NLC'` (a sequence, features "
                    "last) for this layer."
                )
        elif nd <= 2:
            if n is None or shape[0] == n:  # type: ignore[index]
                self._decided[key] = (0, nd - 1)  # decided: later forwards are not followed
                return 0, nd - 1
        else:
            mark = _mark_of(out)
            if isinstance(module, _CHANNELS_FIRST) or mark == "C":
                ud = 1
            elif isinstance(module, _UNITS_LAST) or mark == "L":
                ud = nd - 1  # a Linear applied to (N, H, W, C), and what follows from it
            else:
                how = ("the model runs compiled, so only module hooks follow it: a residual sum is not followed"
                       if self._compiled or _IN_COMPILED[0]
                       else "it is computed by a function netprobe does not follow, or from the model's input")
                raise ValueError(
                    f"Layer {name!r} ({type(module).__name__}) returned {shape}, and its layout cannot be established "
                    f"({how}): channels first and channels last are both possible. Pass `layout={suggest}` "
                    "(N = batch, C = units) for this layer."
                )
            if n is None or shape[0] == n:  # type: ignore[index]
                self._decided[key] = (0, ud)
                return 0, ud
        raise ValueError(
            f"Layer {name!r} ({type(module).__name__}) returned {shape}, and netprobe cannot tell its batch axis ({seen}). "
            f"Pass the layer's layout, e.g. `layout={suggest}` (N = batch, C = units), for this layer."
        )


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
