"""Edge attribution patching: EAP (Syed et al. 2023) and EAP-IG (Hanna et al. 2024).

Both estimate, for every edge s -> r, the change of the task metric when that edge alone is
patched from the source (corrupted) run, to first order:

    score(s, r) = (src_s - clean_s) . E_alpha[ d metric / d x_r ]

1. Run the source (corrupted) prompts once without gradients; cache every sender's output.
2. For alpha in {1/m, 2/m, ..., 1} (EAP: m = 1, i.e. alpha = 1 only): run the clean prompts
   with the input embedding interpolated, ``x_0 = src_0 + alpha * (clean_0 - src_0)``, keep
   every receiver input x_r [batch, pos, (heads,) d_model] and take the gradient of the
   summed per-example metric with respect to all of them in one backward pass. The alpha = 1
   pass is the clean run itself, so clean sender outputs come from it for free: the whole
   method costs (m + 1) forward and m backward passes.
3. score[s, r] = sum_{batch, pos} (src_s - clean_s) . mean_alpha grad_r, one einsum per
   receiver hook over only the senders upstream of it. Key/value receivers are per KV head,
   so grouped-query models pay no ungrouping.

Node scores follow exactly: a sender feeds each downstream receiver with coefficient 1, so
d metric / d out_s = sum_r d metric / d x_r and node_score[s] = sum_r score[s, r].

Parameters are frozen during the backward passes (only activation gradients are computed).

Speed: the passes run with the bridge's split q/k/v inputs and per-head results switched off
(plain attention, as fast as plain transformers). The gradient with respect to head h's query
input x_{q,h} (the residual stream as only that head's query sees it) is recovered exactly
from the gradient at its query ``hook_q`` [batch, pos, heads, d_head]:

    d metric / d x_{q,h} = J_norm(x)^T  W_Q[h] (d metric / d q_h)

one batched matmul per layer and a vmapped vector-Jacobian product through the layer's own
norm module (LayerNorm or RMSNorm alike); keys and values likewise per KV head. Head outputs
are z_h @ W_O[h] from ``hook_z``.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from tqdm.auto import tqdm

from mechscope.graph import Graph
from mechscope.models import plain_attention
from mechscope.patching.engine import (
    INPUT_HOOK,
    LOGITS_HOOK,
    Ablation,
    capture_hooks,
    head_weights,
    mlp_in_hook,
    source_activations,
)
from mechscope.tasks.base import TaskBatch

Method = Literal["eap", "eap-ig"]


@contextlib.contextmanager
def frozen(model):
    """Temporarily set requires_grad=False on every parameter (restored on exit)."""
    params = list(model.bridge.parameters())
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, b in zip(params, before):
            p.requires_grad_(b)


def edge_scores(
    model,
    graph: Graph,
    batch: TaskBatch,
    method: Method = "eap-ig",
    steps: int = 5,
    ablation: Ablation = "patching",
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Attribution score of every edge: float [n_senders, n_receivers] (0 where no edge).

    Scores estimate metric(edge patched) - metric(clean), averaged over examples.
    """
    m = 1 if method == "eap" else int(steps)
    if m < 1:
        from mechscope.errors import MechscopeError

        raise MechscopeError(f"--ig-steps must be at least 1, got {steps}.")
    dev = model.device
    scores = torch.zeros(graph.n_senders, graph.n_receivers, device=dev)
    n = len(batch)
    chunks = range(0, n, batch_size)
    it = tqdm(chunks, desc=f"{method} scores", disable=not progress, leave=False)
    with frozen(model), plain_attention(model):
        weights = [{k: v.detach() for k, v in head_weights(model, l).items()} for l in range(graph.n_layers)]
        norms = [model.bridge.blocks[l].ln1.original_component for l in range(graph.n_layers)]
        for i in it:
            sub = batch.subset(slice(i, min(n, i + batch_size))).to(dev)
            with torch.no_grad():
                src = source_activations(model, graph, sub.clean, sub.corrupt, ablation, sub.lengths)
            _accumulate(model, graph, sub, src, m, scores, weights, norms)
    return (scores / n) * graph.allowed.to(dev)


