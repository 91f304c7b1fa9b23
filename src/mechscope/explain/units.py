"""Unit sources: where a kind of unit is read in the model, and what it writes back.

A source answers, for each layer it covers: which hook its units read (``hook(layer)``), how
many units the layer has (``n_units(layer)``), the units' activations from that hook's tensor
(``acts(layer, x)``: [batch, pos, d_hook] -> [batch, pos, n_units]) and each unit's output
direction in the residual stream (``directions(layer)``: [n_units, d_model]), which
``output_logits`` reads through the final norm's weight and the unembedding.

- ``mlp``: MLP neurons. The activation is the one that multiplies the MLP's output matrix
  (``blocks.L.mlp.hook_post``: act(pre) for GPT-2, act(gate) * up for gated Llama MLPs), so
  ``acts @ W_out[L] + b_out[L] == hook_mlp_out`` (tested); the direction is the row of W_out
  (with a norm after the MLP, Gemma 2/3 and OLMo-2, that sum is the norm's input, and the
  direction folds in the norm's weight).
- ``sae:DIR``: the features of an SAE folder (or of every SAE folder directly inside DIR), read
  at the SAE's hook with ``encode``; the direction is the row of W_dec.
- ``transcoders:DIR``: the features of a transcoder set (``layer_<l>`` folders or circuit-tracer's
  layout), read at ``ln2.hook_normalized``; the direction is the decoder row (written into
  ``hook_mlp_out``, i.e. the residual stream).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mechscope.errors import MechscopeError
from mechscope.models.hooks import mlp_post, parse_hook
from mechscope.models.norms import norm_matrix, norm_module, residual_multiplier
from mechscope.models.unembed import final_norm, unembed_weights

if TYPE_CHECKING:
    from mechscope.models import Model
    from mechscope.sae.model import SAE


class UnitSource:
    """Base class; see the module docstring."""

    kind: str = ""
    source: str = ""
    layers: list[int]

    def hook(self, layer: int) -> str:
        raise NotImplementedError

    def n_units(self, layer: int) -> int:
        raise NotImplementedError

    def acts(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """[batch, pos, d_hook] -> [batch, pos, n_units]."""
        raise NotImplementedError

    def directions(self, layer: int) -> torch.Tensor:
        """[n_units, d_model]: what each unit adds to the residual stream per unit of activation."""
        raise NotImplementedError

    def weights_fingerprint(self, layer: int) -> str:
        """A digest of the weights that define ``layer``'s units beyond the model's own ("" for the
        model's neurons, which the database's model fingerprint covers): a unit database names a
        dictionary by its folder's name, and this tells apart two dictionaries of one name."""
        return ""


