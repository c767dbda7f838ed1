"""The one place that decides each call site's layout (:class:`Layouts`): the batch axis observed
(see :mod:`netprobe.layers.observe`), the units axis from a declared ``layout=``, ``batch_first``,
the module's type or the followed operations; and the ``layout=`` vocabulary and its checks."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from netprobe.layers import observe as _observe
from netprobe.layers.follow import (
    _NORM_LAST,
    _clear_marks,
    _compiled,
    _FollowLayouts,
    _mark_of,
    _TorchFunctionMode,
    _typed_unit,
    _units_last_module,
    batch_first_of,
    track_layouts,
)
from netprobe.layers.hooks import _Cleanup, _state, eager_hook, evaluating
from netprobe.layers.outputs import NESTED_MESSAGE, _select_key, select_output

__all__ = ["LAYOUTS", "LayoutSpec", "check_layout", "per_layer_layout", "Layouts"]


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
