"""Short reprs for a notebook: a result's last line in a cell prints one readable line, not
every tensor and list it holds (a ``CircuitResult`` printed 95,000 characters, a label set 1.4
million, a ``Model`` its whole module tree).

``brief_repr(obj)`` writes ``ClassName(field=value, ...)`` for a dataclass with each value
shortened by ``brief``: tensors and arrays as ``Tensor[30, 9] float32``, long lists, tuples
and dicts as their first items and their length, long strings cut, nested dataclasses by
their class name alone. The full data stays in the object's fields; this is only how it prints.
"""

from __future__ import annotations

import dataclasses
from typing import Any

_ITEMS = 4  # items of a list / dict shown before "... (n items)"
_TEXT = 60  # characters of a string shown
_WIDTH = 500  # characters of a whole repr


def brief(value: Any, depth: int = 0) -> str:
    """One short line for ``value`` (see the module docstring)."""
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype") and not isinstance(value, (int, float)):
        dims = ", ".join(str(int(d)) for d in shape)
        return f"{type(value).__name__}[{dims}] {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, str):
        return repr(value if len(value) <= _TEXT else value[:_TEXT] + "...")
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (bool, int)) or value is None:
        return repr(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return f"{type(value).__name__}(...)" if depth else brief_repr(value, depth + 1)
    if isinstance(value, dict):
        if depth > 1:
            return f"{{... {len(value)} keys}}"
        items = [f"{brief(k, depth + 1)}: {brief(v, depth + 1)}" for k, v in list(value.items())[:_ITEMS]]
        more = f", ... ({len(value)} keys)" if len(value) > _ITEMS else ""
        return "{" + ", ".join(items) + more + "}"
    if isinstance(value, (list, tuple, set, frozenset)):
        seq = list(value)
        open_, close = ("(", ")") if isinstance(value, tuple) else ("{", "}") if isinstance(value, (set, frozenset)) else ("[", "]")
        if depth > 1:
            return f"{open_}... {len(seq)} items{close}"
        items = [brief(v, depth + 1) for v in seq[:_ITEMS]]
        more = f", ... ({len(seq)} items)" if len(seq) > _ITEMS else ""
        return open_ + ", ".join(items) + more + close
    text = repr(value)
    return text if len(text) <= _TEXT else f"<{type(value).__name__}>"


def brief_repr(obj: Any, depth: int = 0, skip: tuple[str, ...] = ()) -> str:
    """``ClassName(field=brief(value), ...)`` of the dataclass ``obj``, cut at ``_WIDTH``
    characters; fields named in ``skip`` are left out."""
    parts = [f"{f.name}={brief(getattr(obj, f.name), depth + 1)}" for f in dataclasses.fields(obj)
             if f.repr and f.name not in skip]
    text = f"{type(obj).__name__}(" + ", ".join(parts) + ")"
    return text if len(text) <= _WIDTH else text[: _WIDTH - 5] + " ...)"
