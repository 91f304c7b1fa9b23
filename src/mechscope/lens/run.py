"""``run_lens``: logit lens + direct logit attribution of one prompt, as one ``LensResult``."""

from __future__ import annotations

import torch

from mechscope.errors import MechscopeError
from mechscope.lens.dla import direct_logit_attribution
from mechscope.lens.logit_lens import logit_lens, site_names
from mechscope.lens.result import LensResult
from mechscope.models.prompt import encode_prompt, single_token


def check_k(k: int) -> None:
    """Refuse a number of top tokens below 1."""
    if k < 1:
        raise MechscopeError(f"--k {k} must be at least 1.")


def run_lens(model, prompt: str, target: str | None = None, distractor: str | None = None, k: int = 5) -> LensResult:
    """Logit lens and DLA for ``prompt``.

    ``target``: the token to follow (default: the model's top prediction); ``distractor``: the
    contrast token of the DLA (default: the highest-logit token other than the target).
    """
    check_k(k)
    tokens = encode_prompt(model, prompt)
    with torch.no_grad():
        logits = model(tokens)[0, -1].float()
    tid = single_token(model, target) if target is not None else int(logits.argmax())
    if distractor is not None:
        did = single_token(model, distractor, "distractor")
    else:
        masked = logits.clone()
        masked[tid] = float("-inf")
        did = int(masked.argmax())
    table = logit_lens(model, tokens, tid, k=k)
    dla = direct_logit_attribution(model, tokens, tid, did)
    dec = lambda i: model.tokenizer.decode([int(i)])  # noqa: E731
    top_tokens = [[[dec(i) for i in pos] for pos in site] for site in table.top_ids.tolist()]
    return LensResult(
        model=model.summary.to_dict(), prompt=prompt, tokens=model.to_str_tokens(tokens[0]), target=dec(tid), target_id=tid,
        distractor=dec(did), distractor_id=did, sites=site_names(model.summary.n_layers), rank=table.rank, prob=table.prob,
        top_ids=table.top_ids, top_probs=table.top_probs, top_tokens=top_tokens, dla=dla,
        settings={"k": k, "target_given": target is not None, "distractor_given": distractor is not None},
    )
