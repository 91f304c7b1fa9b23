"""What a graph's feature nodes stand for, on the graph page itself: each feature's
top-activating corpus contexts and the output tokens its decoder direction promotes.

``feature_contexts`` runs the model over corpus contexts once, reads every needed layer's
transcoder input (``ln2.hook_normalized``), encodes it with that layer's transcoder (the whole
layer, so TopK and BatchTopK activate as in the graph) and keeps the needed features'
activations [contexts, positions, features] in memory (features x tokens x 4 bytes: 1.2 MB
for 300 features over 4,096 tokens); the ``top`` largest activations per feature, position 0
of each context, special tokens and attention sinks left out (positions whose residual norm
after some block up to the set's deepest layer is more than ``sink_ratio`` times that block's
median over the context's positions from 1: ``activations.store.context_sinks``, per context
where training takes a forward batch), give the exemplars, each with a window of tokens and the
feature's activation on each of them.

``feature_logits`` is the direct path from a feature's decoder row to the logits through the
final norm's linear part (scale left out: only the ranking is shown) and the unembedding,
demeaned over the vocabulary as the graph's logit nodes are; it ignores every later layer,
so it says what the feature writes, not what the model finally does with it.

``feature_cards`` returns both for a list of (layer, feature) pairs, keyed ``"layer:feature"``
(the key ``graph_json``'s descriptions use): ``{"logits": [[token, value]...],
"contexts": [{"tokens": [...], "acts": [...], "at": i, "max": v}...]}``; token strings are
plain text, escaped by the page (``report/assets/attribution.js`` sets ``textContent``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechscope.activations.config import check_sink_ratio
from mechscope.activations.store import context_sinks, sink_hooks, special_token_ids
from mechscope.errors import MechscopeError
from mechscope.features.config import SINK_RATIO
from mechscope.features.transcoder_set import TranscoderSet
from mechscope.models.hooks import hook_layer, ln_normalized
from mechscope.models.tokens import token_texts
from mechscope.progress import ProgressArg, as_progress

if TYPE_CHECKING:
    from mechscope.models import Model

MAX_CELLS = 200_000_000
"""Largest activation table (features x tokens) ``feature_contexts`` builds (800 MB)."""


def _group(feats: list[tuple[int, int]], tset: TranscoderSet) -> dict[int, list[int]]:
    by_layer: dict[int, list[int]] = {}
    for layer, f in feats:
        if not 0 <= layer < tset.n_layers or not 0 <= f < tset.layers[layer].cfg.d_sae:
            raise MechscopeError(f"feature {layer}:{f} is not in the transcoder set (layers 0-{tset.n_layers - 1}).")
        by_layer.setdefault(layer, [])
        if f not in by_layer[layer]:
            by_layer[layer].append(f)
    return by_layer


@torch.no_grad()
def feature_contexts(model: Model, tset: TranscoderSet, feats: list[tuple[int, int]], tokens: Tensor, top: int = 5,
                     before: int = 8, after: int = 3, batch_size: int = 8, sink_ratio: float | None = SINK_RATIO,
                     progress: ProgressArg = False) -> dict[str, list[dict]]:
    """The ``top`` corpus positions of largest activation of each feature (module docstring).
    ``tokens`` [contexts, ctx_len] (ctx_len >= 2); ``sink_ratio`` None keeps attention sinks. The
    sink test takes each context's own medians, so the exemplars do not depend on ``batch_size``."""
    if tokens.dim() != 2 or tokens.shape[1] < 2 or tokens.shape[0] == 0:
        raise MechscopeError(f"contexts must be [n, ctx_len >= 2] token ids, got shape {list(tokens.shape)}.")
    if top < 1 or before < 0 or after < 0 or batch_size < 1:
        raise MechscopeError("top and batch_size must be at least 1, before and after at least 0.")
    by_layer = _group(feats, tset)
    if not by_layer:
        return {}
    n_feats = sum(len(v) for v in by_layer.values())
    if n_feats * tokens.numel() > MAX_CELLS:
        raise MechscopeError(f"{n_feats} features x {tokens.numel():,} tokens is too large a table; search fewer tokens (--contexts).")
    check_sink_ratio(sink_ratio)
    names = {ln_normalized(layer, 2): layer for layer in by_layer}
    # every block up to the set's deepest layer, as the set's training read them, whichever features are asked for
    deepest = max(hook_layer(h) for tc in tset.layers for h in (tc.cfg.hook_name, tc.cfg.hook_name_out) if h)
    sinks_read = sink_hooks(model, deepest) if sink_ratio is not None else []
    wanted = set(names) | set(sinks_read)
    N, T = tokens.shape
    acts = {layer: torch.zeros(N, T, len(fs)) for layer, fs in by_layer.items()}
    sinks = torch.zeros(N, T, dtype=torch.bool)
    bar = as_progress(progress).phase("feature contexts", total=N * T, unit="tok")
    for i in range(0, N, batch_size):
        toks = tokens[i:i + batch_size].to(model.device)
        _, cache = model.bridge.run_with_cache(toks, names_filter=lambda n: n in wanted)
        for name, layer in names.items():
            tc = tset.layers[layer]
            a = tc.encode(cache[name].to(tc.W_enc.dtype))  # the whole layer: TopK picks as in the graph
            acts[layer][i:i + len(toks)] = a[..., by_layer[layer]].float().cpu()
        if sink_ratio is not None:
            norms = [cache[h].float().norm(dim=-1).cpu() for h in sinks_read]  # [batch, pos] per block
            sinks[i:i + len(toks)] = context_sinks(norms, sink_ratio)  # position 0 out of the medians, as in training
        del cache
        bar.advance(toks.numel())
    bar.close()
    vocab = model.tokenizer
    special = torch.isin(tokens.cpu(), torch.tensor(special_token_ids(vocab)))  # [N, T]
    out: dict[str, list[dict]] = {}
    for layer, fs in by_layer.items():
        a = acts[layer].clone()
        a[:, 0] = float("-inf")  # position 0 (attention sink) is not an exemplar
        a[special | sinks] = float("-inf")  # nor are special tokens and sinks (the transcoders never trained on them)
        flat = a.reshape(N * T, len(fs))
        vals, idx = flat.topk(min(top, N * (T - 1)), dim=0)  # [top, features]
        for j, f in enumerate(fs):
            rows = []
            for v, k in zip(vals[:, j].tolist(), idx[:, j].tolist()):
                if v <= 0:
                    break
                c, p = divmod(k, T)
                lo, hi = max(0, p - before), min(T, p + after + 1)
                ids = tokens[c, lo:hi].tolist()
                rows.append({"tokens": token_texts(vocab, ids), "acts": [round(x, 4) for x in acts[layer][c, lo:hi, j].tolist()],
                             "at": p - lo, "max": round(v, 4)})
            out[f"{layer}:{f}"] = rows
    return out


