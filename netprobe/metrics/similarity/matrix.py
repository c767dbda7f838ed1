"""The similarity of every pair of ``M`` representations of the same inputs.

:func:`similarity_matrix` computes each representation's own statistics once (its co-moments and
factorizations, or its ``n x n`` kernel) and every pair's value from them, equal to the pairwise
function's up to rounding; :class:`SimilarityMatrix` is its result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Sequence, Tuple, Union

import torch

from netprobe._validation import check_2d, check_finite, check_same_n

from ._compute import _compute
from ._config import _F64, RANK_TOL
from ._factors import _Factors
from ._grams import _centred_gram, _flat_dot, _gram_root, _row_sq_norms
from ._inputs import _check_keep, _check_method, _check_rank_tol, _need_rows, _warn_if_grad
from ._methods import aliases_note, canonical_method, method_names
from ._moments import _joint_comoments
from ._ratios import _cka_ratio, _debiased_ratio, _hsic_u, _procrustes_ratio
from .rbf import RBF_MAX_SAMPLES, _check_max_samples, _check_threshold, _double_centre_, _rbf_kernel


#: the methods :func:`similarity_matrix` knows: every one of the method table
_MATRIX_METHODS = method_names()


@dataclass(frozen=True, eq=False)
class SimilarityMatrix:
    """The result of :func:`similarity_matrix`.

    Attributes:
        values: ``(M, M)`` float64 tensor; ``values[i, j]`` compares ``labels[i]`` with ``labels[j]``
            (for ``"pwcca"``, ``pwcca(reps[i], reps[j])``: row ``i`` is the ``x`` argument).
        labels: the ``M`` names, in order: a dict's keys in its order, or ``0 .. M-1`` for a list.
        method: the method that filled ``values``.

    Indexing by a pair of labels gives one value: ``m["fc1", "fc2"]`` (a 0-d tensor).
    """

    values: torch.Tensor
    labels: Tuple[Any, ...]
    method: str

    def __getitem__(self, pair: Tuple[Any, Any]) -> torch.Tensor:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"Expected a pair of labels, e.g. m[{self.labels[0]!r}, {self.labels[-1]!r}], but got {pair!r}.")
        idx = []
        for label in pair:
            if label not in self.labels:
                raise KeyError(f"Expected a label among {list(self.labels)}, but got {label!r}.")
            idx.append(self.labels.index(label))
        return self.values[idx[0], idx[1]]


def _check_reps(reps: Any) -> Tuple[Tuple[Any, ...], list]:
    if isinstance(reps, dict):
        labels, tensors = tuple(reps.keys()), list(reps.values())
    elif isinstance(reps, (list, tuple)):
        labels, tensors = tuple(range(len(reps))), list(reps)
    else:
        raise TypeError(
            f"Expected `reps` to be a list or dict of (n, d) tensors (e.g. {{'fc1': a1, 'fc2': a2}}), but got {type(reps).__name__}."
        )
    if not tensors:
        raise ValueError("Expected `reps` to hold at least one representation, but got none.")
    out = []
    for label, t in zip(labels, tensors):
        t = check_2d(t, f"reps[{label!r}]")
        if out:
            check_same_n(out[0], t, f"reps[{labels[0]!r}]", f"reps[{label!r}]")
            if t.device != out[0].device:
                raise ValueError(
                    f"Expected every representation on one device, but got {out[0].device} for reps[{labels[0]!r}] "
                    f"and {t.device} for reps[{label!r}]."
                )
        out.append(t)
    _warn_if_grad(*out)
    out = [t.detach() for t in out]
    _need_rows(out[0].shape[0])
    return labels, out


def similarity_matrix(reps: Union[Sequence[torch.Tensor], Dict[Any, torch.Tensor]], *, method: str = "cka",
                      keep: Union[float, int] = 0.99, rank_tol: float = RANK_TOL, pwcca_method: str = "paper",
                      threshold: float = 1.0, max_samples: int = RBF_MAX_SAMPLES) -> SimilarityMatrix:
    """Similarity of every pair of ``M`` representations of the same inputs (layers of one network,
    or one layer of several networks), each representation's own statistics computed once.

    ``values[i, j]`` equals the pairwise function on ``(reps[i], reps[j])`` up to rounding (~1e-12):
    ``"cka"`` :func:`linear_cka`, ``"cka_debiased"`` ``linear_cka(debiased=True)``, ``"rbf_cka"``
    :func:`rbf_cka` (``threshold``), ``"procrustes"`` :func:`procrustes`, ``"svcca"`` :func:`svcca`
    (``keep``), ``"pwcca"`` :func:`pwcca` (``pwcca_method``), and ``"cca"`` the *mean* canonical
    correlation of :func:`cca` (one number per pair). The diagonal is 1 by definition (every method
    gives 1 for identical inputs, the debiased estimators included: their ratio is then exactly 1)
    and is not computed. Every method but PWCCA is symmetric, and its matrix is filled from the
    upper triangle, so exactly symmetric. PWCCA weights the canonical correlations by the side with
    fewer (kept) dimensions, ``x`` on a tie, so with equal widths ``values[i, j]`` and ``values[j,
    i]`` can differ: both are computed, as ``pwcca(reps[i], reps[j])`` (row = ``x``), and not
    symmetrized (``(m.values + m.values.T) / 2`` does that if wanted).

    What is shared: the co-moment blocks of all representations in one pass over the rows (a
    representation's covariance and its factorizations, e.g. its whitening, serve all ``M - 1``
    pairs it is in: the CCA family, linear CKA and Procrustes), or, when ``n`` is small next to the
    widths (linear CKA, Procrustes) and always for RBF CKA, each representation's ``n x n`` kernel
    matrix (and for Procrustes its eigendecomposition). Memory: ``sum_{i <= j} d_i d_j`` float64
    numbers for the co-moments, or ``M n^2`` for the kernels (RBF: ``n <= max_samples``). No float64
    copy of the data is made.

    Args:
        reps: a list (labels ``0 .. M-1``) or a dict (labels its keys, in order) of ``(n, d_i)``
            tensors over the same ``n`` inputs, in the same order, on one device.
        method: one of ``"cka"``, ``"cka_debiased"``, ``"rbf_cka"``, ``"procrustes"``, ``"svcca"``,
            ``"pwcca"``, ``"cca"``, or a function's name for its method (``"linear_cka"`` for
            ``"cka"``; the result's ``method`` is then ``"cka"``).
        keep: SVCCA's fraction of variance or number of directions (see :func:`svcca`).
        rank_tol: the CCA family's whitening cutoff (see :func:`cca`).
        pwcca_method: PWCCA's weighting, ``"paper"`` or ``"google"`` (see :func:`pwcca`'s ``method``).
        threshold: RBF CKA's bandwidth as a multiple of the median distance (see :func:`rbf_cka`).
        max_samples: RBF CKA's largest ``n`` (see :func:`rbf_cka`).

    Returns:
        A :class:`SimilarityMatrix`: ``values`` ``(M, M)`` float64, ``labels``, ``method``.

    Raises:
        TypeError: ``reps`` not a list or dict of tensors.
        ValueError: no representations, different ``n`` or devices, NaN/Inf, an unknown method or
            bad option, or a pair the method is undefined for (the message names the pair).

    Example:
        >>> from netprobe.metrics import linear_cka
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(500, 6, generator=g)
        >>> reps = {"in": x, "hidden": (x @ torch.randn(6, 10, generator=g)).relu(), "noise": torch.randn(500, 4, generator=g)}
        >>> m = similarity_matrix(reps, method="cka")
        >>> m.labels, tuple(m.values.shape), bool(torch.equal(m.values, m.values.T))
        (('in', 'hidden', 'noise'), (3, 3), True)
        >>> torch.allclose(m["in", "hidden"], linear_cka(x, reps["hidden"]))
        True
        >>> bool(m["in", "hidden"] > m["in", "noise"])
        True
    """
    labels, xs = _check_reps(reps)
    named = canonical_method(method)  # an alias means its method
    if named is None:
        raise ValueError(f"Expected `method` to be one of {list(_MATRIX_METHODS)}, but got {method!r}"
                         f"{aliases_note(_MATRIX_METHODS)}.")
    method = named
    keep, rank_tol, pwcca_method = _check_keep(keep), _check_rank_tol(rank_tol), _check_method(pwcca_method)
    if method == "rbf_cka":
        threshold = _check_threshold(threshold)
        _check_max_samples(xs[0].shape[0], max_samples)
    m, n, dims = len(xs), xs[0].shape[0], [x.shape[1] for x in xs]
    out = torch.eye(m, dtype=_F64, device=xs[0].device)
    if m == 1:
        check_finite(xs[0], f"reps[{labels[0]!r}]")
        return SimilarityMatrix(out, labels, method)
    total = sum(dims)
    if method in ("cka", "cka_debiased"):
        gram = n * (total + m * m) < total * total
    elif method == "procrustes":
        gram = n * m < 2 * total  # n below the mean width of a pair, as the pairwise rule
    else:
        gram = method == "rbf_cka"
    pair_value = _matrix_gram_pairs(xs, labels, method, threshold) if gram else \
        _matrix_moment_pairs(xs, labels, method, keep=keep, rank_tol=rank_tol, pwcca_method=pwcca_method)
    for i in range(m):
        for j in range(i + 1, m):
            try:
                out[i, j] = pair_value(i, j)
                out[j, i] = pair_value(j, i) if method == "pwcca" else out[i, j]
            except ValueError as err:
                raise ValueError(f"{method} is undefined for the pair ({labels[i]!r}, {labels[j]!r}): {err}") from err
    return SimilarityMatrix(out, labels, method)


def _matrix_gram_pairs(xs: list, labels: Tuple[Any, ...], method: str, threshold: float) -> Callable[[int, int], torch.Tensor]:
    """Per-representation ``n x n`` kernel data, and the function that gives a pair's value from it."""
    n = xs[0].shape[0]
    if n < (4 if method in ("cka_debiased",) else 2):
        need = 4 if method == "cka_debiased" else 2
        raise ValueError(f"{method} needs at least {need} samples, but got n={n}.")
    names = [f"reps[{lab!r}]" for lab in labels]
    if method == "rbf_cka":
        ks = [_double_centre_(_rbf_kernel(x, threshold, nm)) for x, nm in zip(xs, names)]
        sq = [_flat_dot(k, k) for k in ks]
        return lambda i, j: _cka_ratio(_flat_dot(ks[i], ks[j]), sq[i], sq[j])
    ks = [_centred_gram(x, nm) for x, nm in zip(xs, names)]
    if method == "procrustes":
        roots = [_gram_root(k) for k in ks]
        del ks
        return lambda i, j: _procrustes_ratio(torch.linalg.svdvals(roots[i][0].T @ roots[j][0]).sum(), roots[i][1], roots[j][1])
    sq = [_flat_dot(k, k) for k in ks]
    if method == "cka":
        return lambda i, j: _cka_ratio(_flat_dot(ks[i], ks[j]), sq[i], sq[j])
    rs = [k.diagonal() for k in ks]
    hs = [_hsic_u(s, r, r, n) for s, r in zip(sq, rs)]
    return lambda i, j: _debiased_ratio(_hsic_u(_flat_dot(ks[i], ks[j]), rs[i], rs[j], n), hs[i], hs[j])


