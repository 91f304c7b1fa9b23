"""The Language Confusion Benchmark's metrics (Marchisio et al. 2024, as used by Nie et al. 2025).

For one response in expected language ``lang``:

1. normalise: drop ASCII punctuation (and the em dash);
2. split into lines at newlines; skip lines of fewer than ``min_words`` (5) whitespace words;
   a response with no line left is *skipped* (it counts in neither numerator nor denominator);
3. identify each kept line's language (``langid.line_language``: 'unknown' at probability
   <= 0.3). The response has a *line error* when any kept line is not ``lang``.
4. A response without line errors has a *word error* when any of its words is in a list of
   English words (lowercase, longer than 3 letters).

Line-level pass rate LPR = 1 - (responses with a line error) / (responses not skipped).
Word-level pass rate WPR = 1 - (responses with a word error) / (responses not skipped and
without a line error). The LCB reports WPR only for non-Latin scripts because in Latin-script
languages English-looking words are often the language's own (Italian "come", French "table");
it is computed here for completeness and should be read with that caveat.

``english_line``: a kept line identified as English, the error language confusion is about
(the other line errors are a wrong non-English language or 'unknown').
"""

from __future__ import annotations

import functools
import string
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from mechscope.confusion.langid import line_language

_DROP = str.maketrans("", "", string.punctuation + "\u2014")


def normalise(text: str) -> str:
    """The response without ASCII punctuation and em dashes (LCB step 1)."""
    return text.translate(_DROP).strip()


@dataclass
class ResponseCheck:
    """The metric's view of one response."""

    lines: list[str]
    line_langs: list[str]
    skipped: bool
    line_error: bool
    word_error: bool
    english_line: bool
    english_words: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_response(text: str, lang: str, english: frozenset[str] = frozenset(), threshold: float = 0.3,
                   min_words: int = 5) -> ResponseCheck:
    """Line and word errors of one response expected in ``lang``."""
    lines = [ln for ln in normalise(text).split("\n") if len(ln.split()) >= min_words]
    langs = [line_language(ln, threshold) for ln in lines]
    line_error = any(lg != lang for lg in langs)
    hits = [w for ln in lines for w in ln.split() if w.strip() in english] if lines and not line_error else []
    return ResponseCheck(lines=lines, line_langs=langs, skipped=not lines, line_error=line_error,
                         word_error=bool(hits), english_line="en" in langs, english_words=hits[:10])


def pass_rates(checks: Iterable[ResponseCheck]) -> dict[str, Any]:
    """{'lpr', 'wpr', 'english_rate', 'n', 'scored'}: rates in [0, 1] (None when nothing is scored)."""
    checks = list(checks)
    scored = [c for c in checks if not c.skipped]
    line_ok = [c for c in scored if not c.line_error]
    return {
        "n": len(checks),
        "scored": len(scored),
        "lpr": len(line_ok) / len(scored) if scored else None,
        "wpr": sum(not c.word_error for c in line_ok) / len(line_ok) if line_ok else None,
        "english_rate": sum(c.english_line for c in scored) / len(scored) if scored else None,
    }


@functools.lru_cache(maxsize=1)
def english_words(n: int = 3000, max_chars: int = 3_000_000) -> frozenset[str]:
    """A list of English words for WPR: the ``n`` + F most frequent lowercase words longer than
    three letters in the first ``max_chars`` characters of the embedded English corpus
    (public-domain books), where F is the number of distinct words of the shipped non-English
    prompts, minus any word that occurs in those prompts (a guard against shared words); so at
    least ``n`` words, and usually more (3,618 with the defaults). The LCB uses a dictionary
    file; none ships offline, so this is the substitute."""
    from mechscope.activations.corpus import get_corpus
    from mechscope.confusion.prompts import load_prompts

    counts: Counter[str] = Counter()
    used = 0
    for doc in get_corpus():
        for w in normalise(doc).split():
            if len(w) > 3 and w.isalpha() and w.islower():
                counts[w] += 1
        used += len(doc)
        if used >= max_chars:
            break
    foreign = {w.lower() for p in load_prompts() for w in normalise(p.prompt).split()}
    return frozenset(w for w, _ in counts.most_common(n + len(foreign)) if w not in foreign)
