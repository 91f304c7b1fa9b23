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
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from tqdm.auto import tqdm

from mechscope.graph import Graph
from mechscope.patching.engine import (
    INPUT_HOOK,
    Ablation,
    _as_heads,
    receiver_hooks,
    sender_hooks,
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
    with frozen(model):
        for i in it:
            sub = batch.subset(slice(i, min(n, i + batch_size))).to(dev)
            src = source_activations(model, graph, sub.clean, sub.corrupt, ablation, sub.lengths)
            _accumulate(model, graph, sub, src, m, scores)
    return (scores / n) * graph.allowed.to(dev)


def _accumulate(model, graph: Graph, sub: TaskBatch, src: torch.Tensor, m: int, scores: torch.Tensor) -> None:
    B, P = sub.clean.shape
    D = model.summary.d_model
    clean_acts = torch.empty(graph.n_senders, B, P, D, device=src.device)
    rec_specs = receiver_hooks(graph)
    grad_sums: list[torch.Tensor | None] = [None] * len(rec_specs)

    for k in range(1, m + 1):
        alpha = k / m
        kept: list[torch.Tensor] = []

        def interp(x, hook, alpha=alpha):
            x = x.detach()
            if alpha < 1.0:
                x = src[0] + alpha * (x - src[0])
            return x.requires_grad_(True)

        def keep(x, hook):
            # A fresh node: the hooked tensor may also feed the residual skip path (hook_mlp_in
            # does), and its gradient must only count the receiver's own use.
            y = x.clone()
            kept.append(y)
            return y

        hooks = [(INPUT_HOOK, interp)]
        if alpha == 1.0:
            for name, sl in sender_hooks(graph):
                hooks.append((name, _store(clean_acts, sl)))
        hooks += [(name, keep) for name, _, _ in rec_specs]
        with torch.enable_grad():
            logits = model.bridge.run_with_hooks(sub.clean, fwd_hooks=hooks)
            metric = sub.per_example_metric(logits).sum()
            grads = torch.autograd.grad(metric, kept)
        for j, g in enumerate(grads):
            grad_sums[j] = g if grad_sums[j] is None else grad_sums[j] + g

    delta = src - clean_acts  # [S, B, P, D]
    for j, (_, rs, n_up) in enumerate(rec_specs):
        g = _as_heads(grad_sums[j]) / m  # [B, P, r, D]
        scores[:n_up, rs] += torch.einsum("sbpd,bprd->sr", delta[:n_up], g)


def _store(buf: torch.Tensor, sl: slice):
    def hook(x, hook):
        buf[sl] = _as_heads(x).detach().permute(2, 0, 1, 3)
        return x

    return hook


def node_scores(graph: Graph, scores: torch.Tensor) -> torch.Tensor:
    """Sender (node) scores [n_senders] from edge scores: the sum over each sender's edges."""
    return (scores * graph.allowed.to(scores.device)).sum(1)