def _head_input_grads(norm, x: torch.Tensor, g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """Per-head gradient at the residual input of a head projection.

    x [b, p, d_model] (the norm's input), g [b, p, h, d_head] (gradient at the projection's
    output), W [h, d_model, d_head] -> [b, p, h, d_model] = J_norm(x)^T (W[h] g_h).
    """
    b, p, h, e = g.shape
    g_out = torch.bmm(g.permute(2, 0, 1, 3).reshape(h, b * p, e), W.transpose(1, 2))  # [h, b*p, d]
    g_out = g_out.view(h, b, p, -1).permute(1, 2, 0, 3)  # [b, p, h, d]
    return norm_vjp(norm, x, g_out)


def norm_vjp(norm, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """J_norm(x)^T g for a batch of cotangents: x [b, p, d], g [b, p, h, d] -> [b, p, h, d].

    Closed forms for LayerNorm and RMSNorm (the common cases, ~10x faster); any other norm
    module goes through ``torch.func.vjp`` vmapped over heads.
    """
    w = getattr(norm, "weight", None)
    u = g * w if w is not None else g
    xx = x[:, :, None].float()
    d = x.shape[-1]
    if isinstance(norm, torch.nn.LayerNorm):
        mu = xx.mean(-1, keepdim=True)
        sigma = ((xx - mu).pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
        xhat = (xx - mu) / sigma
        return (u - u.mean(-1, keepdim=True) - xhat * (u * xhat).mean(-1, keepdim=True)) / sigma
    eps = getattr(norm, "variance_epsilon", None)
    if eps is not None and type(norm).__name__.endswith("RMSNorm") and not hasattr(norm, "bias"):
        r = (xx.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        return u / r - xx * (u * xx).sum(-1, keepdim=True) / (d * r.pow(3))
    _, vjp = torch.func.vjp(norm, x)
    return torch.func.vmap(vjp, in_dims=2, out_dims=2)(g)[0]


def _accumulate(model, graph: Graph, sub: TaskBatch, src: torch.Tensor, m: int, scores: torch.Tensor,
                weights: list[dict], norms: list) -> None:
    B, P = sub.clean.shape
    D = model.summary.d_model
    L = graph.n_layers
    clean_acts = torch.empty(graph.n_senders, B, P, D, device=src.device)
    # gradient sums per receiver group: q/k/v [B, P, heads, D] per layer, mlp [B, P, D], logits
    sums: dict[str, torch.Tensor] = {}

    def add(key: str, g: torch.Tensor) -> None:
        sums[key] = g if key not in sums else sums[key] + g

    for k in range(1, m + 1):
        alpha = k / m
        kept: dict[str, torch.Tensor] = {}
        resid: list[torch.Tensor | None] = [None] * L

        def interp(x, hook, alpha=alpha):
            x = x.detach()
            if alpha < 1.0:
                x = src[0] + alpha * (x - src[0])
            return x.requires_grad_(True)

        def keep(key: str):
            def hook(x, hook):
                # A fresh node: the hooked tensor may also feed the residual skip path
                # (hook_mlp_in does); its gradient must count only the receiver's own use.
                y = x.clone()
                kept[key] = y
                return y

            return hook

        def store_resid(l: int):
            def hook(x, hook):
                resid[l] = x.detach()
                return x

            return hook

        hooks = [(INPUT_HOOK, interp)]
        if alpha == 1.0:
            hooks += capture_hooks(model, graph, clean_acts)
        for l in range(L):
            hooks.append((f"blocks.{l}.hook_resid_pre", store_resid(l)))
            for t in "qkv":
                hooks.append((f"blocks.{l}.attn.hook_{t}", keep(f"{t}{l}")))
            hooks.append((mlp_in_hook(l), keep(f"m{l}")))
        hooks.append((LOGITS_HOOK, keep("logits")))
        with torch.enable_grad():
            logits = model.bridge.run_with_hooks(sub.clean, fwd_hooks=hooks)
            metric = sub.per_example_metric(logits).sum()
            keys = list(kept)
            grads = dict(zip(keys, torch.autograd.grad(metric, [kept[c] for c in keys])))
        with torch.no_grad():
            for l in range(L):
                for t, w in (("q", "W_Q"), ("k", "W_K"), ("v", "W_V")):
                    add(f"{t}{l}", _head_input_grads(norms[l], resid[l], grads[f"{t}{l}"], weights[l][w]))
                add(f"m{l}", grads[f"m{l}"])
            add("logits", grads["logits"])

    # score[s, r] = sum_{b,p,d} delta[s, b, p, d] * grad_r[b, p, d]: one GEMM per layer over
    # that layer's 2*n_kv + n_heads + 1 receivers; entries of senders that are not upstream
    # (this layer's heads into its own q/k/v) are dropped by the final ``allowed`` mask.
    delta = (src - clean_acts).reshape(graph.n_senders, -1)  # [S, B*P*D]
    for l in range(L):
        rs = graph.receiver_slices(l)
        up_m = graph.sender_slice_before(l, mlp=True)
        G = torch.cat([sums[f"{t}{l}"].permute(2, 0, 1, 3).reshape(-1, delta.shape[1]) for t in "qkv"]
                      + [sums[f"m{l}"].reshape(1, -1)])  # [H + 2KV + 1, B*P*D], in receiver order
        scores[:up_m, rs["q"].start : rs["mlp"].stop] += delta[:up_m] @ G.T / m
    scores[:, graph.logits_receiver] += delta @ sums["logits"].reshape(-1) / m


def node_scores(graph: Graph, scores: torch.Tensor) -> torch.Tensor:
    """Sender (node) scores [n_senders] from edge scores: the sum over each sender's edges."""
    return (scores * graph.allowed.to(scores.device)).sum(1)
