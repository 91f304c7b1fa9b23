"""Attribution graphs: the direct linear effect of every node on every feature and logit of
one prompt, through the frozen replacement model (``mechscope.features.replacement``).

Nodes, in this order: active features (layer, position, feature; layer-major), error nodes
(layer, position), token nodes (position), logit nodes. ``adjacency[t, s]`` is the effect of
source s's output vector on target t: on a feature's pre-activation (its encoder column
applied to the transcoder input) or on a logit (its unembedding column minus the mean column,
as in circuit-tracer, so a constant shift of all logits counts for nothing). Error and token
rows are zero (nothing feeds them); a feature's row holds only earlier layers' sources.

Algorithm (one row per target; all of a batch's rows from one backward pass):

1. ``capture`` the clean pass: transcoder inputs, MLP outputs, active features, errors.
2. One forward pass of B copies of the prompt through the frozen model with gradients
   (``freeze_hooks``), kept for repeated backward passes.
3. For each batch of up to B targets: inject each target's vector as the output gradient of
   its copy at its (layer, position) (the transcoder input for a feature, the final norm's
   output at the last position for a logit) and run one backward pass to the MLP outputs and
   the token embeddings. Row b's gradient g at an MLP output (l, p) dotted with a source's
   vector there (a_f W_dec[f], or e_l,p) is the edge weight; at the embedding, dotted with the
   token's embedding.
4. Which features get rows: all active ones when there are at most ``max_features``; else
   the logits' rows first, then batches of the features of highest estimated influence on the
   logits (``prune.influence`` over the rows so far), re-estimated after every batch. Features
   that never get a row are dropped from the graph and their direct effects added to the
   error node at their (layer, position), so every row still sums to the same total and the
   graph never claims more than its features explain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechscope.errors import MechscopeError
from mechscope.features.replacement import ReplacementRun, capture, freeze_hooks, quiet_norm_edits
from mechscope.features.transcoder_set import TranscoderSet
from mechscope.models.check import require_model
from mechscope.models.load import plain_attention
from mechscope.models.tokens import prompt_ids
from mechscope.models.unembed import unembed_weights
from mechscope.progress import PhaseHandle, ProgressArg, as_progress

if TYPE_CHECKING:
    from mechscope.models import Model


@dataclass
class AttributionGraph:
    """One prompt's attribution graph.

    Shapes: ``features`` [F, 3] (layer, pos, feature) with ``activations`` [F];
    ``logit_tokens`` [K] with ``logit_probs`` [K]; ``adjacency`` [N, N] (N = F + E + T + K,
    rows targets, columns sources; E = layers x positions error nodes, T = positions).
    """

    tokens: Tensor
    token_text: list[str]
    features: Tensor
    activations: Tensor
    logit_tokens: Tensor
    logit_probs: Tensor
    adjacency: Tensor
    n_layers: int
    first_pos: int
    error_norms: Tensor
    """[L, P] the error vectors' norms (0 at positions without error nodes)."""
    n_active: int
    """Active features before the ``max_features`` cap."""
    settings: dict = field(default_factory=dict)
    target_feature: int | None = None
    """Index (into ``features``) of the feature attributed instead of the logits (a local
    circuit, Ge et al. 2024); None for a graph of the logits."""

    @property
    def n_features(self) -> int:
        return self.features.shape[0]

    @property
    def n_pos(self) -> int:
        return self.tokens.shape[0]

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return self.logit_tokens.shape[0]

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_errors

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_start + self.n_logits

    def error_index(self, layer: int, pos: int) -> int:
        return self.error_start + layer * self.n_pos + pos

    def logit_weights(self) -> Tensor:
        """[N]: the weight of each sink in the influence: each logit node's probability, or 1 on
        the target feature of a local circuit; 0 elsewhere."""
        w = torch.zeros(self.n_nodes)
        if self.target_feature is not None:
            w[self.target_feature] = 1.0
        else:
            w[self.logit_start:] = self.logit_probs
        return w


def logit_targets(logits_last: Tensor, targets: list[int] | None, max_logits: int = 10,
                  cumulative: float = 0.95) -> tuple[Tensor, Tensor]:
    """Token ids and probabilities of the logit nodes: the given ``targets``, or the most likely
    tokens at the last position until their probability sums to ``cumulative`` (at most
    ``max_logits``)."""
    probs = logits_last.float().softmax(-1)
    if targets:
        ids = torch.tensor(targets, dtype=torch.long)
        return ids, probs[ids].cpu()
    p, ids = probs.sort(descending=True)
    k = int((p.cumsum(0) < cumulative).sum()) + 1
    k = max(1, min(k, max_logits))
    return ids[:k].cpu(), p[:k].cpu()


