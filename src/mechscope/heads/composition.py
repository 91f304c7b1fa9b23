"""Q-, K- and V-composition scores between heads of different layers (Elhage et al. 2021,
"A Mathematical Framework for Transformer Circuits").

For a writing head h1 (layer l1) and a reading head h2 (layer l2 > l1), with row-vector
weights (norms folded, ``heads.weights``), ``W_OV^1 = W_V^1 W_O^1`` and
``W_QK^2 = W_Q^2 W_K^2^T`` (both [d_model, d_model]):

    Q-composition  ||W_OV^1 W_QK^2||   / (||W_OV^1|| ||W_QK^2||)   (h1 writes what h2's query reads)
    K-composition  ||W_OV^1 W_QK^2^T|| / (||W_OV^1|| ||W_QK^2||)   (... what h2's key reads)
    V-composition  ||W_OV^1 W_OV^2||   / (||W_OV^1|| ||W_OV^2||)   (... what h2's value reads)

with Frobenius norms. Each product is ``V1 O1 A2 B2^T`` with (A2, B2) = (W_Q^2, W_K^2),
(W_K^2, W_Q^2) or (W_V^2, W_O^2^T), so its squared norm is computed in d_head-sized pieces:
``||V1 X B2^T||^2 = sum((G1 X) * (X H2))`` with ``X = O1 A2``, ``G1 = V1^T V1``,
``H2 = B2^T B2``, never forming a d_model x d_model matrix per pair. Under GQA, K and V
weights are per KV group and the query head picks its group. A previous-token head feeding an
induction head shows as a high K-composition pair.
"""

from __future__ import annotations

import torch

from mechscope.graph.names import head_node
from mechscope.heads.weights import HeadWeights

KINDS = ("q", "k", "v")


def _gram(a: torch.Tensor) -> torch.Tensor:
    """a [n, d_model, d_head] -> a^T a [n, d_head, d_head]."""
    return a.transpose(-1, -2) @ a


@torch.no_grad()
def composition_scores(w: HeadWeights) -> dict[str, torch.Tensor]:
    """{'q', 'k', 'v'} -> [n_layers, n_heads, n_layers, n_heads] scores (writer layer/head,
    reader layer/head); zero unless writer layer < reader layer."""
    L, H = w.n_layers, w.n_heads
    grp = torch.tensor([w.kv_group(h) for h in range(H)])
    Q, K, V, O = w.W_Q, w.W_K, w.W_V, w.W_O  # [H|G, D, e], O [H, e, D]
    GQ, GK, GV = [_gram(x) for x in Q], [_gram(x) for x in K], [_gram(x) for x in V]  # [H|G, e, e]
    GO = [o @ o.transpose(-1, -2) for o in O]  # [H, e, e] = B^T B for B = O^T
    ov_norm = [(torch.einsum("hab,hbd->had", GV[l][grp], O[l]) * O[l]).sum((1, 2)).sqrt() for l in range(L)]  # [H]
    qk_norm = [(GQ[l] * GK[l][grp]).sum((1, 2)).sqrt() for l in range(L)]  # [H]
    out = {k: torch.zeros(L, H, L, H) for k in KINDS}
    for l1 in range(L - 1):
        later = list(range(l1 + 1, L))
        n_later = len(later)
        GV1 = GV[l1][grp]  # [H1, e, e]
        # per kind: A2 stacked over the later layers (query heads for q, KV groups for k/v),
        # which A2 each reader head uses, its H2 = B2^T B2 and its norm
        offs = [i * w.n_kv_heads for i in range(n_later)]
        kv_idx = torch.tensor([o + int(g) for o in offs for g in grp])  # reader head -> row of K/V stack
        specs = {
            "q": (torch.cat([Q[l] for l in later]), None, torch.cat([GK[l][grp] for l in later]), torch.cat([qk_norm[l] for l in later])),
            "k": (torch.cat([K[l] for l in later]), kv_idx, torch.cat([GQ[l] for l in later]), torch.cat([qk_norm[l] for l in later])),
            "v": (torch.cat([V[l] for l in later]), kv_idx, torch.cat([GO[l] for l in later]), torch.cat([ov_norm[l] for l in later])),
        }
        for kind, (A2, idx, H2, n2) in specs.items():
            X = torch.einsum("ied,jdf->ijef", O[l1], A2)  # [H1, J, e, e]
            if idx is not None:
                X = X[:, idx]  # [H1, n_later * H, e, e]
            GX = torch.einsum("iab,ijbf->ijaf", GV1, X)
            XH = torch.einsum("ijaf,jfc->ijac", X, H2)
            num = (GX * XH).sum((-1, -2)).clamp_min(0).sqrt()  # [H1, n_later * H]
            score = num / (ov_norm[l1][:, None] * n2[None, :]).clamp_min(1e-30)
            out[kind][l1, :, l1 + 1 :, :] = score.view(H, n_later, H)
    return out


def top_pairs(comp: torch.Tensor, k: int = 20) -> list[dict]:
    """The ``k`` highest-scoring (writer, reader) pairs of one [L, H, L, H] score tensor."""
    L, H = comp.shape[:2]
    flat = comp.flatten()
    vals, idx = flat.topk(min(k, int((flat > 0).sum())))
    pairs = []
    for v, i in zip(vals.tolist(), idx.tolist()):
        l1, h1, l2, h2 = i // (H * L * H), (i // (L * H)) % H, (i // H) % L, i % H
        pairs.append({"writer": head_node(l1, h1), "reader": head_node(l2, h2), "score": v})
    return pairs
