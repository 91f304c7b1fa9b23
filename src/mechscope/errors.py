"""One exception type for every user-facing failure.

A ``MechscopeError`` carries one sentence that says what is wrong and how to fix it. The CLI
prints that sentence to stderr and exits with code 2 (no traceback unless ``--debug``);
notebook users see the same sentence as the exception message.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Callable


class MechscopeError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""


def near_matches(name: str, candidates: list[str], n: int = 3) -> str:
    """Return ' Did you mean: a, b?' for the closest candidates, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def check_lr(lr: float, option: str = "--lr") -> None:
    """Refuse a learning rate that is not a positive finite number (NaN and inf included: they
    train a model of NaN that reports nothing wrong)."""
    import math

    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise MechscopeError(f"{option} must be a positive finite number; got {lr}.")
    if lr > 3.4e38:  # float32's largest: the optimisers' float32 arithmetic overflows on the first step
        raise MechscopeError(f"{option} {lr} is beyond float32's range (3.4e38); give a learning rate such as 1e-3.")


def step_or_diverge(opt: Any, diverged: Callable[[], Exception]) -> None:
    """``opt.step()``, with the float32 overflow a huge learning rate causes (Adam's step size
    lr / (1 - beta1^t) past 3.4e38 is a RuntimeError) raised as ``diverged()`` instead: the one
    sentence every trainer gives for a run whose weights left the finite numbers."""
    try:
        opt.step()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        raise diverged() from exc


FLOAT32_MAX = 3.4028234663852886e38
"""float32's largest value: a setting past it overflows where the model computes (steering
scales, clamped feature values)."""

_NUMBER_KINDS = {"int": (int,), "float": (int, float)}


def check_number_fields(obj: Any, what: str | None = None, *, integer: str = "an integer",
                        strings: tuple[str, ...] = ()) -> None:
    """One sentence when a field of the dataclass ``obj`` annotated ``int``, ``float`` or ``bool``
    (or ``... | None``) holds something else, e.g. the string '64' (which would fail later with
    "'<' not supported between ..."), or a field named in ``strings`` holds no text. ``integer``
    is how the sentence names an int ("an integer", "a whole number"). Reads the annotation
    strings only: cheap."""
    what = what or type(obj).__name__
    for f in fields(obj):
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        optional = ann.endswith("| None")
        base = ann.removesuffix("| None").strip()
        if base == "bool":  # "no" or 0 would pass as a truth value without a word
            flag = getattr(obj, f.name)
            if type(flag).__name__ == "bool_":  # numpy's np.True_: the plain bool
                flag = bool(flag)
                object.__setattr__(obj, f.name, flag)
            if not isinstance(flag, bool) and not (flag is None and optional):
                raise MechscopeError(f"{what}.{f.name} must be True or False; got {flag!r} ({_article(type(flag).__name__)}).")
            continue
        kinds = (str,) if f.name in strings else _NUMBER_KINDS.get(base)
        if kinds is None:
            continue
        value = getattr(obj, f.name)
        if value is None and optional:
            continue
        if f.name not in strings and not isinstance(value, (bool, int, float)):
            value = _plain_number(value, base)  # numpy's np.int64(8) from a sweep over np.arange
            if value is not None:
                object.__setattr__(obj, f.name, value)  # the plain number, so JSON and comparisons see one
                continue
            value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, kinds):
            kind = "a string" if f.name in strings else integer if base == "int" else "a number"
            raise MechscopeError(f"{what}.{f.name} must be {kind}{' (or None)' if optional else ''}; got "
                                 f"{value!r} ({_article(type(value).__name__)}).")


def _plain_number(value: Any, base: str) -> int | float | None:
    """``value`` as a Python int (an ``int`` field) or float (a ``float`` field) where it is a
    numpy (or other ``numbers``) integer or real that equals one, else None."""
    import numbers

    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value) if base == "int" else float(int(value))
    if base == "float" and isinstance(value, numbers.Real):
        return float(value)
    return None


def _article(noun: str) -> str:
    """'a str', 'an int'."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def check_at_least(*options: tuple[str, float], least: float = 1) -> None:
    """One sentence for the first ``(option, value)`` whose value is below ``least``."""
    for option, value in options:
        if value < least:
            raise MechscopeError(f"{option} must be at least {least}; got {value}.")


def refuse_file_as_folder(path: str | Path, option: str = "--out") -> None:
    """One sentence when ``path`` (a folder a command writes into) is an existing file or lies
    under one; nothing otherwise. The one check ``--out`` options and library ``out`` arguments share."""
    p = Path(path).expanduser()
    q = p
    while not q.exists() and q != q.parent:
        q = q.parent
    if q.exists() and not q.is_dir():
        where = "is a file" if q == p else f"lies under {q}, which is a file"
        raise MechscopeError(f"{path} {where}; {option} must name a folder.")


def check_config(cfg: Any, cls: type, who: str) -> None:
    """One sentence when ``cfg`` (given to ``who``) is neither None nor a ``cls``: a dict or a
    string there failed later as an AttributeError deep inside the run."""
    if cfg is not None and not isinstance(cfg, cls):
        hint = f" ({cls.__name__}(**d) for a dict d)" if isinstance(cfg, dict) else ""
        raise MechscopeError(f"{who} takes a {cls.__name__} ({cls.__module__}.{cls.__name__}(...)) as cfg, got "
                             f"{_article(type(cfg).__name__)}{hint}.")
