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
from typing import TYPE_CHECKING, Literal, get_args

import torch

from mechscope.circuits.qk import QKExact
from mechscope.graph import Graph
from mechscope.models import plain_attention
from mechscope.models.hooks import attn_hook, attn_out, attn_z, mlp_in, resid_pre
from mechscope.models.norms import fit_norm, head_shares, input_norm
from mechscope.patching.engine import (
    INPUT_HOOK,
    LOGITS_HOOK,
    Ablation,
    attn_weights,
    capture_hooks,
    dataset_mean_source,
    heads_layer,
    logits_at,
    sender_hooks,
    source_activations,
)
from mechscope.progress import ProgressArg, as_progress
from mechscope.tasks import check_fits
from mechscope.tasks.base import TaskBatch

if TYPE_CHECKING:
    from mechscope.models import Model

Method = Literal["eap", "eap-ig", "eap-ig-act"]
QKMode = Literal["exact", "linear"]


@contextlib.contextmanager
def frozen(model: Model):
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
    progress: ProgressArg = False,
    qk: QKMode = "exact",
) -> torch.Tensor:
    """Attribution score of every edge: float [n_senders, n_receivers] (0 where no edge).

    Scores estimate metric(edge patched) - metric(clean), averaged over examples. ``qk``:
    ``exact`` (default for eap and eap-ig) computes query and key edges through the attention
    softmax exactly (``circuits.qk``); ``linear`` keeps the plain gradient for them.
    """
    from mechscope.models import require_model

    require_model(model, "edge_scores")
    return edge_score_folds(model, graph, batch, None, method, steps, ablation, batch_size, progress, qk)[0]


def edge_score_folds(
    model: Model,
    graph: Graph,
    batch: TaskBatch,
    folds: list[int] | None = None,
    method: Method = "eap-ig",
    steps: int = 5,
    ablation: Ablation = "patching",
    batch_size: int = 16,
    progress: ProgressArg = False,
    qk: QKMode = "exact",
    info: dict | None = None,
) -> torch.Tensor:
    """Edge scores summed per fold of examples, divided by the number of examples:
    float [n_folds, n_senders, n_receivers], summing over folds to ``edge_scores``.
    ``info`` (a dict, when given) receives ``qk_fallback_layers``: the layers whose attention
    the exact q/k computation could not reproduce (``circuits.qk``), scored by the plain
    gradient instead; the progress sees a note naming them.

    ``folds``: sizes of consecutive example ranges (None: one fold). Attribution scores are
    sums over examples, so the scores without fold f (cross-validation) are the total minus
    fold f, at no extra forward or backward pass.
    """
    from mechscope.errors import MechscopeError
    from mechscope.graph import check_graph_fits
    from mechscope.tasks import check_batch_size

    if method not in get_args(Method):
        hint = " (ACDC is not an attribution score: run discover with DiscoverConfig(method='acdc'))" if method == "acdc" else ""
        raise MechscopeError(f"Unknown attribution method {method!r}; choose {', '.join(get_args(Method))}{hint}.")
    if ablation not in ("patching", "mean", "zero"):
        raise MechscopeError(f"Unknown ablation {ablation!r}; choose patching, mean or zero.")
    check_batch_size(batch_size)
    from mechscope.models.check import require_float32

    require_float32(model, "gradient attribution (EAP, EAP-IG)")
    if not isinstance(batch, TaskBatch):
        raise MechscopeError(f"edge_scores needs a TaskBatch, got a {type(batch).__name__}; build one with "
                             "get_task(name).build(model.tokenizer).")
    check_graph_fits(model, graph, "edge_scores")
    batch.check(model.summary.d_vocab)
    check_fits(model, batch)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MechscopeError(f"--ig-steps must be a whole number of at least 1, got {steps!r}.")
    m = 1 if method == "eap" else steps
    if qk not in ("exact", "linear"):
        raise MechscopeError(f"Unknown q/k edge mode '{qk}'; choose exact or linear.")
    dev = model.device
    n = len(batch)
    folds = list(folds) if folds else [n]
    if sum(folds) != n or min(folds) < 1:
        raise ValueError(f"fold sizes {folds} do not partition {n} examples")
    bounds = torch.tensor([0] + folds).cumsum(0).tolist()
    scores = torch.zeros(len(folds), graph.n_senders, graph.n_receivers, device=dev)
    chunks = range(0, n, batch_size)
    with as_progress(progress).phase(f"{method} scores", total=len(chunks), unit="batch") as bar, \
            frozen(model), plain_attention(model):
        heads = [HeadInputGrads(input_norm(model, l), {k: v.detach() for k, v in attn_weights(model, l).items()})
                 for l in range(graph.n_layers)]
        exact = QKExact(graph.n_layers) if qk == "exact" and method != "eap-ig-act" else None
        # Mean ablation: the mean over every example, not over each chunk of ``batch_size``
        means: dict[str, torch.Tensor] = {}
        if ablation == "mean":
            names = tuple(name for name, _ in _sender_groups(graph, head_shares(model))) if method == "eap-ig-act" else ()
            mean_src, means = dataset_mean_source(model, graph, batch, batch_size, names)
        for i in chunks:
            j = min(n, i + batch_size)
            sub = batch.subset(slice(i, j)).to(dev)
            # (fold, first, last example of the fold inside this sub-batch), sub-batch indices
            parts = [(f, max(a, i) - i, min(b, j) - i) for f, (a, b) in enumerate(zip(bounds, bounds[1:]))
                     if a < j and b > i]
            if ablation == "mean":
                src = mean_src
            else:
                with torch.no_grad():
                    src = source_activations(model, graph, sub.clean, sub.corrupt, ablation, sub.lengths)
            if method == "eap-ig-act":
                _accumulate_activations(model, graph, sub, src, m, scores, heads, ablation, parts, means)
            else:
                _accumulate(model, graph, sub, src, m, scores, heads, parts, exact)
            bar.advance()
    fallback = exact.fallback_layers if exact is not None else []
    if info is not None:
        info["qk_fallback_layers"] = fallback
    if fallback:
        as_progress(progress).note(
            f"exact q/k scoring does not reproduce the attention of layer(s) {', '.join(map(str, fallback))} (ALiBi, partial "
            "rotary or another rotary variant, or a query/key norm over all heads); their query and key edges have the plain gradient score (as --qk linear)")
    return (scores / n) * graph.allowed.to(dev)


