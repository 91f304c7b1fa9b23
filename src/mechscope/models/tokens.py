"""Token texts as they read inside running text.

``tokenizer.decode([i])`` drops the leading space of a SentencePiece word-start piece
(Llama-2, Mistral v0.1: '▁Mary' decodes alone as 'Mary'), so per-token texts joined, or checked
for a leading space, lose every word boundary. ``token_texts`` decodes each token after a fixed
anchor token and keeps what it adds: '▁Mary' -> ' Mary'; byte-level BPE ('ĠMary' -> ' Mary')
gives what ``decode([i])`` gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

_ANCHOR = "a"


def continuation(tokenizer: Any, prompt: str, text: str) -> list[int] | None:
    """The ids ``text`` adds after ``prompt`` when the two are tokenised together (no special
    tokens), or None when the prompt's own ids are not a prefix of theirs (the text merges into
    the prompt's last token, e.g. "17" + "5" with a tokenizer that has a token "175")."""
    base = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(prompt + text, add_special_tokens=False)["input_ids"])
    return full[len(base):] if full[: len(base)] == base else None


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each of ``ids`` adds after a plain word, its leading space included (one
    ``batch_decode``); ``decode([i])`` where the anchor does not decode as a prefix; an id past
    the tokenizer's vocabulary (a padded unembedding row) as ``unused_id``."""
    ids = [int(i) for i in ids]
    try:
        n_real = len(tokenizer)
    except TypeError:
        n_real = None
    real = [i for i in ids if n_real is None or 0 <= i < n_real]
    anchor = list(tokenizer(_ANCHOR, add_special_tokens=False)["input_ids"])
    if len(anchor) != 1:
        texts = [tokenizer.decode([i]) for i in real]
    else:
        prefix = tokenizer.decode(anchor)
        texts = [full[len(prefix):] if full.startswith(prefix) else tokenizer.decode([i])
                 for i, full in zip(real, tokenizer.batch_decode([anchor + [i] for i in real]))]
    it = iter(texts)
    return [next(it) if n_real is None or 0 <= i < n_real else unused_id(i) for i in ids]


def ids_outside(ids: Tensor, vocab: int | None) -> tuple[int, int] | None:
    """``(lowest, highest)`` of the token ids ``ids`` when one lies outside ``[0, vocab)`` (below
    0 only, when ``vocab`` is None); None when every id fits or there are none."""
    if not ids.numel():
        return None
    lo, hi = int(ids.min()), int(ids.max())
    return (lo, hi) if lo < 0 or (vocab is not None and hi >= vocab) else None


def unused_id(i: int) -> str:
    """How an id past the tokenizer's vocabulary is shown: models pad their embedding and
    unembedding beyond the tokenizer (Pythia: 50,304 rows for 50,277 tokens), and such a row
    decodes to nothing, so it would read as an empty token."""
    return f"<unused id {int(i)}>"


def prompt_ids(model: Any, tokens: Any, who: str, verb: str = "reads") -> Tensor:
    """One prompt's token ids as a long tensor [P]: from a list of ids (what ``Model.to_tokens``
    returns), an array, or a tensor [P], [1, P] or [P, 1]. One sentence for text, values that
    are not whole numbers, several prompts ("``who`` ``verb`` one prompt") or ids outside the
    vocabulary. ``one_prompt`` adds the length checks; ``features.attribute`` reads through this."""
    import numbers

    import torch

    from mechscope.errors import MechscopeError

    if isinstance(tokens, (str, bytes)):
        raise MechscopeError(f"{who} takes the prompt's token ids, not its text; pass "
                             f"model.tokenizer({str(tokens)[:30]!r}).input_ids (a list of ints).")
    if isinstance(tokens, (list, tuple)) and not all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                     for t in tokens):
        raise MechscopeError(f"{who} takes one prompt's token ids (a list of ints or a tensor [1, pos]); the list holds "
                             "something else; build it with model.to_tokens(prompt).")
    try:
        t = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError):
        raise MechscopeError(f"{who} takes one prompt's token ids as a list of ints or a tensor; got a "
                             f"{type(tokens).__name__}.") from None
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise MechscopeError(f"{who} takes token ids (whole numbers), got {t.dtype} values; build them with "
                             "model.to_tokens(prompt).")
    if t.ndim > 1 and sum(d > 1 for d in t.shape) > 1:
        raise MechscopeError(f"{who} {verb} one prompt, tokens [1, pos]; got shape {tuple(t.shape)}; call it once per prompt.")
    t = t.long().flatten()
    V = int(model.summary.d_vocab)
    if (span := ids_outside(t, V)) is not None:
        raise MechscopeError(f"{who}: token ids {span[0]}..{span[1]} lie outside the model's vocabulary 0..{V - 1}; "
                             "build the tokens with this model's tokenizer.")
    return t


def one_prompt(model: Any, tokens: Any, who: str) -> Tensor:
    """``prompt_ids`` as [1, P] for the forward-pass readers (lens, DLA, tracing, knockout), also
    refusing a prompt of no tokens or of more tokens than a learned-position model's context."""
    from mechscope.errors import MechscopeError
    from mechscope.models.load import context_overrun

    t = prompt_ids(model, tokens, who)
    if not t.numel():
        raise MechscopeError(f"{who} got a prompt of no tokens; give at least one.")
    if (n_ctx := context_overrun(model, t.numel())) is not None:
        raise MechscopeError(f"{who}: a prompt of {t.numel()} tokens is longer than {model.summary.name}'s "
                             f"context of {n_ctx}; shorten it.")
    return t[None]


def check_token_id(model: Any, token_id: Any, who: str, what: str = "target_id") -> int:
    """``token_id`` as an int within ``model``'s vocabulary, else one sentence (a string there
    is a token's text: say how to get its id)."""
    import numbers

    from mechscope.errors import MechscopeError

    V = int(model.summary.d_vocab)
    if isinstance(token_id, str):
        raise MechscopeError(f"{who}: {what} is a token id, not text ({token_id!r}); take it from "
                             f"model.tokenizer({token_id!r}, add_special_tokens=False).input_ids[0], or use the call that "
                             "takes text (run_lens, recall).")
    if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):
        raise MechscopeError(f"{who}: {what} must be a token id (an int), not {type(token_id).__name__}.")
    if not 0 <= int(token_id) < V:
        raise MechscopeError(f"{who}: {what} {int(token_id)} is outside the model's vocabulary 0..{V - 1}.")
    return int(token_id)


def check_position(position: Any, n_tokens: int, who: str, what: str = "position") -> int:
    """``position`` (negative counts from the end, as in Python) as an index into a prompt of
    ``n_tokens`` tokens, else one sentence: an index past the prompt must not wrap around."""
    import numbers

    from mechscope.errors import MechscopeError

    if isinstance(position, bool) or not isinstance(position, numbers.Integral):
        raise MechscopeError(f"{who}: {what} must be a whole number, not {type(position).__name__}.")
    p = int(position)
    if not -n_tokens <= p < n_tokens:
        raise MechscopeError(f"{who}: {what} {p} is outside the prompt of {n_tokens} tokens "
                             f"(0..{n_tokens - 1}, or -{n_tokens}..-1 from the end).")
    return p % n_tokens
