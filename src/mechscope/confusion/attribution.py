"""Neuron attribution at confusion points (Nie et al. 2025, after Yu and Ananiadou's
log-probability increase).

For one prefix (the prompt and the generation up to the confusion point) and its next token t,
at the last position: s is the final norm's scale of the final residual stream (frozen, as the
paper does), and for layer l the residual stream after attention is r_l (``resid_mid``). A
neuron n of layer l with activation a_n (``mlp_post``) writes a_n W_out[l, n]; its score is
the gain in log-probability of t when that vector is added to r_l and read through the frozen
norm and the unembedding:

    gain(l, n) = log softmax(U(r_l + a_n W_out[l, n]))[t] - log softmax(U(r_l))[t],
    U(x) = (w * centre(x) / s) W_U + (b_norm W_U + b_U)   (then the model's soft-cap, if any)

Where a norm follows the MLP (Gemma 2/3's ``post_feedforward_layernorm``), a neuron's write is
its share of that norm with the run's own scale frozen, ``g * centre(a_n W_out[l, n]) / s(o)``
for the MLP's raw output o (``models.norms.HeadShares`` for neurons): adding the raw vector
would score each layer on the scale of its output before the norm, which differs by an order
of magnitude from layer to layer (measured on a tiny Gemma 2: 6.7-18x).

Per prefix the ``per_prompt`` (300) neurons of highest gain are kept and their gains summed
over prefixes (``accumulate``). The gain is not additive (a log-softmax), so the identity test
lives in ``logit_decomposition``: with the same frozen scale, every neuron's direct
contribution to logit t, plus attention, embeddings and biases, sums exactly to the model's
logit (before its soft-cap, where the model caps its logits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mechscope.errors import MechscopeError
from mechscope.models import plain_attention
from mechscope.models.hooks import (
    EMBED,
    FINAL_NORM_IN,
    POS_EMBED,
    attn_out,
    mlp_norm_in,
    mlp_out,
    mlp_post,
    resid_mid,
    resid_post,
    resid_pre,
)
from mechscope.models.norms import HeadShares, norm_module, residual_multiplier
from mechscope.models.unembed import final_norm, project, unembed_weights
from mechscope.partial import Partial
from mechscope.progress import ProgressArg, as_progress

if TYPE_CHECKING:
    from mechscope.models import Model

_CHUNK = 256  # neurons per [chunk, d_vocab] block


@dataclass
class Prefix:
    """Token ids of a prefix and the token t its last position predicts."""

    ids: list[int]
    target: int


def _post_mlp_norm(model: Model, l: int) -> HeadShares | None:
    """The norm after block ``l``'s MLP as shares (``models.norms.HeadShares``), or None where
    the MLP's output is added as it is."""
    post = getattr(model.bridge.blocks[l], "ln2_post", None)
    if post is None:
        return None
    try:
        return HeadShares(norm_module(post), model.summary.d_model, model.device)
    except ValueError:
        return None


def _write_rows(share: HeadShares | None, W_out: torch.Tensor) -> torch.Tensor:
    """Each neuron's output row [d_mlp, d_model] as the residual stream receives it, but for the
    per-token factor ``_write_factor`` (``HeadShares.directions``; ``W_out`` without a norm)."""
    return W_out if share is None else share.directions(W_out)


def _write_factor(share: HeadShares | None, mlp_in: torch.Tensor | None) -> torch.Tensor:
    """[1]: 1 without a post-MLP norm; with one, 1 / s(o) for the MLP's raw output ``mlp_in``
    [d_model] (the norm's scale in this run, frozen; ``HeadShares.inv_scale``)."""
    if share is None or mlp_in is None:
        return torch.ones(1)
    return share.inv_scale(mlp_in).reshape(1).cpu()


