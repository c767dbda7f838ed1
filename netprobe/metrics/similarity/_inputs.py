"""Input checks of the similarity metrics.

Inputs are 2-D tensors with the same ``n`` on one device, detached (with a warning when gradients
were being recorded through them); options are checked for type and range; a metric refuses data
it is undefined for (no rows, one row, fewer samples than directions). Every refusal is a
``ValueError`` or ``TypeError`` saying what was expected and what was got, or why the metric is
undefined and what to pass instead.
"""

from __future__ import annotations

import warnings
from typing import Any, Tuple, Union

import torch

from netprobe._validation import check_2d, check_same_n


def _prep(x: Any, y: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    x = check_2d(x, "x")
    y = check_2d(y, "y")
    check_same_n(x, y)
    if x.device != y.device:
        raise ValueError(f"Expected `x` and `y` on the same device, but got {x.device} and {y.device}.")
    _warn_if_grad(x, y)
    return x.detach(), y.detach()


def _warn_if_grad(*ts: torch.Tensor) -> None:
    """The similarities are measurements, not differentiable losses: inputs are detached. Say so
    when gradients are being recorded through an input (a term ``1 - cka`` added to a loss would
    otherwise contribute a silent zero gradient)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        warnings.warn(
            "netprobe's similarity metrics are not differentiable: the inputs are detached and the result "
            "carries no gradient (a term built from it adds nothing to a loss's gradient). To measure, "
            "call it under torch.no_grad() or pass `.detach()`ed tensors to silence this warning.",
            UserWarning, stacklevel=4)


def _need_rows(n: int) -> None:
    """Refuse inputs with no rows before any statistic is formed (their means would be 0/0)."""
    if n == 0:
        raise ValueError(
            "Expected `x` and `y` to hold samples (rows), but got n=0 samples: there is nothing to compare. "
            "Pass activations of shape (n, d) with n > d_x + d_y for the CCA family (or n >= 2 for "
            "`linear_cka`, n >= 4 with `debiased=True`), e.g. check that the probe buffer was filled."
        )


def _need_samples(n: int, kx: int, ky: int, what: str) -> None:
    """Centered, ``n`` samples span ``n - 1`` dimensions: when the two sides' independent directions
    ``kx + ky`` exceed that, ``kx + ky - (n - 1)`` canonical correlations are 1 by construction,
    whatever the data. Refuse instead of returning a spurious similarity."""
    if n - 1 < kx + ky:
        raise ValueError(
            f"{what} needs more samples than the two representations have dimensions together, but got "
            f"n={n} samples for d_x={kx} and d_y={ky} linearly independent directions (constant and collinear "
            f"units removed): with so few samples {kx + ky - (n - 1)} correlations would be 1 by construction. "
            f"Use at least {kx + ky + 1} samples (10x that is safer), reduce the units first "
            f"(`svcca(..., keep=0.99)` or an int `keep`, or a spatial-mean reduction), or use `linear_cka`, "
            f"which has no such limit."
        )


def _check_rank_tol(rank_tol: float) -> float:
    if not isinstance(rank_tol, (int, float)) or not (0.0 <= float(rank_tol) < 1.0):
        raise ValueError(f"Expected `rank_tol` in [0, 1), but got {rank_tol!r}.")
    return float(rank_tol)


def _check_keep(keep: Union[float, int]) -> Union[float, int]:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"Expected `keep` to be a float in (0, 1] or an int >= 1, but got {type(keep).__name__}.")
    if isinstance(keep, int):
        if keep < 1:
            raise ValueError(f"Expected an int `keep` >= 1 (directions kept), but got {keep}.")
    elif not (0.0 < keep <= 1.0):
        raise ValueError(f"Expected a float `keep` in (0, 1] (fraction of variance kept), but got {keep}.")
    return keep


def _check_method(method: str) -> str:
    if method not in ("paper", "google"):
        raise ValueError(f"Expected `method` to be 'paper' or 'google', but got {method!r}.")
    return method


def _need_two(n: int, what: str) -> None:
    if n < 2:
        raise ValueError(
            f"{what} needs samples to vary over, but got n={n} sample: with one row every unit is constant "
            f"and {what} is undefined. Pass activations of more inputs (n > d_x + d_y for the CCA family)."
        )
