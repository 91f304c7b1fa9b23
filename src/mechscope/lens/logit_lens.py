"""Logit lens (nostalgebraist 2020): read every intermediate residual stream as if it were the
last one.

1. Run the prompt once, caching ``blocks.L.hook_resid_pre``, ``hook_resid_mid`` and
   ``hook_resid_post`` at every layer (3 * n_layers "sites").
2. Project each site's hidden state at every position through the model's final norm (with
   the state's own scale) and the unembedding: logits [site, pos, d_vocab].
3. Record the target's rank (0 = top) and probability and the top-k tokens per site and
   position. The last site (``resid_post`` of the last layer) reproduces the model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mechscope.errors import MechscopeError
from mechscope.models.hooks import FINAL_NORM_IN, FINAL_NORM_OUT, resid_mid, resid_post, resid_pre
from mechscope.models.tokens import check_token_id, one_prompt
from mechscope.models.unembed import check_matches, final_norm, project

if TYPE_CHECKING:
    from mechscope.models import Model

SITES = ("pre", "mid", "post")
_SITE_HOOK = {"pre": resid_pre, "mid": resid_mid, "post": resid_post}


def site_names(n_layers: int) -> list[str]:
    """['L0.pre', 'L0.mid', 'L0.post', 'L1.pre', ...]: rows of every lens table."""
    return [f"L{l}.{s}" for l in range(n_layers) for s in SITES]


def site_hooks(n_layers: int) -> list[str]:
    """Hook names of the rows of ``site_names``, in the same order."""
    return [_SITE_HOOK[s](l) for l in range(n_layers) for s in SITES]


def site_name(hook: str) -> str:
    """``blocks.3.hook_resid_mid`` -> ``L3.mid``."""
    layer, site = hook.split(".")[1], hook.rsplit("_", 1)[-1]
    return f"L{layer}.{site}"


@dataclass
class LensTable:
    """Logit-lens readout. ``rank``/``prob`` [site, pos] for the target; ``top_ids``/
    ``top_probs`` [site, pos, k]; ``logits`` [pos, d_vocab] of the model itself."""

    rank: torch.Tensor
    prob: torch.Tensor
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    logits: torch.Tensor
    resid_final: torch.Tensor  # [pos, d_model], input of the final norm
    hooks: list[str] = field(default_factory=list)
    """The hook of every row (``site_hooks`` less the sites the model does not have)."""


@torch.no_grad()
def logit_lens(model: Model, tokens: torch.Tensor, target_id: int, k: int = 5, tuned=None) -> LensTable:
    """Logit lens of one prompt, tokens [1, pos], for the token ``target_id``. With ``tuned``
    (a ``lens.tuned.TunedLens``), the tuned lens instead: the sites are the translators' hooks
    (``tuned.hooks``) and each state goes through its layer's translator before the decoding.
    ``tokens`` may also be the prompt's list of ids (``model.to_tokens``)."""
    tokens = one_prompt(model, tokens, "logit_lens")
    target_id = check_token_id(model, target_id, "logit_lens")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= model.summary.d_vocab:
        raise MechscopeError(f"logit_lens: k is the number of top tokens kept per site, 1..{model.summary.d_vocab}; got {k!r}.")
    L = model.summary.n_layers
    hooks = site_hooks(L) if tuned is None else tuned.hooks
    wanted = set(hooks) | {FINAL_NORM_IN, FINAL_NORM_OUT}
    logits, cache = model.bridge.run_with_cache(tokens.to(model.device), names_filter=lambda n: n in wanted)
    hooks = [h for h in hooks if h in cache]  # a block with attention and MLP in parallel has no resid_mid
    norm = final_norm(model)
    check_matches(norm, cache[FINAL_NORM_IN][0], cache[FINAL_NORM_OUT][0])
    ranks, probs, tids, tps = [], [], [], []
    for h in hooks:  # one site at a time: [pos, d_vocab] stays small
        x = cache[h][0] if tuned is None else tuned.translate(cache[h][0], tuned.layer_of(h))
        lp = project(model, x, norm).log_softmax(-1)  # [pos, d_vocab]
        tgt = lp[:, target_id]
        ranks.append((lp > tgt[:, None]).sum(-1))
        probs.append(tgt.exp())
        v, i = lp.topk(k, dim=-1)
        tids.append(i)
        tps.append(v.exp())
    return LensTable(
        rank=torch.stack(ranks).cpu(), prob=torch.stack(probs).cpu(), top_ids=torch.stack(tids).cpu(),
        top_probs=torch.stack(tps).cpu(), logits=logits[0].detach().float().cpu(),
        resid_final=cache[FINAL_NORM_IN][0].detach().float().cpu(), hooks=list(hooks),
    )
