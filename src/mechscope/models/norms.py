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
    mat = torch.diag(norm_gain(norm, d_model))
    if isinstance(norm, torch.nn.LayerNorm) or getattr(norm, "bias", None) is not None:
        centre = torch.eye(d_model) - torch.full((d_model, d_model), 1.0 / d_model)
        mat = centre @ mat
    return mat


def norm_gain(norm: Any, d_model: int) -> torch.Tensor:
    """The per-dimension gain of a norm module [d_model] (Gemma's norms scale by ``1 + w``), on
    CPU in float32."""
    w = getattr(norm, "weight", None)
    w = torch.ones(d_model) if w is None else w.detach().float().cpu()
    return 1.0 + w if "gemma" in type(norm).__name__.lower() else w


def norm_eps(norm: Any) -> float | None:
    """The epsilon a norm module adds to the mean square (or variance), or None if it has none
    under a known name."""
    for name in ("eps", "variance_epsilon", "epsilon"):
        v = getattr(norm, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


class HeadShares:
    """Each head's share of a norm that acts on the sum of the heads' outputs (Gemma 2 and 3,
    OLMo-2: ``ln1_post`` normalises the attention output before the residual add).

    The norm ``y = g * (o - centre(o)) / s(o) (+ b)`` of ``o = sum_h r_h`` is linear in the heads'
    outputs ``r_h`` once its per-token scale ``s(o)`` is fixed, so with the scale of the run
    itself each head contributes ``c_h = g * (r_h - centre(r_h)) / s(o)`` and ``sum_h c_h + b``
    is exactly what the block adds. The circuit graph's head senders are these shares: patching
    an edge swaps one head's share for its share in the source run, where every share carries
    the scale of the run it came from, so patching every edge gives the source run's sum exactly.
    (The norm's bias, if any, is the same constant in every run.)
    """

    def __init__(self, norm: Any, d_model: int, device: Any = None):
        eps = norm_eps(norm)
        if eps is None:
            raise ValueError(f"{type(norm).__name__} has no epsilon under a known name")
        self.eps = eps
        self.centred = isinstance(norm, torch.nn.LayerNorm) or getattr(norm, "bias", None) is not None
        self.gain = norm_gain(norm, d_model).to(device)

    def __call__(self, result: torch.Tensor) -> torch.Tensor:
        """Shares [..., h, d_model] of per-head outputs ``result`` [..., h, d_model] (any device,
        float32 arithmetic, returned in ``result``'s dtype)."""
        r = result.float()
        if self.centred:
            r = r - r.mean(-1, keepdim=True)
        inv = self.inv_scale(r.sum(-2, keepdim=True))
        gain = self.gain if self.gain.device == r.device else self.gain.to(r.device)
        return (r * inv * gain).to(result.dtype)

    def inv_scale(self, total: torch.Tensor) -> torch.Tensor:
        """1 / s(o) [..., 1] of the norm's input ``total`` [..., d_model] (the summed outputs)."""
        o = total.float()
        if self.centred:
            o = o - o.mean(-1, keepdim=True)
        return torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps)  # centred: the mean square is the variance

    def directions(self, rows: torch.Tensor) -> torch.Tensor:
        """Output rows [..., d_model] as the norm passes them on but for the scale ``inv_scale``:
        centred (a LayerNorm) and multiplied by the gain (a neuron's W_out row, a head's output)."""
        r = rows - rows.mean(-1, keepdim=True) if self.centred else rows
        return r * self.gain.to(r.device)


def head_shares(model: Any) -> list[HeadShares | None]:
    """Per layer, the ``HeadShares`` of a norm after its attention (None where the heads'
    outputs are added as they are, or where that norm names no epsilon: its heads are then read
    raw, which ``graph.block_layout`` refuses and DLA reports as not adding up). Whether the
    shares add up is measured by ``graph.block_layout``."""
    out: list[HeadShares | None] = []
    for block in model.bridge.blocks:
        post = getattr(block, "ln1_post", None)
        try:
            out.append(None if post is None else HeadShares(norm_module(post), model.summary.d_model, model.device))
        except ValueError:
            out.append(None)
    return out


def fit_norm(norm, d: int, device) -> tuple[str, torch.Tensor, float]:
    """("rms" | "ln" | "other", per-dimension scale [d], eps) of a norm module, by fitting it."""
    found = getattr(norm, "variance_epsilon", None)
    eps = float(getattr(norm, "eps", 1e-5) if found is None else found)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, d, generator=gen) * 3 + torch.randn(64, 1, generator=gen)).to(device)
    with torch.no_grad():
        y = norm(x).float()
        for kind in ("rms", "ln"):
            if kind == "rms":
                base = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            else:
                c = x - x.mean(-1, keepdim=True)
                base = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
            bc = base - base.mean(0)
            scale = (bc * (y - y.mean(0))).sum(0) / bc.pow(2).sum(0).clamp(min=1e-12)
            bias = y.mean(0) - scale * base.mean(0)
            err = (scale * base + bias - y).abs().max()
            if err <= 1e-4 * y.abs().max().clamp(min=1.0):
                return kind, scale, float(eps)
    return "other", torch.ones(d, device=device), float(eps)


def input_norm(model: Any, l: int) -> Any:
    """Block ``l``'s norm before the attention (the HF module), or None where it has none (OLMo-2)."""
    norm = getattr(model.bridge.blocks[l], "ln1", None)
    return None if norm is None else norm.original_component


def head_norm_modules(model: Any, l: int) -> tuple[Any, Any]:
    """Block ``l``'s query and key norm modules after the projections (Hugging Face's
    ``q_norm``/``k_norm``: per head in Qwen3 and Gemma 3, over all heads in OLMo-2), or None."""
    attn = model.bridge.blocks[l].attn.original_component
    out = []
    for name in ("q_norm", "k_norm"):
        mod = getattr(attn, name, None)
        out.append(getattr(mod, "original_component", mod))
    return out[0], out[1]


def residual_multiplier(model: Any) -> float:
    """The factor a block applies to what its attention and its MLP write before adding it to
    the residual stream (Granite's ``residual_multiplier``; 1 elsewhere). The bridge's
    ``hook_attn_out`` and ``hook_mlp_out`` include it; a head's ``z @ W_O`` and a neuron's row of
    ``W_out`` do not, so readers of those multiply by it (session 39: Granite's head DLA was
    1/multiplier too large)."""
    cfg = getattr(getattr(getattr(model, "bridge", None), "original_model", None), "config", None)
    m = getattr(cfg, "residual_multiplier", None)
    return float(m) if isinstance(m, (int, float)) and not isinstance(m, bool) else 1.0
