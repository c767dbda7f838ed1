"""The probe: forward hooks that copy chosen layers' activations into ring buffers."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from netprobe._validation import check_int, close_names
from netprobe.capture.reductions import Reduction, check_reduction, reduce_output
from netprobe.capture.ring_buffer import STORAGE_DTYPES, RingBuffer
from netprobe.layers import (
    LayerSpec,
    LayoutDecisions,
    Layouts,
    LayoutSpec,
    eager_hook,
    observing,
    resolve_layers,
    select_output,
)

__all__ = ["Probe", "probe", "OutputSelector"]

OutputSelector = Union[int, str, Callable[[Any], torch.Tensor]]



class Probe:
    """Capture the outputs of chosen layers into fixed-size, on-device ring buffers.

    A forward hook on each selected module reduces its output to ``(rows, units)`` (see
    :mod:`netprobe.capture.reductions`), detaches it and copies it into that layer's
    :class:`RingBuffer`, which keeps the newest ``capacity`` rows on the output's own device.
    The hooks return nothing, so the model's outputs and gradients are exactly unchanged, and no
    autograd graph is kept. They are removed by :meth:`detach` / on leaving the ``with`` block,
    also when the body raises; the modules' own hook dictionaries are left as they were. An
    attached probe is referenced by its hooks, so dropping the last name for it does not detach it:
    use the ``with`` block or call :meth:`detach`.

    A module called several times in one forward (weight sharing, recurrence) records one block of
    rows per call, in call order.

    With ``reduce="sample"``, the positions are drawn once per forward pass of the model for each
    grid size (inputs ``N``, positions per input ``P``) and shared by every sampled layer (and call)
    of that size: rows line up across layers only when the layers have the same spatial size, where
    row ``i`` is the same input and the same position in each of them. Layers of different spatial
    sizes get unrelated positions (the same inputs, in the same order): compare those with
    ``reduce="mean"`` (or your own resampling, as a callable ``reduce``), not row by row. Each new
    forward pass draws new positions; two probes with equally seeded generators on networks of the
    same architecture draw the same ones.

    Args:
        model: the model to probe.
        layers: what to capture, mixed freely: qualified names (``"encoder.0.fc"``), glob patterns
            (``"encoder.*.fc"``), module classes (``nn.Conv2d``) or submodules; see
            :func:`netprobe.layers.resolve_layers`. Unknown names raise with the closest names.
        capacity: rows kept per layer (the newest); memory is
            ``sum_layers capacity * d_layer * dtype.itemsize`` (+ ``capacity * 8`` with targets).
        reduce: ``"mean"`` (default), ``"flatten"``, ``"last"``, ``"sample"``, a callable
            ``output -> (n, d)``, or a dict ``{layer_name: reduce}`` (layers not in it use ``"mean"``).
        dtype: storage dtype, ``torch.float32`` (default), ``torch.float16``, ``torch.bfloat16`` or
            ``torch.float64``.
        positions: for ``reduce="sample"``, positions drawn per input (each a row); the same
            positions in every sampled layer of the same spatial size within a forward pass.
        generator: ``torch.Generator`` for ``"sample"`` (never the global RNG); a probe-owned one
            seeded with 0 when ``None``.
        select: which tensor of a non-tensor output to capture: an index into a tuple/list
            (default: the first tensor element), a key of a dict-like output, or a callable
            ``output -> tensor``; a dict ``{layer_name: selector}`` for per-layer choices.
        store_targets: keep one ``int64`` target per row; give them with :meth:`set_targets`
            before each forward.
        layout: which axis of a layer's output is the batch (``N``) and which the units (``C``),
            the others being positions (``L``/``T``/``H``/``W``/``D``): ``"NC"``, ``"NCL"``,
            ``"NLC"``, ``"LNC"``, ``"NCHW"``, ``"NHWC"``, ``"NCDHW"``, ...; one string for every
            layer or a dict ``{layer_name: layout}``. Its ``N`` is checked against the observed
            batch axis. Without it the units axis is established from the module (its type,
            ``batch_first`` of RNNs, attention and transformer layers and of their submodules, the
            operations followed from a known layout); where it cannot be, the forward raises
            ``ValueError`` naming the ``layout=`` to pass (see :class:`netprobe.layers.Layouts`).
            Rows are always one per batch item.
        observe: at the first forward pass after :meth:`attach`, the model is first run on the same
            inputs resized to two other batch sizes (no grad, eval mode, RNG restored; this probe
            captures nothing from those runs) to observe each layer's batch axis. ``False`` runs
            nothing again: the batch axis is then ``layout=``'s ``N`` (default: the first axis, or
            what ``batch_first`` says), checked only against the number of input rows. A
            :class:`netprobe.LayoutDecisions` keeps what is observed and reuses it (pass
            the same one to later probes of the model: each layer is then observed once).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> with Probe(model, ["1", "2"], capacity=100) as p:
        ...     _ = model(torch.randn(32, 8))
        >>> p["1"].shape, p["2"].shape
        (torch.Size([32, 16]), torch.Size([32, 3]))
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Union[LayerSpec, Iterable[LayerSpec]],
        *,
        capacity: int = 4096,
        reduce: Union[Reduction, Mapping[str, Reduction]] = "mean",
        dtype: torch.dtype = torch.float32,
        positions: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        select: Union[OutputSelector, Mapping[str, OutputSelector], None] = None,
        store_targets: bool = False,
        layout: LayoutSpec = None,
        observe: Union[bool, LayoutDecisions] = True,
    ) -> None:
        self._modules: Dict[str, nn.Module] = resolve_layers(model, layers)
        select_map = select if isinstance(select, Mapping) else {n: select for n in self._modules}
        self._layouts = Layouts(model, self._modules, layout, select=select_map, observe=observe)
        check_int(capacity, "capacity", 1, " (rows kept per layer)")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"Expected `dtype` to be one of {[str(d) for d in STORAGE_DTYPES]}, but got {dtype}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Expected `generator` to be a torch.Generator, but got {type(generator).__name__}.")
        self.model = model
        self.capacity = capacity
        self.dtype = dtype
        self.store_targets = bool(store_targets)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._reduce = self._per_layer(reduce, "reduce", check_reduction, default="mean")
        self._select = self._per_layer(select, "select", lambda s, where: s, default=None)
        if any(r == "sample" for r in self._reduce.values()):
            if not isinstance(positions, int) or isinstance(positions, bool) or positions < 1:
                raise ValueError(
                    f"Expected `positions` (positions sampled per input) to be an int >= 1 with "
                    f"reduce='sample', but got {positions!r}."
                )
        elif positions is not None:
            raise ValueError(f"`positions={positions!r}` is only used with reduce='sample', which no layer of this probe uses.")
        self.positions = positions
        if type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            warnings.warn(
                "netprobe.probe: `model` is already compiled (torch.compile); hooks registered on it after its first "
                "call are not seen by the compiled code, so nothing may be captured. Attach the probe to the model "
                "before compiling it (the hooks then compile in), or probe the uncompiled module.",
                RuntimeWarning,
                stacklevel=3,
            )
        self._buffers: Dict[str, RingBuffer] = {
            name: RingBuffer(capacity, dtype=dtype, store_targets=self.store_targets) for name in self._modules
        }
        self._handles: List[RemovableHandle] = []
        self._targets: Optional[torch.Tensor] = None
        self._target_problems: Dict[str, str] = {}
        self._overflow: Dict[str, torch.Tensor] = {}  # float16 storage: a finite value above its range was written
        # "sample": the positions drawn in the forward pass numbered `_draws_pass` (Layouts.passes), per
        # (N, P, positions) and per device, shared by the layers of that size in that pass
        self._draws: Dict[tuple, torch.Tensor] = {}
        self._draws_pass = -1
        self.enabled = True

    def _per_layer(self, value: Any, what: str, check: Callable[[Any, str], Any], default: Any) -> Dict[str, Any]:
        if isinstance(value, Mapping):
            unknown = [k for k in value if k not in self._modules]
            if unknown:
                raise ValueError(
                    f"`{what}` names layers that are not probed: {unknown}. Probed layers: {list(self._modules)}."
                )
            return {n: check(value.get(n, default), f"{what}[{n!r}]") for n in self._modules}
        checked = check(value, what) if value is not None or default is not None else None
        return {n: checked for n in self._modules}

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def layers(self) -> List[str]:
        """Resolved qualified names of the probed layers, in model order."""
        return list(self._modules)

    @property
    def attached(self) -> bool:
        """Whether the hooks are attached (between :meth:`attach` and :meth:`detach`)."""
        return bool(self._handles)

    def attach(self) -> "Probe":
        """Register the forward hooks (one per layer). Returns ``self``."""
        if self._handles:
            raise RuntimeError("This probe is already attached; call `detach()` first.")
        try:
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
            self._handles += self._layouts.attach()  # entry batch size, a ReLU after a Conv1d: channels
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        """Remove every hook this probe registered (idempotent). Buffers are kept for reading."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    def __enter__(self) -> "Probe":
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def __del__(self) -> None:  # when collected detached; an attached probe is kept alive by its hooks
        try:
            self.detach()
        except Exception:
            pass

    @contextlib.contextmanager
    def paused(self) -> Iterator["Probe"]:
        """Stop capturing inside the block without removing hooks (no recompilation under compile)."""
        previous = self.enabled
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = previous

    # -- targets -----------------------------------------------------------------------
    def set_targets(self, targets: Optional[torch.Tensor]) -> None:
        """Targets ``(batch,)`` of the next forward's inputs, stored beside each captured row.

        Needs ``store_targets=True``. Rows from ``reduce="sample"`` repeat their input's target.
        """
        if not self.store_targets:
            raise ValueError("This probe does not store targets; create it with `store_targets=True`.")
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or targets.ndim != 1:
                raise ValueError(
                    "Expected `targets` to be a 1-D tensor (batch,), but got "
                    f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__}."
                )
            if targets.is_floating_point() or targets.is_complex():
                raise TypeError(
                    f"Expected class-index targets (an integer tensor), but got dtype {targets.dtype}: they are stored as "
                    "int64 and a value such as 0.7 would be truncated. Pass `targets.long()` if they are whole class "
                    "indices, or `targets.argmax(1)` for one-hot/soft targets."
                )
            targets = targets.detach()
        self._targets = targets

    # -- the hook ----------------------------------------------------------------------
    def _make_hook(self, name: str) -> Callable[..., None]:
        module = self._modules[name]
        buf = self._buffers[name]
        reduce = self._reduce[name]
        select = self._select[name]

        layouts = self._layouts
        f16 = self.dtype == torch.float16
        sample = isinstance(reduce, str) and reduce == "sample"

        def capture(mod: nn.Module, args: Any, output: Any) -> None:
            if not self.enabled or observing():
                return None
            out, primary, _ = select_output(output, select, name)
            dims = None
            if not callable(reduce) or isinstance(reduce, str):
                dims = layouts.dims(name, module, out, primary=primary)
            draws = None
            if sample:
                if self._draws_pass != layouts.passes:  # a new forward pass: new positions
                    self._draws, self._draws_pass = {}, layouts.passes
                draws = self._draws
            with torch.no_grad():
                rows = reduce_output(
                    module, out, reduce, positions=self.positions, generator=self.generator, layer=name, dims=dims,
                    draws=draws,
                )
                targets = None
                if self.store_targets:
                    n_in = out.shape[dims[0]] if dims is not None and out.ndim > dims[0] else (out.shape[0] if out.ndim else 1)
                    targets = self._row_targets(name, n_in, rows)
                if f16 and rows.is_floating_point():
                    over = ((rows.abs() > 65504.0) & torch.isfinite(rows)).any()  # no host sync: read when the rows are
                    prev = self._overflow.get(name)
                    self._overflow[name] = over if prev is None else (prev | over.to(prev.device))
                if buf.allocated and rows.ndim == 2 and rows.shape[1] != buf.dim:
                    raise ValueError(
                        f"Layer {name!r} ({type(module).__name__}) gave rows of {rows.shape[1]} units at this call, but "
                        f"{buf.dim} at an earlier one: one module used at several places of the model (a shared "
                        "activation, say) with outputs of different widths cannot fill one layer's rows. Give each "
                        "place its own module instance, or probe the modules around it."
                    )
                buf.write(rows, targets)
            return None

        # hooks run eagerly under torch.compile (a graph break), so the captured rows match eager mode
        return eager_hook(capture)

    def _row_targets(self, name: str, n_in: int, rows: torch.Tensor) -> torch.Tensor:
        t = self._targets
        n_rows = rows.shape[0]
        if n_rows == 0:
            return torch.empty((0,), dtype=torch.long, device=rows.device)
        why = None
        if t is None:
            why = "no targets were set"
        elif n_in == 0 or t.shape[0] != n_in:
            why = f"targets had {t.shape[0]} entries for a batch of {n_in}"
        elif n_rows % n_in:
            why = f"{n_rows} captured rows are not a whole number per input of a batch of {n_in}"
        if why is not None:
            self._target_problems.setdefault(name, why)
            return torch.full((n_rows,), -1, dtype=torch.long, device=rows.device)
        # Non-blocking only host -> device (the copy is ordered before any use on that device's stream);
        # device -> host must be complete before the buffer reads it.
        t = t.to(rows.device, torch.long, non_blocking=rows.device.type != "cpu")
        rep = n_rows // n_in
        return t.repeat_interleave(rep) if rep > 1 else t

    # -- reading -----------------------------------------------------------------------
    def _check_name(self, name: str) -> RingBuffer:
        try:
            return self._buffers[name]
        except KeyError:
            raise KeyError(
                f"{name!r} is not a probed layer. Probed layers: {self.layers}; closest: "
                f"{close_names(str(name), self.layers)}."
            ) from None

    def __getitem__(self, name: str) -> torch.Tensor:
        """Captured rows of layer ``name``, ``(n, d)``, oldest first (a copy, storage dtype/device)."""
        buf = self._check_name(name)
        if not buf.allocated:
            # (the model's own entry hook may have run even so: a compiled wrapper calls it eagerly)
            if _compiled_elsewhere(self.model):
                raise ValueError(
                    f"Layer {name!r} has captured nothing, and the model has code compiled by torch.compile: if the forward "
                    "ran through a model compiled before this probe was attached, the compiled code does not run hooks "
                    "added later. Attach the probe before compiling (`with netprobe.probe(model, ...)` then "
                    "`torch.compile(model)`), or call `torch._dynamo.reset()` and compile again."
                )
            raise ValueError(
                f"Layer {name!r} has captured nothing: run a forward pass through the model while the "
                "probe is attached and enabled (was the layer reached by the forward?)."
            )
        over = self._overflow.get(name)
        if over is not None and bool(over):
            raise ValueError(
                f"Layer {name!r} produced activations above 65504, the largest float16 value: they were stored as inf. "
                "Create the probe with `dtype=torch.bfloat16` (same memory, float32's range) or `dtype=torch.float32`."
            )
        return buf.read()

    def targets(self, name: str) -> torch.Tensor:
        """Targets ``(n,)`` aligned with ``self[name]`` (``store_targets=True``)."""
        buf = self._check_name(name)
        if not self.store_targets:
            raise ValueError("This probe does not store targets; create it with `store_targets=True`.")
        if name in self._target_problems:
            raise ValueError(
                f"Some rows of layer {name!r} have no targets ({self._target_problems[name]}): call "
                "`probe.set_targets(y)` with the batch's targets before each forward, then `reset()`."
            )
        return buf.read_targets()

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def __len__(self) -> int:
        return len(self._buffers)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(layer, activations)`` pairs, as ``probe[layer]`` gives them, in :attr:`layers` order."""
        for name in self.layers:
            if self._buffers[name].allocated:
                yield name, self[name]

    @property
    def buffers(self) -> Dict[str, RingBuffer]:
        """The ring buffer of each layer (read-only use)."""
        return dict(self._buffers)

    def num_rows(self, name: str) -> int:
        """Rows buffered for ``layer`` now (at most the capacity)."""
        return len(self._check_name(name))

    @property
    def nbytes(self) -> int:
        """Exact bytes held by all buffers (they are allocated at each layer's first capture)."""
        return sum(b.nbytes for b in self._buffers.values())

    def reset(self) -> None:
        """Empty every buffer (storage stays allocated) and forget the targets."""
        for b in self._buffers.values():
            b.reset()
        self._targets = None
        self._target_problems.clear()
        self._overflow.clear()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"Probe(layers={self.layers}, capacity={self.capacity}, dtype={self.dtype}, {state}, nbytes={self.nbytes})"


