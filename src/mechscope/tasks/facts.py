"""Factual recall (subject -> attribute), in the style of Meng et al. 2022, "Locating and Editing
Factual Associations in GPT" (ROME, arXiv:2202.05262) and Geva et al. 2023, "Dissecting Recall
of Factual Associations in Auto-Regressive Language Models" (arXiv:2304.14767).

Data: ``data/facts.jsonl``, one fact a line: ``{"subject", "relation", "prompt", "attribute"}``.
The prompt contains the subject exactly once and ends right before the attribute, which has a
leading space (e.g. "The capital city of France is" -> " Paris"). Relations are ones a small
model has a chance on: capitals, cities and landmarks, main languages, company home countries,
birth countries (present-day borders), athletes' sports, currencies, continents. Attributes
are real-world facts whether or not a given model knows them.

Corruption by subject swap: the corrupt prompt is the clean prompt with its subject replaced
by another subject of the same relation, chosen (seeded) among those whose attribute differs
and whose swapped prompt has the clean prompt's token length. ``answer`` = the clean
attribute, ``wrong`` = the other subject's attribute; metric ``logit_diff``. A fact with no
such partner is still passed on with a partner of another length, so ``tokenize_pairs``
drops it and counts it; a fact whose relation has no different attribute at all is counted
under its own reason.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechscope.errors import MechscopeError
from mechscope.tasks.base import Pair, TaskBatch, capped_note, tokenize_pairs

DATA = Path(__file__).parent / "data" / "facts.jsonl"


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    prompt: str  # contains ``subject`` once; ends before the attribute
    attribute: str  # with leading space, e.g. " Paris"

    def with_subject(self, subject: str) -> str:
        """This fact's prompt about another subject."""
        return self.prompt.replace(self.subject, subject, 1)


def load_facts(path: Path = DATA) -> list[Fact]:
    """All facts in ``path`` (validated: subject appears once in the prompt)."""
    facts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        f = Fact(**json.loads(line))
        if f.prompt.count(f.subject) != 1 or not f.attribute.startswith(" "):
            raise MechscopeError(f"{path}:{i}: the subject must appear once in the prompt "
                                 "and the attribute must start with a space.")
        facts.append(f)
    return facts


def make_pairs(tokenizer: Any, facts: list[Fact], seed: int = 0) -> tuple[list[Pair], dict[str, int]]:
    """Subject-swap pairs for ``facts`` (partners drawn from all facts of the same relation)."""
    rng = random.Random(seed)
    everyone = load_facts()
    n_tok = lambda text: len(tokenizer(text)["input_ids"])  # noqa: E731
    pairs: list[Pair] = []
    dropped: dict[str, int] = {}
    for f in facts:
        others = [o for o in everyone if o.relation == f.relation and o.attribute != f.attribute]
        if not others:
            key = "no other subject of the relation has a different attribute"
            dropped[key] = dropped.get(key, 0) + 1
            continue
        length = n_tok(f.prompt)
        same = [o for o in others if n_tok(f.with_subject(o.subject)) == length]
        o = rng.choice(same or others)
        pairs.append(Pair(f.prompt, f.with_subject(o.subject), f.attribute, o.attribute))
    return pairs, dropped


def build(tokenizer: Any, n: int | None = None, seed: int = 0) -> TaskBatch:
    """Facts batch: ``n`` facts drawn with ``seed`` (all facts, shuffled, when ``n`` is None or
    above their number; then with a note saying how many the task can supply)."""
    facts = load_facts()
    rng = random.Random(seed)
    facts = rng.sample(facts, len(facts) if n is None else min(n, len(facts)))
    pairs, dropped = make_pairs(tokenizer, facts, seed)
    if not pairs:
        raise MechscopeError("Task 'facts' has no valid clean/corrupt pair.")
    batch = tokenize_pairs(tokenizer, pairs, "facts", "logit_diff")
    for k, v in dropped.items():
        batch.dropped[k] = batch.dropped.get(k, 0) + v
    if n is not None and n > len(facts):
        batch.notes.append(capped_note(n, len(facts), "facts", len(batch)))
    return batch
