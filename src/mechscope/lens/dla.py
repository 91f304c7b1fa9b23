"""Direct logit attribution (DLA): each component's direct contribution to
logit(target) - logit(distractor) at one position.

The residual stream entering the final norm is a sum of component outputs (decisions.md:
exact on the bridge):

    x = embed (+ pos_embed) + sum_{l,h} head_{l,h} + sum_l b_O[l] + sum_l mlp_l

Following the field's convention (e.g. TransformerLens's ``apply_ln_to_stack``), the final
norm's scale s is *frozen* at its value on the clean run at that position, which makes the
map x -> logits linear:

    logit_diff = sum_c (w * centre(c) / s) . (W_U[:, t] - W_U[:, d])
                 + b_norm . (W_U[:, t] - W_U[:, d]) + b_U[t] - b_U[d]

(``centre`` subtracts the mean for LayerNorm, is the identity for RMSNorm). The contributions
therefore sum to the real logit difference; ``DLA.error`` records how closely (float error).
A model that soft-caps its logits (Gemma 2: ``c * tanh(raw / c)``) is decomposed before the cap:
``actual`` is then the raw logit difference (the cap is monotonic, so the order of the logits is
the same) and ``soft_cap`` records c.
Head outputs are z_h @ W_O[h] from ``attn.hook_z``, which needs no per-head result mode; where
a norm follows the attention (Gemma 2 and 3, OLMo-2), each head's share of that norm's output at
this run's scale (``models.norms.HeadShares``), which adds up to what the attention adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mechscope.graph.names import head_node, mlp_node
from mechscope.models.hooks import EMBED, FINAL_NORM_IN, POS_EMBED, attn_z, mlp_out, resid_pre
from mechscope.models.norms import head_shares, residual_multiplier
from mechscope.models.tokens import check_position, check_token_id, one_prompt
from mechscope.models.unembed import final_norm, project, unembed_weights

if TYPE_CHECKING:
    from mechscope.models import Model


@dataclass
class DLA:
    """Direct contributions to logit(target) - logit(distractor) at ``position``.

    ``heads`` [n_layers, n_heads], ``mlps`` [n_layers]; ``other`` holds the embedding terms,
    attention output biases and the constant (norm bias + unembedding bias) term.
    """

    position: int
    heads: torch.Tensor
    mlps: torch.Tensor
    other: dict[str, float] = field(default_factory=dict)
    total: float = 0.0  # sum of every contribution
    actual: float = 0.0  # the model's own logit difference (before its soft-cap, if it has one)
    error: float = 0.0  # |total - actual|
    soft_cap: float = 0.0  # the model's logit soft-cap c (0: none); then the logits are read before it

    def components(self) -> list[tuple[str, float]]:
        """Every component as (name, contribution): a{l}.h{h}, m{l} and the other terms."""
        L, H = self.heads.shape
        out = [(head_node(l, h), float(self.heads[l, h])) for l in range(L) for h in range(H)]
        out += [(mlp_node(l), float(self.mlps[l])) for l in range(L)]
        out += list(self.other.items())
        return out

    @property
    def exact(self) -> bool:
        """Whether the contributions add up to the model's logit difference (float error only).
        Measured, not assumed: heads are read as their shares of a norm after the attention
        (Gemma 2 and 3, OLMo-2) and MLPs after theirs, so those add up; something else between a
        component's output and the residual stream would not."""
        return self.error <= 1e-3 * max(1.0, abs(self.actual))

    def note(self) -> str:
        """'' where exact and uncapped; else why the contributions do not add up, and what a soft-cap means."""
        capped = (f"The model soft-caps its logits (c * tanh(logit / c), c = {self.soft_cap:g}); the contributions "
                  "decompose the logit difference before the cap, which keeps the logits' order." if self.soft_cap > 0 else "")
        if self.exact:
            return capped
        return (capped + " " if capped else "") + (f"The contributions do not add up to the logit difference (error {self.error:.2g} of {self.actual:.3g}): "
                "something in this model transforms what attention or an MLP writes before adding it to the residual "
                "stream, so a component's output is not its direct effect; read these shares as approximate.")

    def top(self, k: int = 20) -> list[tuple[str, float]]:
        """The k components with the largest |contribution|."""
        return sorted(self.components(), key=lambda c: -abs(c[1]))[:k]


