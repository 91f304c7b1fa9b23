"""Influence, pruning and the graph's scores (the definitions of circuit-tracer's graph.py).

With Â the adjacency's absolute values normalised so each row sums to 1 (zero rows stay zero)
and w the logit nodes' probabilities (0 elsewhere):

- influence  I = w Â + w Â^2 + ...  (the graph is acyclic, so the series ends);
- node pruning: features and errors, sorted by I, are kept until their cumulative share of the
  total reaches ``node_threshold``; tokens and logits are always kept;
- edge pruning (on the node-pruned graph, re-normalised): edge score Â[t, s] (I_t + w_t), edges
  kept until their cumulative share reaches ``edge_threshold``; then features and errors left
  without outgoing edges, and features without incoming ones, are dropped, repeatedly;
- replacement score = I(tokens) / (I(tokens) + I(errors)): the share of the token-to-logit
  influence that does not pass through an error node;
- completeness score = sum_n (1 - sum_{e error} Â[n, e]) (I_n + w_n) / sum_n (I_n + w_n): the
  influence-weighted share of each node's input that comes from features and tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechscope.features.attribute import AttributionGraph


def normalise_rows(A: Tensor) -> Tensor:
    a = A.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def influence(A_hat: Tensor, w: Tensor, max_iter: int = 10_000) -> Tensor:
    """[N] total influence of every node on the weighted logits through Â (module docstring)."""
    cur = w @ A_hat
    total = cur.clone()
    for _ in range(max_iter):
        if not bool(cur.any()):
            return total
        cur = cur @ A_hat
        total += cur
    raise RuntimeError("influence did not converge: the adjacency has a cycle")


def influence_from_rows(row_feats: Tensor, feat_rows: Tensor, logit_rows: Tensor, lp: Tensor, n_act: int) -> Tensor:
    """Estimated influence [n_act] of every active feature from the rows computed so far
    (features ``row_feats`` with rows ``feat_rows`` over all active features, errors and
    tokens, plus the logits' rows): the series above restricted to those rows."""
    ncol = logit_rows.shape[1]
    fr = normalise_rows(feat_rows) if len(feat_rows) else torch.zeros(0, ncol)
    return influence_from_normalised(row_feats, fr, normalise_rows(logit_rows), lp, n_act)


def influence_from_normalised(row_feats: Tensor, fr: Tensor, lr: Tensor, lp: Tensor, n_act: int) -> Tensor:
    """``influence_from_rows`` with the rows already normalised (``normalise_rows`` works row by
    row, so a caller adding rows batch by batch normalises each batch once)."""
    total = torch.zeros(lr.shape[1])
    cur = lp @ lr
    for _ in range(10_000):
        total += cur
        if not len(row_feats) or not bool(cur[row_feats].any()):
            break
        cur = cur[row_feats] @ fr
    return total[:n_act]


@dataclass
class Pruned:
    """Which nodes and edges survive (bool [N], [N, N]) and each node's influence [N]."""

    node_mask: Tensor
    edge_mask: Tensor
    influence: Tensor
    cumulative: Tensor
    """[N] the node's cumulative influence share when nodes are sorted by influence (its rank as
    a fraction: the field circuit-tracer's JSON calls ``influence``)."""


def _threshold(scores: Tensor, share: float) -> float:
    s = scores.flatten().sort(descending=True).values
    tot = s.sum()
    if tot <= 0:
        return float("inf")
    cum = s.cumsum(0) / tot
    i = min(int(torch.searchsorted(cum, torch.tensor(share, dtype=cum.dtype))), len(s) - 1)
    return float(s[i])


def prune(g: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """Node and edge masks of the pruned graph (module docstring)."""
    for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            from mechscope.errors import MechscopeError

            raise MechscopeError(f"{name} must lie between 0 and 1, got {v}.")
    A, w = g.adjacency, g.logit_weights()
    infl = influence(normalise_rows(A), w)
    always = torch.zeros(g.n_nodes, dtype=torch.bool)
    always[g.token_start:] = True
    if g.target_feature is not None:  # a local circuit's sink is kept like a logit
        always[g.target_feature] = True
    prunable = ~always
    node = always.clone()
    if prunable.any():
        node[prunable] = infl[prunable] >= _threshold(infl[prunable], node_threshold)
    Ap = A.clone()
    Ap[~node] = 0
    Ap[:, ~node] = 0
    An = normalise_rows(Ap)
    edge_scores = An * (influence(An, w) + w)[:, None]
    edge = (edge_scores >= _threshold(edge_scores, edge_threshold)) & (edge_scores > 0)
    F = g.n_features
    while True:
        old = node.clone()
        edge[~node] = False
        edge[:, ~node] = False
        node[: g.token_start] &= edge[:, : g.token_start].any(0)
        node[:F] &= edge[:F].any(1)
        node |= always & (torch.arange(g.n_nodes) < g.token_start)  # the sink has no outgoing edges
        if torch.equal(old, node):
            break
    order = infl.sort(descending=True)
    cum = torch.zeros_like(infl)
    tot = infl.sum()
    cum[order.indices] = order.values.cumsum(0) / (tot if tot > 0 else 1.0)
    return Pruned(node, edge, infl, cum)


def scores(g: AttributionGraph, node_mask: Tensor | None = None, edge_mask: Tensor | None = None) -> dict[str, float]:
    """Replacement and completeness scores (module docstring) of the graph, or of its pruned
    version when masks are given (the adjacency restricted to kept nodes and edges)."""
    A = g.adjacency
    if node_mask is not None:
        A = A.clone()
        A[~node_mask] = 0
        A[:, ~node_mask] = 0
    if edge_mask is not None:
        A = A * edge_mask
    w = g.logit_weights()
    An = normalise_rows(A)
    infl = influence(An, w)
    err = slice(g.error_start, g.token_start)
    tok = float(infl[g.token_start:g.logit_start].sum())
    er = float(infl[err].sum())
    out = infl + w
    comp = float(((1 - An[:, err].sum(1)) * out).sum() / out.sum().clamp_min(1e-12))
    return {"replacement": tok / (tok + er) if tok + er > 0 else 0.0, "completeness": comp}
