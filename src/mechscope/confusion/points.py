"""Confusion points: where a generation switches to English.

The generated text is cut into *segments* at newlines and sentence ends (``. ! ? ; :``). The
first segment of at least ``min_words`` (3) words that the identifier labels English
(``langid.is_english``: English is its best guess) is the switch; the confusion point is the
generated token that holds the first letter of that segment's first word (the paper's "first
generated token that is English"; identifying single tokens is too noisy, so the decision is
made on the run of words the token starts). Tokens are the texts of the generated ids as they
read in running text (``models.tokens.token_texts``: a SentencePiece word-start piece keeps its
leading space, which ``decode([i])`` drops), in order; their concatenation is the generated text.
"""

from __future__ import annotations

import re

from mechscope.confusion.langid import is_english

_SEGMENT = re.compile(r"[^\n.!?;:]+")


def confusion_point(tokens: list[str], min_words: int = 3) -> int | None:
    """Index into ``tokens`` of the confusion point, or None when no segment is English."""
    text = "".join(tokens)
    for m in _SEGMENT.finditer(text):
        seg = m.group(0)
        words = [w for w in seg.split() if any(ch.isalpha() for ch in w)]
        if len(words) < min_words or not is_english(seg):
            continue
        first = m.start() + next(i for i, ch in enumerate(seg) if ch.isalpha())
        end = 0
        for i, t in enumerate(tokens):
            end += len(t)
            if end > first:
                return i
    return None


def matched_position(rel: float, n_generated: int) -> int:
    """The generated index at relative position ``rel`` in [0, 1] of a generation of
    ``n_generated`` tokens (the control position in a generation without a switch)."""
    return min(max(int(round(rel * n_generated)), 0), max(n_generated - 1, 0))