@torch.no_grad()
def feature_logits(model: Model, tset: TranscoderSet, feats: list[tuple[int, int]], top: int = 8) -> dict[str, list]:
    """The ``top`` output tokens each feature's decoder row promotes most (module docstring):
    ``{"layer:feature": [[token, value], ...]}``."""
    from mechscope.models.unembed import final_norm, unembed_weights

    by_layer = _group(feats, tset)
    norm = final_norm(model, ranks_only=True)
    W_U, _ = unembed_weights(model)
    out: dict[str, list] = {}
    for layer, fs in by_layer.items():
        d = tset.layers[layer].W_dec[fs].detach().float().to(W_U.device)  # [n, d_model]
        if norm.kind == "layernorm":
            d = d - d.mean(-1, keepdim=True)
        logits = (d * norm.weight.to(W_U.device).float()) @ W_U  # [n, vocab]
        logits = logits - logits.mean(-1, keepdim=True)
        vals, idx = logits.topk(min(top, logits.shape[-1]), dim=-1)
        for j, f in enumerate(fs):
            out[f"{layer}:{f}"] = [[s, round(float(v), 4)] for v, s in zip(vals[j], token_texts(model.tokenizer, idx[j].tolist()))]
    return out


def feature_cards(model: Model, tset: TranscoderSet, feats: list[tuple[int, int]], contexts: Tensor | None,
                  top: int = 5, logits: bool = True, progress: ProgressArg = False) -> dict[str, dict]:
    """Both views per feature (module docstring); ``contexts`` None leaves the exemplars out,
    ``logits=False`` the output tokens (for a final norm ``final_norm`` cannot read)."""
    out_tokens = feature_logits(model, tset, feats) if logits else {}
    ex = feature_contexts(model, tset, feats, contexts, top=top, progress=progress) if contexts is not None and feats else {}
    by_layer = _group(feats, tset)
    return {f"{layer}:{f}": {"logits": out_tokens.get(f"{layer}:{f}", []), "contexts": ex.get(f"{layer}:{f}", [])}
            for layer, fs in by_layer.items() for f in fs}
