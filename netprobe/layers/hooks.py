"""How netprobe's hooks run: eagerly under ``torch.compile`` (:func:`eager_hook`), removable
cleanups, the state every hook reads (which forward passes are netprobe's own), and
:func:`evaluating` (eval mode, no grad, flags and RNG restored)."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

__all__ = ["eager_hook", "evaluating", "observing"]


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
    eager mode it is called directly (the disabling wrapper costs about as much per call as a
    capture hook's own work; docs/benchmarks.md)."""

    def hook(*args: Any, **kwargs: Any) -> Any:
        if _is_compiling():
            return _call_eagerly(_from_compiled, fn, *args, **kwargs)
        return fn(*args, **kwargs)

    return hook


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


class _Cleanup:
    """A handle whose ``remove()`` calls ``fn`` once."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn: Optional[Callable[[], None]] = fn

    def remove(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn()


def observing() -> bool:
    """Whether the forward pass running now is one netprobe runs to observe batch axes (hooks
    that capture or count must ignore it)."""
    return bool(_state.observing)
