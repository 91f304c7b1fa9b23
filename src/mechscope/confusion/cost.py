"""What an edit costs on English: IOI accuracy, the share of the shipped facts the model still
gets top-1, and perplexity on held-out contexts of the embedded corpus."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from mechscope.confusion.edit import Neuron, zeroed_neurons

if TYPE_CHECKING:
    from mechscope.activations.corpus import Split
    from mechscope.models import Model


def corpus_contexts(model: Model, split: Split, n: int, length: int) -> list[list[int]]:
    """Up to ``n`` consecutive contexts of ``length`` tokens of the embedded corpus's ``split``,
    no longer than the model's context (a 64-position GPT-2 gets 64 tokens, not 128)."""
    from mechscope.activations.corpus import get_corpus
    from mechscope.activations.store import pack_contexts
    from mechscope.models.load import default_length

    out: list[list[int]] = []
    for ids in pack_contexts(model.tokenizer, get_corpus(split=split), default_length(model, length)):
        out.append(ids)
        if len(out) >= n:
            break
    return out


class CostProbe:
    """The English checks, built once (before any generation, so a check that cannot run fails
    early) and run under any edit; perplexity contexts are ``ppl_len`` tokens, at most the model's context."""

    def __init__(self, model: Model, ioi_n: int = 100, ppl_contexts: int = 24, ppl_len: int = 128, seed: int = 0,
                 facts_n: int = 0):
        from mechscope.errors import MechscopeError
        from mechscope.tasks import get_task
        from mechscope.tasks.facts import load_facts

        self.model = model
        self.skipped: list[str] = []
        self.ioi = None
        if ioi_n:
            try:
                self.ioi = get_task("ioi").build(model.tokenizer, n=ioi_n, seed=seed)
            except MechscopeError as exc:  # e.g. a tokenizer without single-token names
                self.skipped.append(f"IOI cost skipped: {exc}")
        self.facts = load_facts()[:facts_n or None]
        self.ppl: torch.Tensor | None = None
        if ppl_contexts:
            ctx = corpus_contexts(model, "heldout", ppl_contexts, ppl_len)
            self.ppl = torch.tensor(ctx, dtype=torch.long) if ctx else None

    def measure(self, neurons: list[Neuron] | None = None) -> dict[str, Any]:
        """{'ioi_accuracy', 'facts_accuracy', 'perplexity'} with ``neurons`` zeroed (None: unedited)."""
        from mechscope.heads.icl import per_token_loss
        from mechscope.recall.dataset import known_facts
        from mechscope.tasks import evaluate_task

        m = self.model
        out: dict[str, Any] = {}
        with zeroed_neurons([m.bridge.original_model], neurons or []):
            if self.ioi is not None and len(self.ioi):
                out["ioi_accuracy"] = float(evaluate_task(m, self.ioi)["clean_accuracy"])
            out["facts_accuracy"] = len(known_facts(m, self.facts)) / len(self.facts)
            if self.ppl is not None:
                out["perplexity"] = math.exp(float(per_token_loss(m, self.ppl).mean()))
        return out


def relative_change(after: dict[str, Any], before: dict[str, Any]) -> dict[str, float]:
    """(after - before) / before per metric both hold (0 where before is 0)."""
    return {k: (after[k] - before[k]) / before[k] if before[k] else 0.0 for k in before if k in after}
