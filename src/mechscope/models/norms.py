"""The linear part of a model's norm modules, for folding into the weights around them.

A norm ``y = w * (x - mean) / scale (+ b)`` is linear in ``x`` up to its per-token scale, so
weight-based readings (head scores' folded ``W_O``, a neuron's output direction) fold ``diag(w)``
(with centring for LayerNorm) and leave the positive per-token ``1/scale`` out: it rescales a
direction, and changes no ranking of the tokens it promotes.
"""

from __future__ import annotations

from typing import Any

import torch


def norm_module(component: Any) -> Any:
    """The Hugging Face module inside a TransformerLens bridge component (or the module itself)."""
    return getattr(component, "original_component", component)


def norm_matrix(norm: Any, d_model: int) -> torch.Tensor:
    """The linear part of a norm module as a [d_model, d_model] matrix acting on row vectors
    (Gemma's norms scale by ``1 + w``), on CPU in float32."""
    w = getattr(norm, "weight", None)
    w = torch.ones(d_model) if w is None else w.detach().float().cpu()
    if "gemma" in type(norm).__name__.lower():
        w = 1.0 + w
    mat = torch.diag(w)
    if isinstance(norm, torch.nn.LayerNorm) or getattr(norm, "bias", None) is not None:
        centre = torch.eye(d_model) - torch.full((d_model, d_model), 1.0 / d_model)
        mat = centre @ mat
    return mat
