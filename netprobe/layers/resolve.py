"""Finding layers in a model: exact names, pathlib-style globs over dotted names, module classes
and submodules, with the closest names suggested for a name that does not exist."""

from __future__ import annotations

import re
from typing import Dict, Iterable, Sequence, Union

from torch import nn

from netprobe._validation import close_names

__all__ = ["LayerSpec", "glob_regex", "resolve_layers", "resolve_layer"]


LayerSpec = Union[str, type, nn.Module]

_GLOB_CHARS = set("*?[")


def glob_regex(pattern: str) -> "re.Pattern[str]":
    """The compiled regular expression of a layer glob over dotted names, as :mod:`pathlib` globs
    paths: ``*`` matches within one dotted segment, ``?`` one character of a segment, ``[...]`` a
    character class, and ``**`` any number of whole segments (zero included: ``a.**.b`` matches
    ``a.b`` and ``a.x.y.b``; within a segment, ``**`` matches across dots)."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            start = i == 0 or pattern[i - 1] == "."
            end = i + 2 == n or pattern[i + 2] == "."
            if start and end and i + 2 < n:  # "**." : zero or more whole segments, each with its dot
                out.append(r"(?:[^.]+\.)*")
                i += 3
            elif start and end and i > 0:  # ".**" at the end: the dot before it is optional
                out[-1] = r"(?:\..*)?"
                i += 2
            else:
                out.append(".*")
                i += 2
        elif c == "*":
            out.append(r"[^.]*")
            i += 1
        elif c == "?":
            out.append(r"[^.]")
            i += 1
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern.startswith("[!", i) or pattern.startswith("[]", i) else i + 1)
            if j < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1:j]
                body = "^" + body[1:] if body.startswith("!") else body
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _named(model: nn.Module) -> Dict[str, nn.Module]:
    return {name: mod for name, mod in model.named_modules() if name != ""}


def resolve_layers(model: nn.Module, layers: Union[LayerSpec, Iterable[LayerSpec]]) -> Dict[str, nn.Module]:
    """Resolve a mixed list of layer selectors to ``{qualified_name: module}``, in model order.

    Args:
        model: the model whose submodules are selected.
        layers: a selector or a list of selectors, mixed freely:

            * an exact qualified name from ``model.named_modules()`` (``"encoder.0.fc"``);
            * a glob pattern (``"encoder.*.fc"``): ``*`` matches within one dotted segment and
              ``**`` across segments, as in :mod:`pathlib` (see :func:`glob_regex`);
            * a module class (``nn.Conv2d``): every submodule that is an instance of it;
            * a module object that is a submodule of ``model``.

    Returns:
        An ordered ``dict`` from qualified name to module, each module once, in the order of
        ``model.named_modules()``.

    Raises:
        ValueError: an unknown name (the message lists the closest existing names), a pattern or a
            class that matches nothing, a module that is not part of ``model``, or an empty selection.
        TypeError: a selector of another type.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> list(resolve_layers(m, ["0", nn.ReLU]))
        ['0', '1']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    if isinstance(layers, (str, type, nn.Module)):
        layers = [layers]
    try:
        specs: Sequence[LayerSpec] = list(layers)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            "Expected `layers` to be a name, glob pattern, module class, module, or a list of them, "
            f"but got {type(layers).__name__}."
        ) from None
    if not specs:
        raise ValueError("Expected `layers` to select at least one module, but got an empty list.")
    named = _named(model)
    if not named:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no submodules to probe; wrap it, e.g. "
            "`nn.Sequential(model)`, or probe a model that has layers."
        )
    by_id = {id(m): n for n, m in named.items()}
    selected: set[str] = set()
    for spec in specs:
        if isinstance(spec, str):
            if spec in named:
                selected.add(spec)
            elif _GLOB_CHARS & set(spec):
                rx = glob_regex(spec)
                hits = [n for n in named if rx.match(n)]
                if not hits:
                    raise ValueError(
                        f"Layer pattern {spec!r} matches no module of {type(model).__name__}. "
                        f"Closest names: {close_names(spec.replace('*', ''), named)}. (`*` matches within one dotted segment, `**` across segments.)"
                    )
                selected.update(hits)
            else:
                raise ValueError(
                    f"Unknown layer {spec!r} in {type(model).__name__}. Did you mean one of "
                    f"{close_names(spec, named)}? (All names: `[n for n, _ in model.named_modules()]`.)"
                )
        elif isinstance(spec, type) and issubclass(spec, nn.Module):
            hits = [n for n, m in named.items() if isinstance(m, spec)]
            if not hits:
                kinds = sorted({type(m).__name__ for m in named.values()})
                raise ValueError(
                    f"No module of type {spec.__name__} in {type(model).__name__}; it has: {kinds}."
                )
            selected.update(hits)
        elif isinstance(spec, nn.Module):
            name = by_id.get(id(spec))
            if name is None:
                raise ValueError(
                    f"The {type(spec).__name__} module passed in `layers` is not a submodule of "
                    f"{type(model).__name__} (pass a name from `model.named_modules()` instead)."
                )
            selected.add(name)
        else:
            raise TypeError(
                "Expected each entry of `layers` to be a str (name or glob), an nn.Module subclass or a "
                f"submodule, but got {type(spec).__name__}: {spec!r}."
            )
    return {n: named[n] for n in named if n in selected}


def resolve_layer(model: nn.Module, layer: Union[str, nn.Module]) -> tuple[str, nn.Module]:
    """Resolve exactly one layer (a qualified name or a submodule) to ``(name, module)``."""
    if isinstance(layer, str) and _GLOB_CHARS & set(layer):
        raise ValueError(f"Expected one layer, but got the pattern {layer!r}; pass an exact name.")
    if not isinstance(layer, (str, nn.Module)) or isinstance(layer, type):
        raise TypeError(
            f"Expected `layer` to be a qualified module name or a submodule, but got {type(layer).__name__}."
        )
    ((name, mod),) = resolve_layers(model, [layer]).items()
    return name, mod
