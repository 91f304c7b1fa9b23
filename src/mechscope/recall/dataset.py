"""Recall over the shipped facts list, aggregated like the papers' figures.

1. Keep the facts the model knows: the attribute is its top-1 next token (one batched pass
   over all 301 prompts); draw ``n`` of them with ``seed``.
2. Build every drawn subject's related-token set in one batched generation; each fact's
   enrichment control is the next drawn fact's set.
3. Run ``recall`` on each fact (its own noise draw: seed + index); by default one noise draw
   per fact and every second layer (``dataset_config``).
4. Aggregate: causal tracing by ROME's position categories (mean restored p(target) per layer
   and the recovered fraction (mean restored - mean corrupted) / (mean clean - mean
   corrupted) over the facts that have the category), mean knockout curves per key group
   (all facts, and those whose subject does not start the prompt, where the subject group
   would include the first token), attribute-extraction rates per layer, mean enrichment rates.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

import torch

from mechscope.errors import MechscopeError
from mechscope.progress import ProgressArg, as_progress
from mechscope.recall.aggregate import aggregate
from mechscope.recall.config import DATASET_N, RecallConfig, check_dataset, dataset_config
from mechscope.recall.engine import last_logits
from mechscope.recall.enrichment import related_tokens
from mechscope.recall.result import RecallDatasetResult, RecallResult
from mechscope.recall.run import facts_noise_std, recall
from mechscope.tasks.facts import Fact, load_facts

if TYPE_CHECKING:
    from mechscope.models import Model


@torch.no_grad()
def known_facts(model: Model, facts: list[Fact]) -> list[Fact]:
    """The facts whose attribute is the model's top-1 next token (batched by token length)."""
    by_len: dict[int, list[int]] = {}
    enc = [model.to_tokens(f.prompt) for f in facts]
    for i, ids in enumerate(enc):
        by_len.setdefault(len(ids), []).append(i)
    keep = set()
    for idx in by_len.values():
        for s in range(0, len(idx), 64):
            part = idx[s:s + 64]
            top = last_logits(model, torch.tensor([enc[i] for i in part])).argmax(-1).tolist()
            for i, t in zip(part, top):
                if _attribute_id(model, facts[i]) == t:
                    keep.add(i)
    return [f for i, f in enumerate(facts) if i in keep]


def _attribute_id(model: Model, fact: Fact) -> int | None:
    """The fact's attribute as one token after its prompt, or None: alone first, then in context
    (a SentencePiece "▁" tokenizer encodes " Paris" alone as two pieces, after the prompt as one)."""
    from mechscope.models.prompt import single_token

    try:
        return single_token(model, fact.attribute, prompt=fact.prompt)
    except MechscopeError:
        return None


def recall_dataset(model: Model, n: int = DATASET_N, cfg: RecallConfig | None = None, parts: tuple[str, ...] | None = None,
                   progress: ProgressArg = False,
                   facts: list[Fact] | None = None, tuned=None) -> RecallDatasetResult:
    """Recall analyses of ``n`` known facts (seeded draw) and their aggregate; ``facts``
    defaults to the whole shipped list; ``tuned``: a ``TunedLens`` for subject enrichment
    (default: the logit lens)."""
    from mechscope.recall.run import PARTS

    check_dataset("facts", n)
    cfg = cfg or dataset_config()
    parts = parts or PARTS
    t0 = time.time()
    facts = facts if facts is not None else load_facts()
    known = known_facts(model, facts)
    if len(known) < 2:
        raise MechscopeError(f"The model knows only {len(known)} of the {len(facts)} facts (top-1); there is nothing to aggregate.")
    chosen = random.Random(cfg.seed).sample(known, min(n, len(known)))
    noise_std = facts_noise_std(model, cfg)
    rel = related_tokens(model, [f.subject for f in chosen], cfg.gen_tokens) if "enrichment" in parts else [None] * len(chosen)
    results: list[RecallResult] = []
    bar = as_progress(progress).phase("facts", total=len(chosen), unit="fact")
    for i, f in enumerate(chosen):
        bar.advance(0, fact=f.subject)  # names the fact in progress
        c = RecallConfig(**{**cfg.to_dict(), "kinds": tuple(cfg.kinds), "seed": cfg.seed + i})
        j = (i + 1) % len(chosen)
        r = recall(model, f.prompt, f.subject, f.attribute, c, parts=parts, noise_std=noise_std, related=rel[i],
                   control=rel[j], control_subject=chosen[j].subject, tuned=tuned)
        r.extras["relation"] = f.relation
        results.append(r)
        bar.advance()
    bar.close()
    agg = aggregate(results, model.summary.n_layers)
    return RecallDatasetResult(model=model.summary.to_dict(), settings={**cfg.to_dict(), "n": n, "parts": list(parts)},
                               n_facts=len(facts), n_known=len(known), facts=results, aggregate=agg,
                               seconds=time.time() - t0)
