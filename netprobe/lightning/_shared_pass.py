"""What the monitors of one Trainer share at a measurement: one forward pass over a probe set
(:class:`_SharedProbePass`, kept per Trainer), the identity of the fit a callback was set up
for, and the digest of a probe set kept in checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from netprobe.layers import evaluating

if TYPE_CHECKING:  # pragma: no cover
    import lightning.pytorch as _lightning_pytorch
    import pytorch_lightning as _pytorch_lightning

    from netprobe.lightning.base import NetprobeMonitor

    #: the ``Trainer`` of either package (both accept netprobe's callbacks); for annotations only
    Trainer = Union[_pytorch_lightning.Trainer, _lightning_pytorch.Trainer]


class _OtherRankFailed(ValueError):
    """A rank-local check failed on another rank; this rank skips the same step."""


class _RunIdentity:
    """The Trainer and module a callback last set up a fit with, held by weak reference (dropped
    when the callback is pickled, e.g. for ``ddp_spawn``: they belong to this process)."""

    def __init__(self) -> None:
        self._refs: Optional[Tuple[Any, Any]] = None

    def __getstate__(self) -> Dict[str, Any]:
        return {"_refs": None}

    def begins(self, trainer: Trainer, pl_module: Any, stage: str) -> Optional[str]:
        """``"first"`` or ``"other"`` when a fit with a new Trainer or module begins (the callback's
        first, or one after a fit with another pair), else ``None`` (not a fit, or the same pair)."""
        refs = self._refs
        if stage != "fit" or (refs is not None and refs[0]() is trainer and refs[1]() is pl_module):
            return None
        self._refs = (weakref.ref(trainer), weakref.ref(pl_module))
        return "first" if refs is None else "other"


@dataclasses.dataclass
class _Pass:
    """One forward pass over a probe set, kept until every monitor it was made for took its layers.

    Attributes:
        step: ``(id of the model, global step, epoch, probe size)`` it was made at.
        inputs: the probe inputs it ran on.
        activations: ``{layer: activations}`` of every peer's layers.
        outputs: the model's outputs on ``inputs``.
        waiting: ids of the monitors yet to take theirs.
    """

    step: Any
    inputs: torch.Tensor
    activations: Dict[str, torch.Tensor]
    outputs: Optional[torch.Tensor]
    waiting: set


class _SharedProbePass:
    """The forward passes over the probe sets shared by the monitors of one Trainer at one step.

    Each monitor joins at ``setup``. The first monitor to measure at a step captures the layers
    of every joined monitor with the same probe set (:meth:`NetprobeMonitor._share_key`) that is
    due at this epoch; the others take their layers from it. A pass is dropped once every monitor
    it was made for has taken its own layers, so activations are held only while the step's
    measurements run (one entry per probe set: monitors with other probe sets, measured in
    between, do not evict it). A peer's own hooks for the same pass
    (:meth:`NetprobeMonitor._extra_capture`) run in it too.
    """

    def __init__(self) -> None:
        self.monitors: "weakref.WeakSet[NetprobeMonitor]" = weakref.WeakSet()
        self._passes: Dict[Any, _Pass] = {}  # share key -> the pass made for it at its step
        self.tensorboard_written: Any = None  # (writer id, keys) of the last layout/HParams written
        self.fewer_told: set = set()  # (source, num_samples, examples there) warned about (NetprobeMonitor._warn_fewer)
        self._order: Optional[Tuple[int, Dict[str, int]]] = None  # (id of the model, {module name: position})

    def forward_order(self, mon: "NetprobeMonitor", pl_module: nn.Module, x: torch.Tensor) -> Dict[str, int]:
        """``{module name: position}`` of every module of ``pl_module`` in the order their forward
        calls finish (so a block comes after its layers), from one forward pass of one probe example
        under ``mon.forward``, once per model."""
        if self._order is not None and self._order[0] == id(pl_module):
            return self._order[1]
        order: Dict[str, int] = {}
        handles = []

        def hook_for(name: str) -> Callable[..., None]:
            def hook(mod: nn.Module, args: Any, out: Any) -> None:
                order.setdefault(name, len(order))
            return hook

        try:
            for name, m in pl_module.named_modules():
                handles.append(m.register_forward_hook(hook_for(name)))
            device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
            with evaluating(pl_module, restore_rng=True):
                mon.forward(pl_module, x[:2].to(device))
        except Exception as err:  # never a failed run for an order: then no layer_index keys
            warnings.warn(f"netprobe: the layers' forward order could not be read ({type(err).__name__}: {err}); "
                          "netprobe/layer_index/<layer> is not logged.", RuntimeWarning, stacklevel=2)
            order = {}
        finally:
            for h in handles:
                h.remove()
        self._order = (id(pl_module), order)
        return order

    @staticmethod
    def step_key(trainer: Trainer, pl_module: nn.Module, x: torch.Tensor) -> Tuple[int, int, int, int]:
        """What a pass is made for: ``(id of the model, global step, epoch, probe inputs)``."""
        return (id(pl_module), int(trainer.global_step), int(trainer.current_epoch), x.shape[0])

    def capture(self, mon: "NetprobeMonitor", trainer: Trainer, pl_module: nn.Module,
                x: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        share = mon._share_key()
        key = self.step_key(trainer, pl_module, x)
        entry = self._passes.get(share)
        # the inputs themselves must be the same (the same settings can still draw other examples,
        # e.g. from a shuffling DataLoader with its own generator): equal, else a pass of its own
        same_x = entry is not None and same_inputs(entry.inputs, x)
        if entry is not None and entry.step == key and id(mon) in entry.waiting and not same_x:
            return mon._capture(pl_module, x)
        if entry is None or entry.step != key or id(mon) not in entry.waiting:
            epoch = int(trainer.current_epoch)
            peers = [m for m in list(self.monitors) if m is mon or (m._share_key() == share and m._due(epoch))]
            wanted = set(l for m in peers for l in m.layers)
            layers = [n for n, _ in pl_module.named_modules() if n in wanted]
            extras = [e for m in peers if (e := m._extra_capture(pl_module, x, key)) is not None]
            try:
                acts, out = mon._capture(pl_module, x, layers, extras)
            except ValueError:  # a peer's layer failed: this monitor's own layers alone say what is wrong
                self._passes.pop(share, None)
                return mon._capture(pl_module, x)
            entry = _Pass(key, x, acts, out, {id(m) for m in peers})
            self._passes[share] = entry
        entry.waiting.discard(id(mon))
        if not entry.waiting:
            del self._passes[share]
        return {n: entry.activations[n] for n in mon.layers}, entry.outputs

    def clear(self) -> None:
        """Drop every pass (at the end of a step's measurements: a peer that did not take its
        share, e.g. one whose measurement failed, must not keep activations alive)."""
        self._passes = {}


def same_inputs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two probe input tensors hold the same inputs: the same object, or equal shape and values."""
    return a is b or (a.shape == b.shape and torch.equal(a, b))


_SHARED: "weakref.WeakKeyDictionary[Any, _SharedProbePass]" = weakref.WeakKeyDictionary()


def _shared_pass(trainer: Trainer) -> _SharedProbePass:
    try:
        return _SHARED.setdefault(trainer, _SharedProbePass())
    except TypeError:  # not weak-referenceable (a stand-in Trainer): a pass of its own
        return _SharedProbePass()


def _probe_fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """A digest of a probe set's shapes, dtypes and values (equal probe sets, equal digests)."""
    import hashlib

    h = hashlib.sha256()
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _frozen_spec(spec: Any) -> Any:
    return tuple(sorted(spec.items())) if isinstance(spec, Mapping) else spec


@contextlib.contextmanager
def seeded_host_rngs(seed: int) -> Iterator[None]:
    """Torch's CPU generator, numpy's global generator and Python's ``random`` seeded with
    ``seed`` inside the block, and each restored to its state on leaving it: random transforms of a
    dataset that draw from any of them give the same probe set at every draw (on every rank, after
    a resume), and the training run's random streams are left as they were."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

