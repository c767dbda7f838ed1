"""The shared base of netprobe's Lightning callbacks (the only package that imports Lightning).

What every monitor does, in one place:

* **Probe set.** A fixed set of examples, drawn once and kept for the whole run, so every epoch
  is measured on the same inputs: by default ``num_samples`` examples of the *training* dataset,
  chosen with the callback's own seeded ``torch.Generator`` (the global RNG is never touched:
  drawing happens under ``torch.random.fork_rng``); or the user's tensors / DataLoader
  (``probe_data``). The indices are part of the callback's ``state_dict``, so a resumed run
  measures the same examples.
* **When.** After the optimizer step of the epoch's last training batch (before validation), every
  ``every_n_epochs`` epochs; if the number of batches is unknown, in ``on_train_epoch_end``. The
  values are written to ``trainer.callback_metrics`` at once, so ``EarlyStopping`` and
  ``ModelCheckpoint`` see them in the same epoch whatever the order of the callbacks, and to every
  logger (rank zero) at the step of Lightning's own epoch-level scalars (``global_step - 1``).
* **Training does not notice.** Evaluation runs under ``torch.no_grad()`` in eval mode; every
  module's training flag and the CPU/CUDA RNG states are restored afterwards; probe hooks are
  removed; gradients are untouched.
* **DDP.** Each rank evaluates a contiguous shard of the probe set; sufficient statistics are
  reduced across ranks, so the values equal the single-process ones, and every rank logs the same.
* **One probe pass per measurement.** Monitors of one Trainer that measure the same probe set
  (same ``seed``, ``num_samples``, ``probe_data``, ``batch_size`` and ``forward``) at the same
  step share one forward pass over it, capturing the layers of all of them at once
  (:class:`_SharedProbePass`); the activations of a layer do not depend on which other layers
  are captured, so no value depends on which other monitors are attached.
* **Failures.** Misconfiguration fails fast (unknown layers with close names in ``setup``; layers
  not reached, classes not inferable, a probe set too small for CCA at ``on_train_start``). A
  metric that cannot be computed for a layer at some epoch (e.g. every unit dead) is skipped with
  a warning, once per layer and metric in a fit, that says why and which layers the mean
  ``netprobe/<metric>`` then covers (it averages the layers that have a value); the training run
  goes on.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
from torch import nn

from netprobe import distributed as _dist
from netprobe._keys import BEST_TRACKED as _BEST
from netprobe._keys import FACTS as _FACTS
from netprobe._keys import MODEL_LEVEL as _MODEL_LEVEL
from netprobe._validation import check_int
from netprobe.layers import (
    LayerSpec,
    LayoutDecisions,
    check_layout,
    evaluating,
    resolve_layers,
    split_batch,
)
from netprobe.lightning._shared_pass import (
    _frozen_spec,
    _OtherRankFailed,
    _probe_fingerprint,
    _RunIdentity,
    _shared_pass,
    seeded_host_rngs,
)
from netprobe.lightning._skips import SkipReport
from netprobe.lightning._tensorboard import (
    _log_hp_metric,
    _register_tensorboard,
    _restore_hp_metric_default,
    _tensorboard_writer,
    _write_experiment,
)

if TYPE_CHECKING:  # pragma: no cover
    from netprobe.lightning._shared_pass import Trainer

try:
    import pytorch_lightning as _pl
except ImportError:  # pragma: no cover
    _pl = None  # type: ignore[assignment]
try:
    import lightning.pytorch as _L
except ImportError:  # pragma: no cover
    _L = None  # type: ignore[assignment]

_BASES: Tuple[type, ...] = tuple(m.Callback for m in (_pl, _L) if m is not None)
if not _BASES:  # pragma: no cover
    raise ImportError("netprobe.lightning needs `pytorch-lightning` (or `lightning`) installed.")
#: Lightning's ``EarlyStopping`` of each Lightning package installed
_EARLY_STOPPING: Tuple[type, ...] = tuple(m.callbacks.EarlyStopping for m in (_pl, _L) if m is not None)

__all__ = ["NetprobeMonitor"]

Batch = Any
#: what ``layers`` takes: one spec (name, glob pattern, module class) or a sequence of them
Layers = Union[LayerSpec, Sequence[LayerSpec]]
#: what ``probe_data`` takes: an ``(inputs, targets)`` pair of tensors or a DataLoader
ProbeData = Union[Tuple[torch.Tensor, torch.Tensor], Any]
#: what ``layout`` takes: one layout string for every layer, or ``{layer: layout}``
LayoutSpec = Union[str, Mapping[str, str], None]
#: what ``select`` takes: one index or key for every layer, or ``{layer: index or key}``
SelectSpec = Union[int, str, Mapping[str, Union[int, str]], None]


def _module_type(pl_module: nn.Module, layer: str) -> Optional[str]:
    """The class name of the monitored module ``layer`` (``None`` when it is not a submodule)."""
    try:
        return type(pl_module.get_submodule(layer)).__name__
    except (AttributeError, TypeError):
        return None


class NetprobeMonitor(*_BASES):  # type: ignore[misc]
    """Base of :class:`SelectivityMonitor`, :class:`RelianceMonitor`, :class:`ConvergenceMonitor`.

    Accepted by the ``Trainer`` of ``pytorch_lightning`` and of ``lightning.pytorch`` (it derives
    from both ``Callback`` classes when both are installed).

    The options after ``layers`` are the *shared options*: every monitor's ``__init__`` takes each
    of them as a keyword-only argument, with the default given here, and passes it on by name.

    Args:
        layers: the layers to monitor, as in :func:`netprobe.probe`: qualified names of the
            LightningModule's submodules, glob patterns, module classes, mixed.
        num_samples: size of the default probe set (examples of the training dataset). 256 by
            default, chosen for precision per cost (``benchmarks/probe_precision.py`` and
            ``benchmarks/reliance_precision.py``; docs/reliance.md and docs/benchmarks.md).
            PWCCA (``ConvergenceMonitor(methods=("pwcca", ...))``) on a layer wider than half the
            probe set is computed on sampled positions or leading directions (docs/convergence.md).
            A dataset (or ``probe_data`` DataLoader) with
            fewer examples gives a probe set of all of them, with a warning naming both sizes.
        every_n_epochs: measure every ``n`` epochs (epochs ``n-1, 2n-1, ...``, 0-based).
        probe_data: ``(inputs, targets)`` tensors or a DataLoader to use instead of the default
            (at most ``num_samples`` examples are taken from a DataLoader).
        batch_size: examples per forward pass during evaluation.
        seed: seed of the callback's own generator (probe-set choice, ablation orders).
        num_classes: number of classes; inferred from the model's output width when ``None``.
        media_every: draw and log the TensorBoard media (histograms, figures, heatmaps) at every
            ``media_every``-th measurement, starting with the first (default 10). Scalars are logged
            at every measurement; media cost far more (matplotlib drawing and PNG encoding, tens
            of ms per figure). ``1`` = every measurement.
        layout: the layout of the monitored layers' outputs (``"NCL"``, ``"NLC"``, ``"LNC"``,
            ``"NCHW"``, ...; ``N`` batch, ``C`` units), one string or a dict ``{layer: layout}``,
            for layers whose layout netprobe cannot establish itself (it then refuses before the
            first step, naming this argument); see :func:`netprobe.probe`.
        select: for layers whose output is a tuple or dict (``nn.LSTM``, ``nn.MultiheadAttention``):
            the index or key of the tensor to measure, one for all layers or a dict per layer.
    """

    #: metric names this monitor logs (``netprobe/<metric>/<layer>`` and their mean ``netprobe/<metric>``;
    #: a model-level one such as ``probe_accuracy`` only as ``netprobe/<metric>``)
    metrics: Tuple[str, ...] = ()

    def __init__(
        self,
        layers: Layers,
        *,
        num_samples: int = 256,
        every_n_epochs: int = 1,
        probe_data: Optional[ProbeData] = None,
        batch_size: int = 256,
        seed: int = 0,
        num_classes: Optional[int] = None,
        media_every: int = 10,
        layout: LayoutSpec = None,
        select: SelectSpec = None,
    ) -> None:
        super().__init__()
        if layers is None or (isinstance(layers, (list, tuple)) and not layers):
            raise ValueError("Expected `layers` to name at least one layer to monitor, but got none.")
        for name, v, lo in (("num_samples", num_samples, 2), ("every_n_epochs", every_n_epochs, 1), ("batch_size", batch_size, 1),
                             ("media_every", media_every, 1)):
            check_int(v, name, lo)
        if not isinstance(seed, int):
            raise TypeError(f"Expected `seed` to be an int, but got {type(seed).__name__}.")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"Expected `num_classes` to be an int >= 2 or None, but got {num_classes!r}.")
        if probe_data is not None:
            if isinstance(probe_data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in probe_data) and len(probe_data) != 2:
                raise ValueError(
                    "Expected `probe_data` to be an (inputs, targets) pair of tensors or a DataLoader, but got a "
                    f"{type(probe_data).__name__} of {len(probe_data)} tensors. Pass `probe_data=(inputs, targets)`."
                )
            if not hasattr(probe_data, "__iter__"):
                raise TypeError(
                    "Expected `probe_data` to be an (inputs, targets) pair of tensors or a DataLoader, "
                    f"but got {type(probe_data).__name__}."
                )
        self.layer_specs = layers
        self.num_samples = num_samples
        self.every_n_epochs = every_n_epochs
        self.probe_data = probe_data
        self.batch_size = batch_size
        self.seed = seed
        self.num_classes = num_classes
        self._num_classes_arg = num_classes  # what the user passed (None = infer from each run's model)
        self.media_every = media_every
        if layout is not None:  # checked now; the layer names only once resolved (setup)
            for v in (layout.values() if isinstance(layout, Mapping) else [layout]):
                if v is not None:
                    check_layout(v)
        if (select is not None and not isinstance(select, (int, str, Mapping))) or isinstance(select, bool):
            raise TypeError(f"Expected `select` to be an int index, a key, or a dict {{layer: index or key}}, but got {type(select).__name__}.")
        self.layout, self.select = layout, select
        self._media_due = True  # whether the running measurement draws media (see _maybe_run)
        self.layers: List[str] = []
        self._probe_indices: Optional[torch.Tensor] = None
        self._probe: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._last_epoch = -1
        self._widths: Dict[str, int] = {}
        self.last_values: Dict[str, float] = {}
        self._published: set = set()  # keys written at the last measurement
        # keys this measurement leaves out on purpose (not due: RelianceMonitor's rotation), whose
        # last values stay where Lightning's callbacks read them, as between measurements
        self._resting: set = set()
        # True while on_train_end computes the last measurement again for its media: a subclass
        # whose measurement advances a state (RelianceMonitor's rotation) repeats it instead
        self._redrawing = False
        self._best: Dict[str, float] = {}  # metric -> best value of netprobe/<metric> so far (see _BEST)
        self._fingerprint: Optional[str] = None  # of the probe set measured (kept in checkpoints)
        # each layer's batch axis, observed at its first measurement and carried to the later ones
        self._layout_decisions = LayoutDecisions()
        self._resumed_fingerprint: Optional[str] = None  # of the checkpoint's probe set, until compared
        self._order_logged = False  # netprobe/layer_index/, layer_units/ and layer_type/ written in this fit
        self._units: Dict[str, int] = {}  # each monitored layer's units, as its activations showed them
        self._media_epoch = -1  # the last epoch whose measurement drew the media
        self._run = _RunIdentity()
        self._skipped = SkipReport()  # values skipped at the running measurement, told at its end

    # ------------------------------------------------------------------ identity / state
    @property
    def state_key(self) -> str:
        """The key of this monitor's state in a checkpoint: its class and settings, so two monitors
        of one class on other layers or settings keep apart (Lightning refuses duplicate keys)."""
        # Lightning reads this for every hook call, so it is built once per set of settings.
        specs = self.layer_specs
        specs = tuple(specs) if isinstance(specs, (list, tuple)) else (specs,)
        settings = (specs, self.every_n_epochs, self.num_samples, self.seed, tuple(self.metrics))
        cached = self.__dict__.get("_state_key_cache")
        if cached is None or cached[0] != settings:
            key = {"layers": self._layer_key(), "every_n_epochs": self.every_n_epochs, "num_samples": self.num_samples,
                   "seed": self.seed, "metrics": list(self.metrics)}
            cached = self._state_key_cache = (settings, f"{type(self).__name__}{key}")
        return cached[1]

    def _share_key(self) -> Tuple[Any, ...]:
        """Monitors with equal keys measure the same probe set the same way (one shared pass)."""
        return (self.seed, self.num_samples, id(self.probe_data), self.batch_size, type(self).forward, type(self)._draw_probe_set,
                type(self).batch_to_inputs_targets, _frozen_spec(self.layout), _frozen_spec(self.select))

    def _per_layer(self, spec: Any, layer: str) -> Any:
        """``layout``/``select`` of one resolved layer (a single value applies to every layer)."""
        return spec.get(layer) if isinstance(spec, Mapping) else spec

    def _layer_key(self) -> str:
        specs = self.layer_specs if isinstance(self.layer_specs, (list, tuple)) else [self.layer_specs]
        return repr([s.__name__ if isinstance(s, type) else str(s) for s in specs])

    def state_dict(self) -> Dict[str, Any]:
        """What resuming needs: the probe set's indices and digest, the last measured epoch, the
        best values so far, and a subclass's extra state (the previous activations, the orders)."""
        return {"probe_indices": self._probe_indices, "last_epoch": self._last_epoch, "extra": self._extra_state(),
                "best": dict(self._best), "probe_fingerprint": self._fingerprint}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state; the probe set's digest is checked against the resumed run's at its start."""
        self._resumed_fingerprint = state_dict.get("probe_fingerprint")
        self._probe_indices = state_dict.get("probe_indices")
        self._last_epoch = int(state_dict.get("last_epoch", -1))
        self._best = {str(k): float(v) for k, v in dict(state_dict.get("best", {})).items()}
        self._probe = None  # re-drawn from the indices
        self._load_extra_state(state_dict.get("extra", {}))

    def _extra_state(self) -> Dict[str, Any]:
        return {}

    def _reset_extra_state(self) -> None:
        pass

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------ batches
    def batch_to_inputs_targets(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """Split a batch into ``(inputs, integer targets)``. Override for unusual batch formats.

        Default: ``(x, y, ...)`` tuples/lists, and dicts with keys such as ``x``/``input``/``image``
        and ``y``/``target``/``label``.
        """
        pair = split_batch(batch, "Override `batch_to_inputs_targets`.")
        if pair is None:
            raise ValueError(
                f"Cannot split a batch of type {type(batch).__name__} into (inputs, targets); override "
                "`batch_to_inputs_targets(batch)` in a subclass of the monitor."
            )
        return pair

    def forward(self, pl_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """How the monitored model is called on probe inputs (default ``pl_module(x)``, floating
        inputs cast to the dtype of the model's parameters, e.g. for ``precision="bf16-true"``)."""
        p = next((p for p in pl_module.parameters() if p.is_floating_point()), None)
        if p is not None and isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != p.dtype:
            x = x.to(p.dtype)
        return pl_module(x)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Trainer, pl_module: nn.Module, stage: str) -> None:
        """Resolve the layers (unknown names raise with the closest ones), refuse keys another monitor would also write, and join the Trainer's shared probe pass."""
        self.layers = list(resolve_layers(pl_module, self.layer_specs))
        for what, spec in (("layout", self.layout), ("select", self.select)):
            unknown = [k for k in spec if k not in self.layers] if isinstance(spec, Mapping) else []
            if unknown:
                raise ValueError(f"{type(self).__name__}: `{what}` names layers that are not monitored: {unknown}. Monitored: {self.layers}.")
        self._refuse_shared_keys(trainer, pl_module)
        self._refuse_strict_early_stopping(trainer, pl_module)
        _shared_pass(trainer).monitors.add(self)
        # a monitor reused for another Trainer or model starts afresh (its probe set and previous
        # activations belong to the old run); a second fit of the same pair goes on where it was.
        # A checkpoint being resumed is loaded after this, so its state wins.
        if self._run.begins(trainer, pl_module, stage):
            self._probe_indices, self._probe, self._last_epoch, self.last_values = None, None, -1, {}
            self._fingerprint = self._resumed_fingerprint = None
            self._layout_decisions = LayoutDecisions()
            self._published, self.num_classes, self._best, self._resting = set(), self._num_classes_arg, {}, set()
            self._reset_extra_state()

    def _refuse_shared_keys(self, trainer: Trainer, pl_module: nn.Module) -> None:
        """A key has one writer: refuse, naming both monitors, when another netprobe monitor of this
        Trainer would log one of this monitor's keys (``EarlyStopping``, ``ModelCheckpoint`` and
        ``netprobe rank`` read them; two writers would alternate and ``best/*`` would not be monotone).
        ``netprobe/layer_index/``, ``layer_units/`` and ``layer_type/`` are facts of the model, the
        same from every monitor."""
        facts = tuple(f"netprobe/{fact}/" for fact in _FACTS if fact != "time")
        mine = {k for k in self.logged_keys(pl_module) if not k.startswith(facts)}
        for other in getattr(trainer, "callbacks", None) or []:
            if other is self or not isinstance(other, NetprobeMonitor):
                continue
            shared = sorted(mine & set(other.logged_keys(pl_module)))
            if not shared:
                continue
            same = type(other) is type(self)
            advice = (f"Monitor all of their layers with one {type(self).__name__}, e.g. "
                      f"{type(self).__name__}({list(dict.fromkeys(self._specs() + other._specs()))!r}): "
                      "its netprobe/<metric> is then the mean over every layer"
                      if same else
                      "Keep one monitor per metric: drop the metric from one of them, or monitor with one of the two")
            raise ValueError(
                f"{self._describe()} and {other._describe()} would both log {shared[:4]}"
                f"{' and %d more' % (len(shared) - 4) if len(shared) > 4 else ''}: a key has one writer (EarlyStopping, "
                f"ModelCheckpoint and `netprobe rank` read these keys, and two writers would overwrite each other). {advice}."
            )

    def _late_keys(self, pl_module: nn.Module) -> Dict[str, str]:
        """``{key: why}`` for the keys the end of the first epoch does not have yet: all of them with
        ``every_n_epochs > 1`` (a subclass adds its own)."""
        if self.every_n_epochs == 1:
            return {}
        return {k: f"every_n_epochs={self.every_n_epochs}: first measured at the end of epoch {self.every_n_epochs - 1}"
                for k in self.logged_keys(pl_module)}

    def _refuse_strict_early_stopping(self, trainer: Trainer, pl_module: nn.Module) -> None:
        """Refuse, before the first step, an ``EarlyStopping(strict=True)`` that checks at the end of
        the first training epoch (Lightning's rule: ``check_on_train_epoch_end``, or by default a
        validation every epoch at the epoch's end) on a key this monitor does not log by then:
        Lightning would stop the run there with an error."""
        late = self._late_keys(pl_module)
        if not late:
            return
        for cb in getattr(trainer, "callbacks", None) or []:
            key = getattr(cb, "monitor", None)
            if not (isinstance(cb, _EARLY_STOPPING) and getattr(cb, "strict", False) and key in late):
                continue
            at_epoch_end = getattr(cb, "_check_on_train_epoch_end", None)
            if at_epoch_end is None:
                at_epoch_end = (getattr(trainer, "val_check_interval", 1.0) == 1.0
                                and getattr(trainer, "check_val_every_n_epoch", 1) == 1)
            if at_epoch_end:
                raise ValueError(
                    f"{type(cb).__name__}(monitor={key!r}, strict=True) would end the run with an error at the end of "
                    f"epoch 0: {self._describe()} does not log that key by then ({late[key]}). Pass strict=False (the key "
                    "keeps its last value between measurements), or use netprobe.lightning.RelianceEarlyStopping, which "
                    "counts only fresh measurements."
                )

    def _specs(self) -> List[Any]:
        spec = self.layer_specs
        return [spec] if isinstance(spec, (str, type, nn.Module)) else list(spec)

    def _describe(self) -> str:
        """``ClassName([layers], every_n_epochs=k)`` for messages."""
        every = f", every_n_epochs={self.every_n_epochs}" if self.every_n_epochs != 1 else ""
        return f"{type(self).__name__}({self._specs()!r}{every})"

    def on_fit_start(self, trainer: Trainer, pl_module: nn.Module) -> None:
        """Start the fit's warnings afresh and write the TensorBoard layout before Lightning logs the hyperparameters."""
        self._order_logged = False
        self._skipped.warned = set()  # a skipped value is told once per layer and metric in each fit
        # before Lightning logs the hyperparameters (TensorBoard keeps the first experiment summary
        # of a run): the layout, the HParams session, the experiment held back to on_train_end
        _register_tensorboard(trainer, pl_module, [c for c in getattr(trainer, "callbacks", []) if isinstance(c, NetprobeMonitor)])

    def on_train_start(self, trainer: Trainer, pl_module: nn.Module) -> None:
        """Draw (or check) the probe set and validate the layers and options on it, before the first step."""
        _restore_hp_metric_default(trainer)
        if self._probe is None:
            # rank 0's probe set on every rank: a user DataLoader that shuffles, or an iterable
            # dataset split by rank, would otherwise give each rank different examples
            self._probe = _dist.broadcast_object(self._draw_probe_set(trainer))
            self._fingerprint = _probe_fingerprint(*self._probe)
            resumed, self._resumed_fingerprint = self._resumed_fingerprint, None
            if resumed is not None and resumed != self._fingerprint:
                raise ValueError(
                    f"{type(self).__name__}: the checkpoint being resumed was measured on another probe set than the one "
                    "drawn now (same size, other examples or values): values such as `<method>_prev` would compare "
                    "different inputs across the resume. Resume with the same `probe_data=`/`seed=`/`num_samples` and "
                    "training data, or start a fresh run. A dataset whose random transforms draw from a generator of "
                    "their own (not torch's, numpy's global or Python's `random`, which netprobe seeds) gives other "
                    "values at every draw: pass fixed `probe_data=(inputs, targets)` tensors."
                )
            self._validate(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: nn.Module, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Measure after the optimizer step of the epoch's last training batch, when due."""
        nb = trainer.num_training_batches
        if isinstance(nb, (int, float)) and math.isfinite(nb) and batch_idx + 1 == int(nb):
            self._maybe_run(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: nn.Module) -> None:
        """Measure here when the number of training batches is unknown, when due."""
        self._maybe_run(trainer, pl_module)
        _shared_pass(trainer).clear()  # whatever a peer left (every monitor has measured by now)

    def on_train_end(self, trainer: Trainer, pl_module: nn.Module) -> None:
        """Write the HParams experiment with every key the run logged, and draw the last
        measurement's media if they were not due."""
        _write_experiment(trainer, pl_module)
        # a run stopped early (EarlyStopping decides after the measurement) ends without the media
        # of its last measurement: draw them now, from the same model (no step since), at its step
        last = self._last_epoch
        if (last < 0 or self._media_epoch == last or _dist.world_size() > 1 or _dist.rank() != 0
                or last < int(trainer.current_epoch) - 1 or _tensorboard_writer(list(getattr(trainer, "loggers", []) or [])) is None):
            return
        self._media_due, self._redrawing = True, True
        try:
            with self._frozen(pl_module):
                _, media = self._measure(trainer, pl_module)
        except Exception as err:  # the run is over: a figure is not worth failing it
            warnings.warn(f"{type(self).__name__}: the last measurement's figures were not drawn: {err}", RuntimeWarning)
            return
        finally:
            self._redrawing = False
            _shared_pass(trainer).clear()
        self._media_epoch = last
        self._publish_media(trainer, media)

    # ------------------------------------------------------------------ probe set
    def _draw_probe_set(self, trainer: Trainer) -> Tuple[torch.Tensor, torch.Tensor]:
        with seeded_host_rngs(self.seed):  # random transforms: the same probe set on every rank and after a resume
            if self.probe_data is not None:
                if isinstance(self.probe_data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in self.probe_data):
                    x, y = self.probe_data
                else:
                    x, y = self._take(iter(self.probe_data), self.num_samples)
                    self._warn_fewer(trainer, "the `probe_data` DataLoader", x.shape[0])
            else:
                loader = trainer.train_dataloader
                while isinstance(loader, (Mapping, list, tuple)) and loader:
                    loader = next(iter(loader.values())) if isinstance(loader, Mapping) else loader[0]
                ds = getattr(loader, "dataset", None)
                if ds is None:
                    raise ValueError(
                        f"{type(self).__name__}: no training DataLoader to draw the probe set from; pass "
                        "`probe_data=(inputs, targets)`."
                    )
                if hasattr(ds, "__len__") and hasattr(ds, "__getitem__"):
                    if self._probe_indices is None:
                        g = torch.Generator().manual_seed(self.seed)
                        k = min(self.num_samples, len(ds))
                        self._warn_fewer(trainer, "the training dataset", k)
                        self._probe_indices = torch.randperm(len(ds), generator=g)[:k].sort().values
                    items = [ds[int(i)] for i in self._probe_indices]
                    collate = getattr(loader, "collate_fn", None) or torch.utils.data.default_collate
                    x, y = self.batch_to_inputs_targets(collate(items))
                else:  # iterable dataset: the first num_samples examples
                    x, y = self._take(iter(loader), self.num_samples)
                    self._warn_fewer(trainer, "the training DataLoader", x.shape[0])
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: the probe set must be tensors (inputs, targets).")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{type(self).__name__}: probe inputs and targets differ in length ({x.shape[0]} vs {y.shape[0]}).")
        if y.is_floating_point() or y.ndim != 1:
            raise ValueError(
                f"{type(self).__name__}: no classes can be inferred: expected 1-D integer class targets, but got "
                f"dtype {y.dtype} and shape {tuple(y.shape)}. Override `batch_to_inputs_targets` to return class indices."
            )
        x, y = x.detach().cpu(), y.detach().cpu().long()
        self._check_probe_set(x, y)
        return x, y

    def _check_probe_set(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The one policy for bad probe data, the same in every monitor, before the first step: an
        empty probe set, non-finite inputs, targets that are not classes (negative, an ignore index such as -100) and
        a probe set of one class are refused, naming the offending examples and the fix."""
        name = type(self).__name__

        def rows(mask: torch.Tensor) -> str:
            idx = mask.nonzero().flatten().tolist()
            return f"{idx[:8]}{' ...' if len(idx) > 8 else ''} ({len(idx)} of {mask.numel()})"

        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(
                f"{name}: the probe set has no examples (inputs of shape {tuple(x.shape)}): nothing can be measured. "
                "Pass `probe_data=(inputs, targets)` with examples of several classes, or leave it out to draw "
                "`num_samples` examples of the training data."
            )
        if x.is_floating_point() or x.is_complex():
            bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(1) if x.ndim else ~torch.isfinite(x).reshape(1)
            if bool(bad.any()):
                raise ValueError(
                    f"{name}: probe examples {rows(bad)} have NaN or infinite inputs, so every value measured on them "
                    "would be NaN. Use a probe set without them: clean the dataset, or pass `probe_data=(inputs, targets)` "
                    "with finite inputs."
                )
        neg = y < 0
        if bool(neg.any()):
            vals = sorted(set(y[neg].tolist()))[:4]
            raise ValueError(
                f"{name}: probe examples {rows(neg)} have targets {vals}, which are not classes (a negative label, or an "
                "ignore index such as -100 that cross_entropy skips). Every probe example needs its class: pass "
                "`probe_data=(inputs, targets)` without them, or override `batch_to_inputs_targets`."
            )
        if y.numel() and int(y.unique().numel()) < 2:
            raise ValueError(
                f"{name}: all {y.numel()} probe examples are of class {int(y[0])}: selectivity, accuracy, reliance and "
                "the class-balanced values need at least two classes. Draw another probe set (`seed=`, a larger "
                "`num_samples`) or pass `probe_data=(inputs, targets)` with several classes."
            )

    def _warn_fewer(self, trainer: Trainer, source: str, got: int) -> None:
        """Warn (rank zero, once per Trainer and sizes) when ``source`` gave fewer probe examples than
        ``num_samples``: the probe set is then all of them, and every value is measured on ``got``."""
        if got >= self.num_samples or _dist.rank() != 0:
            return
        told = _shared_pass(trainer).fewer_told
        if (source, self.num_samples, got) in told:  # another monitor of this Trainer said it already
            return
        told.add((source, self.num_samples, got))
        warnings.warn(
            f"{type(self).__name__}: `num_samples`={self.num_samples}, but {source} has only {got} examples, so the probe "
            f"set is all {got} of them: every value is measured on {got} examples, not {self.num_samples}. Pass "
            f"`num_samples={got}` (or fewer) to ask for what is there and silence this warning.",
            RuntimeWarning, stacklevel=2,
        )

    def _take(self, it: Iterator[Any], n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        xs, ys, got = [], [], 0
        for batch in it:
            x, y = self.batch_to_inputs_targets(batch)
            xs.append(x)
            ys.append(y)
            got += x.shape[0]
            if got >= n:
                break
        if not xs:
            raise ValueError(f"{type(self).__name__}: the probe data is empty.")
        return torch.cat(xs)[:n], torch.cat(ys)[:n]

    def _shard(self) -> Tuple[torch.Tensor, torch.Tensor, slice]:
        """This rank's contiguous block of the probe set (all of it without DDP)."""
        assert self._probe is not None
        x, y = self._probe
        n, ws, r = x.shape[0], _dist.world_size(), _dist.rank()
        sl = slice(r * n // ws, (r + 1) * n // ws)
        return x[sl], y[sl], sl

    def _batched(self, x: torch.Tensor, y: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """``(x, y)`` in batches of ``batch_size`` (the data the metric functions take)."""
        return [(x[i : i + self.batch_size], y[i : i + self.batch_size]) for i in range(0, x.shape[0], self.batch_size)]

    # ------------------------------------------------------------------ evaluation helpers
    def _frozen(self, pl_module: nn.Module) -> ContextManager[None]:
        return evaluating(pl_module, restore_rng=True)

    def _probe_pass(self, trainer: Trainer, pl_module: nn.Module, x: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """This monitor's layers and the model's outputs on ``x`` (this rank's shard of the probe
        set) at this step, from the forward pass shared with the other monitors (see the module
        docstring). Notes each layer's units (the activations' columns), logged as a fact."""
        acts, out = _shared_pass(trainer).capture(self, trainer, pl_module, x)
        self._units.update({n: int(a.shape[-1]) for n, a in acts.items() if a.ndim == 2})
        return acts, out

    def _extra_capture(self, pl_module: nn.Module, x: torch.Tensor, step: Any) -> Optional[ContextManager[Any]]:
        """Subclass hook: more hooks to run during the forward pass shared with the other monitors
        over ``x`` (this rank's shard of the probe set) made for ``step``
        (:meth:`_SharedProbePass.step_key`), as a context manager entered around that pass;
        ``None`` (the default) for none. The subclass keeps what it needs from the context, with
        ``step`` to tell it is this measurement's; what it computes must not depend on whether the
        shared pass ran it or it ran its own pass."""
        return None

    def _capture(self, pl_module: nn.Module, x: torch.Tensor, layers: Optional[Sequence[str]] = None,
                 extras: Sequence[ContextManager[Any]] = ()) -> Tuple[Dict[str, torch.Tensor], Optional[torch.Tensor]]:
        """Per-unit activations ``{layer: (n, d)}`` (probe default reduction) and the outputs
        (``None`` when the model does not return a tensor), with the ``extras`` (see
        :meth:`_extra_capture`) entered around the same forward pass."""
        from netprobe.capture import probe

        layers = list(layers or self.layers)
        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        outs = []
        sel = {n: self._per_layer(self.select, n) for n in layers}
        lay = {n: self._per_layer(self.layout, n) for n in layers}
        with contextlib.ExitStack() as stack, \
                probe(pl_module, layers, capacity=max(1, x.shape[0]), select={n: v for n, v in sel.items() if v is not None} or None,
                      layout={n: v for n, v in lay.items() if v is not None} or None, observe=self._layout_decisions) as p:
            for extra in extras:
                stack.enter_context(extra)
            for i in range(0, x.shape[0], self.batch_size):
                outs.append(self.forward(pl_module, x[i : i + self.batch_size].to(device)))
        missing = [n for n in layers if not p.buffers[n].allocated]
        if missing:
            raise ValueError(
                f"{type(self).__name__}: layers {missing} were not reached by the forward pass on the probe inputs "
                "(check the names, or override `forward(pl_module, x)`)."
            )
        misaligned = {n: p.buffers[n].total_written for n in layers if p.buffers[n].total_written != x.shape[0]}
        if misaligned:
            raise ValueError(
                f"{type(self).__name__}: layers must give one row per probe input, but {x.shape[0]} inputs gave "
                f"{misaligned} rows (a module called several times per forward, or a per-position reduction). "
                "Monitor a module that runs once per input, or override `forward(pl_module, x)`."
            )
        out = torch.cat(outs) if outs and all(isinstance(o, torch.Tensor) for o in outs) else None
        return {n: p[n] for n in layers}, out

    def _validate(self, pl_module: nn.Module) -> None:
        assert self._probe is not None
        x, y = self._probe
        if len(x) < _dist.world_size():
            raise ValueError(
                f"{type(self).__name__}: the probe set has {len(x)} examples for {_dist.world_size()} ranks; every rank "
                "evaluates a share of it, so use num_samples >= the number of ranks."
            )
        with self._frozen(pl_module):
            try:
                acts, out = self._capture(pl_module, x[: min(len(x), 16)])
            except RuntimeError as err:  # a shape or dtype torch cannot take: the probe set, not the training
                raise ValueError(
                    f"{type(self).__name__}: the model cannot run on the probe inputs (shape {tuple(x.shape)}, dtype "
                    f"{x.dtype}): {type(err).__name__}: {err}. The probe set must be inputs the model takes, as in a "
                    "training batch: check `probe_data=`, `batch_to_inputs_targets`, or override `forward(pl_module, x)`."
                ) from err
        self._widths = {n: a.shape[1] for n, a in acts.items()}
        if self.num_classes is None:
            if out is not None and out.ndim == 2 and out.shape[1] >= 2:
                self.num_classes = int(out.shape[1])
                span = int(y.max()) + 1 if y.numel() else 0
                if y.numel() and int(y.min()) >= 0 and self.num_classes > 4 * max(span, 2):
                    # e.g. 128 features taken for 128 classes with labels 0-9: every class-based
                    # value (accuracy, selectivity, reliance) would be computed, and wrong
                    raise ValueError(
                        f"{type(self).__name__}: the model returns {self.num_classes} scores per input, but the probe "
                        f"targets span only classes 0-{span - 1}: if these outputs are not class scores (features, an "
                        "embedding), override `forward(pl_module, x)` to return the class scores; if the model really "
                        f"has {self.num_classes} classes, pass `num_classes={self.num_classes}`."
                    )
            else:
                self.num_classes = int(y.max()) + 1 if y.numel() else 0
        if self.num_classes < 2:
            raise ValueError(f"{type(self).__name__}: no classes can be inferred; pass `num_classes`.")
        if int(y.max()) >= self.num_classes or int(y.min()) < 0:
            raise ValueError(
                f"{type(self).__name__}: probe targets span [{int(y.min())}, {int(y.max())}] but num_classes={self.num_classes}."
            )
        self._check(self._widths, len(x), acts, out)

    def _check(self, widths: Mapping[str, int], n: int, acts: Mapping[str, torch.Tensor], out: Optional[torch.Tensor]) -> None:
        """Subclass hook: raise ValueError listing what is wrong for these layer widths and probe
        size, given the activations and outputs of the first few probe examples."""

    # ------------------------------------------------------------------ running and publishing
    def _due(self, epoch: int) -> bool:
        return (epoch + 1) % self.every_n_epochs == 0 and epoch != self._last_epoch

    def _maybe_run(self, trainer: Trainer, pl_module: nn.Module) -> None:
        epoch = int(trainer.current_epoch)
        if getattr(trainer, "sanity_checking", False) or not self._due(epoch):
            return
        if self._probe is None:
            self.on_train_start(trainer, pl_module)
        self._last_epoch = epoch
        self._media_due = ((epoch + 1) // self.every_n_epochs - 1) % self.media_every == 0 or _final_epoch(trainer, epoch)
        t0 = time.perf_counter()
        with self._frozen(pl_module):
            scalars, media = self._measure(trainer, pl_module)
        scalars[self._time_key] = time.perf_counter() - t0
        if self._media_due:
            self._media_epoch = epoch
        for metric in self.metrics:
            v = scalars.get(f"netprobe/{metric}")
            if metric in _BEST and v is not None and math.isfinite(v):
                self._best[metric] = max(v, self._best.get(metric, -math.inf))
            if metric in self._best:
                scalars[f"netprobe/best/{metric}"] = self._best[metric]
        if not self._order_logged and self._probe is not None:
            # where each layer sits in the forward pass (what `netprobe rank --layer deepest` reads),
            # once per fit; the same for every monitor of the model
            order = _shared_pass(trainer).forward_order(self, pl_module, self._probe[0])
            for layer in self.layers:
                if layer in order:
                    scalars[f"netprobe/layer_index/{layer}"] = float(order[layer])
                if layer in self._units:  # what `netprobe rank` forms strata of comparable runs from
                    scalars[f"netprobe/layer_units/{layer}"] = float(self._units[layer])
                    kind = _module_type(pl_module, layer)
                    if kind is not None:
                        scalars[f"netprobe/layer_type/{layer}/{kind}"] = 1.0
            self._order_logged = True
        self._publish(trainer, scalars, media)

    def compute(self, trainer: Trainer, pl_module: nn.Module) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """Subclass hook: ``({key: value}, {media})`` for this epoch. Runs frozen (eval, no_grad)."""
        raise NotImplementedError

    def _measure(self, trainer: Trainer, pl_module: nn.Module) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """:meth:`compute`, then the warnings for the values it skipped (:class:`SkipReport`)."""
        self._skipped.forget_measurement()
        result = self.compute(trainer, pl_module)
        self._skipped.tell(type(self).__name__)
        return result

    @property
    def _time_key(self) -> str:
        return f"netprobe/time/{type(self).__name__}"

    def logged_keys(self, pl_module: nn.Module) -> List[str]:
        """Every key this monitor logs for ``pl_module``: ``netprobe/<metric>``, ``netprobe/<metric>/<layer>``
        (not for a model-level metric such as ``probe_accuracy``) and its ``netprobe/time/<Monitor>``.
        Before ``setup`` the layers are resolved as ``setup`` will (none if they cannot be: then
        ``setup`` raises its own error)."""
        layers = list(self.layers)
        if not layers:
            try:
                layers = list(resolve_layers(pl_module, self.layer_specs))
            except (ValueError, TypeError):
                layers = []
        keys = [self._time_key]
        for metric in self.metrics:
            keys.append(f"netprobe/{metric}")
            if metric in _BEST:
                keys.append(f"netprobe/best/{metric}")
            if metric not in _MODEL_LEVEL:
                keys.extend(f"netprobe/{metric}/{layer}" for layer in layers)
        keys.extend(f"netprobe/layer_index/{layer}" for layer in layers)
        keys.extend(f"netprobe/layer_units/{layer}" for layer in layers)
        keys.extend(f"netprobe/layer_type/{layer}/{kind}" for layer in layers
                    if (kind := _module_type(pl_module, layer)) is not None)
        return keys

    def _layer_values(self, metric: str, values: Mapping[str, float], out: Dict[str, float], *,
                      expected: Optional[Sequence[str]] = None, coverage: bool = True) -> None:
        """Add ``netprobe/<metric>/<layer>`` and their mean ``netprobe/<metric>`` to ``out``.

        The mean is over the layers that have a finite value. With ``coverage``, the layers that
        should have one (``expected``; every monitored layer when ``None``) are noted, so that the
        measurement's warnings say which layers a mean left out (:class:`SkipReport`)."""
        finite = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
        for layer, v in finite.items():
            out[f"netprobe/{metric}/{layer}"] = v
        if finite:
            out[f"netprobe/{metric}"] = sum(finite.values()) / len(finite)
        if coverage:
            exp = list(self.layers if expected is None else expected)
            self._skipped.coverage[metric] = ([k for k in exp if k in finite], exp)

    def _agreed(self, fn: Callable[[], Any], device: Optional[torch.device]) -> Any:
        """Run a rank-local step that may raise ValueError (input checks on this rank's shard)
        and agree across ranks before any collective: if it failed on any rank, every rank raises
        ValueError (its own, or one saying another rank failed), so all of them skip the same
        layer instead of some waiting forever in the next collective."""
        result, err = None, None
        try:
            result = fn()
        except ValueError as e:
            err = e
        if not _dist.all_true(err is None, device):
            raise err if err is not None else _OtherRankFailed("it failed on another rank (see that rank's warning)")
        return result

    def _warn_skip(self, layer: str, what: str, err: Exception, metrics: Optional[Sequence[str]] = None) -> None:
        """Note that ``what`` could not be computed for ``layer`` at this measurement (``err`` says
        why); ``metrics``: the logged metrics this leaves without a value for the layer (``None``:
        any of them). The warning comes at the end of the measurement (:class:`SkipReport`)."""
        loud = _dist.rank() == 0 or not isinstance(err, _OtherRankFailed)  # the rank with the cause says why
        self._skipped.note(layer, what, err, loud, metrics)

    def _publish(self, trainer: Trainer, scalars: Dict[str, float], media: Dict[str, Any]) -> None:
        self.last_values = dict(scalars)
        cm = trainer.callback_metrics
        resting = (self._resting & self._published) - set(scalars)
        for k in self._published - set(scalars) - resting:
            cm.pop(k, None)  # skipped this time (warned): no stale value for EarlyStopping/ModelCheckpoint to read
        self._published = set(scalars) | resting
        for k, v in scalars.items():
            cm[k] = torch.tensor(float(v))
        pbar, main = getattr(trainer, "progress_bar_metrics", None), f"netprobe/{self.metrics[0]}"
        if isinstance(pbar, dict):  # the monitor's main mean on the progress bar, as `self.log(..., prog_bar=True)` puts it
            if main in scalars:
                pbar[main] = float(scalars[main])
            elif main not in resting:
                pbar.pop(main, None)
        loggers = list(getattr(trainer, "loggers", []) or [])
        if _dist.rank() != 0 or not loggers:
            return
        step = _log_step(trainer)
        for logger in loggers:
            logger.log_metrics({**scalars, "epoch": float(trainer.current_epoch)}, step=step)
        _log_hp_metric(trainer, scalars, step)
        if self._media_due:
            self._publish_media(trainer, media)

    def _publish_media(self, trainer: Trainer, media: Dict[str, Any]) -> None:
        writer = _tensorboard_writer(list(getattr(trainer, "loggers", []) or []))
        if writer is None or _dist.rank() != 0:
            return
        step = _log_step(trainer)
        for tag, values in media.get("histograms", {}).items():
            if values.numel():
                writer.add_histogram(tag, values.detach().cpu().float(), step)
        for tag, fig in media.get("figures", {}).items():
            if fig is not None:
                writer.add_figure(tag, fig, step, close=True)


def _log_step(trainer: Trainer) -> int:
    """The step of Lightning's own epoch-level scalars of this epoch (one before the optimizer step
    count at the epoch's end), so that TensorBoard shows netprobe's at the same x."""
    return max(int(trainer.global_step) - 1, 0)


def _final_epoch(trainer: Trainer, epoch: int) -> bool:
    """Whether ``epoch`` is the run's last (``max_epochs`` reached, or a callback stopping it)."""
    max_epochs = getattr(trainer, "max_epochs", None)
    if isinstance(max_epochs, int) and max_epochs > 0 and epoch + 1 >= max_epochs:
        return True
    return bool(getattr(trainer, "should_stop", False))
