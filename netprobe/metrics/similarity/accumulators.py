"""Streaming forms of the similarity metrics.

:class:`SimilarityAccumulator` keeps float64 co-moments of paired batches (exact merges across
batches and ranks) and computes the CCA family, linear CKA and Procrustes from them, equal to the
functional forms on the concatenated rows; :class:`SideStats` is one side's statistics with its
factorizations, reusable as a later pair's ``y`` side; :class:`MinibatchCKA` is the minibatch CKA of
Nguyen, Raghu & Kornblith (2021) for layers too wide for ``d x d`` co-moments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from netprobe import distributed as _dist
from netprobe._validation import check_finite, check_int

from .._accumulator import Accumulator
from ._compute import _check_methods, _compute
from ._config import _F64, RANK_TOL
from ._factors import _Factors
from ._inputs import _check_keep, _check_method, _check_rank_tol, _prep
from ._moments import _Moments
from ._ratios import _hsic_zero_diag


#: how closely the means of the y rows must match the given ``y_stats`` (relative to each unit's
#: ``|mean| + std``): loose enough for activations stored in float32 (rounding ~6e-8), far tighter
#: than any other set of rows would match (a different sample's means differ by ~``std / sqrt(n)``)
_Y_MEAN_RTOL = 1e-6


@dataclass(frozen=True, eq=False)
class SideStats:
    """Statistics of one side of a :class:`SimilarityAccumulator`, with the factorizations computed
    from them so far: what a later accumulator needs to use these rows as its ``y`` side without
    recomputing their co-moments or factorizations (:meth:`SimilarityAccumulator.side`,
    ``update(..., y_stats=)``).

    Treat it as immutable: the cached factorizations (``eigh``, Cholesky data, at most about
    ``3 d^2`` float64 numbers, filled in by whichever metrics are computed with it) belong to these
    ``n``, ``mean`` and ``comoment``.

    Attributes:
        n: number of rows.
        mean: ``(d,)`` float64 means of the units.
        comoment: ``(d, d)`` float64 centered co-moment matrix ``sum_i (a_i - mean)(a_i - mean)^T``
            (the covariance times ``n - 1``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(100, 3, generator=g, dtype=torch.float64)
        >>> s = SimilarityAccumulator().update(a, a).side("x")
        >>> s.n, tuple(s.comoment.shape), torch.allclose(s.covariance, torch.cov(a.T))
        (100, (3, 3), True)
    """

    n: int
    mean: torch.Tensor
    comoment: torch.Tensor
    _factors: _Factors = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"Expected `n` to be an int >= 1, but got {self.n!r}.")
        if not isinstance(self.mean, torch.Tensor) or not isinstance(self.comoment, torch.Tensor):
            raise TypeError("Expected `mean` and `comoment` to be torch.Tensor.")
        d = self.mean.shape[0] if self.mean.ndim == 1 else -1
        if d < 0 or tuple(self.comoment.shape) != (d, d) or self.comoment.device != self.mean.device:
            raise ValueError(
                f"Expected `mean` (d,) and `comoment` (d, d) on one device, but got {tuple(self.mean.shape)} on "
                f"{self.mean.device} and {tuple(self.comoment.shape)} on {self.comoment.device}."
            )
        object.__setattr__(self, "mean", self.mean.to(_F64))
        object.__setattr__(self, "comoment", self.comoment.to(_F64))
        # the covariance exactly as the metrics form it from an accumulator's co-moments (see _cov)
        object.__setattr__(self, "_factors", _Factors(self.comoment / max(self.n - 1, 1)))

    @property
    def covariance(self) -> torch.Tensor:
        """``(d, d)`` covariance, ``comoment / (n - 1)``."""
        return self._factors.cov


def _same_stats(a: Optional[SideStats], b: Optional[SideStats]) -> bool:
    if a is b:
        return True
    return (a is not None and b is not None and a.n == b.n and torch.equal(a.mean, b.mean)
            and torch.equal(a.comoment, b.comoment))


class SimilarityAccumulator(Accumulator):
    """Streaming CCA / SVCCA / PWCCA / linear CKA / Procrustes over paired batches, without storing activations.

    Keeps, in float64 on the inputs' device, the sample count, the means and the centered
    co-moment matrices of ``x`` and ``y``: memory ``8 * (d_x^2 + d_y^2 + d_x d_y + d_x + d_y)``
    bytes whatever the number of samples (with ``update(..., y_stats=)``, the ``y`` co-moment is
    that object's, not a copy). Batches are merged with Chan et al.'s pairwise update,
    which is exact (no running-sum cancellation), and ranks merge the same way
    (:meth:`all_reduce`), so the values equal the functional forms on the concatenated data.
    Computing a metric also keeps each side's covariance and the factorizations computed from it
    (at most about ``3 d^2`` float64 numbers per side, ``4 d^2`` with constant units dropped) until the
    next ``update``/``merge``/``all_reduce``, so that several metrics, or a later accumulator
    (:meth:`side`), factorize each covariance once.

    Example:
        >>> from netprobe.metrics import pwcca
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(600, 5, generator=g), torch.randn(600, 3, generator=g)
        >>> acc = SimilarityAccumulator()
        >>> for i in range(0, 600, 128):
        ...     _ = acc.update(x[i:i + 128], y[i:i + 128])
        >>> torch.allclose(acc.pwcca(), pwcca(x, y))
        True
    """

    def __init__(self) -> None:
        self._m: Optional[_Moments] = None
        self._y_stats: Optional[SideStats] = None
        self._sides: Dict[str, Any] = {}  # the SideStats built from _m (and sxy), until _m changes

    @property
    def n(self) -> int:
        """The number of rows (samples) seen."""
        return 0 if self._m is None else self._m.n

    def update(self, x: torch.Tensor, y: torch.Tensor, *, y_stats: Optional[SideStats] = None) -> "SimilarityAccumulator":
        """Add a batch of paired rows ``x`` ``(b, d_x)``, ``y`` ``(b, d_y)``.

        Args:
            x: ``(b, d_x)`` activations.
            y: ``(b, d_y)`` activations of the same ``b`` inputs.
            y_stats: the statistics of *all* the ``y`` rows this accumulator will see (over every
                batch and, after :meth:`all_reduce`, every rank), e.g. ``prev_acc.side("x")`` of an
                earlier accumulator that had these rows as its ``x``. Then the ``y`` co-moment is not
                computed here (only ``x``'s, the cross one and the ``y`` means, which merging the
                cross one needs), and the metrics take ``y``'s co-moment and any factorization of it
                from ``y_stats``: the values are the same as without it. Pass the same object with
                every batch. Checked when a metric is computed: the row count must equal
                ``y_stats.n`` and the ``y`` means ``y_stats.mean`` (to ``1e-6`` of each unit's
                ``|mean| + std``, i.e. up to float32 rounding of the rows), else ``ValueError``.

        Returns:
            ``self``.

        Raises:
            ValueError: bad shapes, non-finite values, widths unlike the earlier batches', or a
                ``y_stats`` unlike the earlier batches' (or of another width or device than ``y``).
        """
        x, y = _prep(x, y)
        if y_stats is not None:
            if not isinstance(y_stats, SideStats):
                raise TypeError(f"Expected `y_stats` to be a SideStats (from `side`), but got {type(y_stats).__name__}.")
            if y_stats.mean.shape[0] != y.shape[1] or y_stats.mean.device != y.device:
                raise ValueError(
                    f"Expected `y` of the width and device of `y_stats` ({y_stats.mean.shape[0]} on {y_stats.mean.device}), "
                    f"but got {y.shape[1]} on {y.device}."
                )
        if self._m is not None and not _same_stats(self._y_stats, y_stats):
            raise ValueError("Expected the same `y_stats` (or none) with every batch of an accumulator, but got a different one.")
        if x.shape[0] == 0:
            return self
        batch = _Moments.of(x, y, yy=y_stats is None)
        if self._m is not None:
            if (self._m.mx.shape[0], self._m.my.shape[0]) != (x.shape[1], y.shape[1]):
                raise ValueError(
                    f"Expected batches of widths ({self._m.mx.shape[0]}, {self._m.my.shape[0]}) like the "
                    f"first one, but got ({x.shape[1]}, {y.shape[1]})."
                )
            self._m = self._m.merge(batch)
        else:
            self._m, self._y_stats = batch, y_stats
        self._sides = {}
        return self

    def merge(self, other: "SimilarityAccumulator") -> "SimilarityAccumulator":
        """Merge another accumulator's statistics into this one (in place); returns ``self``."""
        if not isinstance(other, SimilarityAccumulator):
            raise TypeError(f"Expected a SimilarityAccumulator, but got {type(other).__name__}.")
        if other._m is not None:
            if self._m is None:
                self._m, self._y_stats = other._m, other._y_stats
            else:
                mine, theirs = (self._m.mx.shape[0], self._m.my.shape[0]), (other._m.mx.shape[0], other._m.my.shape[0])
                if mine != theirs:
                    raise ValueError(f"Cannot merge statistics of widths {theirs} into an accumulator of widths {mine}.")
                if not _same_stats(self._y_stats, other._y_stats):
                    raise ValueError("Cannot merge statistics computed with a different `y_stats` (or with and without).")
                self._m = self._m.merge(other._m)
            self._sides = {}
        return self

    def reset(self) -> "SimilarityAccumulator":
        """Forget every batch (and the ``y_stats`` given with them); returns ``self``, as if just constructed."""
        self._m, self._y_stats, self._sides = None, None, {}
        return self

    def _flat(self) -> torch.Tensor:
        m = self._need()
        has_yy = m.cyy is not None
        return torch.cat([
            torch.tensor([float(m.n), float(has_yy)], dtype=_F64, device=m.mx.device), m.mx, m.my,
            m.cxx.flatten(), *([m.cyy.flatten()] if has_yy else []), m.cxy.flatten(),
        ])

    @staticmethod
    def _unflat(t: torch.Tensor, dx: int, dy: int) -> _Moments:
        n, has_yy = int(t[0]), bool(t[1])
        o = 2
        mx = t[o : o + dx]; o += dx  # noqa: E702
        my = t[o : o + dy]; o += dy  # noqa: E702
        cxx = t[o : o + dx * dx].reshape(dx, dx); o += dx * dx  # noqa: E702
        cyy = None
        if has_yy:
            cyy = t[o : o + dy * dy].reshape(dy, dy); o += dy * dy  # noqa: E702
        cxy = t[o : o + dx * dy].reshape(dx, dy)
        return _Moments(n, mx, my, cxx, cyy, cxy)

    def all_reduce(self) -> "SimilarityAccumulator":
        """Merge the statistics of every rank, in rank order (every rank ends with the same values).

        A collective under ``torch.distributed`` (every rank must call it, each having seen at least
        one batch, all with ``y_stats`` or all without); a no-op otherwise. With ``y_stats``, only
        the ``x`` and cross co-moments and the means travel.
        """
        if not _dist.is_distributed():
            return self
        _dist.require_all(self._m is not None, "Every rank must `update` the accumulator at least once before `all_reduce`.")
        m = self._need()
        dx, dy = m.mx.shape[0], m.my.shape[0]
        parts = _dist.all_gather(self._flat())
        if len({bool(p[1]) for p in parts}) > 1:  # every rank sees the same parts: all raise alike
            raise ValueError("Every rank must pass `y_stats` to `update`, or none; they differ.")
        merged: Optional[_Moments] = None
        for part in parts:
            pm = self._unflat(part, dx, dy)
            merged = pm if merged is None else merged.merge(pm)
        self._m = merged
        self._sides = {}
        return self

    def state_dict(self) -> Dict[str, Any]:
        """A snapshot of the statistics: ``n``, the means ``mx``/``my`` and co-moments ``cxx``/``cxy``
        (and ``cyy``, or the ``y_stats`` given without its factorizations); ``{"n": 0}`` when empty.
        Later updates do not change it."""
        if self._m is None:
            return {"n": 0}
        m = self._m
        state: Dict[str, Any] = {"n": m.n, "mx": m.mx, "my": m.my, "cxx": m.cxx, "cxy": m.cxy}
        if m.cyy is not None:
            state["cyy"] = m.cyy
        if self._y_stats is not None:  # its factorizations are not saved (recomputed on use)
            ys = self._y_stats
            state["y_stats"] = {"n": ys.n, "mean": ys.mean, "comoment": ys.comoment}
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> "SimilarityAccumulator":
        """Replace the statistics with a :meth:`state_dict` snapshot; returns ``self``."""
        self.reset()
        if int(state.get("n", 0)) == 0:
            return self
        ys = state.get("y_stats")
        if ys is not None:
            self._y_stats = SideStats(int(ys["n"]), ys["mean"], ys["comoment"])
        cyy = None if ys is not None else state["cyy"].to(_F64)
        self._m = _Moments(int(state["n"]), *(state[k].to(_F64) for k in ("mx", "my", "cxx")), cyy, state["cxy"].to(_F64))
        return self

    def _need(self) -> _Moments:
        if self._m is None:
            raise ValueError(
                "The accumulator is empty (no samples, n=0): call `update(x, y)` with at least one batch "
                "of one or more rows first (batches with 0 rows add nothing)."
            )
        return self._m

    def _pair(self) -> Tuple[SideStats, SideStats, torch.Tensor, int]:
        """Both sides' statistics (with their factorization caches) and the cross-covariance."""
        m = self._need()
        if not self._sides:
            ys = self._y_stats
            if ys is not None:
                _check_y_matches(m, ys)
            sides = {
                "x": SideStats(m.n, m.mx, m.cxx),
                "y": ys if ys is not None else SideStats(m.n, m.my, m.cyy),
                "sxy": m.cxy / max(m.n - 1, 1),
            }
            self._sides = sides
        s = self._sides
        return s["x"], s["y"], s["sxy"], m.n

    def side(self, which: str = "x") -> SideStats:
        """The statistics of one side of all rows seen, with every factorization computed so far.

        Meant to be handed to a later accumulator whose ``y`` rows are these rows
        (``update(..., y_stats=)``), which then reuses the co-moment and factorizations instead of
        recomputing them: e.g. a layer's activations this epoch, compared with the next epoch's.
        Take it after all updates (and :meth:`all_reduce`) and after computing the metrics, so
        that it holds their factorizations; computing more metrics later adds to it.

        Args:
            which: ``"x"`` or ``"y"`` (with ``y_stats``, the ``y`` side is that object).

        Returns:
            A :class:`SideStats` (``n``, ``mean`` ``(d,)``, ``comoment`` ``(d, d)``, cached
            factorizations), the same object until the accumulator changes.

        Raises:
            ValueError: empty accumulator, ``which`` not ``"x"``/``"y"``, or ``y`` rows that do not
                match the given ``y_stats``.

        Example:
            >>> g = torch.Generator().manual_seed(0)
            >>> epochs = [torch.randn(400, 6, generator=g, dtype=torch.float64)]
            >>> for _ in range(2):
            ...     epochs.append(epochs[-1] + 0.1 * torch.randn(400, 6, generator=g, dtype=torch.float64))
            >>> acc = SimilarityAccumulator().update(epochs[1], epochs[0])    # epoch 1 vs 0
            >>> _ = acc.compute(("pwcca", "svcca", "cka"))                   # (logged)
            >>> prev = acc.side("x")                                          # epoch 1's statistics
            >>> nxt = SimilarityAccumulator().update(epochs[2], epochs[1], y_stats=prev)
            >>> values, errors = nxt.compute(("pwcca", "svcca", "cka"))       # epoch 2 vs 1
            >>> plain, _ = SimilarityAccumulator().update(epochs[2], epochs[1]).compute(("pwcca", "svcca", "cka"))
            >>> all(torch.equal(values[m], plain[m]) for m in plain), errors
            (True, {})
        """
        if which not in ("x", "y"):
            raise ValueError(f"Expected `which` to be 'x' or 'y', but got {which!r}.")
        sx, sy, _, _ = self._pair()
        return sx if which == "x" else sy

    def leading(self, r: int, *, rank_tol: float = RANK_TOL) -> "SimilarityAccumulator":
        """The statistics of the same rows with each side replaced by its centered projection on
        its own top ``r`` principal directions (SVCCA's reduction with a rank cut): for PWCCA of a
        layer with more units than its rows support.

        A side's directions are the eigenvectors of its covariance with the ``r`` largest
        eigenvalues (constant units, and directions with variance below ``rank_tol`` times the
        largest, left out, so a side may keep fewer), from the eigendecomposition SVCCA uses,
        computed once per side and kept in its :class:`SideStats` (a side handed on with
        :meth:`side` keeps it). The projections' statistics follow from the moments without
        another pass over the rows: ``x' = (x - mean) V_x`` has mean 0, covariance
        ``diag(lambda_x)`` and cross-covariance ``V_x^T S_xy V_y`` with ``y'``. A metric of the
        returned accumulator equals that metric of the projected rows (to rounding); the
        directions, hence the value, are undefined where the ``r``-th and ``r+1``-th variances tie.

        Args:
            r: directions kept per side, ``>= 1``.
            rank_tol: the variance cutoff, relative to the side's largest.

        Returns:
            A new accumulator (``n`` as this one; widths ``r`` or fewer), independent of later
            updates of this one.

        Raises:
            ValueError: empty accumulator, ``r < 1``, a side with no variance at all, or ``y`` rows
                that do not match the given ``y_stats``.

        Example:
            >>> g = torch.Generator().manual_seed(0)
            >>> x = torch.randn(40, 30, generator=g, dtype=torch.float64)
            >>> acc = SimilarityAccumulator().update(x, 2 * x + 1)
            >>> red = acc.leading(10)
            >>> red.n, round(float(red.pwcca()), 9)
            (40, 1.0)
        """
        check_int(r, "r", 1)
        rank_tol = _check_rank_tol(rank_tol)
        sx, sy, sxy, n = self._pair()
        fx, fy = sx._factors, sy._factors
        vx, lx = fx.principal(r, rank_tol)
        vy, ly = fy.principal(r, rank_tol)
        cross = sxy if fx.all_kept() and fy.all_kept() else sxy[fx.mask()][:, fy.mask()]
        scale = max(n - 1, 1)
        red = SimilarityAccumulator()
        red._m = _Moments(n, torch.zeros_like(lx), torch.zeros_like(ly), torch.diag(lx) * scale, torch.diag(ly) * scale,
                          (vx.T @ cross @ vy) * scale)
        return red

    # -- the metrics -------------------------------------------------------------------
    def compute(self, methods: Sequence[str], *, keep: Union[float, int] = 0.99, rank_tol: float = RANK_TOL,
                method: str = "paper") -> Tuple[Dict[str, torch.Tensor], Dict[str, ValueError]]:
        """Several metrics of all rows seen, factorizing each covariance at most once.

        The values are those of the single-metric methods (:meth:`cca`, :meth:`svcca`,
        :meth:`pwcca`, :meth:`linear_cka`) up to rounding (~1e-13; CCA's correlations near 0 up to
        its documented ~1e-8, as with PWCCA it takes them from the eigenproblem that gives PWCCA's
        directions, whose small correlations are refined). Each
        side's covariance is decomposed once for all of them, by ``eigh`` when SVCCA needs it
        (CCA and PWCCA then whiten with the same decomposition), else by Cholesky where it provably
        gives the same correlations; factorizations kept from an earlier call, or from
        ``y_stats``, are reused. Which whitening is used depends only on ``methods``, never on
        what was computed before, so reuse does not change a value by a bit.

        Args:
            methods: any of ``"cca"`` (canonical correlations ``(r,)``), ``"svcca"``, ``"pwcca"``,
                ``"cka"`` (linear CKA), ``"procrustes"`` (see :func:`procrustes`; from the
                cross-covariance's singular values and the covariances' traces), in any order;
                repeats are ignored.
            keep: SVCCA's fraction of variance or number of directions (see :func:`svcca`).
            rank_tol: whitening cutoff (see :func:`cca`).
            method: PWCCA's weighting, ``"paper"`` or ``"google"`` (see :func:`pwcca`).

        Returns:
            ``(values, errors)``: ``values[m]`` the float64 tensor of each metric that is defined for
            this data, ``errors[m]`` the ``ValueError`` of each that is not (e.g. too few samples for
            PWCCA while CKA is fine), which :meth:`pwcca` etc. would raise.

        Raises:
            ValueError: empty accumulator, unknown method or bad option, or ``y`` rows that do
                not match the given ``y_stats``.

        Example:
            >>> g = torch.Generator().manual_seed(0)
            >>> x = torch.randn(500, 4, generator=g, dtype=torch.float64)
            >>> acc = SimilarityAccumulator().update(x, x @ torch.randn(4, 4, generator=g, dtype=torch.float64))
            >>> values, errors = acc.compute(("pwcca", "svcca", "cka"), keep=4)
            >>> round(float(values["pwcca"]), 9), round(float(values["svcca"]), 9), errors
            (1.0, 1.0, {})
            >>> values, errors = SimilarityAccumulator().update(x[:8], x[:8]).compute(("pwcca", "cka"))
            >>> sorted(values), sorted(errors)        # 8 samples cannot support 4 + 4 directions
            (['cka'], ['pwcca'])
        """
        methods = _check_methods(methods)
        keep, rank_tol, method = _check_keep(keep), _check_rank_tol(rank_tol), _check_method(method)
        sx, sy, sxy, n = self._pair()
        return _compute(sx._factors, sy._factors, sxy, n, methods, keep=keep, rank_tol=rank_tol, method=method)

    def _one(self, name: str, **options: Any) -> torch.Tensor:
        values, errors = self.compute((name,), **options)
        if name in errors:
            raise errors[name]
        return values[name]

    def cca(self, *, rank_tol: float = RANK_TOL) -> torch.Tensor:
        """Canonical correlations of all rows seen; see :func:`cca`."""
        return self._one("cca", rank_tol=rank_tol)

    def svcca(self, *, keep: Union[float, int] = 0.99, rank_tol: float = RANK_TOL) -> torch.Tensor:
        """See :func:`svcca`."""
        return self._one("svcca", keep=keep, rank_tol=rank_tol)

    def pwcca(self, *, method: str = "paper", rank_tol: float = RANK_TOL) -> torch.Tensor:
        """See :func:`pwcca`."""
        return self._one("pwcca", method=method, rank_tol=rank_tol)

    def procrustes(self) -> torch.Tensor:
        """The orthogonal Procrustes similarity of all rows seen; see :func:`procrustes`.

        Example:
            >>> from netprobe.metrics import procrustes
            >>> g = torch.Generator().manual_seed(0)
            >>> x, y = torch.randn(600, 5, generator=g), torch.randn(600, 3, generator=g)
            >>> acc = SimilarityAccumulator()
            >>> for i in range(0, 600, 128):
            ...     _ = acc.update(x[i:i + 128], x[i:i + 128, :3] + y[i:i + 128])
            >>> torch.allclose(acc.procrustes(), procrustes(x, x[:, :3] + y))
            True
        """
        return self._one("procrustes")

    def linear_cka(self, *, debiased: bool = False) -> torch.Tensor:
        """See :func:`linear_cka`. The debiased form needs per-row norms and is not available here."""
        if debiased:
            raise ValueError(
                "Debiased linear CKA needs per-sample statistics that the streaming form does not keep; "
                "call `linear_cka(x, y, debiased=True)` on the activations instead."
            )
        return self._one("cka")


def _check_y_matches(m: _Moments, ys: SideStats) -> None:
    """The rows given as ``y`` must be those ``ys`` describes: same count, same means (to rounding)."""
    if m.n != ys.n:
        raise ValueError(
            f"The y side does not match the given statistics `y_stats`: the accumulator has seen n={m.n} rows, "
            f"`y_stats` describes n={ys.n} (pass the same rows, over all batches and ranks, then `all_reduce`)."
        )
    scale = ys.mean.abs() + (ys.comoment.diagonal().clamp_min(0) / max(ys.n - 1, 1)).sqrt()
    tol = _Y_MEAN_RTOL * scale + 1e-12 * scale.max()
    dev = (m.my - ys.mean).abs()
    if not bool((dev <= tol).all()):
        j = int((dev / tol.clamp_min(torch.finfo(_F64).tiny)).argmax())
        raise ValueError(
            "The y side does not match the given statistics `y_stats`: the means of the y rows differ from "
            f"`y_stats.mean` (unit {j}: {float(m.my[j]):.9g} vs {float(ys.mean[j]):.9g}); pass the rows `y_stats` "
            "was computed from, in the same order of units."
        )


class MinibatchCKA(Accumulator):
    """Streaming linear CKA for wide layers: the minibatch estimator of Nguyen, Raghu & Kornblith
    (2021), ``mean_b HSIC_1(X_b, Y_b) / sqrt(mean_b HSIC_1(X_b, X_b) mean_b HSIC_1(Y_b, Y_b))``,
    with ``HSIC_1`` the unbiased HSIC estimator (Song et al. 2012) on the linear Gram matrices of
    each minibatch of ``b >= 4`` rows.

    Memory and cost do not grow with the width's square: per batch ``O(b^2)`` memory and
    ``b^2 (d_x + d_y)`` multiply-adds (against ``O(d^2)`` memory and ``b d^2`` for
    :class:`SimilarityAccumulator`), so it serves layers of thousands of units. Only three sums and a
    count are kept: batches and ranks merge exactly (:meth:`merge`, :meth:`all_reduce`).

    It estimates a different quantity from :func:`linear_cka` (the debiased CKA, averaged over the
    batch partition): its value depends on the batch size (use the same one to compare), it is
    unbiased per batch, and, like ``linear_cka(debiased=True)``, it can fall slightly below 0 for
    unrelated representations.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(400, 3000, generator=g)
        >>> acc = MinibatchCKA()
        >>> for i in range(0, 400, 100):
        ...     _ = acc.update(x[i:i + 100], 2 * x[i:i + 100] + 1)
        >>> round(float(acc.compute()), 6)
        1.0
    """

    def __init__(self) -> None:
        self._sums: Optional[torch.Tensor] = None  # (hsic_xy, hsic_xx, hsic_yy) summed over batches
        self.batches = 0
        self.widths: Optional[Tuple[int, int]] = None  # (d_x, d_y) of the first minibatch: every one must have them

    def update(self, x: torch.Tensor, y: torch.Tensor) -> "MinibatchCKA":
        """Add one minibatch of paired rows ``x`` ``(b, d_x)``, ``y`` ``(b, d_y)``, ``b >= 4``."""
        x, y = _prep(x, y)
        b = x.shape[0]
        if b < 4:
            raise ValueError(f"Expected minibatches of at least 4 rows (the unbiased HSIC needs them), but got {b}.")
        self._check_widths((int(x.shape[1]), int(y.shape[1])))
        check_finite(x, "x")
        check_finite(y, "y")
        # the unbiased HSIC is invariant to constant shifts of the features; centering first keeps
        # the Gram matrices' rounding small
        xc = x.to(_F64) - x.to(_F64).mean(0)
        yc = y.to(_F64) - y.to(_F64).mean(0)
        k, l = xc @ xc.T, yc @ yc.T
        k.fill_diagonal_(0.0)
        l.fill_diagonal_(0.0)
        sk, sl = k.sum(1), l.sum(1)  # K 1, L 1
        h = torch.stack([_hsic_zero_diag(k, l, sk, sl), _hsic_zero_diag(k, k, sk, sk),
                         _hsic_zero_diag(l, l, sl, sl)]) / (b * (b - 3))
        self._sums = h if self._sums is None else self._sums + h.to(self._sums.device)
        self.batches += 1
        return self

    def _check_widths(self, widths: Tuple[int, int]) -> None:
        """Every minibatch holds rows of the same two representations: the same widths."""
        if self.widths is None:
            self.widths = widths
        elif widths != self.widths:
            raise ValueError(
                f"Expected every minibatch to have the widths of the first, (d_x, d_y) = {self.widths} (rows of the same two "
                f"representations), but got {widths}. Use one MinibatchCKA per pair of layers."
            )

    def merge(self, other: "MinibatchCKA") -> "MinibatchCKA":
        """Add another accumulator's batches (in place); returns ``self``."""
        if not isinstance(other, MinibatchCKA):
            raise TypeError(f"Expected a MinibatchCKA, but got {type(other).__name__}.")
        if other.widths is not None:
            self._check_widths(other.widths)
        if other._sums is not None:
            self._sums = other._sums.clone() if self._sums is None else self._sums + other._sums.to(self._sums.device)
            self.batches += other.batches
        return self

    def all_reduce(self) -> "MinibatchCKA":
        """Sum the batches of every rank (a collective under ``torch.distributed``; a no-op otherwise).
        Every rank must have seen at least one batch."""
        if not _dist.is_distributed():
            return self
        _dist.require_all(self._sums is not None, "Every rank must `update` the accumulator at least once before `all_reduce`.")
        assert self._sums is not None
        flat = _dist.all_reduce_sum(torch.cat([self._sums, self._sums.new_tensor([float(self.batches)])]))
        self._sums, self.batches = flat[:3], int(flat[3])
        return self

    def compute(self) -> torch.Tensor:
        """The minibatch CKA of every batch seen (0-d float64)."""
        if self._sums is None:
            raise ValueError("The accumulator is empty (no batches): call `update(x, y)` with minibatches of >= 4 rows first.")
        xy, xx, yy = self._sums
        if not bool(xx > 0) or not bool(yy > 0):
            raise ValueError("Minibatch CKA is undefined here: a representation has no estimable variance in its minibatches.")
        return xy / (xx.sqrt() * yy.sqrt())

    def reset(self) -> "MinibatchCKA":
        """Forget every batch and the widths they fixed; returns ``self``, as if just constructed."""
        self._sums, self.batches, self.widths = None, 0, None
        return self

    def state_dict(self) -> Dict[str, Any]:
        """A snapshot: the three HSIC sums ``sums`` (``None`` when empty), the number of ``batches``
        and the ``widths`` ``(d_x, d_y)`` they fixed. Later updates do not change it."""
        return {"sums": None if self._sums is None else self._sums.clone(), "batches": self.batches,
                "widths": self.widths}

    def load_state_dict(self, state: Dict[str, Any]) -> "MinibatchCKA":
        """Replace the state with a :meth:`state_dict` snapshot; returns ``self``. A snapshot without
        ``widths`` leaves them to the next minibatch."""
        sums = state.get("sums")
        self._sums = None if sums is None else sums.to(_F64).clone()
        self.batches = int(state.get("batches", 0))
        widths = state.get("widths")
        self.widths = None if widths is None else (int(widths[0]), int(widths[1]))
        return self

