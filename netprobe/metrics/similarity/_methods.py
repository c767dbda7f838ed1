"""The one table of similarity method names: what each name means, its direction, the forms it
can be computed in, and the names accepted for it.

:func:`~netprobe.metrics.similarity_matrix` and :class:`~netprobe.lightning.ConvergenceMonitor`
read their method names here (the monitor logs ``netprobe/<name>_prev`` and
``netprobe/<name>_ref``). An alias (the name of the function that computes the method, where it
differs) is accepted wherever a method name is, and means the method itself: same values, same
logged keys.

Example:
    >>> canonical_method("linear_cka"), canonical_method("pwcca"), canonical_method("cosine")
    ('cka', 'pwcca', None)
    >>> SIMILARITY_METHODS["rbf_cka"].whole_set, SIMILARITY_METHODS["cka"].gram
    (True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Optional, Sequence, Tuple

__all__ = ["SimilarityMethod", "SIMILARITY_METHODS", "canonical_method", "method_names", "aliases_note"]


@dataclass(frozen=True)
class SimilarityMethod:
    """One similarity method.

    Attributes:
        name: the method name (``method=`` of :func:`~netprobe.metrics.similarity_matrix`,
            ``methods=`` of ``ConvergenceMonitor``, the ``<name>_prev`` / ``<name>_ref`` keys).
        function: the :mod:`netprobe.metrics` call that defines its value.
        direction: ``"max"``: a similarity, higher = more alike (for every method).
        streamed: computable from streamed ``d x d`` moments
            (:meth:`~netprobe.metrics.SimilarityAccumulator.compute`), so merged across batches
            and ranks.
        gram: has an exact ``n x n`` (Gram or kernel matrix) form, the cheaper one when ``n`` is
            small next to the widths.
        whole_set: needs the whole set's rows at once (RBF CKA's kernels, debiased CKA's per-row
            norms): computed by its function on the gathered activations, never streamed.
        scalar: its function gives one number per pair (CCA gives the canonical correlations;
            ``similarity_matrix`` takes their mean).
        aliases: other names accepted for it (the function's name where it differs).
    """

    name: str
    function: str
    streamed: bool
    gram: bool
    whole_set: bool
    scalar: bool = True
    direction: str = "max"
    aliases: Tuple[str, ...] = ()


_TABLE = (
    SimilarityMethod("pwcca", "pwcca", streamed=True, gram=False, whole_set=False),
    SimilarityMethod("svcca", "svcca", streamed=True, gram=False, whole_set=False),
    SimilarityMethod("cka", "linear_cka", streamed=True, gram=True, whole_set=False, aliases=("linear_cka",)),
    SimilarityMethod("procrustes", "procrustes", streamed=True, gram=True, whole_set=False),
    SimilarityMethod("rbf_cka", "rbf_cka", streamed=False, gram=True, whole_set=True),
    SimilarityMethod("cka_debiased", "linear_cka(debiased=True)", streamed=False, gram=True, whole_set=True),
    SimilarityMethod("cca", "cca", streamed=True, gram=False, whole_set=False, scalar=False),
)

#: every similarity method by name, in the order the messages list them
SIMILARITY_METHODS: Mapping[str, SimilarityMethod] = MappingProxyType({m.name: m for m in _TABLE})

_BY_ALIAS = MappingProxyType({**{a: m.name for m in _TABLE for a in m.aliases}, **{m.name: m.name for m in _TABLE}})


def canonical_method(name: Any) -> Optional[str]:
    """The method name that ``name`` (a method name or an alias) means; None for another value."""
    try:
        return _BY_ALIAS.get(name)
    except TypeError:  # unhashable: no method's name
        return None


def method_names(*, scalar: Optional[bool] = None) -> Tuple[str, ...]:
    """The method names in table order; ``scalar=True``: only those giving one number per pair."""
    return tuple(m.name for m in _TABLE if scalar is None or m.scalar == scalar)


def aliases_note(names: Sequence[str]) -> str:
    """``" (a function's name is also accepted: 'linear_cka' for 'cka')"`` for the aliases of
    ``names``, for an error message; empty if they have none."""
    pairs = [f"{a!r} for {n!r}" for n in names for a in SIMILARITY_METHODS[n].aliases]
    return f" (a function's name is also accepted: {', '.join(pairs)})" if pairs else ""
