"""Token-position categories of a fact prompt, as in ROME's averaged causal-tracing figures
(plus ``before_subject``, which corruption cannot reach: restoring it must change nothing)."""

from __future__ import annotations

CATEGORIES = ("before_subject", "first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last_token")


def position_categories(n_pos: int, subject_pos: list[int]) -> dict[str, list[int]]:
    """{category: positions}. A one-token subject is only ``last_subject``; a subject ending
    the prompt is ``last_subject`` (then ``last_token`` is empty)."""
    s0, s1, last = subject_pos[0], subject_pos[-1], n_pos - 1
    cats = {
        "before_subject": list(range(0, s0)),
        "first_subject": [s0] if s1 > s0 else [],
        "middle_subject": list(range(s0 + 1, s1)),
        "last_subject": [s1],
        "first_subsequent": [s1 + 1] if s1 + 1 < last else [],
        "further": list(range(s1 + 2, last)),
        "last_token": [last] if last != s1 else [],
    }
    return cats