def _component_hooks(L: int) -> set[str]:
    names = {EMBED, POS_EMBED, resid_pre(0), FINAL_NORM_IN}
    for l in range(L):
        names |= {attn_z(l), mlp_out(l)}
    return names


@torch.no_grad()
def direct_logit_attribution(model: Model, tokens: torch.Tensor, target_id: int, distractor_id: int, position: int = -1) -> DLA:
    """DLA of one prompt, tokens [1, pos] (or its list of ids), at ``position`` (default the last)."""
    tokens = one_prompt(model, tokens, "direct_logit_attribution")
    target_id = check_token_id(model, target_id, "direct_logit_attribution")
    distractor_id = check_token_id(model, distractor_id, "direct_logit_attribution", "distractor_id")
    L = model.summary.n_layers
    wanted = _component_hooks(L)
    logits, cache = model.bridge.run_with_cache(tokens.to(model.device), names_filter=lambda n: n in wanted)
    p = check_position(position, tokens.shape[1], "direct_logit_attribution")
    norm = final_norm(model)
    W_U, b_U = unembed_weights(model)
    direction = W_U[:, target_id] - W_U[:, distractor_id]  # [d_model]
    scale = norm.scale(cache[FINAL_NORM_IN][0, p])  # [1], frozen

    def contrib(x: torch.Tensor) -> torch.Tensor:  # x [..., d_model] -> [...]
        return norm.linear(x, scale) @ direction

    other: dict[str, float] = {}
    resid0 = cache[resid_pre(0)][0, p]
    if EMBED in cache and POS_EMBED in cache and torch.allclose(
        cache[EMBED][0, p] + cache[POS_EMBED][0, p], resid0, atol=1e-5
    ):
        other["embed"] = float(contrib(cache[EMBED][0, p]))
        other["pos_embed"] = float(contrib(cache[POS_EMBED][0, p]))
    else:
        other["embed"] = float(contrib(resid0))
    heads = torch.zeros(L, model.summary.n_heads)
    mlps = torch.zeros(L)
    shares = head_shares(model)
    mult = residual_multiplier(model)  # Granite scales what attention writes; hook_mlp_out already holds it
    bias_total = 0.0
    for l in range(L):
        attn = model.bridge.blocks[l].attn
        z = cache[attn_z(l)][0, p]  # [n_heads, d_head]
        out = torch.einsum("he,hed->hd", z.float(), attn.W_O.detach().float())  # [n_heads, d_model]
        share = shares[l]
        if share is not None:  # a norm after the attention: each head's share of its output
            out = share(out)
        heads[l] = contrib(out * mult).cpu()
        b_O = getattr(attn, "b_O", None)
        if b_O is not None:
            bias_total += float(contrib(b_O.detach().float() * mult))
        mlps[l] = float(contrib(cache[mlp_out(l)][0, p]))
    if bias_total:
        other["attn_biases"] = bias_total
    const = 0.0
    if norm.bias is not None:
        const += float(norm.bias @ direction)
    if b_U is not None:
        const += float(b_U[target_id] - b_U[distractor_id])
    if const:
        other["final_biases"] = const
    total = float(heads.sum() + mlps.sum()) + sum(other.values())
    raw = logits[0, p] if norm.soft_cap <= 0 else project(model, cache[FINAL_NORM_IN][0, p], norm, capped=False)
    actual = float(raw[target_id] - raw[distractor_id])
    return DLA(position=p, heads=heads, mlps=mlps, other=other, total=total, actual=actual, error=abs(total - actual),
               soft_cap=norm.soft_cap)
