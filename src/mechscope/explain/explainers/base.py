"""The explainer interface and the prompt every language-model explainer shares.

An explainer reads a unit's *train* exemplars (never the valid/test ones, which the scorers
use) and returns candidate descriptions. It has a ``name`` (``baseline``, ``server``,
``local``), a ``settings`` dict (everything that changes what it writes: model, temperature,
prompt version...) and a ``settings_key``, the store's hash of the settings (with the prompt version), stored with every
description so that a resumed ``describe`` run can ask the store which units this exact
explainer has already described (``UnitStore.described(name, settings_key)``).

The prompt follows Bills et al. 2023 ("Language models can explain neurons in language
models"): each exemplar is shown as its text with the activating tokens marked, then the
activating tokens with their activation normalised to 0-10 as ``floor(10 * relu(a) / max)``,
``max`` being the unit's largest activation. Bumping ``PROMPT_VERSION`` changes every
settings key, so descriptions written with an older prompt are redone, not mistaken for done.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from typing import Any, Iterable

from mechscope.errors import MechscopeError
from mechscope.explain.db import settings_key
from mechscope.explain.types import Exemplar, UnitRecord

PROMPT_VERSION = 1
MAX_EXEMPLARS = 12
"""Train exemplars shown to a language-model explainer (the most activating first)."""

SYSTEM_PROMPT = (
    "You study one neuron of a language model. You see text excerpts; the tokens where the neuron "
    "fires are marked <<like this>>, and each excerpt is followed by its activating tokens with "
    "the activation on a 0-10 scale. Say what the neuron detects in one short phrase (at most 15 "
    "words), such as 'the word \"city\" and names of towns' or 'tokens right after \"of\"'. "
    "Answer with the phrase only."
)


def normalised(acts: Iterable[float], max_act: float) -> list[int]:
    """Bills et al.'s 0-10 scale: ``floor(10 * relu(a) / max_act)``, capped at 10 (0 when max_act <= 0)."""
    if not max_act > 0:
        return [0 for _ in acts]
    return [min(10, int(math.floor(10 * max(a, 0.0) / max_act))) for a in acts]


def clean_token(tok: str) -> str:
    """A token as shown in a prompt: newlines and tabs written as escapes (they would break the layout)."""
    return tok.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def format_exemplar(ex: Exemplar, max_act: float) -> str:
    """One exemplar: the text with tokens at >= 1 on the 0-10 scale marked, then ``token (n)`` pairs."""
    levels = normalised(ex.acts, max_act)
    text = "".join(f"<<{clean_token(t)}>>" if lv > 0 else clean_token(t) for t, lv in zip(ex.tokens, levels))
    pairs = ", ".join(f"{clean_token(t).strip() or repr(t)} ({lv})" for t, lv in zip(ex.tokens, levels) if lv > 0)
    return f"{text}\nActivations: {pairs or 'none'}"


def choose_exemplars(train: list[Exemplar], n: int = MAX_EXEMPLARS) -> list[Exemplar]:
    """The train exemplars an explainer sees: top ones by activation first, then the others."""
    order = {"top": 0, "quantile": 1, "random": 2, "bottom": 3}
    return sorted(train, key=lambda e: (order.get(e.kind, 4), -e.act))[:n]


def explain_prompt(unit: UnitRecord, train: list[Exemplar], n: int = MAX_EXEMPLARS) -> str:
    """The user message: the ``n`` chosen train exemplars, numbered, on the unit's 0-10 scale."""
    shown = choose_exemplars(train, n)
    max_act = unit.max_act if unit.max_act > 0 else max((max(e.acts) for e in shown), default=0.0)
    body = "\n\n".join(f"Excerpt {i + 1}:\n{format_exemplar(e, max_act)}" for i, e in enumerate(shown))
    return f"{body}\n\nWhat does the neuron detect? One short phrase."


_PREFIX = re.compile(r"^(explanation|answer|description|the neuron detects|this neuron detects|the neuron|this neuron)\s*[:\-]?\s*", re.I)


def parse_description(text: str | None) -> str:
    """The first non-empty line of a model's answer, without quotes, bullets or an 'Explanation:' prefix ('' if none)."""
    for line in (text or "").splitlines():
        line = line.strip().strip("*-# ").strip()
        line = _PREFIX.sub("", line).strip()
        while len(line) > 1 and line[0] == line[-1] and line[0] in "\"'`":  # a quoted phrase: unquote
            line = line[1:-1].strip()
        if line:
            return line[:300]
    return ""


class UnitFailed(MechscopeError):
    """One unit could not be described (its prompt does not fit, the server refused or garbled
    that answer); the message is one sentence. Other units go on."""


class Explainer(ABC):
    """Writes candidate descriptions of a unit from its train exemplars."""

    name: str = ""

    @property
    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything that changes what this explainer writes (JSON-able)."""

    @property
    def model_name(self) -> str:
        """The language model behind it ('' for the baseline)."""
        return ""

    @property
    def full_settings(self) -> dict[str, Any]:
        """``settings`` with the prompt version: what a stored ``Description.settings`` holds."""
        return {"prompt_version": PROMPT_VERSION, **self.settings}

    @property
    def settings_key(self) -> str:
        """The store's key of ``full_settings`` (``mechscope.explain.db.settings_key``: a hash of canonical JSON)."""
        return settings_key(self.full_settings)

    @abstractmethod
    def explain(self, unit: UnitRecord, train: list[Exemplar], n_samples: int = 1) -> list[str]:
        """Up to ``n_samples`` candidate descriptions (at least one), best guess first."""

    def explain_many(self, items: list[tuple[UnitRecord, list[Exemplar]]], n_samples: int = 1) -> list[list[str]]:
        """``explain`` for several units (raising the first unit's ``UnitFailed``)."""
        out: list[list[str]] = []
        for got in self.explain_each(items, n_samples):
            if isinstance(got, Exception):
                raise got
            out.append(got)
        return out

    def explain_each(self, items: list[tuple[UnitRecord, list[Exemplar]]],
                     n_samples: int = 1) -> list[list[str] | UnitFailed]:
        """``explain`` for several units, a unit whose own description failed (``UnitFailed``)
        in its place, so one unit cannot block the others (``describe`` stores the rest and
        says which failed; a rerun retries them). An error that is not about one unit (a
        server that does not answer) is raised. Backends that work concurrently override it."""
        out: list[list[str] | UnitFailed] = []
        for u, ex in items:
            try:
                out.append(self.explain(u, ex, n_samples))
            except UnitFailed as e:
                out.append(e)
        return out

    def close(self) -> None:
        """Release what the explainer holds (connections, models)."""
