"""Induction on repeated random tokens, after Olsson et al. 2022, "In-context Learning and
Induction Heads" (Transformer Circuits Thread) and Elhage et al. 2021.

Construction: ``prefix + R + R`` where ``R`` is a sequence of ``L`` distinct random tokens
(seeded) and ``prefix`` is the tokenizer's BOS token if it has one (else empty). In the second
copy each token ``R[i]`` (i >= 1) follows ``R[i-1]``, which already appeared once followed by
``R[i]``; an induction head predicts it. ``R[0]`` (the first token of the second copy) is not
predictable and is not scored.

- Scored positions (k = L - 1 per example): ``p + L + i - 1`` for i = 1..L-1 (p = prefix
  length), where the next token is ``R[i]``; ``answers`` = those ``R[i]``; metric ``logprob``
  (mean log p(answer) over the positions); ``wrongs`` = ``answers`` (unused).
- Corrupt prompt: ``prefix + R + R'`` with ``R'`` another L random tokens, disjoint from R;
  the same positions and answers are scored, which nothing in the corrupt prompt predicts.
  Replacing the *first* copy instead (``prefix + R' + R``, ``corrupt="first"`` of
  ``repeated_tokens_batch``) keeps the scored tokens and removes only the repeat, but then the
  token identities of the first copy, which every component at those positions carries, are
  the behaviour: on the embedded model its circuits were far less local (held-out
  faithfulness 0.08 at 10% of edges against 0.37 with this corruption; docs/decisions.md).

"Ordinary" tokens: non-special vocabulary entries that decode to an ASCII word of 2+ letters
with an optional leading space, so the sequences contain no control bytes or fragments.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch

from mechscope.errors import MechscopeError
from mechscope.tasks.base import TaskBatch

_WORD = re.compile(r"^ ?[A-Za-z]{2,}$")
_CACHE: dict[tuple[int, int], list[int]] = {}


def ordinary_tokens(tokenizer: Any) -> list[int]:
    """Ids of plain-word tokens (see module docstring), sorted."""
    key = (id(tokenizer), len(tokenizer))
    if key not in _CACHE:
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(len(tokenizer)) if i not in special]
        texts = tokenizer.batch_decode([[i] for i in ids])
        _CACHE[key] = [i for i, t in zip(ids, texts) if _WORD.match(t)]
    return _CACHE[key]


def build(tokenizer: Any, n: int = 50, seed: int = 0, length: int = 20) -> TaskBatch:
    """Induction batch of ``n`` sequences ``prefix + R + R`` (corrupt ``prefix + R + R'``)."""
    if length < 2:
        raise MechscopeError("Induction needs a repeated sequence of at least 2 tokens.")
    vocab = torch.tensor(ordinary_tokens(tokenizer))
    if len(vocab) < 2 * length:
        raise MechscopeError(f"The tokenizer has too few plain-word tokens ({len(vocab)}).")
    bos = getattr(tokenizer, "bos_token_id", None)
    prefix = torch.tensor([bos] if bos is not None else [], dtype=torch.long)
    return repeated_tokens_batch(tokenizer, vocab, prefix, n, length, seed, task="induction", corrupt="second")


def repeated_tokens_batch(
    tokenizer: Any, vocab: torch.Tensor, prefix: torch.Tensor, n: int, length: int, seed: int, task: str,
    corrupt: Literal["first", "second"] = "second",
) -> TaskBatch:
    """``prefix + R + R`` with R, R' disjoint draws from ``vocab``; corrupt ``prefix + R' + R``
    (``corrupt="first"``) or ``prefix + R + R'`` (``"second"``).

    Scores the positions of the second copy whose next token is predictable (see module
    docstring); shared by the built-in task and the hand-built toy's task.
    """
    if corrupt not in ("first", "second"):
        raise MechscopeError(f"corrupt must be 'first' or 'second', got {corrupt!r}.")
    p = len(prefix)
    g = torch.Generator().manual_seed(seed)
    corrupt_first = corrupt == "first"
    clean, corrupted = [], []
    for _ in range(n):
        draw = vocab[torch.randperm(len(vocab), generator=g)[: 2 * length]]  # distinct tokens
        r, r2 = draw[:length], draw[length:]
        clean.append(torch.cat([prefix, r, r]))
        corrupted.append(torch.cat([prefix, r2, r] if corrupt_first else [prefix, r, r2]))
    clean_t = torch.stack(clean)  # [n, p + 2L]
    corrupt_t = torch.stack(corrupted)  # [n, p + 2L]
    positions = torch.arange(p + length, p + 2 * length - 1).expand(n, -1).clone()  # [n, L-1]
    answers = clean_t[:, p + length + 1 :].clone()  # [n, L-1]: R[1..L-1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return TaskBatch(
        task=task,
        clean=clean_t,
        corrupt=corrupt_t,
        positions=positions,
        answers=answers,
        wrongs=answers.clone(),
        lengths=torch.full((n,), p + 2 * length),
        metric_name="logprob",
        clean_text=tokenizer.batch_decode(clean_t.tolist()),
        corrupt_text=tokenizer.batch_decode(corrupt_t.tolist()),
        dropped={},
        pad_id=int(pad),
    )
