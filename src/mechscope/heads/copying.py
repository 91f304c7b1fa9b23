"""Copying scores of every head's OV circuit (Elhage et al. 2021; Olsson et al. 2022).

The full OV circuit of head h in layer l maps a source token to the logits it raises when
attended to: ``OV_full = W_E W_V[g(h)] W_O[h] W_U`` [d_vocab, d_vocab] (norms folded, see
``heads.weights``; g(h) is h's KV group).

1. Eigenvalue copying score (Olsson et al., Elhage et al.): ``sum(lambda) / sum(|lambda|)``
   over the eigenvalues of OV_full, in [-1, 1]; positive when the head raises the logits of
   the tokens it attends to. The non-zero eigenvalues of ``A B`` and ``B A`` coincide, so
   they are computed from the [d_head, d_head] matrix ``W_O[h] (W_U W_E) W_V[g]`` instead of
   the vocab-sized one.
2. Top-1 copying rate: the share of sampled source tokens t whose own logit is the largest
   row entry of OV_full[t, S], over the same sample S of ``n_tokens`` tokens (plain-word
   tokens where the tokenizer has them). The full-vocabulary row would cost
   d_head x d_model x d_vocab per head and token; restricting the competitors to S makes it
   a [|S|, |S|] product per head (chance: 1 / |S|).
"""

from __future__ import annotations

from typing import Any

import torch

from mechscope.heads.weights import HeadWeights


@torch.no_grad()
def eigen_copying(w: HeadWeights) -> torch.Tensor:
    """[n_layers, n_heads] ``sum(lambda) / sum(|lambda|)`` of each head's full OV circuit."""
    UE = (w.W_U @ w.W_E).double()  # [d_model, d_model]
    out = torch.zeros(w.n_layers, w.n_heads)
    for l in range(w.n_layers):
        for h in range(w.n_heads):
            g = w.kv_group(h)
            M = w.W_O[l][h].double() @ UE @ w.W_V[l][g].double()  # [d_head, d_head]
            ev = torch.linalg.eigvals(M)
            out[l, h] = float(ev.real.sum() / ev.abs().sum().clamp_min(1e-30))
    return out


@torch.no_grad()
def top1_copying(w: HeadWeights, token_ids: torch.Tensor) -> torch.Tensor:
    """[n_layers, n_heads] share of tokens in ``token_ids`` [S] that are the argmax of their
    own row of OV_full restricted to the columns ``token_ids``."""
    E = w.W_E[token_ids]  # [S, d_model]
    U = w.W_U[:, token_ids]  # [d_model, S]
    target = torch.arange(len(token_ids))
    out = torch.zeros(w.n_layers, w.n_heads)
    for l in range(w.n_layers):
        EV = torch.einsum("sd,gde->gse", E, w.W_V[l])  # [G, S, d_head]
        OU = torch.einsum("hed,ds->hes", w.W_O[l], U)  # [H, d_head, S]
        for h in range(w.n_heads):
            logits = EV[w.kv_group(h)] @ OU[h]  # [S, S]
            out[l, h] = (logits.argmax(-1) == target).float().mean()
    return out


def copying_tokens(model: Any, n: int, seed: int = 0) -> torch.Tensor:
    """A seeded sample of ``n`` token ids for the top-1 copying rate."""
    from mechscope.heads.sequences import sampling_vocab

    vocab = sampling_vocab(model.tokenizer, model.summary.d_vocab, 2)
    g = torch.Generator().manual_seed(seed)
    return vocab[torch.randperm(len(vocab), generator=g)[:n]].sort().values
