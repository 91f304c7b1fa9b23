"""Offline language identification with ``py3langid`` (its naive-Bayes model ships in the
wheel as an npz array file: nothing is downloaded and nothing is unpickled).

``identify(text)`` is the language over all the identifier's languages with its normalised
probability; the Language Confusion Benchmark's rule is that a line whose best probability is
at most the threshold (0.3) has no language ('unknown'), which counts as a wrong language.
"""

from __future__ import annotations

import functools
from typing import Any

from mechscope.errors import MechscopeError

UNKNOWN = "unknown"


@functools.lru_cache(maxsize=1)
def identifier() -> Any:
    """The py3langid identifier over all its languages, probabilities normalised (loaded once)."""
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise MechscopeError("Language identification needs the py3langid package; install it with `pip install py3langid`.") from None
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str) -> tuple[str, float]:
    """(language code, probability) of ``text``."""
    lang, p = identifier().classify(text)
    return str(lang), float(p)


def line_language(text: str, threshold: float = 0.3) -> str:
    """The language of one line, or ``UNKNOWN`` when the identifier's best probability is at
    most ``threshold``."""
    lang, p = identify(text)
    return lang if p > threshold else UNKNOWN


def is_english(text: str) -> bool:
    """Whether English is the identifier's best guess for ``text`` (any probability): the test
    for the run of words that starts a confusion point."""
    return identify(text)[0] == "en"
