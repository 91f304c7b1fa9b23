"""Neuron editing: zero MLP neurons' output, i.e. their columns of the down projection (the
rows of TransformerLens's ``W_out``), in a Hugging Face causal LM, for the ``with`` block.

The same edit is applied to every model given (the bridge's wrapped model for scoring, the
plain copy for generation), and the columns are restored on exit. Supported layouts: Llama-like
(``model.layers[l].mlp.down_proj``, an ``nn.Linear`` [d_model, d_mlp]) and GPT-2
(``transformer.h[l].mlp.c_proj``, a ``Conv1D`` [d_mlp, d_model]).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from mechscope.errors import MechscopeError

Neuron = tuple[int, int]
"""(layer, neuron index)."""


def down_projections(hf: Any) -> list[tuple[torch.nn.Parameter, int]]:
    """Per layer, the down projection's weight and the dimension that indexes neurons."""
    inner = getattr(hf, "model", None)
    if inner is not None and hasattr(inner, "layers"):
        return [(layer.mlp.down_proj.weight, 1) for layer in inner.layers]
    tr = getattr(hf, "transformer", None)
    if tr is not None and hasattr(tr, "h"):
        return [(block.mlp.c_proj.weight, 0) for block in tr.h]
    raise MechscopeError(f"Neuron editing supports Llama-like and GPT-2 models, not {type(hf).__name__}; use one of those.")


@contextlib.contextmanager
def zeroed_neurons(models: list[Any], neurons: list[Neuron]) -> Iterator[None]:
    """Zero ``neurons``' output columns in every Hugging Face model of ``models`` while the block runs."""
    saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
    by_layer: dict[int, list[int]] = {}
    for layer, n in neurons:
        by_layer.setdefault(int(layer), []).append(int(n))
    try:
        with torch.no_grad():
            for hf in models:
                projs = down_projections(hf)
                for layer, idx in by_layer.items():
                    if not 0 <= layer < len(projs):
                        raise MechscopeError(f"Layer {layer} is not in the model (0..{len(projs) - 1}); edit existing layers.")
                    w, dim = projs[layer]
                    ix = torch.tensor(sorted(set(idx)), device=w.device)
                    if int(ix.max()) >= w.shape[dim]:
                        raise MechscopeError(f"Neuron {int(ix.max())} is not in layer {layer} ({w.shape[dim]} neurons).")
                    saved.append((w, dim, ix, w.index_select(dim, ix).clone()))
                    w.index_fill_(dim, ix, 0.0)
        yield
    finally:
        with torch.no_grad():
            for w_, dim, ix, old in reversed(saved):
                w_.index_copy_(dim, ix, old)
