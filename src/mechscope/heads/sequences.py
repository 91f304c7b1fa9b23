"""The token sequences head scores are computed on.

- Repeated random tokens: ``prefix + R + R`` with R ``length`` distinct tokens (the induction
  task's construction, ``tasks.induction.repeated_tokens_batch``), prefix = BOS when the
  tokenizer has one. Tokens are the tokenizer's plain-word tokens when it has enough of them,
  else any non-special token the model's vocabulary holds (toy vocabularies).
- Real text: consecutive windows of ``length`` tokens cut from a text source. The source is
  ``text_source(spec)``: the embedded corpus of ``mechscope.activations`` (Austen and
  Melville) when installed, a ``.txt``/``.jsonl`` file or folder, or ``"pydoc"``: the Python
  reference documentation that ships with every Python (``pydoc_data.topics``), the fallback
  when no corpus is installed.
"""

from __future__ import annotations

from typing import Any

import torch

from mechscope.errors import MechscopeError
from mechscope.tasks.induction import ordinary_tokens, repeated_tokens_batch


def prefix_ids(tokenizer: Any) -> torch.Tensor:
    """[BOS] if the tokenizer has a BOS token, else an empty tensor."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return torch.tensor([bos] if bos is not None else [], dtype=torch.long)


def check_length(model: Any, total: int, what: str, option: str = "--seq-len", length: int | None = None) -> None:
    """Refuse a sequence beyond the model's context where its positions are learned (GPT-2's table
    has no row past it; rotary models run on, ``models.load.position_limit``), or one whose
    ``length`` (the option's value: the repeated span or the text window) is below 2 tokens."""
    from mechscope.models.load import position_limit

    n_ctx = position_limit(model)
    if n_ctx is not None and total > n_ctx:
        raise MechscopeError(
            f"{what} would be {total} tokens, beyond the model's context of {n_ctx}; pass a smaller {option}."
        )
    if (length < 2) if length is not None else total < 3:
        raise MechscopeError(f"{what} would be only {total} tokens; pass a {option} of at least 2.")


def sampling_vocab(tokenizer: Any, d_vocab: int, need: int) -> torch.Tensor:
    """Token ids to draw random sequences from (see module docstring)."""
    ids = [i for i in ordinary_tokens(tokenizer) if i < d_vocab]
    if len(ids) < need:
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(min(len(tokenizer), d_vocab)) if i not in special]
    if len(ids) < need:
        raise MechscopeError(f"The tokenizer has only {len(ids)} usable tokens; use a shorter --seq-len.")
    return torch.tensor(ids)


def repeated_random(model: Any, n: int, length: int, seed: int = 0) -> torch.Tensor:
    """[n, p + 2 * length] token ids ``prefix + R + R`` (p = 1 with a BOS token, else 0)."""
    tok = model.tokenizer
    prefix = prefix_ids(tok)
    check_length(model, len(prefix) + 2 * length, f"A repeated sequence (prefix + 2 x {length})", length=length)
    vocab = sampling_vocab(tok, model.summary.d_vocab, 2 * length)
    return repeated_tokens_batch(tok, vocab, prefix, n, length, seed, task="heads").clean


def text_source(spec: str | None = None) -> tuple[str, list[str]]:
    """(name, documents) of a text source (see module docstring); ``None``: embedded corpus,
    else the Python docs."""
    if spec == "pydoc" or spec is None:
        if spec is None:
            try:
                return _corpus("embedded")
            except (MechscopeError, ImportError):
                pass
        import pydoc_data.topics as topics

        return "pydoc", [topics.topics[k] for k in sorted(topics.topics)]
    return _corpus(spec)


def _corpus(spec: str) -> tuple[str, list[str]]:
    from mechscope.activations.corpus import get_corpus

    corpus = get_corpus(spec)
    return corpus.spec, list(corpus)


def text_windows(model: Any, docs: list[str], n: int, length: int,
                 hint: str = "for a train-toy checkpoint, run `mechscope dynamics` on the run folder instead") -> torch.Tensor:
    """Up to ``n`` windows [n, p + length]: the prefix, then consecutive tokens of the
    documents joined in order. Refused when most of their tokens are unknown to the tokenizer
    (``hint``: what else to do, in the refusal)."""
    tok = model.tokenizer
    prefix = prefix_ids(tok).tolist()
    check_length(model, len(prefix) + length, f"A text window (prefix + {length})", "--text-len", length=length)
    ids: list[int] = []
    for doc in docs:
        t = tok(doc)["input_ids"]
        ids += t[1:] if t and t[0] in prefix else t
        if len(ids) >= n * length:
            break
    k = min(n, len(ids) // length)
    if k == 0:
        raise MechscopeError(f"The text source holds fewer than {length} tokens; pass more text or a smaller length.")
    body = torch.tensor(ids[: k * length]).view(k, length)
    unk = getattr(tok, "unk_token_id", None)
    share = float((body == unk).float().mean()) if unk is not None else 0.0
    if share > MAX_UNKNOWN:
        raise MechscopeError(
            f"{share:.0%} of the text windows' tokens are unknown to this model's tokenizer (a vocabulary of "
            f"{len(tok):,}), so the text scores and the ICL score would mean nothing; pass --text with text in its "
            f"vocabulary ({hint}).")
    return torch.cat([torch.tensor(prefix, dtype=torch.long).expand(k, -1), body], dim=1)


MAX_UNKNOWN = 0.5
"""The largest share of unknown tokens text windows may hold (a word-level toy vocabulary reads
English as ``<unk>`` throughout: every window then scored an ICL score of +0.56 nats)."""