def attribute(model: Model, tset: TranscoderSet, tokens: Tensor | list[int], targets: list[int] | None = None,
              max_features: int = 4096, batch_size: int = 32, max_logits: int = 10,
              target_feature: tuple[int, int, int] | None = None, progress: ProgressArg = False) -> AttributionGraph:
    """The attribution graph of one prompt (module docstring). ``targets``: token ids of the
    logit nodes (default: the top logits up to 95% probability, at most ``max_logits``).
    ``target_feature`` = (layer, feature, position): attribute that active feature's
    pre-activation instead of the logits (a local circuit; no logit nodes; only features
    below it in layer and not after it in position can feed it)."""
    t0 = time.perf_counter()
    require_model(model, "attribute")
    tokens = prompt_ids(model, tokens, "attribute", verb="attributes")
    if isinstance(max_features, bool) or not isinstance(max_features, int) or max_features < 0:
        raise MechscopeError(f"max_features must be a whole number of at least 0 (features attributed); got {max_features!r}.")
    if targets is not None:
        import numbers

        if isinstance(targets, (str, int)) or not hasattr(targets, "__iter__"):
            raise MechscopeError(f"targets is a list of token ids, not {type(targets).__name__}; e.g. "
                                 "[model.tokenizer(' Paris', add_special_tokens=False).input_ids[0]] for one logit.")
        targets = list(targets)
        bad = [t for t in targets if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
        if bad:
            raise MechscopeError(f"targets holds {bad[0]!r}, not a token id; take ids from model.tokenizer(text, "
                                 "add_special_tokens=False).input_ids (the CLI's --target takes text).")
        targets = [int(t) for t in targets]
    if targets and len(set(targets)) < len(targets):  # one logit node per token: graph.json node ids must be unique
        twice = next(t for t in targets if targets.count(t) > 1)
        raise MechscopeError(f"the target token {twice} ({model.tokenizer.decode([twice])!r}) is given twice; give each logit "
                             "target once.")
    from mechscope.models.check import require_attention_edits

    require_attention_edits(model, "attribute (its replacement model freezes the attention patterns)")
    run = capture(model, tset, tokens)
    L, P = run.n_layers, run.n_pos
    V = run.logits.shape[-1]
    if targets and (min(targets) < 0 or max(targets) >= V):
        raise MechscopeError(f"a target token id is outside the vocabulary (0..{V - 1}).")
    n_act = run.active.shape[0]
    feats, vals = run.active, run.values.cpu()
    tgt_idx = None
    if target_feature is not None:
        tl, tf, tp = target_feature
        if not (0 <= tl < L and 0 <= tp < P and 0 <= tf < tset.layers[tl].cfg.d_sae):
            raise MechscopeError(f"target feature {tl}:{tf}:{tp} is out of range ({L} layers, "
                                 f"{tset.layers[min(max(tl, 0), L - 1)].cfg.d_sae} features, {P} positions).")
        hit = ((feats[:, 0] == tl) & (feats[:, 1] == tp) & (feats[:, 2] == tf)).nonzero().flatten()
        if tp < run.first_pos:
            raise MechscopeError(f"position {tp} is the BOS token, whose features are not graph nodes (its MLP output is held "
                                 "fixed, as the attention sink it is); give a feature at a later position.")
        if len(hit) == 0:
            raise MechscopeError(f"feature {tf} of layer {tl} is not active at position {tp} of this prompt; "
                                 "attribute an active one (see graph.json's nodes).")
        tgt_idx = int(hit[0])
        lt, lp = torch.zeros(0, dtype=torch.long), torch.zeros(0)
    else:
        lt, lp = logit_targets(run.logits[-1], targets, max_logits)
    W_U, _ = unembed_weights(model)
    dirs = (W_U[:, lt] - W_U.mean(1, keepdim=True)).T.float()  # [K, d]
    B = max(1, batch_size)
    engine = _Backward(model, tset, run, B)
    if tgt_idx is None:
        cand, n_sink = torch.ones(n_act, dtype=torch.bool), len(lt)
    else:
        cand, n_sink = (feats[:, 0] < feats[tgt_idx, 0]) & (feats[:, 1] <= feats[tgt_idx, 1]), 1  # can feed the target
    # One pass per batch of sink rows (logits or the target), then per batch of feature rows.
    n_passes = -(-n_sink // B) + -(-min(int(cand.sum()), max_features) // B)
    engine.bar = as_progress(progress).phase("attribution backward passes", total=n_passes, unit="pass")
    dec = [tc.W_dec.detach().float() for tc in tset.layers]
    enc = [tc.W_enc.detach().float() for tc in tset.layers]
    # Source vectors of the active features, built once per graph on the model's device, each
    # layer's grouped by position: a row's entries are one small GEMM per position (gradient at p
    # [n, d] x the sources at p [d, m_p]), not a gather of the gradient per feature ([n, m, d]: half
    # of a 512-feature graph's time on the 2-core CPU); the row is built on the device and copied
    # to the CPU once per backward pass (per-layer copies made a 64-token graph 2.3x its floor on an H200).
    dev = run.errors.device
    feats_cpu = feats.cpu()
    by_layer, segs = [], []
    for layer in range(L):
        idx = torch.nonzero(feats_cpu[:, 0] == layer).flatten()
        idx = idx[torch.argsort(feats_cpu[idx, 1], stable=True)]
        pos, counts = torch.unique_consecutive(feats_cpu[idx, 1], return_counts=True)
        ends = counts.cumsum(0)
        by_layer.append(idx)
        segs.append(list(zip(pos.tolist(), (ends - counts).tolist(), ends.tolist())))  # (position, start, end)
    src_vec = [(dec[layer][feats_cpu[idx, 2].to(dec[layer].device)] * vals[idx, None].to(dec[layer])).to(dev)
               for layer, idx in enumerate(by_layer)]  # [m, d] per layer
    cols = [idx.to(dev) for idx in by_layer]
    errors, embed = run.errors, run.embed  # float32, on the model's device (capture)

    def rows_for(kind: str, items: Tensor) -> Tensor:
        """Rows [n, n_act + L*P + P] over all active features, errors, tokens."""
        out = []
        for i in range(0, len(items), B):
            chunk = items[i:i + B]
            inj: dict[tuple[str, int], list[tuple[int, int, Tensor]]] = {}
            for b, it in enumerate(chunk.tolist()):
                if kind == "logit":
                    inj.setdefault(("final", 0), []).append((b, P - 1, dirs[it]))
                else:
                    layer, pos, f = feats_cpu[it].tolist()
                    inj.setdefault(("x_in", layer), []).append((b, pos, enc[layer][:, f]))
            g_mlp, g_emb = engine.backward(inj)
            row = torch.zeros(len(chunk), n_act + L * P + P, device=dev)
            for layer in range(L):
                if g_mlp[layer] is None:
                    continue
                g = g_mlp[layer][: len(chunk)].float()  # [n, P, d]
                if len(by_layer[layer]):
                    part = torch.empty(len(chunk), len(by_layer[layer]), device=dev)
                    for p, a, b in segs[layer]:
                        part[:, a:b] = g[:, p] @ src_vec[layer][a:b].T
                    row[:, cols[layer]] = part
                row[:, n_act + layer * P: n_act + (layer + 1) * P] = (g * errors[layer][None]).sum(-1)
            if g_emb is not None:
                row[:, n_act + L * P:] = (g_emb[: len(chunk)].float() * embed[None]).sum(-1)
            out.append(row.cpu())
        return torch.cat(out) if out else torch.zeros(0, n_act + L * P + P)

    try:
        if tgt_idx is None:
            logit_rows = rows_for("logit", torch.arange(len(lt)))
            sink_rows, sink_w = logit_rows, lp
        else:
            logit_rows = torch.zeros(0, n_act + L * P + P)
            sink_rows, sink_w = rows_for("feature", torch.tensor([tgt_idx])), torch.ones(1)
        n_cand = int(cand.sum())
        if n_cand <= max_features:
            chosen = torch.nonzero(cand).flatten()
            feat_rows = rows_for("feature", chosen)
        else:
            chosen, feat_rows = _visit_by_influence(rows_for, sink_rows, sink_w, feats, n_act, L, P, max_features, B,
                                                    allowed=cand)
        if tgt_idx is not None:  # the target itself is a node, with its row
            chosen = torch.cat([chosen, torch.tensor([tgt_idx])])
            feat_rows = torch.cat([feat_rows, sink_rows])
    finally:
        engine.close()
    passes, depths = engine.calls, engine.depths
    # assemble the square adjacency over kept features + errors + tokens + logits
    F = len(chosen)
    N = F + L * P + P + len(lt)
    A = torch.zeros(N, N)
    keep_cols = chosen
    dropped = torch.ones(n_act, dtype=torch.bool)
    dropped[chosen] = False
    drop_idx = torch.nonzero(dropped).flatten()

    def squash(rows: Tensor) -> Tensor:
        """Columns of all active features -> kept features, dropped ones folded into errors."""
        out = torch.zeros(rows.shape[0], F + L * P + P)
        out[:, :F] = rows[:, keep_cols]
        out[:, F:] = rows[:, n_act:]
        if len(drop_idx):
            err_col = F + feats[drop_idx, 0] * P + feats[drop_idx, 1]
            out.index_add_(1, err_col, rows[:, drop_idx])
        return out

    A[:F, : F + L * P + P] = squash(feat_rows)
    A[F + L * P + P:, : F + L * P + P] = squash(logit_rows)
    g = AttributionGraph(
        tokens=run.tokens, token_text=[model.tokenizer.decode([t]) for t in run.tokens.tolist()],
        features=feats[chosen].clone(), activations=vals[chosen].clone(), logit_tokens=lt, logit_probs=lp,
        adjacency=A, n_layers=L, first_pos=run.first_pos, error_norms=run.errors.norm(dim=-1).cpu(), n_active=n_act,
        settings={"max_features": max_features, "batch_size": B, "targets": targets, "backward_passes": passes, "backward_depths": depths,
                  "target_feature": list(target_feature) if target_feature else None, "seconds": 0.0},
        target_feature=None if tgt_idx is None else len(chosen) - 1,
    )
    g.settings["seconds"] = round(time.perf_counter() - t0, 3)
    return g


def _visit_by_influence(rows_for, logit_rows: Tensor, lp: Tensor, feats: Tensor, n_act: int, L: int, P: int,
                        max_features: int, B: int, allowed: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Rows for the ``max_features`` features of highest estimated influence (module docstring 4)."""
    from mechscope.features.prune import influence_from_normalised, normalise_rows

    visited = torch.zeros(n_act, dtype=torch.bool) if allowed is None else ~allowed
    order: list[int] = []
    # rows land in one preallocated table, normalised once each: re-concatenating and
    # re-normalising every row so far before each batch cost 40% of a 4,096-feature graph
    cap = min(max_features, n_act)
    rows = torch.empty(cap, logit_rows.shape[1])
    normed = torch.empty(cap, logit_rows.shape[1])
    lr = normalise_rows(logit_rows)
    while len(order) < max_features:
        n = len(order)
        infl = influence_from_normalised(torch.tensor(order, dtype=torch.long), normed[:n], lr, lp, n_act)
        infl[visited] = -1.0
        step = min(B, max_features - n)
        nxt = infl.topk(min(step, n_act)).indices
        nxt = nxt[infl[nxt] >= 0]
        if len(nxt) == 0:
            break
        visited[nxt] = True
        order += nxt.tolist()
        got = rows_for("feature", nxt)
        rows[n:n + len(nxt)] = got
        normed[n:n + len(nxt)] = normalise_rows(got)
    chosen = torch.tensor(order, dtype=torch.long)
    return chosen, rows[: len(order)]


class _Backward:
    """The kept forward pass of B prompt copies through the frozen model; ``backward`` runs one
    backward pass for a set of injections and returns the gradients at every MLP output
    [B, P, d] (None where no target lies above) and at the token embeddings [B, P, d]."""

    def __init__(self, model: Model, tset: TranscoderSet, run: ReplacementRun, B: int):
        self.model, self.B = model, B
        self.store: dict = {}
        self._params = [p for p in model.bridge.parameters() if p.requires_grad]
        for p in self._params:
            p.requires_grad_(False)
        hooks = freeze_hooks(model, tset, run, B, self.store)
        tokens = run.tokens[None].expand(B, -1).to(model.device)
        self._ctx = plain_attention(model)
        self._ctx.__enter__()
        with torch.enable_grad(), quiet_norm_edits():
            model.bridge.run_with_hooks(tokens, fwd_hooks=hooks)
        self.P = run.n_pos
        self.calls = 0
        self.bar: PhaseHandle | None = None  # advanced once per backward pass (``attribute(progress=...)``)
        self.depths: list[int] = []
        """Per backward pass, the highest layer a target was injected at (n_layers: the logits)."""

    def backward(self, inj: dict[tuple[str, int], list[tuple[int, int, Tensor]]]):
        outs, grads = [], []
        for (what, layer), items in inj.items():
            t = self.store["final"] if what == "final" else self.store["x_in"][layer]
            g = torch.zeros_like(t)
            for b, pos, vec in items:
                g[b, pos] = vec.to(g)
            outs.append(t)
            grads.append(g)
        ins = [self.store["embed"]] + [m for m in self.store["mlp_out"]]
        self.calls += 1
        if self.bar is not None:
            self.bar.advance()
        self.depths.append(max(len(self.store["x_in"]) if what == "final" else layer for what, layer in inj))
        with torch.enable_grad():
            got = torch.autograd.grad(outs, ins, grads, retain_graph=True, allow_unused=True)
        return list(got[1:]), got[0]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.store.clear()
        self._ctx.__exit__(None, None, None)
        for p in self._params:
            p.requires_grad_(True)
