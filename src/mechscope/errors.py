"""One exception type for every user-facing failure.

A ``MechscopeError`` carries one sentence that says what is wrong and how to fix it. The CLI
prints that sentence to stderr and exits with code 2 (no traceback unless ``--debug``);
notebook users see the same sentence as the exception message.
"""

from __future__ import annotations

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
