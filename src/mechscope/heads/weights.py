"""Per-head weights with the normalisation's linear part folded in (for OV/QK analyses).

A head in layer l reads ``norm_l(x)``; the logits read ``norm_f(x) W_U``. The weight-based
scores (copying, composition) fold the *linear* part of each norm into the weights:

- LayerNorm (``x -> (x - mean(x)) / sigma * w + b``): the centring projection
  ``P = I - 11^T / d`` and ``diag(w)``, so ``W_in' = P diag(w) W_in``;
- RMSNorm (``x / rms * w``; Gemma-style ``(1 + w)`` when the module says so): ``diag(w)``.

A model that normalises each attention output before adding it to the residual stream (Gemma 2
and 3, OLMo-2: ``ln1_post``) gets that norm's ``diag(w)`` folded into ``W_O`` the same way,
``W_O' = W_O diag(w)``; a block without an input norm (OLMo-2) reads the residual directly.

The per-token scale 1/sigma (1/rms) is left out: it is a positive scalar per position that
does not change which direction a head reads or writes, and norm biases, projection biases
and b_U are dropped (Elhage et al. 2021 work with the bias-free circuit too). Under
grouped-query attention query head h reads keys and values from KV group ``h // (H / G)``:
``W_K``/``W_V`` stay [G, d_model, d_head] and ``kv_group`` maps heads to groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mechscope.errors import MechscopeError
from mechscope.models.norms import norm_matrix, norm_module


@dataclass
class HeadWeights:
    """Folded weights of every layer (lists indexed by layer)."""

    W_Q: list[torch.Tensor]  # [H, d_model, d_head] (input norm folded)
    W_K: list[torch.Tensor]  # [G, d_model, d_head] (input norm folded)
    W_V: list[torch.Tensor]  # [G, d_model, d_head] (input norm folded)
    W_O: list[torch.Tensor]  # [H, d_head, d_model] (output norm folded, where the model has one)
    W_E: torch.Tensor  # [d_vocab, d_model]
    W_U: torch.Tensor  # [d_model, d_vocab] (final norm folded)
    n_heads: int
    n_kv_heads: int

    def kv_group(self, h: int) -> int:
        return h // (self.n_heads // self.n_kv_heads)

    @property
    def n_layers(self) -> int:
        return len(self.W_Q)


@torch.no_grad()
def head_weights(model: Any) -> HeadWeights:
    """Folded weights of ``model`` (a ``mechscope.models.Model``), on CPU in float32."""
    b, s = model.bridge, model.summary
    try:
        ln_f = norm_matrix(norm_module(b.ln_final), s.d_model)
    except AttributeError as exc:
        raise MechscopeError(f"The bridge of '{s.name}' exposes no final norm (ln_final); weight-based head scores need one.") from exc
    Q, K, V, O = [], [], [], []
    for l in range(s.n_layers):
        block = b.blocks[l]
        a = block.attn
        pre, post = getattr(block, "ln1", None), getattr(block, "ln1_post", None)
        ln = torch.eye(s.d_model) if pre is None else norm_matrix(norm_module(pre), s.d_model)  # [d_model, d_model]
        Q.append(torch.einsum("de,hef->hdf", ln, a.W_Q.detach().float().cpu()))
        K.append(torch.einsum("de,hef->hdf", ln, a.W_K.detach().float().cpu()))
        V.append(torch.einsum("de,hef->hdf", ln, a.W_V.detach().float().cpu()))
        W_O = a.W_O.detach().float().cpu()
        # a new tensor either way: callers may edit it, the model must not change
        O.append(W_O.clone() if post is None else torch.einsum("hfd,de->hfe", W_O, norm_matrix(norm_module(post), s.d_model)))
    W_U = ln_f @ b.W_U.detach().float().cpu()
    return HeadWeights(Q, K, V, O, b.W_E.detach().float().cpu().clone(), W_U, s.n_heads, s.n_kv_heads)