class HeadInputGrads:
    """Per-head gradients at the residual inputs of one layer's q/k/v projections.

    For head h of projection W (q, k or v), d metric / d x = J_norm(x)^T W[h] g_h, with g_h
    the gradient at the projection's output. The norm's per-dimension scale s (its weight, or
    1 + weight for Gemma's RMSNorm, whichever the module computes) is folded into W once; the
    remaining Jacobian, of plain RMS or layer normalisation, has a closed form. With
    x_hat the normalised input, inv its 1 / rms (or 1 / std) and y_h = W'[h] x_hat:

        J^T W'[h]^T g_h = inv W'[h]^T g_h  (minus its mean over d for layer norm)
                          - x_hat (g_h . y_h) inv / d

    The first term is linear in inv * g_h, so over the m steps of integrated gradients it is
    accumulated in head space ([heads, b*p, d_head], 9x smaller than the residual stream)
    and multiplied by W' once; the second is a rank-m sum formed once from the m steps'
    x_hat. ``step`` adds one pass, ``flush`` writes the sum into the score accumulator: two
    passes over the [heads, b*p, d_model] block per layer instead of seven per step (EAP-IG's
    per-head gradient time on IOI, 25 pairs, 5 steps: 1.15 s -> 0.42 s; docs/decisions.md).
    y_h is read off the projection's forward value minus a constant offset (norm and
    projection biases), measured once against x_hat @ W' and used only if it matches.

    The norm's form is *measured*, not assumed from its class: ``fit_norm`` fits
    y = s * base(x) + b per dimension for base = RMS or layer normalisation and keeps the one
    that reproduces the module; a norm fitting neither goes through ``torch.func.vjp``.
    """

    def __init__(self, norm, weights: dict[str, torch.Tensor]):
        self.norm = norm
        W = torch.cat([weights["W_Q"], weights["W_K"], weights["W_V"]]).float()  # [H + 2KV, d, e], receiver order (float32 as the gradients)
        if norm is None:  # a block without an input norm (OLMo-2): the heads read the residual stream itself
            self.kind, scale, self.eps = "none", torch.ones(W.shape[1], device=W.device), 0.0
        else:
            self.kind, scale, self.eps = fit_norm(norm, W.shape[1], W.device)
        Ws = W * scale[None, :, None] if self.kind != "other" else W
        self.W = Ws.contiguous()  # [n, d, e]
        self.Wt = Ws.transpose(1, 2).contiguous()  # [n, e, d]
        # Layer norm's Jacobian removes the mean over d; for the linear term that is W' centred.
        self.Wt_acc = self.Wt - self.Wt.mean(-1, keepdim=True) if self.kind == "ln" else self.Wt
        self.offset: torch.Tensor | bool | None = None  # projection output - x_hat @ W'; False: not affine
        self._reset()

    def _reset(self) -> None:
        self.G: torch.Tensor | None = None  # [n, bp, e], sum of inv * g
        self.C: list[torch.Tensor] = []  # per step [n, bp]: (g . y) inv / d
        self.X: list[torch.Tensor] = []  # per step [bp, d]: x_hat
        self.A: torch.Tensor | None = None  # "other" norms: the dense sum [n, bp, d]

    def __call__(self, x: torch.Tensor, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor) -> torch.Tensor:
        """x [b, p, d] (the norm's input); g* [b, p, heads, e] -> [H + 2KV, b, p, d]."""
        b, p, d = x.shape
        out = torch.zeros(self.Wt.shape[0], b * p * d, device=x.device, dtype=torch.float32)
        self.step(x, gq, gk, gv)
        self.flush(out)
        return out.view(-1, b, p, d)

    @staticmethod
    def _heads(*ts: torch.Tensor) -> torch.Tensor:
        """[b, p, heads, e] tensors -> [sum of heads, b*p, e]."""
        t = torch.cat(ts, 2)
        return t.permute(2, 0, 1, 3).reshape(t.shape[2], -1, t.shape[3]).float()

    def step(self, x: torch.Tensor, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor,
             outs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add one pass: x [b, p, d] the norm's input, g* [b, p, heads, e] the gradients at the
        q/k/v projection outputs, ``outs`` those outputs' forward values (optional: saves a GEMM)."""
        g = self._heads(gq, gk, gv)  # [n, bp, e]
        xx = x.reshape(-1, x.shape[-1]).float()  # [bp, d]
        d = xx.shape[-1]
        if self.kind == "other":
            u = torch.bmm(g, self.Wt)  # [n, bp, d]
            b, p = x.shape[:2]
            a = norm_vjp(self.norm, x, u.view(-1, b, p, d).permute(1, 2, 0, 3)).permute(2, 0, 1, 3).reshape(u.shape)
            self.A = a if self.A is None else self.A.add_(a)
            return
        if self.kind == "none":  # J = I: the gradient is W g alone
            self.G = g.clone() if self.G is None else self.G.add_(g)
            return
        if self.kind == "rms":
            inv = torch.rsqrt(xx.pow(2).mean(-1, keepdim=True) + self.eps)  # [bp, 1]
            xhat = xx * inv
        else:
            c = xx - xx.mean(-1, keepdim=True)
            inv = torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + self.eps)
            xhat = c * inv
        y = self._projected(xhat, outs)  # [n, bp, e]
        gi = g * inv
        self.G = gi if self.G is None else self.G.add_(gi)
        self.C.append((gi * y).sum(-1) / d)  # [n, bp]
        self.X.append(xhat)

    def _projected(self, xhat: torch.Tensor, outs) -> torch.Tensor:
        """y = x_hat @ W' per head [n, bp, e], from the projections' forward values when they
        are that plus a constant (checked on first use), else by a GEMM."""
        if outs is not None and self.offset is not False:
            o = self._heads(*outs)
            if self.offset is None:
                direct = torch.matmul(xhat, self.W)
                off = (o - direct).mean(1, keepdim=True)
                ok = (o - off - direct).abs().max() <= 1e-4 * direct.abs().max().clamp(min=1.0)
                self.offset = off if bool(ok) else False
                return direct
            return o - self.offset
        return torch.matmul(xhat, self.W)

    def flush(self, acc: torch.Tensor) -> None:
        """acc [H + 2KV, b*p*d] += the per-head input gradients summed over the steps since the
        last flush, in place; then start a new sum."""
        n = self.Wt.shape[0]
        if self.A is not None:
            acc.view_as(self.A).add_(self.A)
        elif self.G is not None:
            bp = self.G.shape[1]
            a = acc.view(n, bp, -1)
            a.baddbmm_(self.G, self.Wt_acc)
            if self.C:  # the norm's own Jacobian term (none without a norm)
                corr = torch.bmm(torch.stack(self.C, -1).transpose(0, 1), torch.stack(self.X, 1))  # [bp, n, d]
                a.sub_(corr.transpose(0, 1))
        self._reset()


