"""Input checks shared by every public entry point.

Errors follow one form: "Expected `name` to be ..., but got ..." plus, where there is one,
what to do about it. ``ValueError`` for bad values, ``TypeError`` for bad types; never ``assert``.
"""

from __future__ import annotations

import difflib
from typing import Iterable, Optional, Sequence

import torch

__all__ = [
    "check_tensor",
    "check_2d",
    "check_finite",
    "check_same_n",
    "check_labels",
    "close_names",
    "clone_or_none",
    "check_int",
    "check_choice",
]


def check_int(value: object, name: str, minimum: int, detail: str = "") -> int:
    """``value`` when it is an ``int`` (not a ``bool``) ``>= minimum``; else ``ValueError``
    "Expected `name` to be an int >= minimum[ detail], but got ...". Returns it."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}{detail}, but got {value!r}.")
    return value


def check_choice(value: object, name: str, choices: Sequence[str], detail: str = "") -> str:
    """``value`` when it is one of ``choices``; else ``ValueError`` "Expected `name` to be 'a',
    'b' or 'c'[detail], but got ...". Returns it."""
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}" if len(choices) > 1 else repr(choices[0])
        raise ValueError(f"Expected `{name}` to be {listed}{detail}, but got {value!r}.")
    return value


def check_tensor(x: object, name: str) -> torch.Tensor:
    """Return ``x`` if it is a tensor, else raise ``TypeError``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, but got {type(x).__name__}.")
    return x


def check_2d(x: object, name: str) -> torch.Tensor:
    """Check ``x`` is a 2-D floating/integer tensor laid out ``(n_samples, n_features)``."""
    x = check_tensor(x, name)
    if x.ndim != 2:
        hint = ""
        if x.ndim == 1:
            hint = " For a single unit use `x[:, None]`; for a single sample there is nothing to compare."
        elif x.ndim > 2:
            hint = (
                " Reduce it first: e.g. the per-channel spatial mean `x.mean(dim=(2, 3))` for a conv output,"
                " or `x.flatten(1)`."
            )
        raise ValueError(
            f"Expected `{name}` to be 2-D (n_samples, n_features), but got shape {tuple(x.shape)}.{hint}"
        )
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"Expected `{name}` to be a real tensor, but got dtype {x.dtype}.")
    return x


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """Raise ``ValueError`` with the count of NaN/Inf entries when ``x`` has any."""
    if x.is_floating_point():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            n_nan = int(torch.isnan(x).sum())
            n_inf = int(bad.sum()) - n_nan
            raise ValueError(
                f"Expected `{name}` to be finite, but got {n_nan} NaN and {n_inf} Inf value(s) "
                f"out of {x.numel()}. Check the activations (diverged training?) or drop those rows."
            )
    return x


def check_same_n(x: torch.Tensor, y: torch.Tensor, xname: str = "x", yname: str = "y") -> None:
    """Check two ``(n, d)`` tensors have the same number of rows (samples)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"Expected `{xname}` and `{yname}` to have the same number of samples (rows), but got "
            f"{x.shape[0]} and {y.shape[0]}. Rows must be the same inputs, in the same order."
        )


def check_labels(labels: object, n: int, num_classes: int, name: str = "labels") -> torch.Tensor:
    """Check integer class labels of length ``n`` in ``[0, num_classes)``; return them as int64."""
    labels = check_tensor(labels, name)
    if labels.ndim != 1:
        raise ValueError(f"Expected `{name}` to be 1-D (n_samples,), but got shape {tuple(labels.shape)}.")
    if labels.shape[0] != n:
        raise ValueError(f"Expected `{name}` to have {n} entries (one per sample), but got {labels.shape[0]}.")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"Expected `{name}` to be an integer tensor of class indices, but got dtype {labels.dtype}.")
    check_int(num_classes, "num_classes", 2)
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"Expected `{name}` in [0, {num_classes}), but got values in [{lo}, {hi}]. "
                f"Pass the right `num_classes` or remap the labels."
            )
    return labels.long()


def close_names(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Closest matches of ``name`` among ``candidates`` (difflib), for error messages."""
    cands: Sequence[str] = list(candidates)
    out = difflib.get_close_matches(name, cands, n=n, cutoff=0.4)
    if not out:
        # fall back on a substring match, then on the first few names
        out = [c for c in cands if name.split(".")[-1] in c][:n] or list(cands)[:n]
    return out


def clone_or_none(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A copy of ``t`` (``None`` stays ``None``): accumulator state snapshots share no memory."""
    return None if t is None else t.clone()
