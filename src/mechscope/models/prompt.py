"""Prompt checks shared by the lens and recall methods: encode a prompt within the context,
resolve a single-token target, locate a subject's token positions.

Each failure raises ``MechscopeError`` with one sentence (the CLI turns it into exit code 2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mechscope.errors import MechscopeError

if TYPE_CHECKING:
    from mechscope.models import Model


def encode_prompt(model: Model, prompt: str) -> torch.Tensor:
    """Token ids [1, pos] of ``prompt`` (the tokenizer's default special tokens), checked
    against the model's context length."""
    if not prompt:
        raise MechscopeError("The prompt is empty; pass the text whose next token you want to explain.")
    ids = model.to_tokens(prompt)
    from mechscope.models.load import context_overrun

    if (n_ctx := context_overrun(model, len(ids))) is not None:
        raise MechscopeError(f"The prompt has {len(ids)} tokens, more than the model's context of {n_ctx}; shorten it.")
    if not ids:
        raise MechscopeError("The prompt encodes to no tokens; pass some text.")
    return torch.tensor([ids], dtype=torch.long)


def single_token(model: Model, text: str, what: str = "target", prompt: str | None = None) -> int:
    """The id of ``text`` as one token.

    A word follows a prompt after a space, so when ``text`` has no leading space, " " + text
    is tried first and text itself second. Where neither is one token alone and ``prompt`` is
    given, each is tried after the prompt (the ids prompt + text adds past the prompt's own):
    a SentencePiece tokenizer that marks word starts with "▁" (Llama-2, Mistral v0.1) encodes
    " Paris" alone as '▁', '▁Paris', after a prompt as '▁Paris'. Raises, naming the pieces,
    when none is one token.
    """
    if not text:
        raise MechscopeError(f"The {what} is empty; pass one token, e.g. ' Paris'.")
    candidates = [text] if text[0].isspace() else [" " + text, text]
    for c in candidates:
        ids = model.tokenizer(c, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return ids[0]
    if prompt is not None:
        from mechscope.models.tokens import continuation

        for c in candidates:
            ids = continuation(model.tokenizer, prompt, c)
            if ids is not None and len(ids) == 1:
                return ids[0]
    ids = model.tokenizer(candidates[0], add_special_tokens=False)["input_ids"]
    pieces = ", ".join(repr(model.tokenizer.decode([i])) for i in ids)
    raise MechscopeError(f"The {what} {candidates[0]!r} is not a single token: it splits into {pieces}; pass one of those tokens instead.")


def subject_positions(model: Model, prompt: str, subject: str) -> list[int]:
    """Positions of the tokens that overlap the first occurrence of ``subject`` in ``prompt``.

    Uses the tokenizer's character offsets (fast tokenizers); otherwise compares the token
    counts of growing prefixes. A token that straddles the subject's edge (e.g. " France"
    with its leading space) counts as a subject token.
    """
    if not subject or subject not in prompt:
        raise MechscopeError(f"The subject {subject!r} does not occur in the prompt {prompt!r}; pass it exactly as it is written there.")
    start = prompt.index(subject)
    end = start + len(subject)
    try:
        enc = model.tokenizer(prompt, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        specials = set(getattr(model.tokenizer, "all_special_ids", []))
        pos = [i for i, ((a, b), t) in enumerate(zip(offsets, enc["input_ids"])) if a < end and b > start and not (t in specials and a == b)]
    except (NotImplementedError, TypeError, KeyError):  # slow tokenizer: compare prefixes
        full = model.to_tokens(prompt)
        before = model.to_tokens(prompt[:start])
        n_same = next((i for i, (a, b) in enumerate(zip(before, full)) if a != b), min(len(before), len(full)))
        pos = list(range(n_same, len(model.to_tokens(prompt[:end]))))
    if not pos:
        raise MechscopeError(f"Could not map the subject {subject!r} to tokens of the prompt; check the spelling.")
    return pos

