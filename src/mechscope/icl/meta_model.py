"""The small model of the meta-learning setting, in plain torch (Minegishi et al. 2025):

- tokens of width d_model: an example is its class vector (dim) followed by a one-hot of its
  position (d_model - dim entries); a label is a learned label vector (dim) followed by the
  one-hot of its position;
- ``attn_layers`` causal attention layers, ``heads`` heads each (the paper: 2 layers, 1 head),
  no output projection (the heads' values, concatenated, are added to the residual stream),
  no LayerNorm, scores not scaled by sqrt(d_head);
- ``mlp_layers`` ReLU layers (d_model -> d_model) and a linear classifier over the N labels,
  read at the query (the last position).

``forward`` returns the query's logits, and the attention patterns when asked.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mechscope.icl.meta_config import MetaConfig


class MetaModel(nn.Module):
    def __init__(self, cfg: MetaConfig):
        super().__init__()
        self.cfg = cfg
        d, c = cfg.d_model, cfg.data
        self.d_head = d // cfg.heads
        self.label_emb = nn.Parameter(torch.randn(c.n_labels, c.dim) / math.sqrt(c.dim))  # [label, dim]
        # per layer: [heads, d_head, d_model]
        self.w_q = nn.ParameterList([nn.Parameter(torch.randn(cfg.heads, self.d_head, d) / math.sqrt(d)) for _ in range(cfg.attn_layers)])
        self.w_k = nn.ParameterList([nn.Parameter(torch.randn(cfg.heads, self.d_head, d) / math.sqrt(d)) for _ in range(cfg.attn_layers)])
        self.w_v = nn.ParameterList([nn.Parameter(torch.randn(cfg.heads, self.d_head, d) / math.sqrt(d)) for _ in range(cfg.attn_layers)])
        self.mlp = nn.ModuleList([nn.Linear(d, d) for _ in range(cfg.mlp_layers)])
        self.classifier = nn.Linear(d, c.n_labels)
        n = c.n_positions
        self.pos: torch.Tensor
        self.causal: torch.Tensor
        self.register_buffer("pos", torch.eye(d - c.dim)[:n], persistent=False)  # [pos, d_model - dim]
        self.register_buffer("causal", torch.ones(n, n).tril().bool(), persistent=False)  # [q, k]

    def embed(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Tokens [batch, pos, d_model] from examples ``x`` [batch, n_context + 1, dim] and
        context labels [batch, n_context]."""
        b, m, _ = x.shape
        lab = self.label_emb[labels]  # [batch, n_context, dim]
        content = torch.empty(b, 2 * m - 1, x.shape[-1], dtype=x.dtype, device=x.device)
        content[:, 0::2] = x
        content[:, 1::2] = lab
        return torch.cat([content, self.pos[: 2 * m - 1].expand(b, -1, -1)], dim=-1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor, return_attention: bool = False):
        """Logits of the query [batch, n_labels]; with ``return_attention`` also the patterns
        [attn_layers, batch, heads, q_pos, k_pos]."""
        h = self.embed(x, labels)  # [batch, pos, d_model]
        n = h.shape[1]
        mask = self.causal[:n, :n]
        patterns = []
        for wq, wk, wv in zip(self.w_q, self.w_k, self.w_v):
            q = torch.einsum("hed,bpd->bhpe", wq, h)
            k = torch.einsum("hed,bpd->bhpe", wk, h)
            v = torch.einsum("hed,bpd->bhpe", wv, h)
            scores = torch.einsum("bhqe,bhke->bhqk", q, k).masked_fill(~mask, float("-inf"))
            pattern = scores.softmax(dim=-1)  # [batch, heads, q, k]
            z = torch.einsum("bhqk,bhke->bqhe", pattern, v).flatten(2)  # [batch, pos, heads * d_head]
            h = h + z
            patterns.append(pattern)
        y = h[:, -1]  # the query [batch, d_model]
        for lin in self.mlp:
            y = torch.relu(lin(y))
        logits = self.classifier(y)
        return (logits, torch.stack(patterns)) if return_attention else logits
