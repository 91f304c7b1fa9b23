"""One sentence when a public function is handed something other than a loaded model.

Notebook users pass a model name, a folder or a Hugging Face model where a ``mechscope`` model
is expected; without a check that fails deep inside with ``'str' object has no attribute
'summary'``. ``require_model`` says what was given and how to get the right thing.
"""

from __future__ import annotations

from typing import Any

from mechscope.errors import MechscopeError


def require_model(model: Any, who: str) -> None:
    """Refuse (one sentence) a ``model`` that is not a ``mechscope.models.Model``; ``who`` names
    the function, e.g. ``"discover"``."""
    from mechscope.models.load import Model

    if isinstance(model, Model):
        return
    what = type(model).__name__
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        hint = f"load it first: model = mechscope.load_model({str(model)!r})"
    elif hasattr(model, "config") and hasattr(model, "forward"):
        hint = "pass the folder it was saved to, or its name, to mechscope.load_model(...) and use the model that returns"
    else:
        hint = "get one from mechscope.load_model(...)"
    raise MechscopeError(f"{who} needs a model loaded by mechscope.load_model, got a {what}; {hint}.")


def require_float32(model: Any, who: str) -> None:
    """Refuse (one sentence) a model loaded in half precision (float16, bfloat16) for a method that keeps float32
    sums and buffers beside it (gradient attribution: EAP, EAP-IG). Found by a helper's sweep:
    ``load_model(path, dtype="float16")`` then ``edge_scores`` died in a dtype mismatch inside
    torch. ``load_model``'s default upcasts half-precision weights to float32 (logits within
    the weights' rounding, 4e-4 to 6e-3 relative on tiny models)."""
    dtype = str(getattr(getattr(model, "summary", None), "dtype", "float32")).replace("torch.", "")
    if dtype in ("float16", "bfloat16", "half"):  # float64 runs (tests compare it with float32)
        raise MechscopeError(f"{who} computes in float32 but this model was loaded in {dtype}; load it with "
                             "mechscope.load_model(..., dtype='float32') (the default, which upcasts half-precision weights).")


_EDITS = "_mechscope_attention_edits"  # cached per bridge: the measurement below, once


def attention_edits_reach_output(model: Any) -> bool:
    """Whether editing ``blocks.L.attn.hook_attn_scores`` and ``hook_pattern`` changes the
    model's output. Measured once per loaded model (cached on its bridge): one four-token
    pass with every layer's scores, then every layer's pattern, set to zero, each compared
    exactly with the clean logits. On OPT, GPT-J and GPT-Neo the bridge fires both hooks after
    the Hugging Face attention has already used the values, so an edit is discarded (with only
    a warning): attention knockout would report exactly 0 and a frozen replacement model would
    not hold its patterns. Session 39's architecture sweep found both."""
    import warnings

    import torch

    from mechscope.models.hooks import attn_pattern, attn_scores

    bridge = model.bridge
    cached = bridge.__dict__.get(_EDITS)
    if cached is not None:
        return bool(cached)
    L = model.summary.n_layers
    names = bridge.hook_dict
    tokens = torch.tensor([[1, 2, 3, 4]], device=model.device) % max(int(model.summary.d_vocab), 1)
    ok = True
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bridge's "edit is discarded" warning: the measurement says it
        clean = bridge(tokens)
        for site in (attn_scores, attn_pattern):
            hooks = [(site(layer), lambda x, hook: torch.zeros_like(x)) for layer in range(L) if site(layer) in names]
            if not hooks:
                ok = False
                break
            if torch.equal(bridge.run_with_hooks(tokens, fwd_hooks=hooks), clean):
                ok = False
                break
    bridge.__dict__[_EDITS] = ok
    return ok


def require_attention_edits(model: Any, who: str) -> None:
    """Refuse (one sentence) a model on which attention edits are discarded
    (``attention_edits_reach_output``) for a method that blocks or freezes attention."""
    if not attention_edits_reach_output(model):
        raise MechscopeError(f"{who} edits attention scores or patterns, but TransformerLens's bridge for "
                             f"{model.summary.architecture} fires those hooks after the attention has used them, so an "
                             "edit would change nothing; use a model of another architecture (Llama, Qwen2, Mistral, "
                             "Gemma, GPT-2 ...).")
