"""``ConvergenceMonitor``: how much each layer's representation still changes (similarity to the
previous measurement and to a reference: PWCCA, SVCCA, CKA, Procrustes, RBF CKA, debiased CKA).
Composes :mod:`netprobe.metrics`; re-implements none."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from netprobe import distributed as _dist
from netprobe import viz
from netprobe.layers import evaluating
from netprobe.lightning._shared_pass import _SharedProbePass, same_inputs
from netprobe.lightning._tensorboard import _has_tensorboard
from netprobe.lightning.base import Layers, LayoutSpec, NetprobeMonitor, ProbeData, SelectSpec
from netprobe.metrics.similarity import (
    RBF_MAX_SAMPLES,
    SideStats,
    SimilarityAccumulator,
    _check_keep,
    linear_cka,
    procrustes,
    rbf_cka,
    similarity_matrix,
)
from netprobe.metrics.similarity._methods import SIMILARITY_METHODS, aliases_note, canonical_method, method_names
from netprobe.metrics.similarity.rbf import _check_max_samples_option, _check_threshold

if TYPE_CHECKING:  # pragma: no cover
    from netprobe.lightning._shared_pass import Trainer

__all__ = ["ConvergenceMonitor"]


#: the methods the monitor offers: every similarity of the table that gives one number per pair
#: (which of them are computed from the whole probe set, streamed, or by Gram matrices: the table's forms)
_METHODS = method_names(scalar=True)

#: PWCCA on a conv or sequence layer: positions sampled per probe input so that the rows number at
#: least this many times the layer's channels (when the layer has the positions)
ROWS_PER_UNIT = 10
#: the fewest leading directions a layer too wide for its data points may be reduced to (else refused)
MIN_DIRECTIONS = 8


class ConvergenceMonitor(NetprobeMonitor):
    """How much each layer's representation still changes: similarity of this epoch's activations
    on the probe set to those of the previous measurement (``<method>_prev``; the previous epoch
    with ``every_n_epochs=1``, else ``every_n_epochs`` epochs earlier) and, optionally, to a reference
    model or checkpoint (``<method>_ref``), for ``methods`` among ``pwcca``, ``svcca``, ``cka``,
    ``procrustes`` (:func:`~netprobe.metrics.procrustes`, Ding et al. 2021), ``rbf_cka``
    (:func:`~netprobe.metrics.rbf_cka`, Gaussian kernels at the median distance) and
    ``cka_debiased`` (``linear_cka(debiased=True)``, the unbiased HSIC estimator).

    The default is PWCCA (Morcos, Raghu & Bengio 2018) on the data points described below, with
    linear CKA beside it (defined for any width and probe size, one pass over the probe
    activations plus ``O(d^2)``); ``methods=("cka",)`` is the cheaper choice where a measurement
    must cost least (docs/convergence.md gives what PWCCA adds). The methods share each
    covariance's factorization, and the previous measurement's statistics are reused.

    **PWCCA's data points** (every other method compares the probe activations as captured, one
    row per input, a conv or sequence layer by its per-channel mean). PWCCA needs more data points
    than twice the directions it compares, so it takes the data points its authors use:

    * a conv or sequence layer (an output with positions: ``(N, C, L)``, ``(N, C, H, W)``,
      ``(N, T, D)``, ...): rows = probe inputs x ``k`` sampled positions (``reduce="sample"`` of
      :func:`netprobe.probe`), ``k = min(P, ceil(ROWS_PER_UNIT * C / n))`` for the widest such layer
      (``C`` channels, ``P`` positions per input, capped by the layer with the fewest), one ``k``
      for all of them. The positions are the same at every measurement (common random numbers):
      the probe's generator starts every measurement from one state, that of
      ``torch.Generator().manual_seed(seed)``, kept in the callback's state (with ``k``), and the
      whole probe set is run in the same batches of ``batch_size``. In one process the rows are
      taken in the forward pass the monitors share; under DDP, where that pass covers each rank's
      shard, by one more forward pass over the whole probe set on every rank (so the rows, hence
      the values, are those of one process);
    * a dense layer with ``m`` rows (``m = n`` probe inputs) and ``d > (m - 1) / 2`` units: each
      side is first reduced to its own top ``r = floor(m / 4)`` principal directions (SVCCA's
      recipe with a stated rank cut, :meth:`~netprobe.metrics.SimilarityAccumulator.leading`), then PWCCA compares the two
      ``(m, r)`` projections (the weights are over those directions). The same rule applies to a
      conv or sequence layer whose ``m = n k`` rows are still too few. The rank is fixed, the
      directions are each measurement's own: a projection fixed at the first measurement would
      measure only the change inside the subspace that led early in training, and its value would
      depend on when measuring began; with each side's own leading subspace the comparison is
      symmetric and a layer that did not change gives 1;
    * a dense layer with ``2 d < m``: PWCCA of its units, streamed with the other methods.

    A layer whose rank cut leaves fewer than ``MIN_DIRECTIONS`` directions (``m < 32``) is refused
    before the first step. ``pwcca_ref`` takes the reference's rows the same way (same positions).

    Logs ``netprobe/<method>_prev/<layer>`` and the mean ``netprobe/<method>_prev`` (1 = the layer
    did not change up to the method's invariances), likewise ``*_ref``; with ``heatmap=True`` and a
    TensorBoardLogger, a layer-by-layer linear-CKA heatmap of the current epoch
    (``netprobe/cka_layers``). Lower layers typically converge first (Raghu et al. 2017).

    Memory: the previous measurement's activations of the whole probe set are kept, per layer
    ``num_samples x d x 4`` bytes (CPU), and saved in the callback's state for resuming; the
    similarity itself streams paired shards through :class:`~netprobe.metrics.SimilarityAccumulator`
    (``O(d^2)``) and reduces them across ranks. PWCCA's position rows (above) of the previous
    measurement are kept too, ``n k C x 4`` bytes per conv or sequence layer; SVCCA reduces to
    ``keep`` of the variance first.

    The shared options, keyword-only, are those of :class:`~netprobe.lightning.base.NetprobeMonitor`,
    which documents them: ``num_samples``, ``every_n_epochs``, ``probe_data``, ``batch_size``,
    ``seed``, ``num_classes``, ``media_every``, ``layout``, ``select``.

    Args:
        layers: see :class:`~netprobe.lightning.base.NetprobeMonitor`.
        methods: one name or a sequence of names among ``"pwcca"``, ``"svcca"``, ``"cka"``,
            ``"procrustes"``, ``"rbf_cka"``, ``"cka_debiased"`` (default ``("pwcca", "cka")``, PWCCA
            on the data points described above; ``"cka"`` is the same as ``("cka",)``; a function's name is accepted for its method,
            ``"linear_cka"`` for ``"cka"``, logged as ``cka_prev``). ``procrustes`` streams like the others (``O(d^2)``; for a
            layer wider than 2/3 of the probe set, with CKA alone or beside it, from ``n x n`` Gram
            matrices); ``rbf_cka`` takes ``n x n`` kernel matrices of the whole probe set (about
            ``24 n^2`` bytes at peak, ``n`` up to ``rbf_max_samples``: a larger probe set is refused
            before the first step); ``cka_debiased`` (``linear_cka(debiased=True)``: less upward
            bias than ``cka`` for a layer wide next to the probe set; needs 4 probe examples) is
            computed from the whole probe set's activations, and, being an unbiased estimate, can
            fall slightly below 0 for unrelated representations.
        reference: an ``nn.Module`` with the same layer names, or a checkpoint path whose
            ``state_dict`` loads into a copy of the LightningModule. Treated as fixed: its
            activations on the probe set are computed once, when training starts (a reference
            that changes during training, e.g. an EMA copy, is compared as that snapshot).
        keep: SVCCA's variance fraction (or int number of directions).
        heatmap: log the layer-by-layer CKA heatmap.
        rbf_threshold: ``rbf_cka``'s kernel bandwidth as a multiple of the median distance (the
            ``threshold`` of :func:`~netprobe.metrics.rbf_cka`; positive, default 1.0; Kornblith et
            al. use 0.2 to 1.0).
        rbf_max_samples: the largest probe set ``rbf_cka`` accepts (the ``max_samples`` of
            :func:`~netprobe.metrics.rbf_cka`, default 10000, about 2.4 GB at peak); a larger probe set
            is refused before the first step. Raise it if the memory is there.

    Example:
        >>> ConvergenceMonitor(layers=["relu1"]).metrics
        ('pwcca_prev', 'cka_prev')
        >>> ConvergenceMonitor(layers=["relu1"], methods=("cka",)).metrics
        ('cka_prev',)
        >>> ConvergenceMonitor(layers=["relu1"], methods="cka_debiased").metrics
        ('cka_debiased_prev',)
    """

    def __init__(
        self,
        layers: Layers,
        *,
        methods: Sequence[str] = ("pwcca", "cka"),
        reference: Optional[Union[nn.Module, str]] = None,
        keep: Union[float, int] = 0.99,
        heatmap: bool = False,
        rbf_threshold: float = 1.0,
        rbf_max_samples: int = RBF_MAX_SAMPLES,
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
        super().__init__(layers, num_samples=num_samples, every_n_epochs=every_n_epochs, probe_data=probe_data,
                         batch_size=batch_size, seed=seed, num_classes=num_classes, media_every=media_every,
                         layout=layout, select=select)
        if isinstance(methods, str):  # one name, as SimilarityAccumulator.compute takes it (not its letters)
            methods = (methods,)
        try:
            given = tuple(dict.fromkeys(methods))  # unique, in the order given
        except TypeError:
            raise TypeError(f"Expected `methods` to be a method name or a sequence of names, but got {methods!r}.") from None
        named = [canonical_method(m) for m in given]  # an alias means its method: the same values and keys
        if not given or any(m not in _METHODS for m in named):
            raise ValueError(f"Expected `methods` to be one name or a sequence of names among {list(_METHODS)}, "
                             f"but got {list(given)}{aliases_note(_METHODS)}.")
        methods = tuple(dict.fromkeys(named))
        # the metric's own checks, named after the monitor's options, at construction
        self.rbf_threshold = _check_threshold(rbf_threshold, "rbf_threshold")
        self.rbf_max_samples = _check_max_samples_option(rbf_max_samples, "rbf_max_samples")
        if reference is not None and not isinstance(reference, (nn.Module, str)):
            raise TypeError(f"Expected `reference` to be an nn.Module or a checkpoint path, but got {type(reference).__name__}.")
        _check_keep(keep)  # here, not at every epoch's SVCCA
        self.methods, self.reference, self.keep, self.heatmap = methods, reference, keep, bool(heatmap)
        self._prev: Dict[str, torch.Tensor] = {}
        self._ref: Dict[str, torch.Tensor] = {}
        # the statistics and factorizations of those activations, computed when they were compared
        # last: reused, not recomputed (derived from _prev/_ref, so not part of the saved state)
        self._prev_side: Dict[str, SideStats] = {}
        self._ref_side: Dict[str, SideStats] = {}
        # PWCCA's own rows (see the class docstring): the layers that take them ({layer: positions per
        # input, 0 for a dense layer}), the positions sampled per input, the generator state that draws
        # them (saved); the previous measurement's and the reference's rows, and their statistics kept for reuse
        self._pw_layers: Dict[str, int] = {}
        self._pw_k = 0
        self._pw_rng: Optional[torch.Tensor] = None
        self._prev_pw: Dict[str, torch.Tensor] = {}
        self._ref_pw: Dict[str, torch.Tensor] = {}
        self._pw_side: Dict[Tuple[str, str], SideStats] = {}
        self._shapes: Dict[str, Tuple[int, int]] = {}
        self._in_shared: Optional[Tuple[Any, Any]] = None  # (step, position probe) a shared pass ran (_extra_capture)
        self.metrics = tuple(f"{m}_prev" for m in methods) + (tuple(f"{m}_ref" for m in methods) if reference is not None else ())

    def _rbf_too_many(self, n: int) -> str:
        """Why a probe set of ``n`` examples is too large for ``rbf_cka``, naming the fixes."""
        fewer = ("pass fewer `probe_data` rows" if isinstance(self.probe_data, (tuple, list))
                 else f"lower `num_samples` to {self.rbf_max_samples} or fewer")
        return (
            f"ConvergenceMonitor: expected at most `rbf_max_samples`={self.rbf_max_samples} probe examples for rbf_cka, whose "
            f"n x n kernel matrices of the whole probe set take about 24 n^2 bytes at peak ({24 * n * n / 2**30:.1f} GiB "
            f"for n={n}), but the probe set has n={n}. {fewer[0].upper() + fewer[1:]}, or pass `rbf_max_samples={n}` "
            "if the memory is there, or leave 'rbf_cka' out of `methods`."
        )

    def _check(self, widths: Mapping[str, int], n: int, acts: Mapping[str, torch.Tensor], out: Optional[torch.Tensor]) -> None:
        if "rbf_cka" in self.methods and n > self.rbf_max_samples:
            raise ValueError(self._rbf_too_many(n))
        if "cka_debiased" in self.methods and n < 4:
            raise ValueError(
                f"ConvergenceMonitor: expected at least 4 probe examples for cka_debiased (the unbiased HSIC estimator), "
                f"but the probe set has n={n}. Use num_samples >= 4 (or more `probe_data` rows), or methods=('cka',)."
            )
        if "pwcca" in self.methods:
            self._plan_pwcca(widths, n)
            rows = {k: n * max(self._pw_layers.get(k, 0), 1) for k in widths}
            small = {k: d for k, d in widths.items() if 2 * d >= rows[k] and rows[k] // 4 < MIN_DIRECTIONS}
            if small:
                raise ValueError(
                    f"ConvergenceMonitor: PWCCA compares a layer with itself at another epoch, so it needs more probe "
                    f"samples than twice the layer's units, but the probe set has n={n} and layers {small} have "
                    f"n/2 units or more, and their top n/4 principal directions (the rank cut PWCCA then takes) are "
                    f"fewer than {MIN_DIRECTIONS}. Use num_samples > {2 * max(small.values())} (several times that is "
                    f"safer) or at least {4 * MIN_DIRECTIONS}, or methods=('cka',), or ('svcca', 'cka') with an int "
                    "`keep` below n/2."
                )

    def _plan_pwcca(self, widths: Mapping[str, int], n: int) -> None:
        """Which layers PWCCA takes its own rows for, and how many positions per input (the class
        docstring's rules), from the widths and the output shapes seen by :meth:`_validate`. A
        generator state and ``k`` loaded from a checkpoint are kept."""
        with_positions = {k: e // widths[k] for k, (nd, e) in self._shapes.items() if nd >= 3 and k in widths and e >= widths[k]}
        k = self._pw_k
        if with_positions and not k:
            want = math.ceil(ROWS_PER_UNIT * max(widths[l] for l in with_positions) / max(n, 1))
            k = max(1, min(min(with_positions.values()), want))
        self._pw_k = k if with_positions else 0
        self._pw_layers = {l: self._pw_k for l in with_positions}
        self._pw_layers.update({l: 0 for l, d in widths.items() if l not in with_positions and 2 * d >= n})
        if self._pw_rng is None:
            self._pw_rng = torch.Generator().manual_seed(self.seed).get_state()

    def _output_shapes(self, pl_module: nn.Module, x: torch.Tensor) -> Dict[str, Tuple[int, int]]:
        """``{layer: (ndim, elements per input)}`` of the monitored layers' (selected) outputs on ``x``
        (positions per input: elements / units, the units the default capture counts)."""
        from netprobe.capture import probe

        seen: Dict[str, Tuple[int, int]] = {}

        def note(layer: str) -> Any:
            def reduce(out: torch.Tensor) -> torch.Tensor:
                seen.setdefault(layer, (out.ndim, out.numel()))
                return out.reshape(1, -1)[:, :1]
            return reduce

        device = next((p.device for p in pl_module.parameters()), torch.device("cpu"))
        sel = {n: self._per_layer(self.select, n) for n in self.layers}
        with self._frozen(pl_module), probe(pl_module, self.layers, capacity=1, reduce={n: note(n) for n in self.layers},
                                            select={n: v for n, v in sel.items() if v is not None} or None, observe=False):
            self.forward(pl_module, x.to(device))
        return {l: (nd, numel // max(x.shape[0], 1)) for l, (nd, numel) in seen.items()}

    def _validate(self, pl_module: nn.Module) -> None:
        if "pwcca" in self.methods:
            assert self._probe is not None
            try:
                self._shapes = self._output_shapes(pl_module, self._probe[0][:2])
            except RuntimeError:  # inputs the model cannot take: the base's check refuses them naming the fix
                self._shapes = {}
                super()._validate(pl_module)
                raise
        super()._validate(pl_module)
        if self.reference is not None:  # a missing checkpoint or mismatched layers fail now, not after an epoch
            self._reference_acts(pl_module)

    def _reset_extra_state(self) -> None:
        self._prev, self._ref, self._prev_side, self._ref_side = {}, {}, {}, {}
        self._pw_layers, self._pw_k, self._pw_rng, self._prev_pw, self._ref_pw, self._pw_side = {}, 0, None, {}, {}, {}

    def _extra_state(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"prev": {k: v.clone() for k, v in self._prev.items()}}
        if "pwcca" in self.methods:
            state["pwcca_rows"] = {"positions": self._pw_k, "generator_state": self._pw_rng,
                                   "prev": {k: v.clone() for k, v in self._prev_pw.items()}}
        return state

    def _load_extra_state(self, state: Mapping[str, Any]) -> None:
        self._prev, self._prev_side = dict(state.get("prev", {})), {}
        pw = state.get("pwcca_rows", {})
        self._pw_k, self._pw_rng = int(pw.get("positions", 0)), pw.get("generator_state")
        self._prev_pw, self._pw_side = dict(pw.get("prev", {})), {}

    def _sampled_layers(self) -> List[str]:
        return [l for l, k in self._pw_layers.items() if k]

    def _position_probe(self, model: nn.Module, n: int) -> Any:
        """The probe (not entered) that takes PWCCA's position-sampled rows ``(n k, C)`` of the
        conv and sequence layers over ``n`` probe inputs, drawing the same positions at every
        measurement (its generator starts from the saved state)."""
        from netprobe.capture import probe

        assert self._pw_rng is not None
        g = torch.Generator()
        g.set_state(self._pw_rng)  # the same positions at every measurement
        sampled = self._sampled_layers()
        sel = {l: self._per_layer(self.select, l) for l in sampled}
        lay = {l: self._per_layer(self.layout, l) for l in sampled}
        return probe(model, sampled, capacity=max(1, n * self._pw_k), reduce="sample", positions=self._pw_k,
                     generator=g, select={l: v for l, v in sel.items() if v is not None} or None,
                     layout={l: v for l, v in lay.items() if v is not None} or None, observe=self._layout_decisions)

    def _extra_capture(self, pl_module: nn.Module, x: torch.Tensor, step: Any) -> Optional[Any]:
        """PWCCA's position-sampled rows taken in the shared forward pass, where that pass runs over
        the whole probe set (one process): the same rows as a pass of their own (same inputs, same
        batches, same generator state), without a second forward pass."""
        self._in_shared = None
        if "pwcca" not in self.methods or not self._sampled_layers() or self._probe is None:
            return None
        if _dist.world_size() != 1 or not same_inputs(x, self._probe[0]):
            return None  # each rank's pass covers its shard, or a peer's pass runs on other inputs
        taken = self._position_probe(pl_module, x.shape[0])
        self._in_shared = (step, taken)
        return taken

    def _pwcca_rows(self, model: nn.Module, full: Mapping[str, torch.Tensor],
                    taken: Optional[Any] = None) -> Dict[str, torch.Tensor]:
        """PWCCA's rows of the whole probe set for the layers that take their own (the class
        docstring): position-sampled rows ``(n k, C)`` of the conv and sequence layers, from
        ``taken`` (the probe the shared forward pass ran) or else one more forward pass of
        ``model``, every rank alike; a dense layer's rows are ``full``'s."""
        rows = {l: full[l] for l, k in self._pw_layers.items() if not k and l in full}
        sampled = self._sampled_layers()
        if not sampled:
            return rows
        assert self._probe is not None
        x = self._probe[0]
        expected = x.shape[0] * self._pw_k
        if taken is None or any(taken.buffers[l].total_written != expected for l in sampled):
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            with self._position_probe(model, x.shape[0]) as taken:
                for i in range(0, x.shape[0], self.batch_size):
                    self.forward(model, x[i : i + self.batch_size].to(device))
        rows.update({l: taken[l].cpu().float() for l in sampled})
        return rows

    def _pwcca_of(self, layer: str, cur: torch.Tensor, other: torch.Tensor, key: str,
                  acc: Optional[SimilarityAccumulator]) -> float:
        """PWCCA of PWCCA's rows ``cur`` and ``other`` of one layer: of the rows themselves when they
        number more than twice the units, else of each side's top ``floor(m / 4)`` principal
        directions (:meth:`~netprobe.metrics.SimilarityAccumulator.leading`). ``acc``: the
        accumulator of these very rows when the other methods formed one (a dense layer, whose rows
        are the probe activations), else one is formed here, taking the other side's statistics
        (and their eigendecomposition) from the comparison in which they were this side
        (``key``: ``"prev"`` or ``"ref"``). This side's are kept for the next measurement."""
        m, d = cur.shape
        if acc is None:
            kept = self._pw_side.get((key, layer))
            if kept is not None and kept.mean.device != cur.device:  # kept from an accumulator on the layer's device
                kept = None
            acc = SimilarityAccumulator().update(cur, other, y_stats=kept)
        self._pw_side[("cur", layer)] = acc.side("x")
        if key == "ref":
            self._pw_side[("ref", layer)] = acc.side("y")
        return float((acc if 2 * d < m else acc.leading(m // 4)).pwcca())

    def _whole_set(self, method: str, cur_full: torch.Tensor, other_full: torch.Tensor) -> torch.Tensor:
        """A method computed from the whole set (``whole_set`` in the method table), by its function,
        on the whole probe set's activations."""
        if method == "cka_debiased":
            return linear_cka(cur_full, other_full, debiased=True)
        if cur_full.shape[0] > self.rbf_max_samples:  # refused before the first step; named by the monitor's options
            raise ValueError(self._rbf_too_many(cur_full.shape[0]))
        return rbf_cka(cur_full, other_full, threshold=self.rbf_threshold, max_samples=self.rbf_max_samples)

    def _similarities(self, cur: torch.Tensor, other_full: torch.Tensor, sl: slice, layer: str, what: str,
                      other_side: Optional[SideStats], cur_full: torch.Tensor, key: str
                      ) -> Tuple[Dict[str, float], Optional[SimilarityAccumulator]]:
        """The methods' values for this rank's shard ``cur`` against the same rows of ``other_full``
        (reduced across ranks), each covariance factorized once; ``other_side``: the other side's
        statistics from an earlier comparison, reused instead of recomputed. A layer wider than
        2/3 of the probe set with CKA alone takes the exact linear CKA from the ``n x n`` Gram
        matrices of the whole probe set (``cur_full``, every rank alike) instead of ``d x d``
        moments: the same value, ``O(n^2)`` memory and ``n^2 d`` work instead of ``O(d^2)`` and
        ``n d^2`` (returns no accumulator then). ``key``: ``"prev"`` or ``"ref"``, the logged
        metrics' suffix. PWCCA of a layer that takes its own rows is left to :meth:`_pwcca_of`."""
        n, d = cur_full.shape[0], cur_full.shape[1]
        out: Dict[str, float] = {}
        own = layer in self._pw_layers
        for m in self.methods:
            if SIMILARITY_METHODS[m].whole_set:  # the whole probe set on every rank: the same value everywhere
                try:
                    out[m] = float(self._whole_set(m, cur_full, other_full))
                except ValueError as err:
                    self._warn_skip(layer, f"{m} ({what})", err, (f"{m}_{key}",))
        streamed = [m for m in self.methods if not SIMILARITY_METHODS[m].whole_set and not (own and m == "pwcca")]
        if not streamed:
            return out, None
        if all(SIMILARITY_METHODS[m].gram for m in streamed) and 3 * d > 2 * n:
            for m in streamed:
                fn = linear_cka if m == "cka" else procrustes
                out[m] = float(fn(cur_full, other_full))
            return out, None
        other = other_full[sl].to(cur.device)
        acc = self._agreed(lambda: SimilarityAccumulator().update(cur, other, y_stats=other_side), cur.device).all_reduce()
        # after the reduce every rank holds the same moments: same outcome everywhere
        values, errors = acc.compute(streamed, keep=self.keep)
        for m, err in errors.items():  # e.g. SVCCA keeping more directions than the samples allow
            self._warn_skip(layer, f"{m} ({what})", err, (f"{m}_{key}",))
        out.update({m: float(v) for m, v in values.items()})
        return out, acc

    def _reference_acts(self, pl_module: nn.Module) -> Dict[str, torch.Tensor]:
        if not self._ref and self.reference is not None:
            ref = self.reference
            if isinstance(ref, str):
                path = ref

                def load() -> nn.Module:
                    model = copy.deepcopy(pl_module)
                    try:
                        ckpt = torch.load(path, map_location="cpu", weights_only=False)
                    except Exception as err:  # a missing, truncated or foreign file: pickle, EOF, zip errors
                        raise ValueError(
                            f"ConvergenceMonitor: cannot load the reference checkpoint {path!r} ({type(err).__name__}: {err}). "
                            "Pass the path of a Lightning checkpoint or of a saved state_dict, or an nn.Module."
                        ) from err
                    if isinstance(ckpt, nn.Module):  # a whole saved model
                        ckpt = ckpt.state_dict()
                    if not isinstance(ckpt, Mapping):
                        raise ValueError(
                            f"ConvergenceMonitor: the reference checkpoint {path!r} holds a {type(ckpt).__name__}, not a "
                            "state_dict or a Lightning checkpoint (a dict with 'state_dict')."
                        )
                    try:
                        model.load_state_dict(ckpt.get("state_dict", ckpt))
                    except (RuntimeError, KeyError, TypeError, AttributeError) as err:
                        raise ValueError(f"ConvergenceMonitor: cannot load the reference checkpoint {path!r}: {err}") from err
                    return model

                # agreed across ranks: one rank failing to read the file must not leave the others waiting
                ref = self._agreed(load, next((p.device for p in pl_module.parameters()), None))
            x, _, _ = self._shard()
            with evaluating(ref, restore_rng=True):
                acts, _ = self._capture(ref, x)
            self._ref = {k: _dist.all_gather_cat(v).cpu().float() for k, v in acts.items()}
            if "pwcca" in self.methods:
                with evaluating(ref, restore_rng=True):
                    self._ref_pw = self._pwcca_rows(ref, self._ref)
        return self._ref

    def compute(self, trainer: Trainer, pl_module: nn.Module) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """This measurement's similarity values (``<method>_prev``, ``<method>_ref``) per layer and their means, and the layer heatmap when media are due."""
        x, _, sl = self._shard()
        acts, _ = self._probe_pass(trainer, pl_module, x)
        prev_vals: Dict[str, Dict[str, float]] = {m: {} for m in self.methods}
        ref_vals: Dict[str, Dict[str, float]] = {m: {} for m in self.methods}
        ref = self._reference_acts(pl_module) if self.reference is not None else {}
        sides: Dict[str, SideStats] = {}
        accs: Dict[Tuple[str, str], SimilarityAccumulator] = {}  # (key, layer): the streamed methods' accumulators
        full = {k: _dist.all_gather_cat(v).cpu().float() for k, v in acts.items()}  # the whole probe set, every rank
        # the layers that should have a value this time (the means' coverage): a first measurement has no previous one
        prev_expected, ref_expected = [k for k in acts if k in self._prev], [k for k in acts if k in ref]
        for layer, a in acts.items():
            try:
                if layer in self._prev:
                    vals, acc = self._similarities(a, self._prev[layer], sl, layer, "to the previous measurement",
                                                   self._prev_side.get(layer), full[layer], "prev")
                    for m, v in vals.items():
                        prev_vals[m][layer] = v
                    if acc is not None:
                        sides[layer] = acc.side("x")  # this epoch's side: the previous one at the next measurement
                        accs[("prev", layer)] = acc
                if layer in ref:
                    vals, acc = self._similarities(a, ref[layer], sl, layer, "to the reference", self._ref_side.get(layer),
                                                   full[layer], "ref")
                    for m, v in vals.items():
                        ref_vals[m][layer] = v
                    if acc is not None:
                        self._ref_side[layer] = acc.side("y")
                        accs[("ref", layer)] = acc
            except ValueError as err:
                self._warn_skip(layer, "similarity", err)
        # the rows the shared pass took at this step (on this monitor's own probe inputs: _extra_capture)
        shared, self._in_shared = self._in_shared, None
        taken = shared[1] if shared is not None and shared[0] == _SharedProbePass.step_key(trainer, pl_module, x) else None
        rows = self._pwcca_rows(pl_module, full, taken) if self._pw_layers else {}
        for layer, cur in rows.items():
            for other, key, vals, what in ((self._prev_pw, "prev", prev_vals, "to the previous measurement"),
                                           (self._ref_pw, "ref", ref_vals, "to the reference")):
                if layer in other:
                    try:
                        # a dense layer's rows are the activations the other methods compared
                        same_rows = accs.get((key, layer)) if not self._pw_layers.get(layer) else None
                        vals["pwcca"][layer] = self._pwcca_of(layer, cur, other[layer], key, same_rows)
                    except ValueError as err:
                        self._warn_skip(layer, f"pwcca ({what})", err, (f"pwcca_{key}",))
            # the statistics of the rows kept as the previous ones, or none (a comparison failed):
            # never those of other rows
            mine = self._pw_side.pop(("cur", layer), None)
            if mine is not None:
                self._pw_side[("prev", layer)] = mine
            else:
                self._pw_side.pop(("prev", layer), None)
        self._prev, self._prev_side, self._prev_pw = full, sides, rows
        out: Dict[str, float] = {}
        for m in self.methods:
            self._layer_values(f"{m}_prev", prev_vals[m], out, expected=prev_expected)
            if self.reference is not None:
                self._layer_values(f"{m}_ref", ref_vals[m], out, expected=ref_expected)
        figs: Dict[str, Any] = {}
        if self.heatmap and self._media_due and _dist.rank() == 0 and _has_tensorboard(trainer) and len(full) > 1:
            sm = similarity_matrix(full, method="cka")  # each layer's statistics computed once
            figs["netprobe/cka_layers"] = viz.heatmap_figure(sm.values, list(sm.labels),
                                                             title=f"linear CKA between layers, epoch {trainer.current_epoch}")
        return out, {"figures": figs}