@torch.no_grad()
def _states(model: Model, prefix: Prefix, layers: list[int]) -> dict[str, torch.Tensor]:
    """resid_mid and mlp_post of ``layers`` (and the input of a norm after the MLP, where one
    is) and the final residual, at the last position. A block with attention and MLP in
    parallel (Cohere, GPT-NeoX, StableLM's parallel form) has no ``resid_mid``: the residual the
    MLP writes into is then everything but the MLP, ``resid_post - mlp_out`` (the same
    quantity a sequential block's ``resid_mid`` is)."""
    from mechscope.models.load import fired_shape

    parallel = [l for l in layers if fired_shape(model, resid_mid(l)) is None]  # measured once per model, cached
    wanted = {FINAL_NORM_IN} | {mlp_post(l) for l in layers} | {resid_mid(l) for l in layers if l not in parallel}
    wanted |= {resid_post(l) for l in parallel} | {mlp_out(l) for l in parallel}
    wanted |= {mlp_norm_in(l) for l in layers if getattr(model.bridge.blocks[l], "ln2_post", None) is not None}
    with plain_attention(model):
        _, cache = model.bridge.run_with_cache(torch.tensor([prefix.ids], device=model.device),
                                               names_filter=lambda n: n in wanted)
    missing = sorted(wanted - set(cache.keys()))
    if missing:
        raise MechscopeError(f"{model.summary.architecture}'s bridge does not give {missing[0]}, which the neuron "
                             "attribution reads; use a model of another architecture.")
    got = {k: cache[k][0, -1].detach().float() for k in wanted}
    for l in parallel:
        got[resid_mid(l)] = got[resid_post(l)] - got[mlp_out(l)]
    return got


@torch.no_grad()
def neuron_gains(model: Model, prefixes: list[Prefix], layers: list[int],
                 progress: ProgressArg = False, partial: Partial | None = None) -> torch.Tensor:
    """The log-probability gains [n_prefixes, len(layers), d_mlp] (see the module docstring).
    ``partial``: each layer's gains are stored there as piece ``gains-L<layer>`` when done and
    read back instead of recomputed (a resumed run; the caller's key covers the prefixes)."""
    d_mlp = model.summary.d_mlp
    out = torch.zeros(len(prefixes), len(layers), d_mlp)
    todo = []
    for j, l in enumerate(layers):
        got = partial.get_tensors(f"gains-L{l}") if partial is not None else None
        if got is not None and got.get("gains") is not None and tuple(got["gains"].shape) == (len(prefixes), d_mlp):
            out[:, j] = got["gains"]
        else:
            todo.append(j)
    bar = as_progress(progress).phase("neuron attribution", total=len(layers), unit="layer", initial=len(layers) - len(todo))
    if not todo:
        bar.close()
        return out
    norm = final_norm(model)
    W_U, b_U = unembed_weights(model)
    const = torch.zeros(W_U.shape[1], device=W_U.device)
    if norm.bias is not None:
        const = const + norm.bias @ W_U
    if b_U is not None:
        const = const + b_U
    states = [_states(model, p, [layers[j] for j in todo]) for p in prefixes]
    W_outs = model.bridge.W_out.detach().float() * residual_multiplier(model)  # [n_layers, d_mlp, d_model], read once
    ones = torch.ones(1, device=W_U.device)
    for j in todo:
        l = layers[j]
        share = _post_mlp_norm(model, l)
        M = norm.linear(_write_rows(share, W_outs[l].to(W_U.device)), ones) @ W_U  # [d_mlp, d_vocab]: each neuron's unit output, scale 1
        for i, (p, st) in enumerate(zip(prefixes, states)):
            s = norm.scale(st[FINAL_NORM_IN].to(W_U.device))  # [1], frozen
            base = norm.linear(st[resid_mid(l)].to(W_U.device), s) @ W_U + const  # [d_vocab], before any soft-cap
            capped = norm.cap(base)
            base_lp = capped[p.target] - torch.logsumexp(capped, -1)
            factor = _write_factor(share, st.get(mlp_norm_in(l))).to(W_U.device)
            coef = st[mlp_post(l)].to(W_U.device) * factor / s  # [d_mlp]
            for c in range(0, d_mlp, _CHUNK):
                logits = norm.cap(base + coef[c:c + _CHUNK, None] * M[c:c + _CHUNK])  # [chunk, d_vocab]
                lp = logits[:, p.target] - torch.logsumexp(logits, -1)
                out[i, j, c:c + _CHUNK] = (lp - base_lp).cpu()
        if partial is not None:
            partial.put_tensors(f"gains-L{l}", {"gains": out[:, j]})
        bar.advance()
    bar.close()
    return out


