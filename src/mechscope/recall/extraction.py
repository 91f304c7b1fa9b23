"""Attribute extraction (Geva et al. 2023, section 6): at the last position, project each
layer's attention output and MLP output (``hook_attn_out``, ``hook_mlp_out``) to the
vocabulary (final norm with the vector's own scale, then the unembedding) and record where the
attribute is the top token. Geva et al. found the attribute extracted mostly by upper-layer
attention (MHSA), much less often by MLPs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mechscope.models.hooks import attn_out, mlp_out
from mechscope.models.tokens import token_texts
from mechscope.models.unembed import final_norm, project
from mechscope.recall.engine import clean_states

if TYPE_CHECKING:
    from mechscope.models import Model


@dataclass
class Extraction:
    """Per layer [n_layers]: the attribute's rank in the projection of each sublayer output at
    the last position, and the top token id."""

    attn_rank: torch.Tensor
    mlp_rank: torch.Tensor
    attn_top: torch.Tensor
    mlp_top: torch.Tensor
    attn_top_tokens: list[str]
    mlp_top_tokens: list[str]

    def layers(self, which: str) -> list[int]:
        """Layers where the attribute is the top token of ``which`` ('attn' or 'mlp')."""
        r = self.attn_rank if which == "attn" else self.mlp_rank
        return (r == 0).nonzero()[:, 0].tolist()

    def to_dict(self) -> dict[str, Any]:
        """Every number as plain JSON (``recall.json``'s ``attribute_extraction``), the top tokens'
        ids too: two ids can decode to the same text."""
        return {
            "attn_rank": self.attn_rank.tolist(), "mlp_rank": self.mlp_rank.tolist(),
            "attn_top_token": self.attn_top_tokens, "mlp_top_token": self.mlp_top_tokens,
            "attn_top_id": self.attn_top.tolist(), "mlp_top_id": self.mlp_top.tolist(),
            "attn_layers": self.layers("attn"), "mlp_layers": self.layers("mlp"),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Extraction:
        """The extraction ``to_dict`` wrote, exactly: ranks and ids are int64, as
        ``attribute_extraction`` counts and finds them."""
        return cls(attn_rank=torch.tensor(d["attn_rank"], dtype=torch.int64), mlp_rank=torch.tensor(d["mlp_rank"], dtype=torch.int64),
                   attn_top=torch.tensor(d["attn_top_id"], dtype=torch.int64), mlp_top=torch.tensor(d["mlp_top_id"], dtype=torch.int64),
                   attn_top_tokens=list(d["attn_top_token"]), mlp_top_tokens=list(d["mlp_top_token"]))


@torch.no_grad()
def attribute_extraction(model: Model, tokens: torch.Tensor, target_id: int) -> Extraction:
    """Extraction events of one prompt, tokens [1, pos]."""
    L = model.summary.n_layers
    hook_of = {"attn": attn_out, "mlp": mlp_out}
    hooks = [hook_of[k](l) for k in ("attn", "mlp") for l in range(L)]
    st = clean_states(model, tokens, hooks)
    norm = final_norm(model)
    out: dict[str, Any] = {}
    for k in ("attn", "mlp"):
        x = torch.stack([st[hook_of[k](l)][-1] for l in range(L)])  # [L, d_model]
        logits = project(model, x, norm)  # [L, d_vocab]
        out[k + "_rank"] = (logits > logits[:, target_id : target_id + 1]).sum(-1).cpu()
        out[k + "_top"] = logits.argmax(-1).cpu()
        out[k + "_top_tokens"] = token_texts(model.tokenizer, out[k + "_top"].tolist())
    return Extraction(**out)