def _matrix_moment_pairs(xs: list, labels: Tuple[Any, ...], method: str, *, keep: Union[float, int], rank_tol: float,
                         pwcca_method: str) -> Callable[[int, int], torch.Tensor]:
    """The joint co-moments, one :class:`_Factors` per representation (its factorizations computed
    once, on first use, for all its pairs), and the function that gives a pair's value."""
    n, means, cs = _joint_comoments(xs, labels)
    if method == "cka_debiased":
        if n < 4:
            raise ValueError(f"Debiased linear CKA needs at least 4 samples, but got n={n}.")
        norm2 = lambda c: torch.linalg.matrix_norm(c) ** 2  # noqa: E731
        rs = [_row_sq_norms(x, mu) for x, mu in zip(xs, means)]
        hs = [_hsic_u(norm2(cs[k, k]), rs[k], rs[k], n) for k in range(len(xs))]

        def debiased(i: int, j: int) -> torch.Tensor:
            return _debiased_ratio(_hsic_u(norm2(cs[i, j]), rs[i], rs[j], n), hs[i], hs[j])

        return debiased
    den = max(n - 1, 1)
    factors = [_Factors(cs[k, k] / den) for k in range(len(xs))]
    name = {"cka": "cka", "procrustes": "procrustes", "svcca": "svcca", "pwcca": "pwcca", "cca": "cca"}[method]

    def value(i: int, j: int) -> torch.Tensor:
        sxy = cs[i, j] / den if i < j else cs[j, i].T / den
        values, errors = _compute(factors[i], factors[j], sxy, n, (name,), keep=keep, rank_tol=rank_tol, method=pwcca_method)
        if name in errors:
            raise errors[name]
        v = values[name]
        return v.mean() if name == "cca" else v

    return value
