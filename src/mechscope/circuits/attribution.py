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

EAP-IG on activations (``eap-ig-act``, the variant Hanna et al. 2024 compare with): for each
sender group (the embeddings, one layer's heads, one MLP) the group's own output is interpolated
between source and clean while everything else runs on the clean prompts, and the edges out
of that group are scored with the receiver gradients of those m runs. Each group thus gets an
exact integrated-gradients path of its own (its summed edge scores converge to the effect of
patching the whole group: a test), at (2 n_layers + 1) x m forward and backward passes. (The
authors' code averages every run's gradients into every edge instead; we keep each group's.)

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
    mlp_out_hook,
    source_activations,
    z_hook,
)
from mechscope.tasks.base import TaskBatch

Method = Literal["eap", "eap-ig", "eap-ig-act"]


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
            if method == "eap-ig-act":
                _accumulate_activations(model, graph, sub, src, m, scores, weights, norms, ablation)
            else:
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


def _receiver_grads(model, graph: Graph, sub: TaskBatch, weights: list[dict], norms: list,
                    extra_hooks: list, capture: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One forward + backward pass on the clean prompts under ``extra_hooks``.

    Returns d metric / d x_r for every receiver group, in residual-stream space: ``q{l}``,
    ``k{l}``, ``v{l}`` [B, P, heads, D], ``m{l}`` [B, P, D], ``logits`` [B, P, D]; groups
    upstream of every activation the hooks make differentiable are absent. With ``capture``
    [n_senders, B, P, D], also stores every sender's output there.
    """
    L = graph.n_layers
    kept: dict[str, torch.Tensor] = {}
    resid: list[torch.Tensor | None] = [None] * L

    def keep(key: str):
        def hook(x, hook):
            if not x.requires_grad:
                return x  # upstream of every varied activation: its gradient is not needed
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

    hooks = list(extra_hooks)
    if capture is not None:
        hooks += capture_hooks(model, graph, capture)
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
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, g in grads.items():
            if key[0] in "qkv":
                l = int(key[1:])
                g = _head_input_grads(norms[l], resid[l], g, weights[l][f"W_{key[0].upper()}"])
            out[key] = g
    return out


def _contract(graph: Graph, delta: torch.Tensor, sums: dict[str, torch.Tensor], scale: float,
              scores: torch.Tensor, senders: slice | None = None) -> None:
    """scores[s, r] += scale * sum_{b,p,d} delta[s, b, p, d] * grad_r[b, p, d].

    One GEMM per layer over that layer's 2*n_kv + n_heads + 1 receivers; entries of senders that
    are not upstream (a layer's heads into its own q/k/v) are dropped by the final ``allowed``
    mask. ``senders`` restricts the rows (the others are left untouched); receivers without a
    gradient (absent from ``sums``: upstream of every varied activation) get nothing.
    """
    senders = senders or slice(0, graph.n_senders)
    d = delta[senders].reshape(senders.stop - senders.start, -1)  # [s, B*P*D]
    counts = {"q": graph.n_heads, "k": graph.n_kv_heads, "v": graph.n_kv_heads}
    for l in range(graph.n_layers):
        if f"m{l}" not in sums:
            continue
        rs = graph.receiver_slices(l)
        stop = min(senders.stop, graph.sender_slice_before(l, mlp=True))
        if stop <= senders.start:
            continue
        parts = [sums[f"{t}{l}"].permute(2, 0, 1, 3).reshape(-1, d.shape[1]) if f"{t}{l}" in sums
                 else d.new_zeros(counts[t], d.shape[1]) for t in "qkv"]
        G = torch.cat(parts + [sums[f"m{l}"].reshape(1, -1)])  # [H + 2KV + 1, B*P*D], in receiver order
        scores[senders.start : stop, rs["q"].start : rs["mlp"].stop] += scale * (d[: stop - senders.start] @ G.T)
    scores[senders, graph.logits_receiver] += scale * (d @ sums["logits"].reshape(-1))


def _accumulate(model, graph: Graph, sub: TaskBatch, src: torch.Tensor, m: int, scores: torch.Tensor,
                weights: list[dict], norms: list) -> None:
    """EAP / EAP-IG on the input embeddings: m interpolation steps, alpha = 1 last (the clean run)."""
    B, P = sub.clean.shape
    clean_acts = torch.empty(graph.n_senders, B, P, model.summary.d_model, device=src.device)
    sums: dict[str, torch.Tensor] = {}
    for k in range(1, m + 1):
        alpha = k / m

        def interp(x, hook, alpha=alpha):
            x = x.detach()
            if alpha < 1.0:
                x = src[0] + alpha * (x - src[0])
            return x.requires_grad_(True)

        grads = _receiver_grads(model, graph, sub, weights, norms, [(INPUT_HOOK, interp)],
                                capture=clean_acts if alpha == 1.0 else None)
        for key, g in grads.items():
            sums[key] = g if key not in sums else sums[key] + g
    _contract(graph, src - clean_acts, sums, 1.0 / m, scores)


def _sender_groups(graph: Graph) -> list[tuple[str, slice, int]]:
    """(hook, sender range, layer) of every group of senders written by one hook."""
    out = [(INPUT_HOOK, slice(0, 1), -1)]
    for l in range(graph.n_layers):
        out.append((z_hook(l), graph.head_senders(l), l))
        m = graph.mlp_sender(l)
        out.append((mlp_out_hook(l), slice(m, m + 1), l))
    return out


def _accumulate_activations(model, graph: Graph, sub: TaskBatch, src: torch.Tensor, m: int, scores: torch.Tensor,
                            weights: list[dict], norms: list, ablation: Ablation) -> None:
    """EAP-IG on activations: integrated gradients along each sender group's own path.

    For each group (the embeddings, one layer's heads, one MLP) and alpha in {1/m, ..., 1},
    the group's output is set to ``src + alpha * (clean - src)`` while the rest of the model
    runs on the clean prompts; the edges *out of that group* are scored with the receiver
    gradients of those m runs. Head outputs are interpolated through ``hook_z`` (a head's
    output is linear in z), which needs the source and clean z of every layer.
    """
    B, P = sub.clean.shape
    L = graph.n_layers
    clean_acts = torch.empty(graph.n_senders, B, P, model.summary.d_model, device=src.device)
    names = [name for name, _, _ in _sender_groups(graph)]
    z: dict[str, dict[str, torch.Tensor]] = {"clean": {}, "src": {}}

    def grab(which: str, name: str):
        def hook(x, hook):
            z[which][name] = x.detach().clone()
            return x

        return hook

    with torch.no_grad():
        model.bridge.run_with_hooks(sub.clean, fwd_hooks=[(n, grab("clean", n)) for n in names]
                                    + capture_hooks(model, graph, clean_acts))
        if ablation == "patching":
            model.bridge.run_with_hooks(sub.corrupt, fwd_hooks=[(n, grab("src", n)) for n in names])
        else:
            w = torch.ones(B, P, device=src.device)
            if sub.lengths is not None:
                w = (torch.arange(P, device=src.device)[None] < sub.lengths.to(src.device)[:, None]).float()
            w = w / w.sum(0, keepdim=True).clamp(min=1)
            for n in names:
                c = z["clean"][n]
                mean = torch.einsum("bp...,bp->p...", c, w)[None].expand_as(c)
                z["src"][n] = mean if ablation == "mean" else torch.zeros_like(c)
    delta = src - clean_acts
    for name, sl, _ in _sender_groups(graph):
        clean, source = z["clean"][name], z["src"][name]
        sums: dict[str, torch.Tensor] = {}
        for k in range(1, m + 1):
            alpha = k / m

            def interp(x, hook, alpha=alpha, clean=clean, source=source):
                return (source + alpha * (clean - source)).requires_grad_(True)

            for key, g in _receiver_grads(model, graph, sub, weights, norms, [(name, interp)]).items():
                sums[key] = g if key not in sums else sums[key] + g
        _contract(graph, delta, sums, 1.0 / m, scores, senders=sl)


def node_scores(graph: Graph, scores: torch.Tensor) -> torch.Tensor:
    """Sender (node) scores [n_senders] from edge scores: the sum over each sender's edges."""
    return (scores * graph.allowed.to(scores.device)).sum(1)