def _compiled_elsewhere(model: nn.Module) -> bool:
    """Whether a torch.compile wrapper (``OptimizedModule``) of ``model`` exists: the reason a probe
    attached afterwards sees no call (only asked when a layer captured nothing)."""
    import gc

    return any(type(o).__name__ == "OptimizedModule" and getattr(o, "_orig_mod", None) is model for o in gc.get_objects())


def probe(
    model: nn.Module,
    layers: Union[LayerSpec, Iterable[LayerSpec]],
    *,
    capacity: int = 4096,
    reduce: Union[Reduction, Mapping[str, Reduction]] = "mean",
    dtype: torch.dtype = torch.float32,
    positions: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    select: Union[OutputSelector, Mapping[str, OutputSelector], None] = None,
    store_targets: bool = False,
    layout: LayoutSpec = None,
    observe: Union[bool, LayoutDecisions] = True,
) -> Probe:
    """Capture layers' activations inside a ``with`` block: ``with netprobe.probe(model, layers) as p``.

    Returns a :class:`Probe` (not yet attached); entering the block attaches its hooks, leaving it
    (also by an exception) removes them. See :class:`Probe` for the arguments.

    With ``reduce="sample"``, rows line up across layers only when the layers have the same spatial
    size: within one forward pass, all sampled layers of one size use the same drawn positions (row
    ``i`` = the same input and position in each). Layers of different spatial sizes get unrelated
    positions, so compare them with ``reduce="mean"`` (or your own resampling), not row by row.

    Example:
        >>> import netprobe
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
        >>> with netprobe.probe(model, [nn.ReLU], capacity=64) as p:
        ...     _ = model(torch.randn(4, 3, 10, 10))
        >>> p["1"].shape        # per-channel spatial mean of the ReLU output
        torch.Size([4, 8])
    """
    return Probe(
        model,
        layers,
        capacity=capacity,
        reduce=reduce,
        dtype=dtype,
        positions=positions,
        generator=generator,
        select=select,
        store_targets=store_targets,
        layout=layout,
        observe=observe,
    )
