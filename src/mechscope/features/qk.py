"""QK attribution: why one attention head at one query position attends to one key position,
as a sum over pairs of graph nodes (query-side node x key-side node).

An attribution graph freezes the attention patterns, so it says nothing about where a head
reads from. The pre-softmax score of head h (layer l) for query position i and key position
j is bilinear in the two residual streams that feed it, once the norm's scale is frozen at its
clean value (as the replacement model freezes it):

    s = c * rot_i(q(x_i)) . rot_j(k(x_j)),   q(x) = inv_i * base(x) W'_Q[h] + b_q,

with base(x) = x (RMS norm) or x minus its mean (layer norm), inv the clean 1 / rms, W' the
projection with the norm's per-dimension scale folded in, b_q everything constant (the norm's
bias through W_Q, the projection's bias), rot the rotary embedding of the position (identity
without one) and c the score scale. Writing each residual stream as the sum of the graph's
node outputs, x = sum_n u_n, makes every term exact:

1. ``components``: the residual stream entering layer l at a position, split into the token
   embedding node, the position embedding (GPT-2), one attention-output term per earlier
   layer, each earlier layer's active transcoder features (activation x decoder row, the graph's
   feature nodes) and error node, and the transcoder's bias and skip; checked to sum to the
   model's own ``hook_resid_pre`` at that position.
2. Each component's query vector rot_i(inv_i * base(u_n) W'_Q[h]) (and key vector with the
   head's KV group), plus one constant vector: the clean query minus the sum of the
   components', which must be the same vector at every position (checked: it proves the
   fitted norm and weights reproduce the model's projection).
3. ``matrix[a, b] = c * q_a . k_b``: rows the query side's components and the constant,
   columns the key side's. It sums to the model's score for (h, i, j) (checked against
   ``hook_attn_scores``); a row sum is the query-side component's share with the whole key, a
   column sum the key-side component's share.

Per-head query/key norms (Qwen3, Gemma 3: over d_head, after the projection) are frozen at
their clean scale the same way, so the split stays linear and exact (session 29).

Nothing about the attention module is assumed: rotary, the score scale and the norm's form are
measured against the model's hooks, and a layer that does not match (soft-capping, ALiBi, a
norm of unknown form) is refused with one sentence rather than given wrong numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechscope.circuits.qk import HeadNorm, declared_window, rotate
from mechscope.errors import MechscopeError
from mechscope.features.replacement import ReplacementRun, capture
from mechscope.features.transcoder_set import TranscoderSet
from mechscope.models.hooks import POS_EMBED, attn_hook, attn_out, attn_scores, resid_pre
from mechscope.models.load import plain_attention
from mechscope.models.norms import fit_norm, head_norm_modules, input_norm
from mechscope.models.tokens import token_texts
from mechscope.patching.engine import attn_weights

if TYPE_CHECKING:
    from mechscope.models import Model

__all__ = ["QKAttribution", "check_edge", "parse_qk_spec", "qk_attribution"]

CONST = "const"


@dataclass
class QKAttribution:
    """One attention edge's score split into query-side x key-side node pairs.

    Shapes: ``matrix`` [Q, K]; ``query_ids``/``query_labels`` [Q], ``key_ids``/``key_labels`` [K];
    the last row and column are the constant terms (``CONST``).
    """

    layer: int
    head: int
    query_pos: int
    key_pos: int
    score: float
    """The model's pre-softmax score (scale applied) of this query-key pair."""
    weight: float
    """The attention weight (the softmax over the keys at the query position)."""
    query_ids: list[str]
    query_labels: list[str]
    key_ids: list[str]
    key_labels: list[str]
    matrix: Tensor

    def query_side(self) -> Tensor:
        """[Q] each query-side component's share of the score (with the whole key)."""
        return self.matrix.sum(1)

    def key_side(self) -> Tensor:
        """[K] each key-side component's share of the score (with the whole query)."""
        return self.matrix.sum(0)

    def top_pairs(self, k: int = 20) -> list[dict[str, Any]]:
        """The ``k`` pairs with the largest |contribution|, largest first."""
        flat = self.matrix.flatten()
        idx = flat.abs().argsort(descending=True)[:k].tolist()
        K = self.matrix.shape[1]
        return [{"query": self.query_ids[i // K], "query_label": self.query_labels[i // K], "key": self.key_ids[i % K],
                 "key_label": self.key_labels[i % K], "value": float(flat[i])} for i in idx]

    def to_dict(self, k: int = 20) -> dict[str, Any]:
        def side(ids: list[str], labels: list[str], v: Tensor) -> list[dict[str, Any]]:
            order = v.abs().argsort(descending=True)[:k].tolist()
            return [{"id": ids[i], "label": labels[i], "value": float(v[i])} for i in order]

        return {"layer": self.layer, "head": self.head, "query_pos": self.query_pos, "key_pos": self.key_pos,
                "score": self.score, "weight": self.weight, "n_query_components": len(self.query_ids),
                "n_key_components": len(self.key_ids), "top_pairs": self.top_pairs(k),
                "query_side": side(self.query_ids, self.query_labels, self.query_side()),
                "key_side": side(self.key_ids, self.key_labels, self.key_side())}


def parse_qk_spec(spec: str) -> tuple[int, int, int, int]:
    """``LAYER:HEAD:QPOS:KPOS`` as four non-negative integers, or one sentence saying what is wrong."""
    try:
        vals = tuple(int(x) for x in spec.split(":"))
    except ValueError:
        vals = ()
    if len(vals) != 4 or min(vals) < 0:
        raise MechscopeError(f"--qk {spec!r} is not LAYER:HEAD:QUERY_POS:KEY_POS (four non-negative integers, e.g. 5:3:9:4).")
    return vals[0], vals[1], vals[2], vals[3]


def check_edge(model: Model, n_pos: int, layer: int, head: int, qpos: int, kpos: int) -> None:
    """One sentence (MechscopeError) when the edge is not in the model or the prompt."""
    s = model.summary
    if not 0 <= layer < s.n_layers:
        raise MechscopeError(f"QK attribution: layer {layer} does not exist; {s.name} has layers 0-{s.n_layers - 1}.")
    if not 0 <= head < s.n_heads:
        raise MechscopeError(f"QK attribution: head {head} does not exist; layer {layer} has heads 0-{s.n_heads - 1}.")
    if not 0 <= kpos <= qpos < n_pos:
        raise MechscopeError(f"QK attribution: need 0 <= key position <= query position < {n_pos} (the prompt's tokens, "
                             f"attention is causal); got query {qpos}, key {kpos}.")


def components(run: ReplacementRun, tset: TranscoderSet, cache: dict[str, Tensor], layer: int, pos: int,
               token_text: str) -> tuple[list[str], list[str], Tensor]:
    """(node ids, labels, vectors [n, d]) whose sum is the residual stream entering ``layer`` at
    ``pos`` (step 1 of the module docstring). Ids of graph nodes are the graph's node ids."""
    ids = [f"E_{int(run.tokens[pos])}_{pos}"]
    labels = [f"token {token_text!r} @{pos}"]
    vecs = [run.embed[pos]]
    if POS_EMBED in cache and cache[POS_EMBED].shape[-1] == run.embed.shape[-1]:
        ids.append(f"pos_{pos}")
        labels.append(f"position embedding @{pos}")
        vecs.append(cache[POS_EMBED][0, pos].float())
    act = run.active
    for l in range(layer):
        ids.append(f"attn{l}_{pos}")
        labels.append(f"attention output L{l} @{pos}")
        vecs.append(cache[attn_out(l)][0, pos].float())
        if pos < run.first_pos:
            ids.append(f"mlp{l}_{pos}")
            labels.append(f"MLP output L{l} @{pos} (not a node)")
            vecs.append(run.mlp_out[l, pos])
            continue
        sel = ((act[:, 0] == l) & (act[:, 1] == pos)).nonzero().flatten().tolist()
        feats = torch.zeros_like(run.mlp_out[l, pos])
        W_dec = tset.layers[l].W_dec.detach().float()
        for i in sel:
            f = int(act[i, 2])
            v = run.values[i].float() * W_dec[f].to(feats.device)
            feats = feats + v
            ids.append(f"{l}_{f}_{pos}")
            labels.append(f"feature L{l}:F{f} @{pos}")
            vecs.append(v)
        ids.append(f"{l}_-1_{pos}")
        labels.append(f"error L{l} @{pos}")
        vecs.append(run.errors[l, pos])
        ids.append(f"tcbias{l}_{pos}")
        labels.append(f"transcoder bias+skip L{l} @{pos}")
        vecs.append(run.mlp_out[l, pos] - feats - run.errors[l, pos])
    return ids, labels, torch.stack([v.float() for v in vecs])


def _close(a: Tensor, b: Tensor, tol: float = 1e-4) -> bool:
    return bool((a.float() - b.float()).abs().max() <= tol * b.float().abs().max().clamp(min=1.0))


def _project(U: Tensor, x_all: Tensor, W: Tensor, kind: str, eps: float, pos: int) -> Tensor:
    """inv_pos * base(U) W: each component's pre-rotary projection [n, e] (step 2)."""
    if kind == "ln":
        U = U - U.mean(-1, keepdim=True)
        x = x_all[pos] - x_all[pos].mean()
    else:
        x = x_all[pos]
    inv = torch.rsqrt(x.pow(2).mean() + eps)
    return inv * (U @ W)


def _head_norms(model: Model, layer: int, e: int, device) -> tuple[HeadNorm | None, HeadNorm | None]:
    """Layer ``layer``'s per-head query and key norms (Qwen3, Gemma 3) in fitted form, None where
    there is none; a norm of another form (over all heads: OLMo-2) is refused in one sentence."""
    out = []
    for module, side in zip(head_norm_modules(model, layer), ("query", "key")):
        norm = HeadNorm.fit(module, e, device) if module is not None else None
        if module is not None and norm is None:
            raise MechscopeError(f"QK attribution: layer {layer}'s {side} norm is not a per-head RMS or layer norm (it spans "
                                 f"all heads, or has another form), so its {side}s cannot be split exactly.")
        out.append(norm)
    return out[0], out[1]


def _linear_all(x_all: Tensor, W: Tensor, kind: str, eps: float) -> Tensor:
    """[P, e] the linear part of the projection at every position."""
    x = x_all - x_all.mean(-1, keepdim=True) if kind == "ln" else x_all
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (x @ W)


def qk_attribution(model: Model, tset: TranscoderSet, tokens: Tensor | list[int], layer: int, head: int,
                   query_pos: int, key_pos: int, run: ReplacementRun | None = None) -> QKAttribution:
    """Split head ``head`` of layer ``layer``'s score for (``query_pos``, ``key_pos``) into
    query-side x key-side node pairs (module docstring). ``run``: the prompt's clean capture,
    when the caller has it already."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    check_edge(model, tokens.numel(), layer, head, query_pos, key_pos)
    run = run if run is not None else capture(model, tset, tokens)
    names = {resid_pre(layer), POS_EMBED, attn_scores(layer), attn_hook(layer, "q"), attn_hook(layer, "k"),
             attn_hook(layer, "rot_q"), attn_hook(layer, "rot_k"), attn_hook(layer, "cos"), attn_hook(layer, "sin")}
    names |= {attn_out(l) for l in range(layer)}
    names &= set(model.bridge.hook_dict)
    with torch.no_grad(), plain_attention(model):
        _, cache = model.bridge.run_with_cache(tokens[None].to(model.device), names_filter=lambda n: n in names)
    x_all = cache[resid_pre(layer)][0].float()  # [P, d]
    text = token_texts(model.tokenizer, tokens.tolist())
    sides = []
    for pos in (query_pos, key_pos):
        ids, labels, U = components(run, tset, cache, layer, pos, text[pos])
        if not _close(U.sum(0), x_all[pos], 1e-3):
            raise MechscopeError(f"QK attribution: the residual stream of layer {layer} at position {pos} is not the sum of "
                                 f"embeddings, attention and MLP outputs in this model, so it cannot be split into graph nodes.")
        sides.append((ids, labels, U))

    attn = model.bridge.blocks[layer].attn
    norm = input_norm(model, layer)
    if norm is None:
        raise MechscopeError(f"QK attribution: layer {layer} has no norm before its attention (as in OLMo-2), so its queries and "
                             f"keys are not split at a frozen norm scale; use a model with one.")
    w = attn_weights(model, layer)
    kind, scale, eps = fit_norm(norm, x_all.shape[-1], x_all.device)
    if kind == "other":
        raise MechscopeError(f"QK attribution: layer {layer}'s attention norm is neither RMS nor layer normalisation, so its "
                             f"queries and keys are not linear in the residual stream at a frozen scale.")
    H, KV = w["W_Q"].shape[0], w["W_K"].shape[0]
    kv = head // (H // KV)
    head_norms = _head_norms(model, layer, w["W_Q"].shape[-1], x_all.device)
    Wq = (w["W_Q"][head].detach().float() * scale[:, None])  # [d, e]
    Wk = (w["W_K"][kv].detach().float() * scale[:, None])
    vecs = []
    plan = ((sides[0], query_pos, Wq, "q", attn_hook(layer, "q"), attn_hook(layer, "rot_q"), head),
            (sides[1], key_pos, Wk, "k", attn_hook(layer, "k"), attn_hook(layer, "rot_k"), kv))
    for (ids, labels, U), pos, W, hook, name, rot_name, h in plan:
        clean = cache[name][0, :, h].float()  # [P, e] before rotary
        const = clean - _linear_all(x_all, W, kind, eps)  # the constant term, at every position
        if not _close(const, const[:1].expand_as(const), 1e-3):
            raise MechscopeError(f"QK attribution: layer {layer}'s {hook} projection is not affine in the normalised residual "
                                 f"stream (a norm or projection this method does not model).")
        V = torch.cat([_project(U, x_all, W, kind, eps, pos), const[pos][None]])  # [n + 1, e]
        if (hn := head_norms[0 if hook == "q" else 1]) is not None:  # its scale frozen too: linear in V
            V = hn.frozen(V, clean[pos])
        if rot_name in cache:
            cos, sin = cache[attn_hook(layer, "cos")], cache[attn_hook(layer, "sin")]
            cos, sin = cos.reshape(-1, cos.shape[-2], cos.shape[-1])[0, pos].float(), sin.reshape(-1, sin.shape[-2], sin.shape[-1])[0, pos].float()
            V = rotate(V, cos, sin)
            want = cache[rot_name][0, pos, h].float()
        else:
            want = clean[pos]
        if not _close(V.sum(0), want, 1e-3):
            raise MechscopeError(f"QK attribution: the {hook} of layer {layer} rebuilt from the residual stream does not match the "
                                 f"model's own (a query/key norm over all heads as in OLMo-2, partial rotary or another position scheme), so "
                                 "the split would be wrong.")
        vecs.append(V)
        ids.append(CONST)
        labels.append(f"constant ({hook} biases)")
    score = float(cache[attn_scores(layer)][0, head, query_pos, key_pos])
    if not math.isfinite(score) or score < -1e30:  # masked: the key is outside a sliding window
        win = declared_window(attn.original_component, layer)
        where = f"outside layer {layer}'s sliding window of {win} tokens" if win else f"masked in layer {layer}"
        fix = f"pick a key at most {win - 1} positions before the query" if win else "pick another key"
        raise MechscopeError(f"QK attribution: key position {key_pos} is {where} for query position {query_pos}, so the head "
                             f"gives it no attention to split; {fix}.")
    raw = float(vecs[0].sum(0) @ vecs[1].sum(0))
    e = Wq.shape[-1]
    cands = [getattr(attn.original_component, "scaling", None), getattr(attn.original_component, "scale", None), 1 / math.sqrt(e)]
    c = next((float(x) for x in cands if isinstance(x, (int, float)) and abs(float(x) * raw - score) <= 1e-3 * max(1.0, abs(score))), None)
    if c is None:
        raise MechscopeError(f"QK attribution: layer {layer}'s attention score is not a scaled dot product of its queries and "
                             f"keys (soft-capping, ALiBi or another bias), so it cannot be split exactly.")
    matrix = c * vecs[0] @ vecs[1].T  # [Q, K]
    row = cache[attn_scores(layer)][0, head, query_pos, : query_pos + 1].float()
    weight = float(torch.softmax(row, -1)[key_pos])
    (qi, ql, _), (ki, kl, _) = sides
    return QKAttribution(layer=layer, head=head, query_pos=query_pos, key_pos=key_pos, score=score, weight=weight,
                         query_ids=qi, query_labels=ql, key_ids=ki, key_labels=kl, matrix=matrix.cpu())
