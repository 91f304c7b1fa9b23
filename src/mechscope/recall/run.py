"""``recall``: the four analyses of one fact (prompt, subject, target) as one ``RecallResult``."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

from mechscope.errors import MechscopeError
from mechscope.models.prompt import encode_prompt, single_token, subject_positions
from mechscope.models.tokens import token_texts
from mechscope.recall.config import RecallConfig
from mechscope.recall.enrichment import subject_enrichment
from mechscope.recall.extraction import attribute_extraction
from mechscope.recall.knockout import attention_knockout
from mechscope.recall.result import RecallResult
from mechscope.recall.tracing import causal_trace, embedding_std
from mechscope.tasks.facts import load_facts

if TYPE_CHECKING:
    from mechscope.models import Model

PARTS = ("trace", "knockout", "extraction", "enrichment")


def facts_noise_std(model, cfg: RecallConfig) -> float:
    """cfg.noise x the embedding std of the shipped facts list's subjects (ROME's noise level)."""
    return cfg.noise * embedding_std(model, sorted({f.subject for f in load_facts()}))


def recall(model: Model, prompt: str, subject: str, target: str | None = None, cfg: RecallConfig | None = None,
           parts: tuple[str, ...] = PARTS, noise_std: float | None = None, related=None, control=None,
           control_subject: str | None = None, tuned=None) -> RecallResult:
    """Dissect the recall of one fact. ``target`` defaults to the model's top prediction;
    ``tuned``: a ``TunedLens`` that subject enrichment reads the layers with (default: the
    logit lens)."""
    cfg = cfg or RecallConfig()
    tokens = encode_prompt(model, prompt)
    spos = subject_positions(model, prompt, subject)
    if spos[-1] >= tokens.shape[-1] - 1:
        raise MechscopeError(f"the subject {subject!r} runs to the prompt's last token, where the answer is read; end the prompt "
                             "with words after the subject (e.g. 'The Eiffel Tower is in the city of').")
    if target is not None:
        tid = single_token(model, target, prompt=prompt)
    else:
        with torch.no_grad():
            tid = int(model(tokens)[0, -1].argmax())
    res = RecallResult(model=model.summary.to_dict(), settings=cfg.to_dict(), prompt=prompt, subject=subject,
                       tokens=model.to_str_tokens(tokens[0]), subject_pos=spos, target=token_texts(model.tokenizer, [tid])[0],
                       target_id=tid)
    if "trace" in parts:
        res.trace = causal_trace(model, tokens, spos, tid, noise_std or facts_noise_std(model, cfg), cfg)
    if "knockout" in parts:
        res.knockout = attention_knockout(model, tokens, spos, tid, cfg)
    if "extraction" in parts:
        res.extraction = attribute_extraction(model, tokens, tid)
    if "enrichment" in parts:
        if control_subject is None:
            pool = sorted({f.subject for f in load_facts()} - {subject})
            control_subject = random.Random(cfg.seed).choice(pool)
        res.enrichment = subject_enrichment(model, tokens, subject, spos[-1], control_subject, cfg.top_k, cfg.gen_tokens,
                                            related=related, control=control, tuned=tuned)
    return res