def accumulate(gains: torch.Tensor, per_prompt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed gain, count) [layers, d_mlp] over prefixes, each prefix adding only its
    ``per_prompt`` highest-gain neurons (the paper's top 300)."""
    n, L, D = gains.shape
    total = torch.zeros(L * D)
    count = torch.zeros(L * D)
    k = min(per_prompt, L * D)
    for g in gains.reshape(n, L * D):
        v, i = g.topk(k)
        total[i] += v
        count[i] += 1
    return total.reshape(L, D), count.reshape(L, D)


@dataclass
class LogitDecomposition:
    """Direct contributions to the frozen-scale logit of one token at the last position."""

    neurons: torch.Tensor  # [n_layers, d_mlp]
    attention: torch.Tensor  # [n_layers] (attention outputs with their biases)
    mlp_bias: torch.Tensor  # [n_layers] (mlp_out minus the neurons' sum: the output bias)
    embed: float
    final_bias: float
    actual: float  # the model's logit (before its soft-cap, if it has one)

    @property
    def total(self) -> float:
        return float(self.neurons.sum() + self.attention.sum() + self.mlp_bias.sum()) + self.embed + self.final_bias


@torch.no_grad()
def logit_decomposition(model: Model, prefix: Prefix) -> LogitDecomposition:
    """Every neuron's and every other component's direct contribution to logit ``prefix.target``
    at the last position, through the final norm with its scale frozen (they sum to the logit)."""
    L = model.summary.n_layers
    wanted = {EMBED, POS_EMBED, resid_pre(0), FINAL_NORM_IN}
    shares = [_post_mlp_norm(model, l) for l in range(L)]
    for l in range(L):
        wanted |= {attn_out(l), mlp_out(l), mlp_post(l)} | ({mlp_norm_in(l)} if shares[l] is not None else set())
    with plain_attention(model):
        logits, cache = model.bridge.run_with_cache(torch.tensor([prefix.ids], device=model.device),
                                                    names_filter=lambda n: n in wanted)
    norm = final_norm(model)
    W_U, b_U = unembed_weights(model)
    u = W_U[:, prefix.target]
    s = norm.scale(cache[FINAL_NORM_IN][0, -1])

    def contrib(x: torch.Tensor) -> torch.Tensor:
        return norm.linear(x.float().to(u.device), s) @ u

    neurons = torch.zeros(L, model.summary.d_mlp)
    attention = torch.zeros(L)
    bias = torch.zeros(L)
    W_outs = model.bridge.W_out.detach().float() * residual_multiplier(model)  # [n_layers, d_mlp, d_model], read once
    for l in range(L):
        act = cache[mlp_post(l)][0, -1].float()  # [d_mlp]
        o = cache[mlp_norm_in(l)][0, -1] if shares[l] is not None else None
        rows, factor = _write_rows(shares[l], W_outs[l].to(act.device)), _write_factor(shares[l], o).to(act.device)
        writes = (act * factor)[:, None] * rows  # [d_mlp, d_model]: what each neuron adds to the residual stream
        neurons[l] = contrib(writes).cpu()
        bias[l] = float(contrib(cache[mlp_out(l)][0, -1].float() - writes.sum(0)))
        attention[l] = float(contrib(cache[attn_out(l)][0, -1]))
    const = (float(norm.bias @ u) if norm.bias is not None else 0.0) + (float(b_U[prefix.target]) if b_U is not None else 0.0)
    raw = logits[0, -1] if norm.soft_cap <= 0 else project(model, cache[FINAL_NORM_IN][0, -1], norm, capped=False)
    return LogitDecomposition(neurons=neurons, attention=attention, mlp_bias=bias,
                              embed=float(contrib(cache[resid_pre(0)][0, -1])), final_bias=const,
                              actual=float(raw[prefix.target]))


@torch.no_grad()
def lens_readout(model: Model, prefixes: list[Prefix], tuned: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probability, rank) [n_prefixes, n_layers] of each prefix's next token read at every
    layer's ``resid_post`` (last position) through the logit lens, or through ``tuned`` (a
    ``lens.TunedLens``) when given."""
    from mechscope.models.hooks import resid_post

    L = model.summary.n_layers
    hooks = [resid_post(l) for l in range(L)] if tuned is None else tuned.hooks
    wanted = set(hooks)
    norm = final_norm(model)
    probs = torch.zeros(len(prefixes), len(hooks))
    ranks = torch.zeros(len(prefixes), len(hooks), dtype=torch.long)
    for i, p in enumerate(prefixes):
        with plain_attention(model):
            _, cache = model.bridge.run_with_cache(torch.tensor([p.ids], device=model.device),
                                                   names_filter=lambda n: n in wanted)
        h = torch.stack([cache[k][0, -1] for k in hooks]).float()  # [L, d_model]
        if tuned is not None:
            h = tuned.translate_all(h[None].to(tuned.weight.device))[0]
        lp = project(model, h, norm).log_softmax(-1)  # [L, d_vocab]
        t = lp[:, p.target]
        probs[i] = t.exp().cpu()
        ranks[i] = (lp > t[:, None]).sum(-1).cpu()
    return probs, ranks
