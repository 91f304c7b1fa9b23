"""Greater-than, after Hanna, Liu & Variengien 2023, "How does GPT-2 compute greater-than?:
Interpreting mathematical abilities in a pre-trained language model" (arXiv:2305.00586).

Hanna et al. prompt "The war lasted from the year 1732 to the year 17" and read the model's
probabilities over the two-digit year ending YY (a single GPT-2 token). Tokenizers such as
SmolLM2's split numbers into single digits, so the prompt instead ends right before the *first*
digit of YY and the next token is one digit ``d``. With the start year's ending ``XX = 10a + b``
(tens digit ``a``), every completion that starts with ``d`` gives ``YY`` in ``[10d, 10d + 9]``:

- ``d > a``: every completion gives ``YY >= 10d > 10a + 9 >= XX``: sign **+1**;
- ``d < a``: every completion gives ``YY <= 10d + 9 < 10a <= XX``: sign **-1**;
- ``d = a``: ``YY = 10a + e`` is greater than XX iff ``e > b``: ambiguous, sign **0**.

The metric is ``prob_diff`` over the ten digit tokens: P(d > a) - P(d < a), the digit-level
analogue of Hanna's P(YY > XX) - P(YY <= XX). ``answers``/``wrongs`` are the digits ``a + 1``
and ``a - 1`` (the nearest surely-greater and surely-smaller digits), so ``logit_diff`` also
makes sense on this batch; accuracy is the share of examples with positive prob_diff.

Hanna sample XX from 02..98. At digit level a tens digit of 0 leaves no surely-smaller digit
and 9 no surely-greater one (prob_diff would be >= 0, resp. <= 0, whatever the model knows), so
XX is drawn from 10..89 (tens digit 1..8), every value equally likely; centuries are 11..17.

Corrupt prompt: Hanna's "01" corruption: the same sentence with XX replaced by 01 ("from the
year 1701 to the year 17"), so any completion is greater and the start year carries no
information. Both prompts have the same token length (each digit is one token).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from mechscope.errors import MechscopeError
from mechscope.tasks.base import Pair, TaskBatch, capped_note, single_token, tokenize_pairs

TEMPLATE = "The {noun} lasted from the year {century}{xx:02d} to the year {century}"

# Event nouns in the style of Hanna et al.'s list (things that last a span of years).
NOUNS: list[str] = [
    "war", "expedition", "reign", "siege", "voyage", "journey", "campaign", "conflict",
    "crusade", "occupation", "partnership", "marriage", "pilgrimage", "rebellion", "dynasty",
    "project", "drought", "famine", "epidemic", "construction", "alliance", "exile", "mission",
    "dispute", "blockade", "treaty", "trial", "investigation", "apprenticeship", "friendship",
    "plague", "revolt", "tour", "study", "negotiation",
]
CENTURIES: list[int] = [11, 12, 13, 14, 15, 16, 17]
XX_RANGE = range(10, 90)


def digit_signs(xx: int) -> list[float]:
    """Sign of each next digit 0..9 for start-year ending ``xx`` (see module docstring)."""
    a = xx // 10
    return [1.0 if d > a else -1.0 if d < a else 0.0 for d in range(10)]


def digit_ids(tokenizer: Any, prompt: str | None = None) -> list[int]:
    """Token ids of the digits 0..9 as the next token after ``prompt`` (default: a prompt of this
    task, so a SentencePiece tokenizer gives the digit pieces that continue "17", not "▁5");
    each must be a single token."""
    prompt = TEMPLATE.format(noun=NOUNS[0], century=CENTURIES[-1], xx=32) if prompt is None else prompt
    ids = [single_token(tokenizer, str(d), prompt) for d in range(10)]
    if any(i is None for i in ids):
        raise MechscopeError("The greater-than task needs each digit 0-9 to be a single token.")
    return [int(i) for i in ids]  # type: ignore[arg-type]


def draw(n: int, seed: int) -> tuple[list[tuple[str, int, int]], int]:
    """``n`` different (noun, century, XX) drawn with ``seed`` (all of them, shuffled, when ``n``
    is at least their number) and how many draws repeated an earlier one and were drawn again."""
    rng = random.Random(seed)
    every = [(noun, c, xx) for noun in NOUNS for c in CENTURIES for xx in XX_RANGE]
    if n >= len(every):
        rng.shuffle(every)
        return every, 0
    seen: set[tuple[str, int, int]] = set()
    out: list[tuple[str, int, int]] = []
    repeats = 0
    while len(out) < n:
        key = (rng.choice(NOUNS), rng.choice(CENTURIES), rng.choice(XX_RANGE))
        if key in seen:
            repeats += 1
            continue
        seen.add(key)
        out.append(key)
    return out, repeats


def build(tokenizer: Any, n: int = 50, seed: int = 0) -> TaskBatch:
    """Greater-than batch: metric prob_diff over the 10 digit tokens at the last position.

    The ``n`` pairs are all different: a draw that repeats an earlier one (a copy of a scoring
    pair in the held-out split would be a second look at it) is drawn again, so nothing is
    dropped; above the number of different prompts the batch has them all, with a note.
    """
    digits = digit_ids(tokenizer)
    drawn, _ = draw(n, seed)  # repeats were drawn again: none is missing from the batch
    pairs: list[Pair] = []
    xxs: dict[str, int] = {}
    for noun, century, xx in drawn:
        clean = TEMPLATE.format(noun=noun, century=century, xx=xx)
        corrupt = TEMPLATE.format(noun=noun, century=century, xx=1)
        a = xx // 10
        pairs.append(Pair(clean, corrupt, str(a + 1), str(a - 1)))
        xxs[clean] = xx
    batch = tokenize_pairs(tokenizer, pairs, "greater-than", "prob_diff")
    if n > len(drawn):
        batch.notes.append(capped_note(n, len(drawn), "different prompts", len(batch)))
    # The prompt must end exactly before the first digit of YY: its last token is the
    # century's last digit (true for digit-splitting tokenizers; GPT-2-style would fail).
    last = batch.clean[torch.arange(len(batch)), batch.lengths - 1]  # [batch]
    if not all(int(t) in digits for t in last):
        raise MechscopeError(
            "The greater-than task needs a tokenizer that splits numbers into single digits."
        )
    batch.candidates = torch.tensor([digits] * len(batch))  # [batch, 10]
    batch.signs = torch.tensor([digit_signs(xxs[t]) for t in batch.clean_text])  # [batch, 10]
    return batch
