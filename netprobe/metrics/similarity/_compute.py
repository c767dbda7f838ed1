"""Several metrics of one pair from one set of factorizations per side.

:func:`_compute` serves the functional forms (through :func:`_from_moments`), the streaming
accumulator and the similarity matrix alike. Which factorization a metric uses depends only on the
metrics asked for, so a value is the same whether a factorization is fresh or reused.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple, Union

import torch

from ._canonical import _CCA, _cca_factors, _pwcca_weighted, _svcca_factors
from ._config import RANK_TOL
from ._factors import _Factors
from ._moments import _cov, _Moments
from ._ratios import _cka_ratio, _procrustes_ratio


def _cka_factors(fx: _Factors, fy: _Factors, sxy: torch.Tensor, n: int) -> torch.Tensor:
    if n < 2:
        raise ValueError(f"Linear CKA needs at least 2 samples, but got n={n}.")
    return _cka_ratio(torch.linalg.matrix_norm(sxy) ** 2, fx.sq_norm(), fy.sq_norm())


def _procrustes_factors(fx: _Factors, fy: _Factors, sxy: torch.Tensor, n: int) -> torch.Tensor:
    if n < 2:
        raise ValueError(f"The Procrustes similarity needs at least 2 samples, but got n={n}.")
    # constant units have zero rows/columns in sxy and zero variance: they change neither norm
    return _procrustes_ratio(torch.linalg.svdvals(sxy).sum(), fx.trace(), fy.trace())


#: the metrics :meth:`SimilarityAccumulator.compute` knows
_COMPUTE_METHODS = ("cca", "svcca", "pwcca", "cka", "procrustes")


def _compute(fx: _Factors, fy: _Factors, sxy: torch.Tensor, n: int, methods: Sequence[str], *,
             keep: Union[float, int], rank_tol: float, method: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, ValueError]]:
    """Every metric in ``methods`` from one set of factorizations per side; a ``ValueError`` of one
    metric (data it is undefined for) is returned for that metric and does not stop the others.

    Which whitening CCA and PWCCA use depends only on ``methods`` (never on what ``fx``, ``fy``
    happen to hold already), so a value is the same whether a factorization is fresh or reused:
    by eigendecomposition when SVCCA (or google's PWCCA) needs it anyway, else by Cholesky where it
    provably gives the same correlations. CCA with PWCCA reads the correlations off the
    eigenproblem that gives PWCCA's vectors (:func:`_gram_vectors`)."""
    eigen = "svcca" in methods or ("pwcca" in methods and method == "google")
    vectors = "pwcca" in methods
    core: Dict[str, _CCA] = {}

    def cca_result(what: str) -> _CCA:
        if "r" not in core:  # on an error the next metric retries, for its own message
            core["r"] = _cca_factors(fx, fy, sxy, n, rank_tol=rank_tol, what=what, vectors=vectors, eigvecs=eigen)
        return core["r"]

    run: Dict[str, Callable[[], torch.Tensor]] = {
        "cca": lambda: cca_result("CCA").rho,
        "pwcca": lambda: _pwcca_weighted(cca_result("PWCCA"), method),
        "svcca": lambda: _svcca_factors(fx, fy, sxy, n, keep, rank_tol),
        "cka": lambda: _cka_factors(fx, fy, sxy, n),
        "procrustes": lambda: _procrustes_factors(fx, fy, sxy, n),
    }
    values: Dict[str, torch.Tensor] = {}
    errors: Dict[str, ValueError] = {}
    for m in methods:
        try:
            values[m] = run[m]()
        except ValueError as err:
            errors[m] = err
    return values, errors


def _check_methods(methods: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(dict.fromkeys(methods))  # unique, in the order given
    bad = [m for m in methods if m not in _COMPUTE_METHODS]
    if not methods or bad:
        raise ValueError(
            f"Expected `methods` among {list(_COMPUTE_METHODS)}, but got {list(methods)}."
        )
    return methods


def _from_moments(mom: _Moments, methods: Sequence[str], *, keep: Union[float, int] = 0.99,
                  rank_tol: float = RANK_TOL, method: str = "paper") -> Dict[str, torch.Tensor]:
    """The functional forms: one metric (or several), raising its error."""
    sxx, syy, sxy = _cov(mom)
    values, errors = _compute(_Factors(sxx), _Factors(syy), sxy, mom.n, methods, keep=keep, rank_tol=rank_tol, method=method)
    for err in errors.values():
        raise err
    return values
