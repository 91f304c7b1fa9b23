"""One progress protocol for every long-running library function.

A function that can run for more than a few seconds takes ``progress: ProgressArg = False``
and reports through it:

1. Coerce once, at the top: ``p = as_progress(progress)`` (``True``: bars on stderr;
   ``False``/``None``: silent; a ``Progress`` object: used as it is; anything else: a
   ``MechscopeError``).
2. Open one phase per long step, named as a user would say it, with its total when it is
   known (``None`` when not) and its unit; the phase starts when opened and ends when its
   ``with`` block is left (or at ``close()`` where a block would re-indent a long loop)::

       with p.phase("random baselines", total=len(sizes), unit="size") as ph:
           for s in sizes:
               ...
               ph.advance()              # or ph.advance(n, loss=0.31): metrics shown beside the bar

   A resumed run opens its phase with ``initial=`` the work already done, so the count still
   ends at ``total``.
3. Short status lines that are not a count go through ``p.note("what happens now")``.
4. Pass ``p`` (not the original argument) to the functions it calls, so their phases show
   as nested bars and a ``Recorder`` sees them in order.

Implementations: ``Silent`` (the default; does nothing), ``Bars`` (tqdm bars and notes on
stderr, never stdout, so ``--json`` output stays clean) and ``Recorder`` (keeps every event:
for tests, and for a notebook that wants the loss history, ``rec.history("loss")``).
Checkpoint and test hooks that stop or save a run are not progress and stay separate arguments.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, Union, runtime_checkable

from mechscope.errors import MechscopeError

Metric = Union[float, int, str]
"""A value shown beside a bar (loss, L0, the item just done)."""


@runtime_checkable
class PhaseHandle(Protocol):
    """One open phase: ``advance`` adds ``n`` units of work done (and the latest metrics);
    ``close`` (or leaving the ``with`` block) ends it."""

    def advance(self, n: int = 1, **metrics: Metric) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> PhaseHandle: ...

    def __exit__(self, *exc: object) -> None: ...


@runtime_checkable
class Progress(Protocol):
    """Where a long function reports its phases (see the module docstring)."""

    def phase(self, name: str, total: int | None = None, unit: str = "it", initial: int = 0) -> PhaseHandle: ...

    def note(self, message: str) -> None: ...


ProgressArg = Union[Progress, bool, None]
"""What a public function's ``progress`` argument accepts (``as_progress`` turns it into a ``Progress``)."""


class _NoPhase:
    def advance(self, n: int = 1, **metrics: Metric) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoPhase:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class Silent:
    """Reports nothing."""

    def phase(self, name: str, total: int | None = None, unit: str = "it", initial: int = 0) -> PhaseHandle:
        return _NoPhase()

    def note(self, message: str) -> None:
        pass


SILENT = Silent()


def _fmt(v: Metric) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