def norm_vjp(norm, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """J_norm(x)^T g for a batch of cotangents: x [b, p, d], g [b, p, h, d] -> [b, p, h, d].

    Any norm module, through ``torch.func.vjp`` vmapped over heads (``HeadInputGrads`` uses
    closed forms where the module fits one).
    """
    vjp = torch.func.vjp(norm, x)[1]
    return torch.func.vmap(vjp, in_dims=2, out_dims=2)(g)[0]


def _receiver_grads(model: Model, graph: Graph, sub: TaskBatch, heads: list[HeadInputGrads], extra_hooks: list,
                    acc: torch.Tensor, capture: torch.Tensor | None = None, exact: QKExact | None = None
                    ) -> list[torch.Tensor | None]:
    """One forward + backward pass on the clean prompts under ``extra_hooks``.

    Adds d metric / d x_r, in residual-stream space, to row r of ``acc`` [n_receivers,
    B*P*D] for every MLP and logits receiver, and gives each layer's ``HeadInputGrads`` its
    q/k/v pass (``_flush`` writes their sums into ``acc`` after the last pass); receivers
    upstream of every activation the hooks make differentiable get nothing. With ``capture``
    [n_senders, B, P, D], also stores every sender's output there. With ``exact``, adds the
    gradient at each head's output z to it and, on the capturing (clean) pass, lets it keep
    the attention tensors it needs. Returns each layer's residual input.
    """
    L = graph.n_layers
    kept: dict[tuple[str, int], torch.Tensor] = {}  # (what, layer) -> the kept activation
    resid: list[torch.Tensor | None] = [None] * L

    def keep(key: tuple[str, int], fresh: bool):
        def hook(x, hook):
            if not x.requires_grad:
                return x  # upstream of every varied activation: its gradient is not needed
            # The MLP input and the final residual also feed the residual skip path: a fresh
            # node (clone) makes their gradient count only the receiver's own use. A q/k/v
            # projection output has no other use, so it is its own node.
            y = x.clone() if fresh else x
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
    if exact is not None:
        hooks += exact.hooks(model, capture is not None)
    for l in range(L):
        hooks.append((resid_pre(l), store_resid(l)))
        for t in ("q", "k", "v"):
            hooks.append((attn_hook(l, t), keep((t, l), False)))
        if exact is not None:
            hooks.append((attn_z(l), keep(("z", l), False)))
        hooks.append((mlp_in(l), keep(("mlp", l), True)))
    hooks.append((LOGITS_HOOK, keep(("logits", L), True)))
    with torch.enable_grad():
        metric = sub.metric_at(logits_at(model, sub.clean, sub.positions, hooks)).sum()
        keys = list(kept)
        grads = dict(zip(keys, torch.autograd.grad(metric, [kept[c] for c in keys])))
    with torch.no_grad():
        for (what, l), g in grads.items():
            if what == "q":  # q, k and v of a layer together, in receiver order
                x = resid[l]
                assert x is not None  # stored by the resid_pre hook of this layer on the same pass
                heads[l].step(x, g, grads[("k", l)], grads[("v", l)],
                              outs=(kept[("q", l)].detach(), kept[("k", l)].detach(), kept[("v", l)].detach()))
            elif what == "mlp":
                acc[graph.receiver_slices(l)["mlp"].start] += g.reshape(-1)
            elif what == "logits":
                acc[graph.logits_receiver] += g.reshape(-1)
            elif what == "z" and exact is not None:
                exact.add_gz(l, g)
    return resid


def _flush(graph: Graph, heads: list[HeadInputGrads], acc: torch.Tensor) -> None:
    """Write every layer's summed q/k/v head input gradients into their rows of ``acc``."""
    for l, h in enumerate(heads):
        rs = graph.receiver_slices(l)
        h.flush(acc[rs["q"].start : rs["v"].stop])


def _contract(graph: Graph, delta: torch.Tensor, acc: torch.Tensor, scale: float,
              scores: torch.Tensor, parts: list[tuple[int, int, int]], senders: slice | None = None,
              chunks: int = 4) -> None:
    """scores[f, s, r] += scale * sum_{b in f, p, d} delta[s, b, p, d] * acc[r, b*p*d], as GEMMs.

    ``parts``: (fold f, first, last example) ranges of the sub-batch; each fold's examples are
    a contiguous range of columns. Entries of senders that are not upstream of a receiver are
    dropped by the final ``allowed`` mask; ``senders`` restricts the rows (the others are left
    untouched). The senders are cut into up to ``chunks`` runs, each multiplied only with the
    receivers from its first downstream one on (receivers are in layer order), which skips most
    of the zero triangle while reading every delta once; runs that start at the same receiver
    are one GEMM (one sender group is always one). A GEMM per layer would read the deltas
    once per layer (docs/decisions.md, "Edge scores are one GEMM").
    """
    senders = senders or slice(0, graph.n_senders)
    first = graph.allowed[senders].float().argmax(1).tolist()  # first downstream receiver per sender
    bounds = sorted(set(torch.linspace(0, len(first), chunks + 1).long().tolist()))
    starts = [a for i, a in enumerate(bounds[:-1]) if i == 0 or first[a] != first[bounds[i - 1]]]
    width = acc.shape[1] // delta.shape[1]  # columns per example (P * D)
    for a, b in zip(starts, starts[1:] + [len(first)]):
        r0, rows = first[a], slice(senders.start + a, senders.start + b)
        d = delta[rows].reshape(b - a, -1)  # [s, B*P*D]
        for f, e0, e1 in parts:
            cols = slice(e0 * width, e1 * width)
            scores[f, rows, r0:] += scale * (d[:, cols] @ acc[r0:, cols].T)


def _accumulate(model: Model, graph: Graph, sub: TaskBatch, src: torch.Tensor, m: int, scores: torch.Tensor,
                heads: list[HeadInputGrads], parts: list[tuple[int, int, int]], exact: QKExact | None) -> None:
    """EAP / EAP-IG on the input embeddings: m interpolation steps, alpha = 1 last (the clean run).

    With ``exact``, the edges into query and key receivers are scored through the softmax
    (``circuits.qk``) on the layers where the model's attention was reproduced, instead of by
    the gradient at their input.
    """
    B, P = sub.clean.shape
    D = model.summary.d_model
    clean_acts = torch.empty(graph.n_senders, B, P, D, device=src.device)
    acc = torch.zeros(graph.n_receivers, B * P * D, device=src.device)
    if exact is not None:
        exact.reset()
    resid: list = []
    for k in range(1, m + 1):
        alpha = k / m

        def interp(x, hook, alpha=alpha):
            x = x.detach()
            if alpha < 1.0:
                x = src[0] + alpha * (x - src[0])
            return x.requires_grad_(True)

        resid = _receiver_grads(model, graph, sub, heads, [(INPUT_HOOK, interp)], acc,
                                capture=clean_acts if alpha == 1.0 else None, exact=exact)
    _flush(graph, heads, acc)
    delta = clean_acts.neg_().add_(src)  # src - clean, in place
    exact_layers = []
    if exact is not None:
        for l in range(graph.n_layers):
            if exact.layers[l].gz is not None and exact.verify(model, l, heads[l]):
                rs = graph.receiver_slices(l)
                acc[rs["q"].start : rs["k"].stop] = 0.0  # scored exactly below instead
                exact_layers.append(l)
    _contract(graph, delta, acc, 1.0 / m, scores, parts)
    if not exact_layers:
        return
    assert exact is not None  # exact_layers is only filled when it is given
    top = max(graph.sender_slice_before(l) for l in exact_layers)
    pbsd = delta[:top].permute(2, 1, 0, 3).contiguous()  # [P, B, S, D]: once for every layer
    del delta, clean_acts, acc
    for l in exact_layers:
        rs, up = graph.receiver_slices(l), graph.sender_slice_before(l)
        eq, ek = exact.effects(l, heads[l], resid[l], pbsd[:, :, :up], m, positions_first=True)  # [S, B, H], [S, B, KV]
        for f, e0, e1 in parts:
            scores[f, :up, rs["q"]] += eq[:, e0:e1].sum(1)
            scores[f, :up, rs["k"]] += ek[:, e0:e1].sum(1)


def _sender_groups(graph: Graph, shares: list) -> list[tuple[str, slice]]:
    """(hook, sender range) of every group of senders one hook writes; heads through ``hook_z``
    (their outputs are linear in z, and z exists in plain-attention mode), or, where a norm
    follows the attention (``shares[layer]``, Gemma 2 and 3), through that norm's output, the
    sum of the heads' shares: a straight line there is a straight line of every share."""
    out = []
    for name, sl in sender_hooks(graph):
        layer = heads_layer(graph, name)
        if layer is not None:
            name = attn_z(layer) if shares[layer] is None else attn_out(layer)
        out.append((name, sl))
    return out


def _accumulate_activations(model: Model, graph: Graph, sub: TaskBatch, src: torch.Tensor, m: int, scores: torch.Tensor,
                            heads: list[HeadInputGrads], ablation: Ablation, parts: list[tuple[int, int, int]],
                            means: dict[str, torch.Tensor]) -> None:
    """EAP-IG on activations: integrated gradients along each sender group's own path.

    For each group (the embeddings, one layer's heads, one MLP) and alpha in {1/m, ..., 1},
    the group's output is set to ``src + alpha * (clean - src)`` while the rest of the model
    runs on the clean prompts; the edges *out of that group* are scored with the receiver
    gradients of those m runs. Head outputs are interpolated through ``hook_z`` (a head's
    output is linear in z), which needs the source and clean z of every layer.
    """
    B, P = sub.clean.shape
    clean_acts = torch.empty(graph.n_senders, B, P, model.summary.d_model, device=src.device)
    names = [name for name, _ in _sender_groups(graph, head_shares(model))]
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
        else:  # ``means``: each hook's mean over the whole batch (``dataset_mean_source``)
            for n in names:
                c = z["clean"][n]
                z["src"][n] = means[n].expand_as(c) if ablation == "mean" else torch.zeros_like(c)
    delta = src - clean_acts
    acc = torch.empty(graph.n_receivers, B * P * model.summary.d_model, device=src.device)
    for name, sl in _sender_groups(graph, head_shares(model)):
        clean, source = z["clean"][name], z["src"][name]
        acc.zero_()
        for k in range(1, m + 1):
            alpha = k / m

            def interp(x, hook, alpha=alpha, clean=clean, source=source):
                return (source + alpha * (clean - source)).requires_grad_(True)

            _receiver_grads(model, graph, sub, heads, [(name, interp)], acc)
        _flush(graph, heads, acc)
        _contract(graph, delta, acc, 1.0 / m, scores, parts, senders=sl)


def node_scores(graph: Graph, scores: torch.Tensor) -> torch.Tensor:
    """Sender (node) scores [n_senders] from edge scores: the sum over each sender's edges."""
    return (scores * graph.allowed.to(scores.device)).sum(1)
