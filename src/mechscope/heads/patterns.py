"""Attention-pattern scores: previous-token, duplicate-token and induction (prefix matching).

After Olsson et al. 2022 ("In-context Learning and Induction Heads": prefix-matching score)
and TransformerLens's head detector. For a sequence of tokens t and a query position q, the
target keys are

- previous token: k = q - 1;
- duplicate token: every k < q with t[k] = t[q];
- induction (prefix matching): every 1 <= k <= q with t[k - 1] = t[q] and k - 1 < q: the token
  after an earlier occurrence of the current token.

A head's score is the share of its attention mass on the target keys, BOS excluded: key
position 0 (the BOS token, or the first token without one, where heads park attention as a
no-op) is left out of both the target and the total, and only query positions that have at
least one target count:

    score = sum_{b, q in Q} sum_{k in T(q)} A[b, q, k] / sum_{b, q in Q} sum_{k >= 1} A[b, q, k]

pooled over all sequences and query positions Q (so rows whose mass sits almost entirely on
BOS weigh little). Patterns come from ``blocks.L.attn.hook_pattern`` [batch, head, q, k],
which holds one pattern per query head under grouped-query attention too.
"""

from __future__ import annotations

from typing import Any

import torch

from mechscope.errors import MechscopeError
from mechscope.models import plain_attention
from mechscope.models.hooks import attn_pattern, hook_layer

KINDS = ("previous_token", "duplicate_token", "induction")


def check_heads_visible(model: Any) -> None:
    """Raise unless the bridge exposes an attention pattern hook for every layer."""
    names = getattr(model.bridge, "hook_dict", {})
    n = model.summary.n_layers
    if n < 1 or model.summary.n_heads < 1 or any(attn_pattern(l) not in names for l in range(n)):
        raise MechscopeError(
            f"The model '{model.summary.name}' has no attention heads TransformerLens's bridge can see "
            "(no blocks.L.attn.hook_pattern); head scores need a transformer with standard attention."
        )


def target_masks(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bool masks [batch, q, k] of the target keys of each score (key 0 never a target)."""
    b, p = tokens.shape
    q = torch.arange(p)[:, None]
    k = torch.arange(p)[None, :]
    same = tokens[:, :, None] == tokens[:, None, :]  # [b, q, k]: t[q] == t[k]
    not_bos = (k >= 1)[None]
    prev = ((k == q - 1)[None] & not_bos).expand(b, p, p)
    dup = same & (k < q)[None] & not_bos
    # induction: t[k-1] == t[q], k-1 < q, i.e. shift the duplicate-of-query mask one key right
    same_prev = torch.zeros_like(same)
    same_prev[:, :, 1:] = same[:, :, :-1]  # [b, q, k] = t[q] == t[k-1]
    ind = same_prev & (k <= q)[None] & ((k - 1) < q)[None] & not_bos
    return {"previous_token": prev, "duplicate_token": dup, "induction": ind}


@torch.no_grad()
def pattern_scores(model: Any, tokens: torch.Tensor, batch_size: int = 16, with_loss: bool = False) -> dict[str, torch.Tensor]:
    """Scores [n_layers, n_heads] for each kind in ``KINDS`` on ``tokens`` [n, pos], plus
    ``bos_mass``: the mean attention on key 0 (context for the BOS-excluded scores), and with
    ``with_loss`` the mean next-token loss per position ``token_loss`` [pos - 1] from the same
    forward passes (entry j predicts token j + 1)."""
    check_heads_visible(model)
    L, H = model.summary.n_layers, model.summary.n_heads
    num = {k: torch.zeros(L, H, dtype=torch.float64) for k in KINDS}
    den = {k: torch.zeros(L, H, dtype=torch.float64) for k in KINDS}
    bos = torch.zeros(L, H, dtype=torch.float64)
    rows = 0
    loss_sum = torch.zeros(tokens.shape[1] - 1, dtype=torch.float64)
    for s in range(0, len(tokens), batch_size):
        t = tokens[s : s + batch_size]
        masks = target_masks(t)
        has = {k: m.any(-1).to(model.device) for k, m in masks.items()}  # [b, q]
        where = {k: [i.to(model.device) for i in m.nonzero(as_tuple=True)] for k, m in masks.items()}  # sparse targets

        def hook(pattern, hook):  # pattern [b, h, q, k]
            l = hook_layer(hook.name)
            a = pattern.detach().float()
            rest = a[..., 1:].sum(-1)  # [b, h, q]: mass off key 0
            for kind in KINDS:
                bi, qi, ki = where[kind]
                num[kind][l] += a[bi, :, qi, ki].sum(0).double().cpu()  # [h]
                den[kind][l] += (rest * has[kind][:, None]).sum((0, 2)).double().cpu()
            bos[l] += a[..., 0].sum((0, 2)).double().cpu()
            return pattern

        with plain_attention(model):
            logits = model.bridge.run_with_hooks(t.to(model.device), fwd_hooks=[(attn_pattern(l), hook) for l in range(L)])
        if with_loss:
            tt = t.to(logits.device)
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tt[:, 1:], reduction="none")  # [b, pos-1]
            loss_sum += ce.sum(0).double().cpu()
        del logits
        rows += t.shape[0] * t.shape[1]
    out = {k: (num[k] / den[k].clamp_min(1e-12)).float() for k in KINDS}
    out["bos_mass"] = (bos / max(rows, 1)).float()
    if with_loss:
        out["token_loss"] = (loss_sum / len(tokens)).float()
    return out


@torch.no_grad()
def example_patterns(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Attention patterns [n_layers, n_heads, pos, pos] of one sequence ``tokens`` [pos]."""
    check_heads_visible(model)
    L = model.summary.n_layers
    out: list[torch.Tensor] = [torch.empty(0)] * L

    def hook(pattern, hook):
        out[hook_layer(hook.name)] = pattern[0].detach().float().cpu()
        return pattern

    with plain_attention(model):
        model.bridge.run_with_hooks(tokens[None].to(model.device), fwd_hooks=[(attn_pattern(l), hook) for l in range(L)])
    return torch.stack(out)
