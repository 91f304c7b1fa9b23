"""Causal effect of heads on induction: loss on the repeated half under mean ablation.

On ``prefix + R + R`` (``heads.sequences.repeated_random``) the loss is the mean next-token
cross-entropy at the positions of the second copy whose next token is predictable (R[1..]).
Mean-ablating head h of layer l replaces its output ``z`` (``blocks.l.attn.hook_z``
[batch, pos, head, d_head], before W_O) at every position by its mean over the batch at that
position, so the head keeps its average, position-dependent contribution but loses all
information about the particular tokens (Olsson et al. 2022 use the same ablation).

- ``ablation_effects``: loss increase when each listed head alone is ablated;
- ``topk_vs_random``: loss increase when the top-k heads of a ranking are ablated together,
  against the mean over ``n_random`` sets of k heads drawn at random.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from mechscope.graph.names import head_node
from mechscope.models import plain_attention
from mechscope.models.hooks import attn_z, hook_layer

Head = tuple[int, int]


def repeated_half_loss(logits: torch.Tensor, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Mean CE [] over the predictable positions of the second copy; logits [b, pos, vocab],
    tokens [b, pos] = prefix + R + R with |R| = ``length``."""
    start = tokens.shape[1] - length  # position of R[0] in the second copy
    lp = logits[:, start:-1].log_softmax(-1)  # predicts R[1..]
    return -lp.gather(-1, tokens[:, start + 1 :, None].to(lp.device)).mean()


@torch.no_grad()
def head_means(model: Any, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the mean of ``hook_z`` over the batch: [pos, n_heads, d_head]."""
    L = model.summary.n_layers
    means: list[torch.Tensor] = [torch.empty(0)] * L

    def hook(z, hook):
        means[hook_layer(hook.name)] = z.detach().mean(0)
        return z

    with plain_attention(model):
        model.bridge.run_with_hooks(tokens.to(model.device), fwd_hooks=[(attn_z(l), hook) for l in range(L)])
    return means


@torch.no_grad()
def ablated_loss(model: Any, tokens: torch.Tensor, length: int, heads: Iterable[Head], means: list[torch.Tensor]) -> float:
    """Repeated-half loss with ``heads`` mean-ablated together (none: the clean loss)."""
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)

    def make(l: int):
        idx = torch.tensor(by_layer[l])

        def hook(z, hook):
            z = z.clone()
            z[:, :, idx] = means[l][None, :, idx].to(z.dtype)
            return z

        return hook

    with plain_attention(model):
        logits = model.bridge.run_with_hooks(
            tokens.to(model.device), fwd_hooks=[(attn_z(l), make(l)) for l in by_layer]
        )
    return float(repeated_half_loss(logits, tokens, length))


def ablation_effects(model: Any, tokens: torch.Tensor, length: int, heads: list[Head]) -> dict[str, float]:
    """{'a{l}.h{h}': loss increase} for each head ablated alone, and the clean loss."""
    means = head_means(model, tokens)
    clean = ablated_loss(model, tokens, length, [], means)
    out = {"clean_loss": clean}
    for l, h in heads:
        out[head_node(l, h)] = ablated_loss(model, tokens, length, [(l, h)], means) - clean
    return out


def topk_vs_random(model: Any, tokens: torch.Tensor, length: int, ranking: list[Head], k: int,
                   n_random: int = 5, seed: int = 0) -> dict[str, Any]:
    """Loss increase from ablating the first ``k`` heads of ``ranking`` together vs random k-sets
    drawn from the other heads (from every head only where fewer than ``k`` others exist, which
    ``random_from`` records): a random set that holds a top head would measure part of the top
    set's own effect."""
    means = head_means(model, tokens)
    clean = ablated_loss(model, tokens, length, [], means)
    top = ranking[:k]
    top_inc = ablated_loss(model, tokens, length, top, means) - clean
    L, H = model.summary.n_layers, model.summary.n_heads
    g = torch.Generator().manual_seed(seed)
    chosen = {(int(l), int(h)) for l, h in top}
    others = [(i // H, i % H) for i in range(L * H) if (i // H, i % H) not in chosen]
    pool = others if len(others) >= k else [(i // H, i % H) for i in range(L * H)]
    rand = []
    for _ in range(n_random):
        pick = torch.randperm(len(pool), generator=g)[:k].tolist()
        rand.append(ablated_loss(model, tokens, length, [pool[i] for i in pick], means) - clean)
    return {"k": k, "clean_loss": clean, "top_heads": [head_node(l, h) for l, h in top],
            "top_k_increase": top_inc, "random_increases": rand,
            "random_mean_increase": sum(rand) / max(len(rand), 1),
            "random_from": "other heads" if pool is others else "all heads"}