class MlpNeurons(UnitSource):
    kind = "mlp"

    def __init__(self, model: Model):
        self.model = model
        self.layers = list(range(model.summary.n_layers))
        if not all(hasattr(model.bridge.blocks[layer].mlp, "W_out") for layer in self.layers):
            # a mixture of experts: its neurons belong to experts, with no one output matrix per layer
            raise MechscopeError(f"{model.summary.architecture}'s MLPs have no single output matrix (a mixture of experts?), so "
                                 "--units mlp has no neurons to describe; describe SAE or transcoder features instead "
                                 "(--units sae:DIR or transcoders:DIR).")

    def hook(self, layer: int) -> str:
        return mlp_post(layer)

    def n_units(self, layer: int) -> int:
        return int(self.model.summary.d_mlp)

    def acts(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def directions(self, layer: int) -> torch.Tensor:
        """Rows of W_out [d_mlp, d_model]; where a norm follows the MLP (Gemma 2/3, OLMo-2:
        ``ln2_post``) its linear part is folded in (``models.norms``; its per-token scale only
        rescales), since that norm's output, not W_out's, is what the block adds."""
        W = self.model.bridge.W_out[layer].detach().float() * residual_multiplier(self.model)  # Granite: 1 elsewhere
        post = getattr(self.model.bridge.blocks[layer], "ln2_post", None)
        if post is None:
            return W
        return W @ norm_matrix(norm_module(post), W.shape[1]).to(W.device)


class SaeFeatures(UnitSource):
    """One SAE per layer, from ``DIR`` (an SAE folder) or its subfolders (one SAE each)."""

    kind = "sae"

    def __init__(self, model: Model, path: str | Path, device=None):
        from mechscope.sae.io import check_sae_fits, load_sae

        path = Path(path)
        if not path.is_dir():
            raise MechscopeError(f"{path} is not a folder; pass sae:DIR with an SAE folder (cfg.json + sae_weights.safetensors).")
        folders = [path] if (path / "cfg.json").is_file() else sorted(p for p in path.iterdir() if (p / "cfg.json").is_file())
        if not folders:
            raise MechscopeError(f"{path} holds no SAE (no cfg.json in it or in its subfolders); pass a folder written by mechscope sae train.")
        self.saes: dict[int, SAE] = {}
        for f in folders:
            sae = load_sae(f, device or model.device)
            check_sae_fits(sae, model)
            layer = parse_hook(sae.cfg.hook_name).layer
            if layer is None:
                raise MechscopeError(f"{f} reads {sae.cfg.hook_name}, which is not inside a block; mechscope exemplars needs block hooks.")
            if layer in self.saes:
                raise MechscopeError(f"{path} holds two SAEs for layer {layer}; give one folder per layer.")
            self.saes[layer] = sae
        self.source = path.name
        self.layers = sorted(self.saes)

    def hook(self, layer: int) -> str:
        return self.saes[layer].cfg.hook_name

    def n_units(self, layer: int) -> int:
        return int(self.saes[layer].cfg.d_sae)

    @torch.no_grad()
    def acts(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        sae = self.saes[layer]
        return sae.encode(x.to(sae.W_enc.dtype)).float()

    def directions(self, layer: int) -> torch.Tensor:
        return self.saes[layer].W_dec.detach().float()

    def weights_fingerprint(self, layer: int) -> str:
        import hashlib

        done = self.__dict__.setdefault("_weights_fp", {})  # asked before the pass and again when writing
        if layer in done:
            return done[layer]
        h = hashlib.sha256()
        for name, t in sorted(self.saes[layer].state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        done[layer] = h.hexdigest()[:16]
        return done[layer]


class TranscoderFeatures(SaeFeatures):
    kind = "transcoder"

    def __init__(self, model: Model, path: str | Path, device=None):
        from mechscope.features.transcoder_set import load_transcoder_layers
        from mechscope.sae.io import check_same_weights

        self.saes = {layer: tc.to(device or model.device) for layer, tc in load_transcoder_layers(path, "cpu", model).items()}
        s = model.summary
        for layer, tc in self.saes.items():
            if layer >= s.n_layers or tc.cfg.d_in != s.d_model:
                raise MechscopeError(f"{path}/layer_{layer} does not fit {s.name} (layers 0-{s.n_layers - 1}, width {s.d_model}); use a set trained on this model.")
            check_same_weights(tc.cfg.metadata.get("model_fingerprint"), model, f"layer {layer}'s transcoder", tc.cfg.model_name)
        self.source = Path(path).name
        self.layers = sorted(self.saes)


def unit_source(model, spec: str, device=None) -> UnitSource:
    """``mlp``, ``sae:DIR`` or ``transcoders:DIR`` -> a ``UnitSource``."""
    kind, _, where = spec.partition(":")
    if kind == "mlp" and not where:
        return MlpNeurons(model)
    if kind == "sae" and where:
        return SaeFeatures(model, where, device)
    if kind in ("transcoders", "transcoder") and where:
        return TranscoderFeatures(model, where, device)
    raise MechscopeError(f"unknown --units {spec!r}; use mlp, sae:DIR or transcoders:DIR.")


@torch.no_grad()
def output_logits(model: Model, directions: torch.Tensor, k: int = 10, vocab: list[str] | None = None,
                  chunk: int = 512) -> tuple[list[list[tuple[str, float]]], list[list[tuple[str, float]]]]:
    """Top and bottom ``k`` tokens each direction [n, d_model] promotes, read through the final
    norm's linear part with unit scale (the per-token scale only rescales) and the unembedding
    (its bias left out: it does not depend on the unit)."""
    norm = final_norm(model, ranks_only=True)
    W_U, _ = unembed_weights(model)
    vocab = vocab or token_strings(model.tokenizer, W_U.shape[1])
    top, bottom = [], []
    for i in range(0, directions.shape[0], chunk):
        d = directions[i:i + chunk].to(W_U.device).float()
        logits = norm.linear(d, torch.ones(d.shape[0], 1, device=d.device)) @ W_U  # [chunk, d_vocab]
        tv, ti = logits.topk(k, dim=-1)
        bv, bi = logits.topk(k, dim=-1, largest=False)
        top += [[(vocab[j], round(float(v), 4)) for j, v in zip(r_i.tolist(), r_v.tolist())] for r_i, r_v in zip(ti, tv)]
        bottom += [[(vocab[j], round(float(v), 4)) for j, v in zip(r_i.tolist(), r_v.tolist())] for r_i, r_v in zip(bi, bv)]
    return top, bottom


def token_strings(tokenizer, n: int | None = None) -> list[str]:
    """Every token id's text as it reads inside running text, its leading space included
    (``token_texts``: SentencePiece '▁Mary' -> ' Mary', where ``decode([i])`` gives 'Mary'; on
    byte-level BPE the same as ``decode([i])``), one batched call; ids past the tokenizer (a
    padded unembedding) as ``unused_id``."""
    from mechscope.models.tokens import token_texts

    return token_texts(tokenizer, range(n or len(tokenizer)))
