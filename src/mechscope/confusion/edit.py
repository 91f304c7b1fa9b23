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


def _decoder_layers(hf: Any) -> Any:
    """The Hugging Face model's list of decoder layers (``layers``, ``h``, ``decoder.layers``,
    ``blocks`` of its base model), or None."""
    base = getattr(hf, "base_model", hf)
    for path in ("layers", "h", "decoder.layers", "blocks"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.ModuleList) and len(obj):
            return obj
    return None


def _unwrapped(module: Any) -> Any:
    """The Hugging Face module itself where the TransformerBridge wrapped it in place."""
    while getattr(module, "original_component", None) is not None and module.original_component is not module:
        module = module.original_component
    return module


def _out_dim(module: Any) -> int | None:
    """Output width of a linear layer (``nn.Linear``, or GPT-2's ``Conv1D`` with its weight [in, out])."""
    module = _unwrapped(module)
    w = getattr(module, "weight", None)
    if isinstance(module, torch.nn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[1])
    return None


def down_projections(hf: Any) -> list[tuple[torch.nn.Parameter, int]]:
    """Per layer, the MLP's output projection weight and the dimension that indexes neurons.

    Found by structure, not by name: in each decoder layer's ``mlp`` (the layer itself for OPT,
    whose ``fc1``/``fc2`` sit there), the last linear child that writes ``d_model`` values
    (``down_proj``, ``c_proj``, ``fc_out``, ``fc2``, ``dense_4h_to_h`` ...). A layer whose MLP is a
    mixture of experts has no such one layer, and is refused."""
    layers = _decoder_layers(hf)
    emb = hf.get_input_embeddings() if hasattr(hf, "get_input_embeddings") else None
    hidden = getattr(getattr(hf, "config", None), "hidden_size", None)  # the residual width (OPT may embed narrower)
    d_model = hidden if isinstance(hidden, int) else getattr(emb, "embedding_dim", None)
    if layers is None or d_model is None:
        raise MechscopeError(f"mechscope cannot find the decoder layers of {type(hf).__name__}, so it cannot edit its neurons; "
                             "use a Llama-like or GPT-2-like model.")
    out: list[tuple[torch.nn.Parameter, int]] = []
    for i, layer in enumerate(layers):
        layer = _unwrapped(layer)
        mlp = _unwrapped(getattr(layer, "mlp", None) or layer)
        found = [_unwrapped(m) for _, m in mlp.named_children() if _out_dim(m) == d_model]
        if not found or hasattr(mlp, "experts") or any(hasattr(_unwrapped(m), "experts") for m in layer.children()):
            raise MechscopeError(f"layer {i} of {type(hf).__name__} has no single MLP output projection (a mixture of "
                                 "experts?), so its neurons cannot be edited one by one; use a model with dense MLPs.")
        proj = found[-1]
        out.append((proj.weight, 0 if type(proj).__name__ == "Conv1D" else 1))
    return out


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
