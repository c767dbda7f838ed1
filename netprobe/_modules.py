"""Finding modules in a model and knowing which dimension of their output holds the units.

Shared by the capture engine (``netprobe.capture``) and the ablation metrics
(``netprobe.metrics.ablation``); knows nothing of Lightning.
"""

from __future__ import annotations

import contextlib
import fnmatch
import weakref
from typing import Any, Dict, Iterable, Iterator, List, Sequence, Union

import torch
from torch import nn

from netprobe._validation import close_names

LayerSpec = Union[str, type, nn.Module]

__all__ = ["LayerSpec", "resolve_layers", "resolve_layer", "unit_dim", "evaluating"]

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

try:
    _compiler_disable = torch.compiler.disable
except AttributeError:  # pragma: no cover - torch < 2.1
    def _compiler_disable(fn):  # type: ignore[no-redef]
        return fn


# Tensors known to be channels-first (N, C, L) in the forward pass running now: 3-D outputs of the
# modules above, and outputs of any module whose first input was such a tensor and whose output
# has the same shape (activations, dropout, a user's own elementwise module). Keyed by memory and
# layout (so a detached alias matches too), holding a weak reference to the tensor: a key only
# counts while that tensor lives, so its memory cannot have been reused meanwhile.
_CHANNELS_FIRST: Dict[Any, "weakref.ref[torch.Tensor]"] = {}
_PURGE_AT = [512]
_ACTIVE = [0]  # layout trackers attached now


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
                _CHANNELS_FIRST.clear()


def _layout_key(t: torch.Tensor) -> Any:
    return (t.data_ptr(), t.device, tuple(t.shape), tuple(t.stride()))


def _mark_channels_first(t: torch.Tensor) -> None:
    if len(_CHANNELS_FIRST) > _PURGE_AT[0]:
        for k, r in list(_CHANNELS_FIRST.items()):
            if r() is None:
                _CHANNELS_FIRST.pop(k, None)
        _PURGE_AT[0] = max(512, 2 * len(_CHANNELS_FIRST))  # many live entries: purge less often
    _CHANNELS_FIRST[_layout_key(t)] = weakref.ref(t)


def _is_channels_first(t: torch.Tensor) -> bool:
    if not _ACTIVE[0] or not _CHANNELS_FIRST or t.ndim != 3:  # marks count only while some tracking is on
        return False
    r = _CHANNELS_FIRST.get(_layout_key(t))
    return r is not None and r() is not None


@_compiler_disable
def _layout_hook(mod: nn.Module, args: Any, out: Any) -> None:
    if isinstance(out, torch.Tensor) and out.ndim == 3:
        if isinstance(mod, _CHANNELS_FIRST_3D) or (
            args and isinstance(args[0], torch.Tensor) and args[0].shape == out.shape and _is_channels_first(args[0])
        ):
            _mark_channels_first(out)


def track_layouts(model: nn.Module, modules: Iterable[nn.Module]) -> List[Any]:
    """Hooks (a list of handles; ``.remove()`` each) that let :func:`unit_dim` tell a 3-D output in
    ``(N, C, L)`` layout (a ReLU after a Conv1d, however the modules are declared) from a sequence
    ``(N, T, D)``, by following the tensors of each forward pass through every module of
    ``model``. Registered only when ``model`` has 1-D conv-like modules and one of ``modules`` is
    not itself channels-first by type; they run before any other forward hook of their module.
    A sum or concatenation (a residual connection) starts a new tensor, which is not followed."""
    mods = list(modules)
    if all(isinstance(m, _CHANNELS_FIRST_3D) for m in mods) or not any(isinstance(m, _CONV_LIKE_1D) for m in model.modules()):
        return []
    return [_Tracking([m.register_forward_hook(_layout_hook, prepend=True) for m in model.modules()])]


def unit_dim(module: nn.Module, output: torch.Tensor) -> int:
    """The dimension of ``output`` that indexes units.

    * 2-D ``(N, D)``: dim 1.
    * 4-D/5-D ``(N, C, ...)`` (2-D/3-D convolutions, pooling, batch norm): dim 1, the channel.
    * 3-D: dim 1 for 1-D convolution/pooling/normalization/padding modules ``(N, C, L)``, and for
      modules applied to such an output that keep its shape (a ``ReLU`` after a ``Conv1d``; needs
      :func:`track_layouts` during the forward pass); otherwise a sequence ``(N, T, D)``, dim 2.
    """
    if output.ndim <= 2:
        return output.ndim - 1
    if output.ndim >= 4:
        return 1
    if isinstance(module, _CHANNELS_FIRST_3D) or _is_channels_first(output):
        return 1
    return 2


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
