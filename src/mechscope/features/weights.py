"""Global (input-independent) virtual weights between transcoder features (Ge et al. 2024).

Feature f of layer l writes its decoder row d_f into the residual stream; feature g of a later
layer l' reads the residual stream through its layer's second norm and its encoder column e_g.
Along the direct residual path (no attention, no MLP in between) the effect of f's activation
on g's pre-activation is

    w(f -> g) = (gamma_l' * d_f) . e_g / s

where gamma_l' is the norm's per-dimension weight and s its per-token scale. ``s`` depends on
the token, so the weights here leave it out (each is the effect at s = 1; compare weights into
the same layer, where s is shared): the strongest inputs of a feature are the largest |w| over
all earlier layers' features, its strongest outputs the largest over all later layers'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechscope.errors import MechscopeError
from mechscope.features.transcoder_set import TranscoderSet, mlp_input_norms

if TYPE_CHECKING:
    from mechscope.models import Model


def norm_weights(model: Model) -> list[Tensor]:
    """Each block's second norm's weight [d_model] (ones where the norm has none)."""
    return [g for g, _ in mlp_input_norms(model)]


def virtual_weights(tset: TranscoderSet, layer: int, feature: int, top: int = 20,
                    gammas: list[Tensor] | None = None) -> dict[str, list[dict]]:
    """The ``top`` strongest direct-path inputs and outputs of one feature (module docstring):
    ``{"inputs": [{layer, feature, weight}], "outputs": [...]}``, strongest |weight| first.
    ``gammas``: the second norms' weights (``norm_weights(model)``); without them, 1."""
    L = tset.n_layers
    if not 0 <= layer < L:
        raise MechscopeError(f"layer {layer} is out of range: the set has layers 0-{L - 1}.")
    d_sae = tset.layers[layer].cfg.d_sae
    if not 0 <= feature < d_sae:
        raise MechscopeError(f"feature {feature} is out of range: layer {layer} has features 0-{d_sae - 1}.")
    if top < 1:
        raise MechscopeError(f"--top must be at least 1, got {top}.")

    def gamma(i: int) -> Tensor:
        return gammas[i] if gammas is not None else torch.ones(tset.layers[i].cfg.d_in)

    def best(per_layer: list[tuple[int, Tensor]]) -> list[dict]:
        rows = [(float(v), li, int(f)) for li, w in per_layer for v, f in zip(*w.abs().topk(min(top, len(w))))]
        rows.sort(reverse=True)
        return [{"layer": li, "feature": f, "weight": float(dict(per_layer)[li][f])} for _, li, f in rows[:top]]

    with torch.no_grad():
        enc = tset.layers[layer].W_enc[:, feature].detach().float().cpu() * gamma(layer)  # [d]
        inputs = [(li, tset.layers[li].W_dec.detach().float().cpu() @ enc) for li in range(layer)]
        dec = tset.layers[layer].W_dec[feature].detach().float().cpu()  # [d]
        outputs = [(li, (dec * gamma(li)) @ tset.layers[li].W_enc.detach().float().cpu()) for li in range(layer + 1, L)]
    return {"inputs": best(inputs), "outputs": best(outputs)}
