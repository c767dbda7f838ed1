"""Finding modules in a model and knowing which dimension of their output holds the units.

Shared by the capture engine (``netprobe.capture``) and the ablation metrics
(``netprobe.metrics.ablation``); knows nothing of Lightning.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from netprobe import _observe
from netprobe._validation import close_names

LayerSpec = Union[str, type, nn.Module]

__all__ = ["LayerSpec", "resolve_layers", "resolve_layer", "unit_dim", "evaluating", "Layouts", "observing", "LAYOUTS", "check_layout",
           "batch_first_of", "select_output"]

_GLOB_CHARS = set("*?[")


@dataclasses.dataclass
class _LayerState:
    """What is running now, read by every netprobe hook: nesting depths of the forward passes
    netprobe runs to observe batch axes (``observing``; other hooks ignore those) and of the ones
    whose tensors are followed (``tracking``), and whether an eager hook was called from compiled
    code (``in_compiled``). One instance, :data:`_state`."""

    observing: int = 0
    tracking: int = 0
    in_compiled: bool = False


_state = _LayerState()


def glob_regex(pattern: str) -> "re.Pattern[str]":
    """The compiled regular expression of a layer glob over dotted names, as :mod:`pathlib` globs
    paths: ``*`` matches within one dotted segment, ``?`` one character of a segment, ``[...]`` a
    character class, and ``**`` any number of whole segments (zero included: ``a.**.b`` matches
    ``a.b`` and ``a.x.y.b``; within a segment, ``**`` matches across dots)."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            start = i == 0 or pattern[i - 1] == "."
            end = i + 2 == n or pattern[i + 2] == "."
            if start and end and i + 2 < n:  # "**." : zero or more whole segments, each with its dot
                out.append(r"(?:[^.]+\.)*")
                i += 3
            elif start and end and i > 0:  # ".**" at the end: the dot before it is optional
                out[-1] = r"(?:\..*)?"
                i += 2
            else:
                out.append(".*")
                i += 2
        elif c == "*":
            out.append(r"[^.]*")
            i += 1
        elif c == "?":
            out.append(r"[^.]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern.startswith("[!", i) or pattern.startswith("[]", i) else i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1:j]
                body = "^" + body[1:] if body.startswith("!") else body
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _named(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: mod for name, mod in model.named_modules() if name != ""}


def resolve_layers(model: nn.Module, layers: Union[LayerSpec, Iterable[LayerSpec]]) -> Dict[str, nn.Module]:
    """Resolve a mixed list of layer selectors to ``{qualified_name: module}``, in model order.

    Args:
        model: the model whose submodules are selected.
        layers: a selector or a list of selectors, mixed freely:

            * an exact qualified name from ``model.named_modules()`` (``"encoder.0.fc"``);
            * a glob pattern (``"encoder.*.fc"``): ``*`` matches within one dotted segment and
              ``**`` across segments, as in :mod:`pathlib` (see :func:`glob_regex`);
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
                rx = glob_regex(spec)
                hits = [n for n in named if rx.match(n)]
                if not hits:
                    raise ValueError(
                        f"Layer pattern {spec!r} matches no module of {type(model).__name__}. "
                        f"Closest names: {close_names(spec.replace('*', ''), named)}. (`*` matches within one dotted segment, `**` across segments.)"
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


def _from_compiled(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    _state.in_compiled = True
    try:
        return fn(*args, **kwargs)
    finally:
        _state.in_compiled = False


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


@contextlib.contextmanager
def evaluating(model: nn.Module, *, restore_rng: bool = False) -> Iterator[None]:
    """Eval mode under ``torch.no_grad()``; afterwards ``model.train(mode)`` with the mode it was
    in (so a ``train()`` override undoes what its ``eval()`` did), then every submodule's
    ``training`` flag is what it was (a model may mix modes), and with ``restore_rng`` the global
    CPU and CUDA RNG states too."""
    flags = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.random.get_rng_state() if restore_rng else None
    cuda_rng = (torch.cuda.get_rng_state_all()
                if restore_rng and torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(flags[0][1])
        for m, t in flags:
            if m.training != t:
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


#: global count of observed forward passes running now: every netprobe hook (capture, statistics,
#: other :class:`Layouts`) ignores the forward passes that observation runs


def observing() -> bool:
    """Whether the forward pass running now is one netprobe runs to observe batch axes (hooks
    that capture or count must ignore it)."""
    return bool(_state.observing)


_OPT_OUT = (
    "If the model cannot be run again on resized inputs, pass `observe=False`: the batch axis is then the `layout=`'s "
    "N (default: the first axis, or what `batch_first` says), checked only against the number of input rows."
)


class Layouts:
    """The one place that decides, for every call site (layer and call index within a forward) of
    every selected layer, which axis of its output holds the batch and which the units (used by the
    probe's reductions, ablation masks and noise).

    **The batch axis is observed.** At the first forward pass that enters the model (or a probed
    module) after :meth:`attach`, the same inputs, resized on their batch axis (the first axis of
    every tensor argument; the second of a 3-D input to a module whose own ``batch_first`` is
    ``False``, or when the ``batch_first=False`` of a module inside says so) to two batch sizes that equal no other axis length of the inputs (arguments
    that are not tensors or plain values deep-copied), are run first under
    ``no_grad`` in eval mode, RNG state restored (:func:`evaluating`); other netprobe hooks ignore
    those passes (other hooks on the model see them). The batch axis of a call site's output is the
    one axis whose length is the batch size in both runs. An output with no such axis (attention
    windows ``(N * k, ...)``, rows per token ``(N * T, D)``) or with several is refused: capture the
    enclosing block, or give a ``reduce=`` callable. Every later call is checked against it (same
    rank, the batch axis as long as the input's batch), so a sequence length equal to the batch size
    changes nothing.

    **The units axis** comes from, in this order:

    1. an explicit ``layout=`` of the layer (``"NC"``, ``"NCL"``, ``"NLC"``, ``"LNC"``, ``"NCHW"``,
       ``"NHWC"``, ``"NCDHW"``, ...; ``N`` batch, ``C`` units, ``L/T/H/W/D`` positions), whose ``N``
       must be the observed batch axis and whose ``C`` must agree with the module's type;
    2. the ``batch_first`` of the module (``nn.RNN/LSTM/GRU``, ``nn.MultiheadAttention``, transformer
       layers and stacks) or of its nearest ancestor that has one, for the first tensor of its
       output: ``(N, T, D)`` or ``(T, N, D)``, units last (checked against the observed batch axis);
    3. the module's type: 2-D outputs ``(N, D)``; conv/pool/norm outputs ``(N, C, ...)``;
       ``nn.Linear``/``Embedding``/Hugging Face ``Conv1D`` outputs have their units last;
    4. the operations of the observed forward pass, followed from 3.: an elementwise module or
       function (activation, dropout, a residual sum of two tensors of one layout), slices,
       padding, concatenations, normalizations over trailing axes, and permuted views (by their
       strides). Marked tensors are held until the pass ends, so this depends on nothing but the
       forward pass.

    What none of these establishes raises ``ValueError`` naming the ``layout=`` to pass (with ``N``
    where the batch was observed): a layout is never guessed.

    Args:
        model: the model whose forward passes are run.
        modules: ``{name: module}`` of the selected layers.
        layout: ``layout=`` as documented above (a string for every layer, or a dict per layer).
        select: ``{name: selector}`` (see :func:`select_output`): which tensor of each layer's
            output the callers read.
        observe: ``True`` observes at the first forward pass; a :class:`netprobe.LayoutDecisions`
            also keeps what it observes there and reuses what it holds (a monitor carries one from
            measurement to measurement); ``False`` runs nothing again: the batch axis is then the
            ``layout=``'s ``N`` (default: the first axis, or what ``batch_first`` says), checked
            only against the input batch size, and units come from 1.-3. only.
    """

    def __init__(self, model: nn.Module, modules: Mapping[str, nn.Module], layout: LayoutSpec = None, *,
                 select: Optional[Mapping[str, Any]] = None,
                 observe: Union[bool, _observe.LayoutDecisions] = True) -> None:
        if not isinstance(observe, (bool, _observe.LayoutDecisions)):
            raise TypeError(f"Expected `observe` to be True, False or a LayoutDecisions, but got {observe!r}.")
        self.model = model
        self.modules = dict(modules)
        self.layout = per_layer_layout(layout, self.modules)
        self.select = {n: (select or {}).get(n) for n in self.modules}
        self.observe_enabled = observe is not False
        self.decisions = observe if isinstance(observe, _observe.LayoutDecisions) else _observe.LayoutDecisions()
        self._named = dict(model.named_modules())
        self._names = {id(m): n for n, m in self._named.items()}
        self.context = {n: _sequence_context(self._named, n) for n in self.modules}
        # batch-axis lengths of the tensor inputs of the forward pass running now (its entry)
        self.batch_lengths: set = set()
        self.second_axis_lengths: set = set()  # the lengths of the second axis of its 3-D tensor inputs
        self.batch: Optional[int] = None  # the first of them (kept for callers that need one number)
        self._depth = 0
        # forward passes begun (entries at depth 0): what shares one draw of sampled positions
        self.passes = 0
        self._calls: Dict[str, int] = {n: 0 for n in self.modules}  # calls of each layer in this pass
        self._entry: Optional[Tuple[str, Any]] = None  # (name of the module entered at depth 0, its inputs' signature)
        self._recording: Optional[Dict[str, List[Tuple[Tuple[int, ...], Optional[int]]]]] = None
        self._compiled = _compiled(self._named.values())

    # -- hooks -------------------------------------------------------------------------
    def attach(self) -> List[Any]:
        """Register the hooks (entries, call counts, observation); returns handles to ``.remove()``.
        Register them after the callers' own forward hooks on the layers: they run first."""
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
            for n, m in self.modules.items():
                handles.append(m.register_forward_hook(eager_hook(self._counter(n)), prepend=True))
            handles.append(_Cleanup(self._reset_forward))
        except BaseException:
            for h in handles:
                h.remove()
            raise
        return handles

    def _reset_forward(self) -> None:
        """Forget a forward pass that did not end (a KeyboardInterrupt skips even ``always_call`` hooks)."""
        self._depth = 0
        self._entry = None

    def _counter(self, name: str) -> Callable[..., None]:
        select = self.select[name]

        def count(mod: nn.Module, args: Any, output: Any) -> None:
            rec = self._recording
            if rec is not None:  # a pass this instance observes
                try:
                    t, _, _ = select_output(output, select, name)  # (the callers raise what this raises)
                except (TypeError, ValueError, KeyError, IndexError):
                    rec[name].append(((), None, False))
                    return
                primary = select_output(output, select, name)[1]
                rec[name].append((tuple(t.shape) if not t.is_nested else (), _mark_of(t), primary))
                return
            if _state.observing:
                return
            self._calls[name] += 1

        return count

    def _enter(self, mod: nn.Module, args: Any, kwargs: Any) -> None:
        if _state.observing:
            return
        if mod is self.model and self._depth:
            self._reset_forward()  # a new call of the model while an interrupted one is still counted
        if self._depth == 0:
            self.passes += 1
            self._calls = {n: 0 for n in self.modules}
            d = self.decisions
            default = batch_first_of(mod) is False
            name = self._names.get(id(mod), "?")
            key = (name, _observe.input_signature(args, kwargs, seq_first=default))
            self._entry = key
            seq_first = d.seq_first.get(key, default)
            self.batch_lengths = _observe.input_batch_lengths(args, kwargs, seq_first=seq_first)
            if self.observe_enabled and self.batch_lengths - {0} and not d.covers(key, self._layer_keys()):
                d.failed[key] = self._observe(mod, args, kwargs, default, key)
                seq_first = d.seq_first.get(key, default)  # the inputs may have been (T, N, ...) after all
                self.batch_lengths = _observe.input_batch_lengths(args, kwargs, seq_first=seq_first)
            # with observe=False, a declared (T, N, ...) layout is checked against the inputs' second axis
            self.second_axis_lengths = _observe.input_batch_lengths(args, kwargs, seq_first=True)
            first = next((t for t in _observe._tensors((args, kwargs)) if t.ndim >= 1 and not t.is_nested), None)
            self.batch = None if first is None else int(first.shape[_observe._batch_dim(first, seq_first)])
        self._depth += 1

    def _leave(self, mod: nn.Module, args: Any, out: Any) -> None:
        if _state.observing:
            return
        self._depth = max(0, self._depth - 1)
        if self._depth == 0:
            self._reset_forward()

    def _layer_keys(self) -> List[Tuple[str, Any]]:
        return [(n, _select_key(self.select[n])) for n in self.modules]

    def _observe(self, mod: nn.Module, args: Any, kwargs: Any, seq_first: bool, key: Tuple[str, Any]) -> Optional[str]:
        """Run ``mod`` on ``args``/``kwargs`` resized to two batch sizes and record every call
        site's output; returns ``None``, or why the model could not be run so.

        The inputs' batch axis is the first (the second of 3-D inputs to a sequence-first module).
        When that contradicts the ``batch_first=False`` of modules inside (a plain container around
        an RNN called with ``(T, N, D)``), the second axis of 3-D inputs is tried, and kept only if
        every such module then agrees."""
        sites, failed = self._observe_at(mod, args, kwargs, seq_first)
        if failed is None and not seq_first and self._contradicts_context(sites):
            retry, failed2 = self._observe_at(mod, args, kwargs, True)
            if failed2 is None and not self._contradicts_context(retry):
                sites, seq_first = retry, True
        if failed is not None:
            return failed
        d = self.decisions
        d.seq_first[key] = seq_first
        for (name, k), site in sites.items():
            d.sites[key + (name, _select_key(self.select[name]), k)] = site
        d.layers.setdefault(key, set()).update(self._layer_keys())
        return None

    def _contradicts_context(self, sites: Mapping[Tuple[str, int], _observe.Site]) -> bool:
        for (name, _), site in sites.items():
            bf = self.context.get(name)
            if bf is not None and site.primary and site.ndim == 3 and site.batch != (0 if bf else 1):
                return True
        return False

    def _observe_at(self, mod: nn.Module, args: Any, kwargs: Any,
                    seq_first: bool) -> Tuple[Dict[Tuple[str, int], _observe.Site], Optional[str]]:
        sizes = _observe.observation_sizes(args, kwargs, seq_first=seq_first)
        runs: List[Dict[str, List[Tuple[Tuple[int, ...], Optional[int], bool]]]] = []
        # the observed passes run eagerly (from an eager hook, under torch.compile too), so functions are
        # followed there; not in a model with compiled submodules, whose frames a mode would re-guard
        follow = _TorchFunctionMode is not None and not self._compiled
        # a lazy module initializes its parameters at the first forward, drawing from the global RNG as
        # the user's own first call would have: the RNG is then left as that initialization leaves it
        lazy = any(isinstance(p, nn.parameter.UninitializedParameter) for p in self.model.parameters())
        _state.observing += 1
        tracking: List[Any] = []
        try:
            tracking = track_layouts(self.model)  # for the observed passes only; prepended: before the counters
            with evaluating(self.model, restore_rng=not lazy):
                for n in sizes:
                    try:
                        a = _observe.resize_batch(args, n, seq_first=seq_first)
                        kw = _observe.resize_batch(kwargs, n, seq_first=seq_first)
                    except _observe.UncopiableInput as e:
                        return {}, str(e)
                    self._recording = {name: [] for name in self.modules}
                    _state.tracking += 1
                    mode = _FollowLayouts() if follow else None
                    try:
                        if mode is not None:
                            with mode:
                                mod(*a, **kw)
                        else:
                            mod(*a, **kw)
                    except Exception as e:  # noqa: BLE001 - reported at the layer, with the way out
                        return {}, (f"running {type(mod).__name__} on its inputs resized to batch size {n} (every "
                                    f"tensor argument's batch axis, rows repeated) failed with {type(e).__name__}: {e}")
                    finally:
                        _state.tracking -= 1
                        _clear_marks()
                        runs.append(self._recording)
                        self._recording = None
        finally:
            for h in tracking:
                h.remove()
            _state.observing -= 1
        sites: Dict[Tuple[str, int], _observe.Site] = {}
        for name in self.modules:
            for k, ((sa, _, _), (sb, unit, primary)) in enumerate(zip(runs[0][name], runs[1][name])):
                sites[(name, k)] = _observe.read_site((sa, sb), sizes, unit, primary)
        return sites, None

    # -- the decision ------------------------------------------------------------------
    def _refuse(self, name: str, module: nn.Module, shape: Tuple[int, ...], why: str, advice: str) -> ValueError:
        return ValueError(f"Layer {name!r} ({type(module).__name__}) returned {shape}: {why}. {advice}")

    def dims(self, name: str, module: nn.Module, out: torch.Tensor, *, primary: bool = True) -> Tuple[int, int]:
        """``(batch_dim, unit_dim)`` of ``out``, the output of layer ``name`` at its current call
        (``primary``: the first tensor of the module's output, the one ``batch_first`` describes)."""
        if out.is_nested:
            raise ValueError(NESTED_MESSAGE.format(name=name))
        shape, nd = tuple(out.shape), out.ndim
        if nd == 0:
            raise ValueError(f"Layer {name!r} returned a scalar; there are no units to capture.")
        lay = self.layout.get(name)
        if lay is not None and len(lay) != nd:
            raise ValueError(
                f"`layout={lay!r}` for layer {name!r} names {len(lay)} axes, but the layer's output {shape} has {nd}."
            )
        if not self.observe_enabled or not self.batch_lengths - {0}:  # (no rows: nothing to observe)
            return self._trusted(name, module, out, primary)
        call = max(self._calls.get(name, 0) - 1, 0)
        failed = self.decisions.failed.get(self._entry) if self._entry is not None else None
        if failed is not None:
            raise ValueError(
                f"netprobe establishes the batch axis of layer {name!r} by running the model again on the same inputs "
                f"at two other batch sizes, but {failed}. Call the model with every tensor argument batched on its first "
                f"axis. {_OPT_OUT}"
            )
        site = (self.decisions.sites.get(self._entry + (name, _select_key(self.select.get(name)), call))
                if self._entry is not None else None)
        if site is None:
            raise ValueError(
                f"Layer {name!r} ({type(module).__name__}) ran a {call + 1}-th time in this forward pass, which it did "
                "not when netprobe observed the model's batch axes at other batch sizes (a forward whose control flow "
                f"depends on the batch size?). Probe a module that runs the same way at every batch size. {_OPT_OUT}"
            )
        sizes = " and ".join(f"{s} at batch size {n}" for s, n in zip(site.shapes, site.sizes))
        if site.batch is None:
            raise self._refuse(
                name, module, shape, f"{site.problem} (observed: {sizes}), so its rows are not one per input",
                "A `layout=` cannot fix this: capture the enclosing block (a module whose output has one row per "
                "input), or pass `reduce=` a callable that maps this output to (batch, units) rows.")
        b = site.batch
        if nd != site.ndim or (self.batch_lengths and shape[b] not in self.batch_lengths):
            raise self._refuse(
                name, module, shape, f"observed at other batch sizes, its batch axis is axis {b} ({sizes}), which here "
                f"has {shape[b] if nd > b else 'no'} rows for inputs of {sorted(self.batch_lengths)} rows",
                "Probe a layer whose output has one row per input at every batch size.")
        typed = _typed_unit(module, nd) if nd >= 3 else None
        if lay is not None:
            if lay.index("N") != b:
                raise self._refuse(
                    name, module, shape, f"`layout={lay!r}` puts the batch on axis {lay.index('N')}, but observed at "
                    f"other batch sizes the batch is axis {b} ({sizes})",
                    f"Pass a layout with N at position {b}, e.g. {_layout_suggestions(nd, b)}, or leave `layout=` out. "
                    "If the model takes its inputs batch-second (T, N, ...) with no `batch_first=False` module inside, "
                    "netprobe cannot tell that from batch-first inputs: keep this layout and pass `observe=False`.")
            u = lay.index("C")
            if typed is not None and b == 0 and u != typed:
                raise self._refuse(
                    name, module, shape, f"`layout={lay!r}` puts the units on axis {u}, but a {type(module).__name__}'s "
                    f"units are on axis {typed}", "Leave `layout=` out for this layer, or name its units axis there.")
            return b, u
        if nd == 1:
            return b, 0
        if nd == 2:
            return b, 1 - b
        bf = self.context.get(name) if primary else None
        if nd == 3 and bf is not None:
            if b != (0 if bf else 1):
                raise self._refuse(
                    name, module, shape, f"it runs with batch_first={bf}, so its batch should be axis {0 if bf else 1}, "
                    f"but observed at other batch sizes it is axis {b} ({sizes})",
                    "Call the model with batch-first inputs (or its batch on the axis its `batch_first` says), or pass "
                    f"`layout=` for this layer. {_OPT_OUT}")
            return b, 2
        unit = nd - 1 if _units_last_module(module) else (typed if b == 0 else None)
        unit = site.unit if unit is None else unit
        if unit is None and isinstance(module, _NORM_LAST) and len(module.normalized_shape) == 1:
            unit = nd - 1
        if unit is None or unit == b:
            how = ("the model runs compiled, so only module hooks follow it: a residual sum is not followed"
                   if self._compiled or _state.in_compiled
                   else "it is computed from the model's input or by an operation netprobe does not follow "
                        "(a scripted or compiled function, numpy, a module of unknown type)")
            raise self._refuse(
                name, module, shape, f"its batch is axis {b} (observed: {sizes}), but which axis holds the units cannot "
                f"be established ({how})",
                f"Pass the layer's layout, e.g. `layout={_layout_suggestions(nd, b)}` (N = batch, C = units).")
        return b, unit

    def _trusted(self, name: str, module: nn.Module, out: torch.Tensor, primary: bool) -> Tuple[int, int]:
        """``dims`` with ``observe=False``: the declared or conventional batch axis, checked against
        the input batch size; units from ``layout=``, ``batch_first`` or the module's type."""
        shape, nd = tuple(out.shape), out.ndim
        lay = self.layout.get(name)
        bf = self.context.get(name) if primary else None
        if lay is not None:
            b, u = lay.index("N"), lay.index("C")
        elif nd <= 2:
            b, u = 0, nd - 1
        elif nd == 3 and bf is not None:
            b, u = (0 if bf else 1), 2
        else:
            b, u = 0, _typed_unit(module, nd)
            if u is None and isinstance(module, _NORM_LAST) and len(module.normalized_shape) == 1:
                u = nd - 1
            if u is None:
                raise self._refuse(
                    name, module, shape, "with `observe=False` nothing is followed, and its module's type does not "
                    "tell which axis holds the units", f"Pass `layout=` for this layer, e.g. {_layout_suggestions(nd, 0)}.")
        rows = self.batch_lengths | (self.second_axis_lengths if lay is not None and b == 1 else set())
        if rows and shape[b] not in rows:
            raise self._refuse(
                name, module, shape, f"its batch axis {b} has {shape[b]} rows, but the model's inputs have "
                f"{sorted(rows)}", "Pass the layer's `layout=` with N on its batch axis.")
        return b, u


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


def _layout_suggestions(nd: int, b: int) -> str:
    """Layout strings of rank ``nd`` with the batch on axis ``b`` (for messages)."""
    usual = {(2, 0): "'NC'", (3, 0): "'NCL' or 'NLC'", (3, 1): "'LNC'", (4, 0): "'NCHW' or 'NHWC'",
             (5, 0): "'NCDHW' or 'NDHWC'"}
    if (nd, b) in usual:
        return usual[(nd, b)]
    if nd == 1:
        return "'N'"
    pos = "LHWDT"[: max(nd - 2, 0)]
    out = []
    for u in range(nd):
        if u == b:
            continue
        letters, it = [], iter(pos)
        for i in range(nd):
            letters.append("N" if i == b else "C" if i == u else next(it))
        out.append("'" + "".join(letters) + "'")
    return " or ".join(out[:3])


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
