"""Global (input-independent) virtual weights between transcoder features (Ge et al. 2024).

Feature f of layer l writes its decoder row d_f into the residual stream; feature g of a later
layer l' reads the residual stream through its layer's second norm and its encoder column e_g.
mechscope's transcoders read the *pure* normalised input (``ln2.hook_normalized``: before the
norm's gain and bias, ``mechscope.features.transcoder_set``), so along the direct residual path
(no attention, no MLP in between) the effect of f's activation on g's pre-activation is

    w(f -> g) = P d_f . e_g / s

with P the norm's centring (x - mean(x)) for LayerNorm and the identity for RMSNorm, and s its
per-token scale; the gain does not enter (session 20: an earlier version multiplied by it,
which a finite-difference check with non-unit gains exposed; ``tests/unit/test_attribution_graph.py``).
``s`` depends on the token, so the weights here leave it out (each is the effect at s = 1;
compare weights into the same layer, where s is shared): the strongest inputs of a feature are
the largest |w| over all earlier layers' features, its strongest outputs the largest over all
later layers'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechscope.errors import MechscopeError
from mechscope.features.transcoder_set import TranscoderSet

if TYPE_CHECKING:
    from mechscope.models import Model


def centred_norms(model: Model) -> list[bool]:
    """Whether each block's second norm centres its input (LayerNorm) or not (RMSNorm)."""
    from mechscope.models.unembed import norm_kind

    return [norm_kind(getattr(b.ln2, "_original_component", b.ln2)) == "layernorm" for b in model.bridge.blocks]


def virtual_weights(tset: TranscoderSet, layer: int, feature: int, top: int = 20, *,
                    centred: list[bool]) -> dict[str, list[dict]]:
    """The ``top`` strongest direct-path inputs and outputs of one feature (module docstring):
    ``{"inputs": [{layer, feature, weight}], "outputs": [...]}``, strongest |weight| first.
    ``centred``: per layer, whether its second norm centres (``centred_norms(model)``; required,
    so a LayerNorm model is never read as RMSNorm by omission)."""
    L = tset.n_layers
    if len(centred) != L:
        raise MechscopeError(f"centred has {len(centred)} entries but the set has {L} layers; pass centred_norms(model).")
    if not 0 <= layer < L:
        raise MechscopeError(f"layer {layer} is out of range: the set has layers 0-{L - 1}.")
    d_sae = tset.layers[layer].cfg.d_sae
    if not 0 <= feature < d_sae:
        raise MechscopeError(f"feature {feature} is out of range: layer {layer} has features 0-{d_sae - 1}.")
    if top < 1:
        raise MechscopeError(f"--top must be at least 1, got {top}.")

    def read(i: int, v: Tensor) -> Tensor:
        """What layer ``i``'s norm passes on of a residual direction ``v`` [..., d] (at scale 1)."""
        return v - v.mean(-1, keepdim=True) if centred[i] else v

    def best(per_layer: list[tuple[int, Tensor]]) -> list[dict]:
        rows = [(float(v), li, int(f)) for li, w in per_layer for v, f in zip(*w.abs().topk(min(top, len(w))))]
        rows.sort(reverse=True)
        return [{"layer": li, "feature": f, "weight": float(dict(per_layer)[li][f])} for _, li, f in rows[:top]]

    with torch.no_grad():
        enc = tset.layers[layer].W_enc[:, feature].detach().float().cpu()  # [d]
        inputs = [(li, read(layer, tset.layers[li].W_dec.detach().float().cpu()) @ enc) for li in range(layer)]
        dec = tset.layers[layer].W_dec[feature].detach().float().cpu()  # [d]
        outputs = [(li, read(li, dec) @ tset.layers[li].W_enc.detach().float().cpu()) for li in range(layer + 1, L)]
    return {"inputs": best(inputs), "outputs": best(outputs)}
