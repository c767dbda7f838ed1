"""Representational similarity: CCA, SVCCA, PWCCA, linear and RBF CKA, orthogonal Procrustes, a
matrix of them over many representations, and a streaming accumulator.

All functions take ``x`` ``(n, d_x)`` and ``y`` ``(n, d_y)`` whose rows are the same ``n`` inputs
(google/svcca uses the transpose), compute in float64 on the inputs' device whatever their dtype,
and return similarities in ``[0, 1]`` (1 = identical up to the method's invariances).

Numerical route (one core shared by the functional and the streaming forms): everything is
computed from the centered (cross-)covariance blocks ``S_xx, S_yy, S_xy`` in float64. Each side is
whitened through ``eigh(S_xx)`` keeping only eigenvalues above ``rank_tol * max eigenvalue``
(a rank *truncation*, not a ridge: exactly or nearly collinear units give the correlations of the
remaining subspace, never NaN), and the canonical correlations are the singular values of
``M = W_x^T S_xy W_y``, taken (with the singular vectors PWCCA needs) from the symmetric
eigenproblem of the smaller of ``M M^T``, ``M^T M``, cheaper than the SVD; the accuracy
this costs near 0 is restored where it matters (see :func:`pwcca`, :func:`svcca`). When a cheap
bound proves a covariance has no eigenvalue near the cutoff (the usual case), it is whitened
through its Cholesky factor instead, which gives the same correlations at less cost. The
blocks are accumulated in one pass over row blocks that are converted and shifted on the fly
(then corrected to the exact mean), so no ``(n, d)`` float64 copy of the data is made. Squaring
the data into covariances costs precision only for directions whose variance is below ~1e-8 of the
largest, which the truncation removes anyway; in exchange, the same code serves data that never
fits in memory (:class:`SimilarityAccumulator`), batches and ranks merge exactly, and the cost
is one ``n d^2`` product plus ``d^3`` factorizations (faster than QR of ``(n, d)`` data for
``n >> d``; timings in ``docs/benchmarks.md``).

Several metrics of one pair share each side's factorizations (one ``eigh`` per covariance when
SVCCA is among them, else Cholesky; :meth:`SimilarityAccumulator.compute`), and a side's statistics
with their factorizations can serve as the ``y`` side of a later pair (:meth:`SimilarityAccumulator.side`,
``update(..., y_stats=)``): e.g. this epoch's activations, compared with the next epoch's, are
reduced and factorized once. Sharing never changes a value: a factorization depends on its matrix
alone, and which one a metric uses depends only on the metrics asked for.

Layout: ``cca_family`` (:func:`cca`, :func:`svcca`, :func:`pwcca`), ``cka`` (:func:`linear_cka`),
``rbf`` (:func:`rbf_cka`), ``orthogonal_procrustes`` (:func:`procrustes`), ``matrix``
(:func:`similarity_matrix`), ``accumulators`` (:class:`SimilarityAccumulator`, :class:`SideStats`,
:class:`MinibatchCKA`); beneath them ``_moments`` (streaming moments), ``_factors`` and
``_canonical`` (factorizations, CCA), ``_compute`` (several metrics from shared factorizations),
``_grams`` (per-sample forms), ``_ratios`` (values from sufficient statistics), ``_blas`` (blocked
Gram products, numpy's BLAS), ``_inputs`` (checks) and ``_config`` (tolerances, :data:`config`).
This package re-exports the public names and the private ones other modules read; a test that
replaces a private function patches the module that calls it.
"""

from __future__ import annotations

from .accumulators import MinibatchCKA, SideStats, SimilarityAccumulator
from .cca_family import cca, pwcca, svcca
from .cka import linear_cka
from .matrix import SimilarityMatrix, similarity_matrix
from .orthogonal_procrustes import procrustes
from .rbf import rbf_cka

# constants and the run-time switches, read as this package's attributes
from ._config import RANK_TOL, VAR_TOL, config  # noqa: F401
from .rbf import RBF_MAX_SAMPLES  # noqa: F401

# private names that other netprobe modules and the tests read from this package
from ._canonical import _cca_core, _cca_factors  # noqa: F401
from ._factors import _cholesky_whitener, _Factors, _tol  # noqa: F401
from ._grams import _raw_candidate  # noqa: F401
from ._inputs import _check_keep  # noqa: F401
from ._moments import _cov, _Moments  # noqa: F401
from .matrix import _matrix_gram_pairs, _matrix_moment_pairs  # noqa: F401

__all__ = ["cca", "svcca", "pwcca", "linear_cka", "rbf_cka", "procrustes", "similarity_matrix", "SimilarityMatrix",
           "SimilarityAccumulator", "SideStats", "MinibatchCKA"]
