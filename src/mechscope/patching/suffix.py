"""Run only the upper blocks of a model, from a cached clean residual stream.

ACDC visits receivers from the logits backwards, so while it decides the edges into a layer-l
receiver every patched edge ends at layer l or above: every block below l computes exactly
what it computes in the clean run. Its output, the residual stream entering block l, is
therefore taken from one cached clean run and only blocks l.. are executed. The logits are
computed only at the scored positions (``logits_to_keep``): the unembedding of every position
is about a fifth of SmolLM2-135M's forward pass on IOI prompts.

How: the Hugging Face model's decoder-layer list *is* the bridge's block list (the bridge wraps
the modules in place), so the list is swapped for its suffix for the duration of one call and
the cached residual is written into ``blocks.{l}.hook_resid_pre`` (or ``ln_final.hook_in``
when no block runs). Embeddings are recomputed (cheap) and overwritten; positions, masks and
rotary tables are the model's own, and so is the per-layer attention kind (``config.layer_types``,
cut to the suffix with the list). ``SuffixRunner.check`` compares a suffix run against the
full model; callers fall back to full runs when it fails (an architecture whose forward does
something this trick misses).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from mechscope.models.hooks import resid_into

if TYPE_CHECKING:
    from mechscope.models import Model

Hook = tuple[str, Callable]


def _layer_list(model: Model) -> tuple[nn.Module, str] | None:
    """(parent module, attribute) of the ModuleList holding the bridge's blocks, or None."""
    blocks = list(model.bridge.blocks)
    for name, mod in model.bridge.original_model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == len(blocks) and all(a is b for a, b in zip(mod, blocks)):
            parent_name, _, attr = name.rpartition(".")
            parent = model.bridge.original_model.get_submodule(parent_name) if parent_name else model.bridge.original_model
            return parent, attr
    return None


class SuffixRunner:
    """Forward passes of blocks ``start..`` on a fixed clean batch.

    Args:
        tokens: [batch, pos] clean token ids.
        keep: positions whose logits are returned (sorted, unique), [k].
    """

    def __init__(self, model: Model, tokens: torch.Tensor, keep: torch.Tensor):
        self.model = model
        self.tokens = tokens.to(model.device)
        self.keep = keep.to(model.device)
        self.hf = model.bridge.original_model
        self.layers = _layer_list(model)
        self.n_layers = model.summary.n_layers
        self.ok = self.layers is not None
        params = inspect.signature(self.hf.forward).parameters
        self.logits_to_keep = "logits_to_keep" in params
        self.resid: list[torch.Tensor] = []
        self.cache: dict = {}  # for callers: state shared by successive runs (see engine.prefill)
        if self.ok:
            names = [resid_into(l, self.n_layers) for l in range(self.n_layers + 1)]
            cache: dict[str, torch.Tensor] = {}

            def grab(name: str) -> Callable:
                def hook(x, hook):
                    cache[name] = x.detach().clone()
                    return x

                return hook

            with torch.no_grad():
                model.bridge.run_with_hooks(self.tokens, fwd_hooks=[(n, grab(n)) for n in names])
            self.ok = all(n in cache for n in names)
            self.resid = [cache[n] for n in names] if self.ok else []

    @contextmanager
    def _suffix(self, start: int):
        assert self.layers is not None  # suffix runs happen only when self.ok
        parent, attr = self.layers
        full = getattr(parent, attr)
        # A model that picks each layer's mask by its index in the list (Gemma 2 and 3, Qwen2:
        # ``config.layer_types[i]``, sliding or full attention) must see the suffix of that list too.
        configs = {id(c): c for c in (getattr(parent, "config", None), getattr(self.hf, "config", None)) if c is not None}
        types = {k: c.layer_types for k, c in configs.items()
                 if isinstance(getattr(c, "layer_types", None), list) and len(c.layer_types) == len(full)}
        setattr(parent, attr, nn.ModuleList(list(full)[start:]))
        for k, t in types.items():
            configs[k].layer_types = t[start:]
        try:
            yield
        finally:
            setattr(parent, attr, full)
            for k, t in types.items():
                configs[k].layer_types = t

    @torch.no_grad()
    def run(self, start: int, copies: int, hooks: list[Hook]) -> torch.Tensor:
        """Logits [copies * batch, len(keep), d_vocab] of blocks ``start..`` under ``hooks``.

        The residual entering block ``start`` is the clean one, repeated ``copies`` times;
        ``hooks`` see only the executed blocks (and the final norm).
        """
        toks = self.tokens.repeat(copies, 1)
        own: list[Hook] = []
        if start > 0:
            r = self.resid[start].repeat(copies, 1, 1)
            own.append((resid_into(start, self.n_layers), lambda x, hook: r))
        kwargs: dict[str, Any] = {"use_cache": False}
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = self.keep
        with self._suffix(start), self.model.bridge.hooks(fwd_hooks=own + hooks):
            out = self.hf(input_ids=toks, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        if not self.logits_to_keep or logits.shape[1] != len(self.keep):
            logits = logits[:, self.keep]
        return logits

    def check(self, reference: torch.Tensor, tol: float = 1e-3) -> bool:
        """Whether a suffix run from the middle reproduces ``reference`` logits [batch, pos, V].

        Sets and returns ``self.ok``; any exception also counts as a failure.
        """
        if not self.ok:
            return False
        try:
            got = self.run(self.n_layers // 2, 1, [])
            want = reference.to(got.device)[:, self.keep]
            scale = want.abs().max().clamp(min=1.0)
            self.ok = bool(((got - want).abs().max() / scale) < tol)
        except Exception:  # noqa: BLE001 - any failure means: use full runs
            self.ok = False
        return self.ok
