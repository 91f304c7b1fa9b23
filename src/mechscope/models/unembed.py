"""The model's final norm and unembedding, applied to any residual-stream vector.

Used by the logit lens (project a hidden state to the vocabulary through the final norm, with
the vector's own scale) and by direct logit attribution (the final norm with a *frozen* scale,
which makes the map from residual stream to logits linear, so component contributions sum
exactly to the logits).

Supported final norms: LayerNorm (GPT-2: ``w * (x - mean(x)) / s + b``, ``s = sqrt(var(x) +
eps)``) and RMSNorm (Llama/SmolLM2: ``w * x / s``, ``s = sqrt(mean(x^2) + eps)``; Gemma's with
``1 + w``). A logit scale (Cohere) is folded into the unembedding (``unembed_weights``); logit
soft-capping (Gemma 2: ``c * tanh(logits / c)`` after the unembedding) is
applied by ``project``; readers that decompose logits linearly (direct logit attribution) read
the logits *before* the cap, which keeps their order, and say so.
``final_norm(model)`` reads the weights from the bridge and ``check_matches`` compares against
the model's own ``ln_final.hook_out``, so an unsupported variant fails loudly, never silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from mechscope.errors import MechscopeError

if TYPE_CHECKING:
    from mechscope.models import Model


@dataclass
class FinalNorm:
    """Parameters of the final norm; ``weight``/``bias`` [d_model] (bias None for RMSNorm)."""

    kind: Literal["layernorm", "rmsnorm"]
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    soft_cap: float = 0.0
    """The model's logit soft-cap c (Gemma 2: logits = c * tanh(raw / c)); 0 where there is none."""

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits from the unembedding's raw output: ``soft_cap * tanh(raw / soft_cap)``
        where the model caps them, else ``logits`` itself."""
        return logits if self.soft_cap <= 0 else self.soft_cap * torch.tanh(logits / self.soft_cap)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's scale s of x [..., d_model] -> [..., 1]."""
        x = x.float()
        if self.kind == "layernorm":
            return (x.var(-1, keepdim=True, unbiased=False) + self.eps).sqrt()
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def linear(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The norm's linear part with a given (frozen) scale: no bias. x [..., d_model]."""
        x = x.float()
        if self.kind == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        return self.weight * x / scale

    def __call__(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise x [..., d_model], with its own scale unless ``scale`` is given."""
        out = self.linear(x, self.scale(x) if scale is None else scale)
        return out + self.bias if self.bias is not None else out


def norm_kind(mod: torch.nn.Module) -> Literal["layernorm", "rmsnorm"]:
    """Whether a Hugging Face norm module centres its input (LayerNorm) or not (RMSNorm):
    ``nn.LayerNorm`` (with or without bias), or a class without "RMS" in its name that has a
    bias or is named a LayerNorm (Cohere's bias-free ``CohereLayerNorm`` centres), centres;
    anything else is read as RMSNorm. The final norm, and the transcoders' view of each block's
    second norm (``features.weights``), both go by this."""
    name = type(mod).__name__.upper()
    centres = isinstance(mod, torch.nn.LayerNorm) or (
        "RMS" not in name and ("bias" in dict(mod.named_parameters()) or "LAYERNORM" in name))
    return "layernorm" if centres else "rmsnorm"


def final_norm(model: Model, ranks_only: bool = False) -> FinalNorm:
    """The final norm of ``model`` as a ``FinalNorm`` (with the model's logit soft-cap, if any),
    or a clear error for other norms. ``ranks_only``: the caller reads only the order of the
    logits (top tokens), so the check against the model's logits is skipped."""
    mod = model.bridge.ln_final
    orig = getattr(mod, "_original_component", mod)
    name = type(orig).__name__
    params = dict(orig.named_parameters())
    weight = params.get("weight")
    if weight is None and "LAYERNORM" in name.upper() and not params:  # OLMo's LayerNorm has no parameters
        weight = torch.ones(int(model.summary.d_model), device=model.device)
    if weight is None:
        raise MechscopeError(f"The model's final norm ({name}) has no weight; only LayerNorm and RMSNorm are supported.")
    eps = getattr(orig, "eps", None) or getattr(orig, "variance_epsilon", None) or getattr(model.bridge.cfg, "eps", None) or 1e-5
    cap = float(getattr(model.bridge.cfg, "output_logits_soft_cap", 0.0) or 0.0)
    w = weight.detach().float()
    if "Gemma" in name:  # Gemma's RMSNorm scales by 1 + weight
        w = 1.0 + w
    kind = norm_kind(orig)
    bias = params.get("bias")
    norm = FinalNorm(kind=kind, weight=w, bias=None if bias is None else bias.detach().float(), eps=float(eps),
                     soft_cap=max(cap, 0.0))
    _verify(model, norm, ranks_only)
    return norm


_VERIFIED = "_mechscope_unembed_checked"


@torch.no_grad()
def _verify(model: Model, norm: FinalNorm, ranks_only: bool) -> None:
    """Once per model, on one short random input: ``norm`` must reproduce the model's own final
    norm output and, unless only ranks are read, ``project`` the model's logits. Anything
    between the final norm and the logits that mechscope does not model (a norm variant, a
    multiplier that is not a plain number) is then one sentence here, for the lens, DLA, recall, the tuned
    lens and every other reader of the unembedding, never silently wrong figures."""
    done = model.__dict__.setdefault(_VERIFIED, set())
    if ranks_only in done or False in done:  # a full check (ranks_only False) covers a ranks-only one
        return
    from mechscope.models.hooks import FINAL_NORM_IN, FINAL_NORM_OUT

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, max(2, min(int(model.summary.d_vocab), 1000)), (1, 6), generator=g).to(model.device)
    logits, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n in (FINAL_NORM_IN, FINAL_NORM_OUT))
    half = model.summary.dtype in ("float16", "bfloat16")
    tol = 2e-2 if half else 1e-3
    check_matches(norm, cache[FINAL_NORM_IN][0], cache[FINAL_NORM_OUT][0], tol)
    if not ranks_only:
        got, want = project(model, cache[FINAL_NORM_IN][0], norm), logits[0].float().to(norm.weight.device)
        err = float((got - want).abs().max())
        if err > tol * max(1.0, float(want.abs().max())):
            raise MechscopeError(
                f"mechscope's reading of {model.summary.architecture}'s unembedding (final norm, then W_U and its bias) differs "
                f"from the model's logits by {err:.2g}: something between them is not modelled (a logit scale or offset?), so the "
                "lens, direct logit attribution and the methods reading logits through them do not support this model; use another model."
            )
    done.add(ranks_only)


def check_matches(norm: FinalNorm, resid: torch.Tensor, normalized: torch.Tensor, tol: float = 1e-3) -> None:
    """Raise unless ``norm(resid)`` reproduces the model's own final-norm output: to ``tol``
    relative, or on a model run in 16-bit floats to 8 of that format's epsilons (the model rounds
    its own norm's output there: 0.0076 apart on a bfloat16 load, which is no other variant)."""
    half = normalized.dtype in (torch.float16, torch.bfloat16)
    if half:
        tol = max(tol, 8 * torch.finfo(normalized.dtype).eps)
    err = (norm(resid) - normalized.float()).abs().max().item()
    ref = normalized.float().abs().max().item() or 1.0
    if err > tol * max(1.0, ref):
        raise MechscopeError(
            f"mechscope's reading of the final norm (as a {norm.kind}) differs from the model's by {err:.2g}; "
            "this norm variant is not supported by the lens and the methods that read logits through it; use another model."
        )


def logit_scale(model: Model) -> float:
    """The number the model multiplies its unembedding's output by: Cohere's ``logit_scale``,
    or 1 / Granite's ``config.logits_scaling``; 1.0 where there is none (or it is not a plain
    number)."""
    hf = getattr(model.bridge, "original_model", None)
    s = getattr(hf, "logit_scale", None)
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s)
    d = getattr(getattr(hf, "config", None), "logits_scaling", None)
    if isinstance(d, (int, float)) and not isinstance(d, bool) and d:
        return 1.0 / float(d)
    return 1.0


def _raw_unembedding(model: Model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The bridge's W_U [d_model, d_vocab] and b_U [d_vocab] (or None), without the logit scale."""
    b_U = getattr(model.bridge, "b_U", None)
    return model.bridge.W_U.detach().float(), (None if b_U is None else b_U.detach().float())


def unembed_weights(model: Model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W_U [d_model, d_vocab] and b_U [d_vocab] (None when the model has no unembedding bias),
    with the model's logit scale (``logit_scale``) folded in, so that they give its logits."""
    W_U, b_U = _raw_unembedding(model)
    s = logit_scale(model)
    if s != 1.0:
        W_U, b_U = W_U * s, (None if b_U is None else b_U * s)
    return W_U, b_U


def project(model, x: torch.Tensor, norm: FinalNorm | None = None, capped: bool = True) -> torch.Tensor:
    """Logits [..., d_vocab] of hidden states x [..., d_model] through the final norm (own
    scale), the unembedding and (unless ``capped`` is False) the model's logit soft-cap: the
    logit lens."""
    norm = norm or final_norm(model)
    W_U, b_U = _raw_unembedding(model)  # the scale multiplies the [..., d_vocab] output, not a copy of W_U on every call
    out = norm(x.to(W_U.device)) @ W_U
    out = out + b_U if b_U is not None else out
    s = logit_scale(model)
    out = out * s if s != 1.0 else out
    return norm.cap(out) if capped else out