class _Bar:
    def __init__(self, owner: Bars, name: str, total: int | None, unit: str, initial: int):
        from tqdm.auto import tqdm

        self.owner, self.open = owner, True
        leave = owner.depth == 0  # a top-level phase stays on screen; nested ones go when done
        owner.depth += 1
        self.bar: Any = tqdm(total=total, initial=initial, desc=name, unit=unit, leave=leave, file=sys.stderr,
                             unit_scale=unit == "tok", dynamic_ncols=True, smoothing=0.1)  # tokens as 1.2M

    def __enter__(self) -> _Bar:
        return self

    def advance(self, n: int = 1, **metrics: Metric) -> None:
        if metrics:
            self.bar.set_postfix({k: _fmt(v) for k, v in metrics.items()}, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.open:
            self.open = False
            self.owner.depth -= 1
            self.bar.close()

    def __exit__(self, *exc: object) -> None:
        if exc and exc[0] is not None:
            self.bar.leave = False  # a failed phase clears its bar: the error is the line that stays
        self.close()


class Bars:
    """tqdm bars on stderr (time estimates where the total is known) and timed notes."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.depth = 0

    def phase(self, name: str, total: int | None = None, unit: str = "it", initial: int = 0) -> PhaseHandle:
        return _Bar(self, name, total, unit, initial)

    def note(self, message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(f"[{time.perf_counter() - self.t0:6.1f} s] {message}", file=sys.stderr)
        sys.stderr.flush()


@dataclass
class Event:
    """One thing a ``Recorder`` saw: ``kind`` is "start", "advance", "end" or "note"."""

    kind: str
    phase: str | None = None
    n: int = 0
    total: int | None = None
    unit: str = ""
    metrics: dict[str, Metric] = field(default_factory=dict)
    message: str = ""


@dataclass
class PhaseRecord:
    """A finished (or open) phase as a ``Recorder`` saw it; ``count`` includes ``initial``."""

    name: str
    total: int | None
    unit: str
    count: int = 0
    metrics: list[dict[str, Metric]] = field(default_factory=list)
    closed: bool = False


class _RecPhase:
    def __init__(self, owner: Recorder, rec: PhaseRecord):
        self.owner, self.rec = owner, rec
        owner.events.append(Event("start", rec.name, rec.count, rec.total, rec.unit))
        owner.phases.append(rec)

    def __enter__(self) -> _RecPhase:
        return self

    def advance(self, n: int = 1, **metrics: Metric) -> None:
        self.rec.count += n
        if metrics:
            self.rec.metrics.append(dict(metrics))
        self.owner.events.append(Event("advance", self.rec.name, n, self.rec.total, self.rec.unit, dict(metrics)))
        if n and self.owner.interrupt_at.get(self.rec.name) == self.rec.count:
            raise KeyboardInterrupt(f"Recorder: interrupted at {self.rec.name} {self.rec.count}")

    def close(self) -> None:
        if not self.rec.closed:
            self.rec.closed = True
            self.owner.events.append(Event("end", self.rec.name, self.rec.count, self.rec.total, self.rec.unit))

    def __exit__(self, *exc: object) -> None:
        self.close()


class Recorder:
    """Keeps every event in ``events`` and every phase, in the order opened, in ``phases``.
    ``interrupt_at={"training": 10}`` raises ``KeyboardInterrupt`` when that phase's count
    reaches 10 (an interrupted run, for resume tests)."""

    def __init__(self, interrupt_at: dict[str, int] | None = None) -> None:
        self.events: list[Event] = []
        self.phases: list[PhaseRecord] = []
        self.interrupt_at = dict(interrupt_at or {})

    def phase(self, name: str, total: int | None = None, unit: str = "it", initial: int = 0) -> PhaseHandle:
        return _RecPhase(self, PhaseRecord(name, total, unit, count=initial))

    def note(self, message: str) -> None:
        self.events.append(Event("note", message=message))

    @property
    def names(self) -> list[str]:
        """The phases' names in the order they were opened."""
        return [p.name for p in self.phases]

    @property
    def notes(self) -> list[str]:
        return [e.message for e in self.events if e.kind == "note"]

    def history(self, metric: str, phase: str | None = None) -> list[Metric]:
        """Every reported value of ``metric`` (e.g. the loss curve), optionally of one phase only."""
        return [m[metric] for p in self.phases if phase is None or p.name == phase for m in p.metrics if metric in m]


QUIET_ENV = "MECHSCOPE_QUIET"
"""When this environment variable is set (and not ``0``/``false``), ``True`` means silent:
``mechscope --quiet`` sets it, and a script or notebook may too."""


def quiet() -> bool:
    return os.environ.get(QUIET_ENV, "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """Silence transformers' own progress bars (loading, saving) for the block only: the caller's
    setting comes back on exit, since one process may run many commands (a notebook, the tests)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def as_progress(progress: ProgressArg) -> Progress:
    """``True``: bars on stderr (silent under ``MECHSCOPE_QUIET``); ``False``/``None``: silent;
    a ``Progress``: itself."""
    if progress is None or progress is False:
        return SILENT
    if progress is True:
        return SILENT if quiet() else Bars()
    if isinstance(progress, Progress):
        return progress
    raise MechscopeError(f"progress must be True, False, None or a mechscope.progress.Progress (Bars, Recorder, Silent), "
                         f"got {type(progress).__name__}.")
