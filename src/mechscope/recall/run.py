"""``recall``: the four analyses of one fact (prompt, subject, target) as one ``RecallResult``."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

from mechscope.errors import MechscopeError, check_config
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


def check_parts(parts) -> tuple[str, ...]:
    """``parts`` as a tuple, refused (one sentence naming the known parts) when it names an
    unknown analysis or none at all: an unknown name would otherwise run nothing."""
    if isinstance(parts, str):
        parts = (parts,)
    try:
        parts = tuple(parts)
    except TypeError:
        raise MechscopeError(f"parts must be a tuple of analysis names from {', '.join(PARTS)}; got {parts!r}.") from None
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise MechscopeError(f"parts names unknown analyses {', '.join(map(repr, unknown))}; choose from {', '.join(PARTS)}."
                             if unknown else f"parts is empty; choose one or more of {', '.join(PARTS)}.")
    return parts


def check_noise_std(noise_std) -> None:
    """Refuse a ``noise_std`` that is not a finite non-negative number (NaN traces all-NaN)."""
    import math

    if noise_std is None:
        return
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)):
        raise MechscopeError(f"noise_std must be a number (or None for the default); got a {type(noise_std).__name__}.")
    if not math.isfinite(noise_std) or noise_std < 0:
        raise MechscopeError(f"noise_std must be a finite number >= 0 (or None for the default); got {noise_std}.")


def knockout_unavailable(model: Model, parts: tuple[str, ...]) -> str:
    """Why attention knockout cannot run on ``model`` ('' where it can, or is not asked for):
    its bridge discards attention edits (``models.check.attention_edits_reach_output``). Asked
    for alone (``parts`` other than every part), it is refused instead."""
    from mechscope.models.check import attention_edits_reach_output, require_attention_edits

    if "knockout" not in parts or attention_edits_reach_output(model):
        return ""
    if set(parts) != set(PARTS):
        require_attention_edits(model, "recall's attention knockout")
    return (f"attention knockout was left out: TransformerLens's bridge for {model.summary.architecture} fires the "
            "attention-score hooks after the attention has used them, so blocking edges would change nothing.")


def recall(model: Model, prompt: str, subject: str, target: str | None = None, cfg: RecallConfig | None = None,
           parts: tuple[str, ...] = PARTS, noise_std: float | None = None, related=None, control=None,
           control_subject: str | None = None, tuned=None) -> RecallResult:
    """Dissect the recall of one fact. ``target`` defaults to the model's top prediction;
    ``tuned``: a ``TunedLens`` that subject enrichment reads the layers with (default: the
    logit lens)."""
    from mechscope.lens.run import check_text
    from mechscope.lens.tuned import as_tuned_lens
    from mechscope.models import require_model

    require_model(model, "recall")
    check_text(prompt, "prompt", "recall")
    check_text(subject, "subject", "recall")
    check_text(target, "target", "recall", optional=True)
    check_text(control_subject, "control_subject", "recall", optional=True)
    if not subject.strip():  # else "the subject '' does not occur in the prompt", which it does, everywhere
        raise MechscopeError(f"--subject is empty{'' if not subject else ' (only spaces)'}; give the subject's words as "
                             "written in the prompt, e.g. --subject 'The Eiffel Tower'.")
    tuned = as_tuned_lens(tuned, model, "recall")
    check_config(cfg, RecallConfig, "recall")
    cfg = cfg or RecallConfig()
    parts = check_parts(parts)
    skipped = knockout_unavailable(model, parts)
    if skipped:  # every part by default: the others run, and the result says why this one did not
        parts = tuple(p for p in parts if p != "knockout")
    check_noise_std(noise_std)
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
    if skipped:
        res.extras["attention_knockout_skipped"] = skipped
    if "trace" in parts:
        res.trace = causal_trace(model, tokens, spos, tid, facts_noise_std(model, cfg) if noise_std is None else float(noise_std), cfg)
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
