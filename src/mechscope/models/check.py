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
