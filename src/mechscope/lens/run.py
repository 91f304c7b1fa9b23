"""``run_lens``: logit lens + direct logit attribution of one prompt, as one ``LensResult``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mechscope.errors import MechscopeError
from mechscope.lens.dla import direct_logit_attribution
from mechscope.lens.logit_lens import logit_lens, site_name
from mechscope.lens.result import LensResult
from mechscope.models.prompt import encode_prompt, single_token
from mechscope.models.tokens import token_texts

if TYPE_CHECKING:
    from mechscope.models import Model


MAX_K = 100
"""Top tokens kept per (site, position): each is decoded and written to the report."""


def check_k(k: int) -> None:
    """Refuse a number of top tokens below 1 or above ``MAX_K``."""
    if not 1 <= k <= MAX_K:
        raise MechscopeError(f"--k {k} must be from 1 to {MAX_K} (the top tokens shown per site and position).")


def check_text(value: object, name: str, who: str, optional: bool = False) -> None:
    """One sentence when ``value`` (the argument ``name`` of ``who``) is not a string (None
    too where ``optional``): a list of prompts, a tensor of ids or a token id fails deep in
    the tokenizer otherwise."""
    if isinstance(value, str) or (optional and value is None):
        return
    what = {"prompt": "one prompt as text, e.g. 'The Eiffel Tower is in the city of' (call it once per prompt)",
            "subject": "words of the prompt, e.g. 'The Eiffel Tower'",
            "control_subject": "another subject as text, e.g. 'Big Ben'"}.get(name, "a token as text, e.g. ' Paris'")
    raise MechscopeError(f"{who}'s {name} must be a str, {what}; got a {type(value).__name__}.")


def run_lens(model: Model, prompt: str, target: str | None = None, distractor: str | None = None, k: int = 5,
             tuned=None) -> LensResult:
    """Logit lens and DLA for ``prompt``.

    ``target``: the token to follow (default: the model's top prediction); ``distractor``: the
    contrast token of the DLA (default: the highest-logit token other than the target).
    ``tuned``: a ``TunedLens`` (checked against the model) read instead of the logit lens; its
    sites are the translators' hooks, and ``settings["logit_rank_last_position"]`` keeps the
    logit lens's rank of the target at the same sites for comparison.
    """
    from mechscope.lens.tuned import as_tuned_lens
    from mechscope.models import require_model

    require_model(model, "run_lens")
    check_text(prompt, "prompt", "run_lens")
    check_text(target, "target", "run_lens", optional=True)
    check_text(distractor, "distractor", "run_lens", optional=True)
    check_k(k)
    tuned = as_tuned_lens(tuned, model, "run_lens")
    tokens = encode_prompt(model, prompt)
    with torch.no_grad():
        logits = model(tokens)[0, -1].float()
    tid = single_token(model, target, prompt=prompt) if target is not None else int(logits.argmax())
    if distractor is not None:
        did = single_token(model, distractor, "distractor", prompt=prompt)
        if did == tid:
            raise MechscopeError(f"--distractor {distractor!r} is the target token itself; give another token to contrast with.")
    else:
        masked = logits.clone()
        masked[tid] = float("-inf")
        did = int(masked.argmax())
    extra: dict = {}
    if tuned is not None:
        tuned.check_fits(model)
        tuned = tuned.to(model.device)
        plain = logit_lens(model, tokens, tid, k=1)
        rows = {h: i for i, h in enumerate(plain.hooks)}
        extra = {"lens": "tuned", "tuned_lens": tuned.info.get("path"), "tuned_reads": tuned.reads,
                 "logit_rank_last_position": [int(plain.rank[rows[h], -1]) for h in tuned.hooks]}
    table = logit_lens(model, tokens, tid, k=k, tuned=tuned)
    sites = [site_name(h) for h in table.hooks] if tuned is None else [f"L{l}.{tuned.reads[6:]}" for l in range(tuned.n_layers)]
    dla = direct_logit_attribution(model, tokens, tid, did)
    dec = lambda i: token_texts(model.tokenizer, [int(i)])[0]  # noqa: E731
    top = table.top_ids.tolist()  # [site][pos][k]
    flat = token_texts(model.tokenizer, [i for site in top for pos in site for i in pos])
    k_top = len(top[0][0]) if top and top[0] else 0
    n_pos = len(top[0]) if top else 0
    top_tokens = [[flat[(s * n_pos + p) * k_top:(s * n_pos + p + 1) * k_top] for p in range(n_pos)] for s in range(len(top))]
    return LensResult(
        model=model.summary.to_dict(), prompt=prompt, tokens=model.to_str_tokens(tokens[0]), target=dec(tid), target_id=tid,
        distractor=dec(did), distractor_id=did, sites=sites, rank=table.rank, prob=table.prob,
        top_ids=table.top_ids, top_probs=table.top_probs, top_tokens=top_tokens, dla=dla,
        settings={"k": k, "target_given": target is not None, "distractor_given": distractor is not None, **extra},
    )
