"""The error every refusal of :mod:`netprobe.select` raises, and the wording its messages share.

:class:`SelectionError` is a ``ValueError`` whose message says what to do; ``_plural`` writes a
count with its noun ("1 run", "2 runs").
"""

from __future__ import annotations


class SelectionError(ValueError):
    """A user error when ranking runs (no runs, unknown metric, ...); the message says what to do."""


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
