"""A plain Hugging Face causal LM (no TransformerBridge) for the in-process explainer and simulator.

Why a second copy: the bridge wraps the model's modules for its hooks, and the wrapped model
does not fill a key/value cache (``past_key_values`` stays empty), so ``generate`` and a
shared-prefix forward pass through ``bridge.original_model`` would be wrong or recompute
everything. Describing needs no hooks, so it loads the same weights once more, unwrapped (135M
parameters: ~0.5 GB in float32), from the same source (``ModelSummary.source``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mechscope.errors import MechscopeError

if TYPE_CHECKING:
    from mechscope.models import Model


@dataclass
class PlainLM:
    """An unwrapped causal LM with its tokenizer."""

    hf: Any
    tokenizer: Any
    name: str

    @property
    def device(self) -> Any:
        return next(self.hf.parameters()).device


@functools.lru_cache(maxsize=2)
def _load(source: str | None, device: str) -> PlainLM:
    import torch

    from mechscope.models.load import _default_device, _load_hf, _quiet, _resolve

    display, target, gguf, local = _resolve(source)
    try:
        with _quiet():
            hf, tok = _load_hf(target, torch.float32, gguf, local)
    except (OSError, ValueError) as exc:
        raise MechscopeError(f"Could not load the model {source or display!r} for describing: {str(exc).splitlines()[0]}") from exc
    hf.eval()
    hf.to(device or _default_device())
    return PlainLM(hf=hf, tokenizer=tok, name=display)


def plain_lm(model: Model | None = None, device: str | None = None) -> PlainLM:
    """``model``: a ``PlainLM`` (returned as is), a loaded ``mechscope.models.Model`` (its source is
    loaded again, unwrapped, on its device) or a name as for ``load_model`` (None: embedded)."""
    if isinstance(model, PlainLM):
        return model
    if model is not None and hasattr(model, "summary"):
        plain = _load(model.summary.source, str(model.device))
        return PlainLM(plain.hf, plain.tokenizer, model.summary.name)
    return _load(model, device or "")
