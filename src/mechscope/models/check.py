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
