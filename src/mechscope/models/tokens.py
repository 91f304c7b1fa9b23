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
