"""Task = clean prompts, corrupted prompts, answer tokens and a metric.

Every task builds a ``TaskBatch``. Pairs of different lengths share one batch by right
padding: with causal attention, padding after a prompt never changes the logits at the
prompt's own positions, and every metric reads only the scored positions.

Metrics (per example; the batch metric is their mean):

- ``logit_diff``: logit(answer) - logit(wrong), averaged over the scored positions.
- ``logprob``: log p(answer), averaged over the scored positions (induction).
- ``prob_diff``: sum_j sign_j * p(candidate_j) (greater-than: mass on years above the start
  year minus mass below it).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from mechscope.brief import brief_repr
from mechscope.errors import MechscopeError
from mechscope.models.tokens import continuation, ids_outside

MetricName = Literal["logit_diff", "logprob", "prob_diff"]


@dataclass
class Pair:
    """One clean/corrupt prompt pair before tokenisation checks."""

    clean: str
    corrupt: str
    answer: str  # text of the correct next token (e.g. " Mary")
    wrong: str | None = None  # text of the contrast token (logit_diff)


@dataclass
class TaskBatch:
    """A validated, tokenised batch of clean/corrupt pairs.

    Shapes: ``clean``/``corrupt`` [batch, pos]; ``positions``/``answers``/``wrongs``
    [batch, k] (k scored positions per example; k = 1 for single-answer tasks);
    ``candidates``/``signs`` [batch, c] for ``prob_diff``; ``lengths`` [batch].
    """

    task: str
    clean: torch.Tensor
    corrupt: torch.Tensor
    positions: torch.Tensor
    answers: torch.Tensor
    wrongs: torch.Tensor
    lengths: torch.Tensor
    metric_name: MetricName = "logit_diff"
    candidates: torch.Tensor | None = None
    signs: torch.Tensor | None = None
    clean_text: list[str] = field(default_factory=list)
    corrupt_text: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    pad_id: int = 0
    notes: list[str] = field(default_factory=list)
    """One sentence each about kept pairs that may not measure what was meant (a task file's
    answers without a leading space or prompts ending in a space, ``tokenize_pairs``) or about
    fewer pairs than ``n`` asked for (``capped_note``); shown beside the dropped pairs."""

    def __repr__(self) -> str:  # a notebook's last line: one short line, not every tensor
        return brief_repr(self)

    def __len__(self) -> int:
        return self.clean.shape[0]

    @property
    def n_pos(self) -> int:
        return self.clean.shape[1]

    def to(self, device: torch.device | str) -> "TaskBatch":
        out = TaskBatch(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        for k in ("clean", "corrupt", "positions", "answers", "wrongs", "lengths", "candidates", "signs"):
            v = getattr(out, k)
            if v is not None:
                setattr(out, k, v.to(device))
        return out

    def check(self, d_vocab: int | None = None) -> "TaskBatch":
        """Refuse (one sentence) a batch whose tensors do not fit together: clean and corrupt of
        one shape [batch, pos], scored positions inside the prompts, answers and wrongs shaped
        like the positions, lengths within 1..pos, integer ids (within ``d_vocab`` when given),
        and at least one pair. O(batch x pos) tensor checks, no forward pass; returns the batch."""
        fix = "build batches with get_task(...).build(tokenizer) or tokenize_pairs"

        def bad(what: str) -> MechscopeError:
            return MechscopeError(f"TaskBatch '{self.task}' is malformed: {what}; {fix}.")

        names = ["clean", "corrupt", "positions", "answers", "wrongs", "lengths"]
        if self.metric_name == "prob_diff" or self.candidates is not None:
            names += ["candidates", "signs"]
        for k in names:
            v = getattr(self, k)
            if not isinstance(v, torch.Tensor):
                raise bad(f"{k} is a {type(v).__name__}, not a tensor")
            if k != "signs" and (v.is_floating_point() or v.is_complex() or v.dtype == torch.bool):
                raise bad(f"{k} has dtype {v.dtype}, not integer ids or indices")
        if self.clean.dim() != 2:
            raise bad(f"clean has shape {tuple(self.clean.shape)}, not [batch, pos]")
        B, P = self.clean.shape
        if B == 0 or P == 0:
            raise MechscopeError(f"TaskBatch '{self.task}' is empty ({B} pairs of {P} tokens); give at least one pair.")
        if self.corrupt.shape != self.clean.shape:
            raise bad(f"corrupt has shape {tuple(self.corrupt.shape)}, clean {tuple(self.clean.shape)}: they must match")
        pos = self.positions
        if pos.dim() != 2 or pos.shape[0] != B or pos.shape[1] < 1:
            raise bad(f"positions has shape {tuple(pos.shape)}, expected [{B}, k] with k >= 1")
        for k in ("answers", "wrongs"):
            if getattr(self, k).shape != pos.shape:
                raise bad(f"{k} has shape {tuple(getattr(self, k).shape)}, expected {tuple(pos.shape)} like positions")
        if self.lengths.shape != (B,):
            raise bad(f"lengths has shape {tuple(self.lengths.shape)}, expected ({B},)")
        if int(self.lengths.min()) < 1 or int(self.lengths.max()) > P:
            raise bad(f"lengths range {int(self.lengths.min())}..{int(self.lengths.max())}, outside 1..{P} (the prompt width)")
        if int(pos.min()) < 0 or int(pos.max()) >= P:
            raise bad(f"positions range {int(pos.min())}..{int(pos.max())}, outside 0..{P - 1} (the prompt width)")
        if self.candidates is not None or self.signs is not None:
            c, sg = self.candidates, self.signs
            if c is None or sg is None or c.dim() != 2 or c.shape[0] != B or sg.shape != c.shape:
                raise bad(f"candidates {None if c is None else tuple(c.shape)} and signs {None if sg is None else tuple(sg.shape)} "
                          f"must both be [{B}, c]")
        ids = ["clean", "corrupt", "answers", "wrongs"] + (["candidates"] if self.candidates is not None else [])
        for k in ids:
            if (span := ids_outside(getattr(self, k), d_vocab)) is not None:
                lo, hi = span
                top = f"{d_vocab - 1} (the model's vocabulary)" if d_vocab is not None else "the vocabulary"
                raise bad(f"{k} holds token ids {lo}..{hi}, outside 0..{top}")
        return self

    def subset(self, idx: torch.Tensor | list[int] | slice) -> "TaskBatch":
        """The batch restricted to some examples (e.g. a held-out split)."""
        if isinstance(idx, list):
            idx = torch.tensor(idx, dtype=torch.long)
        if isinstance(idx, torch.Tensor) and idx.numel() and not (idx.dtype == torch.bool):
            n = len(self)
            if int(idx.min()) < -n or int(idx.max()) >= n:
                raise MechscopeError(f"subset indices {int(idx.min())}..{int(idx.max())} are out of range for a batch of {n} "
                                     f"pairs; pick indices 0..{n - 1}.")
        out = TaskBatch(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        for k in ("clean", "corrupt", "positions", "answers", "wrongs", "lengths", "candidates", "signs"):
            v = getattr(out, k)
            if v is not None:
                setattr(out, k, v[idx])
        if isinstance(idx, slice):
            out.clean_text, out.corrupt_text = self.clean_text[idx], self.corrupt_text[idx]
        else:
            ids = idx.tolist()
            out.clean_text = [self.clean_text[i] for i in ids] if self.clean_text else []
            out.corrupt_text = [self.corrupt_text[i] for i in ids] if self.corrupt_text else []
        return out

    def split(self, held_out: float = 0.5, seed: int = 0) -> tuple["TaskBatch", "TaskBatch"]:
        """(scoring pairs, held-out pairs: a ``held_out`` share of them), shuffled with ``seed``."""
        if not 0.0 < held_out < 1.0:
            raise MechscopeError(f"held_out {held_out} is out of range: give the share of pairs held out, between 0 and 1 "
                                 "(e.g. 0.25).")
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(self), generator=g)
        n_test = max(1, int(round(len(self) * held_out)))
        if n_test >= len(self):
            raise MechscopeError(f"Need at least 2 pairs to hold some out; the task has {len(self)}.")
        return self.subset(perm[n_test:]), self.subset(perm[:n_test])

    # ---- metrics -----------------------------------------------------------------------
    def per_example_metric(self, logits: torch.Tensor) -> torch.Tensor:
        """Metric per example [batch] from logits [batch, pos, d_vocab]."""
        b = torch.arange(logits.shape[0], device=logits.device)[:, None]
        return self.metric_at(logits[b, self.positions])

    def metric_at(self, at: torch.Tensor) -> torch.Tensor:
        """Metric per example [batch] from the logits at the scored positions only [batch, k,
        d_vocab] (``patching.logits_at`` makes the model compute no others)."""
        if self.metric_name == "logit_diff":
            good = at.gather(-1, self.answers[..., None])[..., 0]
            bad = at.gather(-1, self.wrongs[..., None])[..., 0]
            return (good - bad).mean(-1)
        if self.metric_name == "logprob":
            lp = at.log_softmax(-1).gather(-1, self.answers[..., None])[..., 0]
            return lp.mean(-1)
        if self.metric_name == "prob_diff":
            if self.candidates is None or self.signs is None:
                raise MechscopeError("metric prob_diff needs candidate answers and their signs; this batch has none.")
            p = at[:, 0].softmax(-1).gather(-1, self.candidates)  # [batch, c]
            return (p * self.signs).sum(-1)
        raise MechscopeError(f"Unknown metric '{self.metric_name}'.")

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """Scalar metric (mean over examples) from logits [batch, pos, d_vocab]."""
        return self.per_example_metric(logits).mean()

    def accuracy(self, logits: torch.Tensor) -> float:
        """Share of examples the model gets right (answer above wrong; top-1 for logprob)."""
        return self.n_correct(logits) / logits.shape[0]

    def n_correct(self, logits: torch.Tensor) -> float:
        """How many examples the model gets right: a whole count, or with several scored positions
        per example (induction) the sum of each example's share of them. Summed over chunks in
        float64 (shares of float32 means drifted: 0.4999999980 for 30 of 60)."""
        b = torch.arange(logits.shape[0], device=logits.device)[:, None]
        at = logits[b, self.positions]
        if self.metric_name == "logprob":
            return float((at.argmax(-1) == self.answers).double().mean(-1).sum().item())
        return float((self.per_example_metric(logits) > 0).sum().item())

    @property
    def chance_accuracy(self) -> float:
        """Accuracy of a model that knows nothing about the task."""
        if self.metric_name == "logprob":
            return 0.0
        return 0.5

    def summary(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "n": len(self),
            "n_pos": self.n_pos,
            "metric": self.metric_name,
            "dropped": dict(self.dropped),
            "notes": list(self.notes),
        }


def tokenize_pairs(
    tokenizer: Any,
    pairs: list[Pair],
    task: str,
    metric_name: MetricName = "logit_diff",
) -> TaskBatch:
    """Tokenise and validate pairs; drop invalid ones, counting why.

    A pair is kept when clean and corrupt have the same number of tokens and the answer (and
    wrong token, if any, a different one) is exactly one token after the clean prompt
    (``single_token`` with the prompt). Raises when no pair survives.
    """
    dropped: Counter[str] = Counter()
    kept: list[tuple[list[int], list[int], int, int, Pair]] = []
    for p in pairs:
        c = tokenizer(p.clean)["input_ids"]
        r = tokenizer(p.corrupt)["input_ids"]
        if len(c) != len(r):
            dropped["clean and corrupt differ in token length"] += 1
            continue
        if c == r:  # nothing differs, so nothing can be attributed to the difference
            dropped["clean and corrupt are the same prompt"] += 1
            continue
        a = single_token(tokenizer, p.answer, p.clean)
        if a is None:
            dropped["answer is not a single token" + _with_space(tokenizer, p.clean, p.answer)] += 1
            continue
        w = -1
        if p.wrong is not None:
            found = single_token(tokenizer, p.wrong, p.clean)
            if found is None:
                dropped["wrong answer is not a single token" + _with_space(tokenizer, p.clean, p.wrong)] += 1
                continue
            w = found
            if w == a:
                dropped["answer and wrong are the same token"] += 1
                continue
        kept.append((c, r, a, w, p))
    if not kept and set(dropped) == {"clean and corrupt are the same prompt"}:
        raise MechscopeError(f"the corrupt prompts of task '{task}' are the clean prompts themselves, so there is nothing to "
                             "patch; make each corrupt prompt differ from its clean prompt where the answer is decided.")
    if not kept:
        reasons = "; ".join(f"{n} {why}" for why, n in dropped.items()) or "no pairs given"
        raise MechscopeError(f"Task '{task}' has no valid clean/corrupt pair ({reasons}).")
    batch = _pad(tokenizer, kept, task, metric_name, dict(dropped))
    glued = sum(_glued(tokenizer, p.clean, a) or (w >= 0 and _glued(tokenizer, p.clean, w)) for _, _, a, w, p in kept)
    if glued:
        batch.notes.append(
            f"{glued} of {len(kept)} pairs have an answer or wrong token that starts with a letter right after a prompt "
            "ending in one, so they score a token that continues the prompt's last word ('Mary' rather than ' Mary'); "
            "if the answer is a new word, write it with a leading space.")
    spaced = sum(_ends_in_space(p.clean) for *_, p in kept)
    if spaced:
        batch.notes.append(
            f"{spaced} of {len(kept)} pairs have a prompt that ends in a space, so the answer is scored after a bare "
            "space token, which tokenizers normally fold into the next word's token; move the space to the start of "
            "the answer ('to' + ' Mary', not 'to ' + 'Mary').")
    return batch


def capped_note(n: int, have: int, what: str, kept: int) -> str:
    """The note for an ``n`` above what a task can supply: ``have`` ``what`` (e.g. "facts"),
    ``kept`` of them valid pairs."""
    valid = f" ({kept} valid with this tokenizer)" if kept != have else ""
    return f"{n} pairs were asked for (--n, or its default) but the task can supply {have} {what}{valid}, so the batch has {kept}."


def _ends_in_space(prompt: str) -> bool:
    """Whether ``prompt`` ends in a space or tab (a line break before the answer is ordinary text)."""
    return prompt[-1:].isspace() and prompt[-1:] not in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"


def _glued(tokenizer: Any, prompt: str, token: int) -> bool:
    """Whether ``token`` after ``prompt`` continues the prompt's last word: the prompt ends in a
    letter and the text the token adds there (decoded in context, so a SentencePiece "▁Mary"
    adds " Mary") starts with one."""
    if not prompt[-1:].isalpha():
        return False
    base = _ids(tokenizer, prompt)
    before, after = tokenizer.decode(base), tokenizer.decode(base + [token])
    added = after[len(before):] if after.startswith(before) else tokenizer.decode([token])
    return added[:1].isalpha()


def _pad(tokenizer, kept, task, metric_name, dropped) -> TaskBatch:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    n_pos = max(len(c) for c, *_ in kept)
    clean = torch.full((len(kept), n_pos), pad, dtype=torch.long)
    corrupt = torch.full_like(clean, pad)
    lengths = torch.tensor([len(c) for c, *_ in kept])
    for i, (c, r, *_rest) in enumerate(kept):
        clean[i, : len(c)] = torch.tensor(c)
        corrupt[i, : len(r)] = torch.tensor(r)
    return TaskBatch(
        task=task,
        clean=clean,
        corrupt=corrupt,
        positions=(lengths - 1)[:, None],
        answers=torch.tensor([[a] for _, _, a, _, _ in kept]),
        wrongs=torch.tensor([[w if w >= 0 else a] for _, _, a, w, _ in kept]),
        lengths=lengths,
        metric_name=metric_name,
        clean_text=[p.clean for *_, p in kept],
        corrupt_text=[p.corrupt for *_, p in kept],
        dropped=dropped,
        pad_id=int(pad),
    )


def _with_space(tokenizer: Any, prompt: str, text: str) -> str:
    """' (but is one with a leading space)' where ``text`` lacks one and gains a single token
    (after ``prompt``) by it."""
    if text != text.rstrip() and text.strip() and single_token(tokenizer, text.rstrip(), prompt) is not None:
        return " (it ends in whitespace; without it, it is one)"
    if text[:1].isspace() or single_token(tokenizer, " " + text, prompt) is None:
        return ""
    return " (but is one with a leading space)"


CONTEXT = "\n"
"""What ``single_token`` puts before a text when given no prompt: a line break, which byte-level
BPE tokenizers never merge with a following space or letter, so the text gets its own tokens."""


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_token(tokenizer: Any, text: str, prompt: str | None = None) -> int | None:
    """The id of the one token ``text`` adds after ``prompt`` (default ``CONTEXT``), else None.

    Decided in context because SentencePiece tokenizers that mark word starts with "▁"
    (Llama-2, Mistral v0.1) give a text alone a dummy prefix: " Mary" alone is ['▁', '▁Mary'],
    after "to" it is the one token '▁Mary'. Where the text merges into the prompt's last token
    (``continuation`` is None), the text's tokens on their own decide. On byte-level BPE
    tokenizers (GPT-2, SmolLM2) both ways give the same tokens.
    """
    ids = continuation(tokenizer, CONTEXT if prompt is None else prompt, text)
    if ids is None:
        ids = _ids(tokenizer, text)
    return ids[0] if len(ids) == 1 else None
