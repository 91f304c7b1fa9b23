"""Text for a terminal that the program did not write: model tokens, prompts, file names, task
names, database contents. ``visible`` shows control characters as escapes (``\\x1b``), so a token
holding ESC cannot clear the screen or restyle what follows; ``TerminalConsole`` is rich's
``Console`` with markup off (a token "[/]" is text, not a closing tag that crashes rich after the
work is done) and every printed character passed through ``visible``, the escapes rich itself
writes for styles left alone. Markup the program writes itself is opted into per call
(``markup=True``) with external text ``rich.markup.escape``-d (found by a sweep: a token or path
with "[/]" made many commands fail at their last line)."""

from __future__ import annotations

from typing import Any, Iterable

from rich.console import Console
from rich.segment import Segment

_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x00, 0x20), *range(0x7F, 0xA0)) if chr(c) not in "\n\t"}


def visible(text: str) -> str:
    """``text`` with every control character but newline and tab written as an escape."""
    return text.translate(_CONTROL)


class TerminalConsole(Console):
    """``rich.console.Console`` for text the program did not write (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("markup", False)
        super().__init__(*args, **kwargs)

    def _render_buffer(self, buffer: Iterable[Segment]) -> str:
        # Segments carrying rich's own control codes (cursor moves, the progress display) pass as they are.
        return super()._render_buffer(s if s.control else Segment(visible(s.text), s.style) for s in buffer)
