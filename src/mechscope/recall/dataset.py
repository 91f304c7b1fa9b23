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

With a ``checkpoint`` folder, each finished fact's result and the related-token sets are kept
there as they finish (``mechscope.partial``), so a killed run resumes after them.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mechscope.errors import MechscopeError, check_config
from mechscope.partial import Partial, digest, model_key
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


def _related(model: Model, chosen: list[Fact], cfg: RecallConfig, parts: tuple[str, ...], done: Partial) -> list[set[str] | None]:
    """Each drawn subject's related-token set (None each without enrichment), kept as the piece
    ``related``: its greedy generation reruns every prefix (no KV cache), several facts'
    analyses' worth of work (on the embedded model on one CPU thread: 107 s for 30 subjects,
    against 12 s a fact)."""
    if "enrichment" not in parts:
        return [None] * len(chosen)
    sets = done.get("related")
    if sets is None:
        sets = done.put("related", [sorted(r) for r in related_tokens(model, [f.subject for f in chosen], cfg.gen_tokens)])
    return [set(r) for r in sets]


def recall_dataset(model: Model, n: int = DATASET_N, cfg: RecallConfig | None = None, parts: tuple[str, ...] | None = None,
                   progress: ProgressArg = False, facts: list[Fact] | None = None, tuned=None,
                   checkpoint: str | Path | None = None) -> RecallDatasetResult:
    """Recall analyses of ``n`` known facts (seeded draw) and their aggregate; ``facts``
    defaults to the whole shipped list; ``tuned``: a ``TunedLens`` (or its folder) for subject
    enrichment (default: the logit lens). ``checkpoint``: a folder where each finished fact's
    result (piece ``fact-<i>``, i its place in the draw) and the related-token sets are kept
    (``mechscope.partial``, job ``recall``); a rerun with the same settings, weights, facts and
    lens reads them back and analyses only the rest, with the same result. The known facts and
    the noise std are found again: one batched pass and the embeddings (8 s and 0.03 s there)."""
    from mechscope.lens.tuned import as_tuned_lens
    from mechscope.recall.run import PARTS

    check_dataset("facts", n)
    check_config(cfg, RecallConfig, "recall_dataset")
    cfg = cfg or dataset_config()
    parts = parts or PARTS
    from mechscope.recall.run import knockout_unavailable

    skipped = knockout_unavailable(model, parts)
    if skipped:
        parts = tuple(p for p in parts if p != "knockout")
    tuned = as_tuned_lens(tuned, model, "recall_dataset")  # a folder is loaded once, not once per fact
    t0 = time.time()
    facts = facts if facts is not None else load_facts()
    settings = {**cfg.to_dict(), "n": n, "parts": list(parts)}
    done = Partial(checkpoint, "recall", {"settings": settings, "model": model_key(model),
                                          "facts": digest([[f.prompt, f.subject, f.attribute, f.relation] for f in facts]),
                                          "tuned": digest([tuned.reads, tuned.weight, tuned.bias]) if tuned is not None else None})
    known = known_facts(model, facts)
    if len(known) < 2:
        raise MechscopeError(f"The model knows only {len(known)} of the {len(facts)} facts (top-1); there is nothing to aggregate.")
    chosen = random.Random(cfg.seed).sample(known, min(n, len(known)))
    noise_std = facts_noise_std(model, cfg)
    rel = _related(model, chosen, cfg, parts, done)
    results: list[RecallResult] = []
    read = 0
    bar = as_progress(progress).phase("facts", total=len(chosen), unit="fact")
    for i, f in enumerate(chosen):
        bar.advance(0, fact=f.subject)  # names the fact in progress
        stored = done.get(f"fact-{i}")
        if stored is not None:
            r = RecallResult.from_dict(stored)
            read += 1
        else:
            c = RecallConfig(**{**cfg.to_dict(), "kinds": tuple(cfg.kinds), "seed": cfg.seed + i})
            j = (i + 1) % len(chosen)
            r = recall(model, f.prompt, f.subject, f.attribute, c, parts=parts, noise_std=noise_std, related=rel[i],
                       control=rel[j], control_subject=chosen[j].subject, tuned=tuned)
            r.extras["relation"] = f.relation
            done.put(f"fact-{i}", r.to_dict())
        results.append(r)
        bar.advance()
    bar.close()
    agg = aggregate(results, model.summary.n_layers)
    return RecallDatasetResult(model=model.summary.to_dict(), settings=settings, n_facts=len(facts), n_known=len(known),
                               facts=results, aggregate=agg, seconds=time.time() - t0, checkpoint_notes=_notes(done, read, len(chosen)) + ([skipped] if skipped else []))


def _notes(done: Partial, read: int, n: int) -> list[str]:
    """The lines the CLI prints about the checkpoint: what was read back, what was discarded."""
    notes = []
    if done.discarded:
        notes.append("The checkpoint held facts of a recall run with other settings, weights, facts or lens; they were discarded.")
    if read:
        notes.append(f"Resumed: {read} of the {n} facts were read from the checkpoint of an earlier run with the same settings.")
    return notes
