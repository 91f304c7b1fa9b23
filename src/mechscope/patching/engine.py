"""Batched, vectorised activation patching at edge and node level.

Edge patching rests on the residual stream being a sum of sender outputs: a receiver's input
is ``x_r = sum_s out_s (+ constants)``. Patching the edge s -> r from a source run replaces
``out_s`` by ``src_s`` in that sum only, so

    x_r' = x_r - sum_s mask[s, r] * (out_s - src_s)                                  (1)

where ``out_s`` is the sender's output *in the patched run itself* (so the effects of edges
patched upstream propagate). One forward pass evaluates any mask; K masks run as one batch of
K * batch rows, the correction (1) being a single einsum per receiver hook. Masks may be
fractional (0..1), which gradient-based methods use.

Node patching replaces a sender's output itself (every outgoing edge at once); it is
implemented independently of (1), so tests can check the two agree.

Where a norm follows the attention (Gemma 2 and 3), ``out_s`` of a head is its share of that
norm's output at the scale of the run it is read in (``models.norms.HeadShares``): the shares of
the live run sum to what its attention adds, which is all (1) needs; a head's node patch swaps its
share at the norm's output.

Sources: ``src`` is a cached run on corrupted prompts (resample / interchange ablation), the
mean over the clean batch (mean ablation), or zeros (zero ablation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

import torch

from mechscope.errors import MechscopeError
from mechscope.graph import Graph
from mechscope.models.hooks import (
    FINAL_NORM_IN,
    UNEMBED_IN,
    attn_out,
    attn_result,
    attn_z,
    k_input,
    mlp_in,
    mlp_out,
    q_input,
    resid_pre,
    v_input,
)
from mechscope.models.norms import head_shares
from mechscope.models.tokens import ids_outside

if TYPE_CHECKING:
    from mechscope.models import Model

Ablation = Literal["patching", "mean", "zero"]

INPUT_HOOK = resid_pre(0)
"""Where the ``input`` sender (token + position embeddings) is read."""
LOGITS_HOOK = FINAL_NORM_IN
"""Where the ``logits`` receiver is patched."""


def sender_hooks(graph: Graph) -> list[tuple[str, slice]]:
    """(hook name, sender index range) for every sender hook, in forward order."""
    out = [(INPUT_HOOK, slice(0, 1))]
    for l in range(graph.n_layers):
        out.append((attn_result(l), graph.head_senders(l)))
        m = graph.mlp_sender(l)
        out.append((mlp_out(l), slice(m, m + 1)))
    return out


def heads_layer(graph: Graph, hook_name: str) -> int | None:
    """The layer whose heads the sender hook ``hook_name`` writes, None for other senders."""
    return _result_layers(graph.n_layers).get(hook_name)


@functools.lru_cache(maxsize=16)
def _result_layers(n_layers: int) -> dict[str, int]:
    return {attn_result(l): l for l in range(n_layers)}


def receiver_hooks(graph: Graph) -> list[tuple[str, slice, int]]:
    """(hook name, receiver index range, number of upstream senders), in forward order."""
    out = []
    for l in range(graph.n_layers):
        rs = graph.receiver_slices(l)
        up = graph.sender_slice_before(l)
        out += [(q_input(l), rs["q"], up), (k_input(l), rs["k"], up), (v_input(l), rs["v"], up)]
        out.append((mlp_in(l), rs["mlp"], graph.sender_slice_before(l, mlp=True)))
    out.append((LOGITS_HOOK, slice(graph.logits_receiver, graph.logits_receiver + 1), graph.n_senders))
    return out


def _as_heads(x: torch.Tensor) -> torch.Tensor:
    """[b, p, d] -> [b, p, 1, d]; per-head tensors [b, p, h, d] unchanged."""
    return x if x.dim() == 4 else x[:, :, None]


def attn_weights(model: Model, layer: int) -> dict[str, torch.Tensor]:
    """Layer ``layer``'s live attention weights (the model's own tensors, unfolded, not copied):
    W_Q [h, d_model, d_head], W_K/W_V [kv, d_model, d_head], W_O [h, d_head, d_model]."""
    a = model.bridge.blocks[layer].attn
    return {"W_Q": a.W_Q, "W_K": a.W_K, "W_V": a.W_V, "W_O": a.W_O}


def capture_hooks(model, graph: Graph, out: torch.Tensor) -> list[tuple[str, Callable]]:
    """Hooks that write every sender's output into ``out`` [n_senders, batch, pos, d_model].

    Head outputs are computed from ``hook_z`` as z_h @ W_O[h] (the per-head result without
    the layer's output bias, exactly what ``attn.hook_result`` holds), so capture works with
    the bridge's per-head result mode on or off. Where a norm follows the attention (Gemma 2
    and 3), each head's output is its share of that norm's output (``models.norms.HeadShares``).
    """
    W_O = [attn_weights(model, l)["W_O"].detach() for l in range(graph.n_layers)]
    shares = head_shares(model)

    def store(sl: slice) -> Callable:
        def hook(x, hook):
            out[sl] = _as_heads(x).detach().permute(2, 0, 1, 3)
            return x

        return hook

    def store_z(l: int, sl: slice) -> Callable:
        def hook(z, hook):  # z [b, p, h, d_head]
            b, p, h, e = z.shape
            zh = z.detach().permute(2, 0, 1, 3).reshape(h, b * p, e)
            r = torch.bmm(zh, W_O[l]).view(h, b, p, -1)  # [h, b, p, d_model]
            share = shares[l]
            out[sl] = r if share is None else share(r.permute(1, 2, 0, 3)).permute(2, 0, 1, 3)
            return z

        return hook

    hooks = [(INPUT_HOOK, store(slice(0, 1)))]
    for l in range(graph.n_layers):
        hooks.append((attn_z(l), store_z(l, graph.head_senders(l))))
        m = graph.mlp_sender(l)
        hooks.append((mlp_out(l), store(slice(m, m + 1))))
    return hooks


@torch.no_grad()
def sender_activations(model: Model, graph: Graph, tokens: torch.Tensor) -> torch.Tensor:
    """Every sender's output on ``tokens`` [batch, pos] -> [n_senders, batch, pos, d_model]
    (the pass unembeds the last position only: no logit is needed)."""
    last = torch.full((tokens.shape[0], 1), tokens.shape[1] - 1, dtype=torch.long)
    return sender_activations_and_logits(model, graph, tokens, last)[0]


@torch.no_grad()
def sender_activations_and_logits(model: Model, graph: Graph, tokens: torch.Tensor, positions: torch.Tensor
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``sender_activations`` of ``tokens`` and, from the same pass, their logits at
    ``positions`` [batch, k] -> ([n_senders, batch, pos, d_model], [batch, k, d_vocab])."""
    B, P = tokens.shape
    out = torch.empty(graph.n_senders, B, P, model.summary.d_model, device=model.device)
    logits = logits_at(model, tokens.to(model.device), positions, capture_hooks(model, graph, out))
    return out, logits


def mean_weights(shape: tuple[int, ...], lengths: torch.Tensor | None, device) -> torch.Tensor:
    """[B, P] weights of a per-position mean over the batch, padding (past ``lengths``) excluded."""
    B, P = shape
    if lengths is None:
        valid = torch.ones(B, P, device=device)
    else:
        valid = (torch.arange(P, device=device)[None] < lengths.to(device)[:, None]).float()
    return valid / valid.sum(0, keepdim=True).clamp(min=1)


def mean_source(acts: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Mean-ablation source [n_senders, 1, pos, d_model] from the clean sender outputs
    ``acts`` [n_senders, batch, pos, d_model]: per position, over the batch, padding excluded."""
    w = mean_weights(acts.shape[1:3], lengths, acts.device)
    return torch.einsum("sbpd,bp->spd", acts, w)[:, None]


class RunningMean:
    """Per-position mean over the examples of several chunks, padding excluded: ``add`` each
    chunk's activations (batch on dimension ``batch_dim``, positions right after it), then
    ``value()`` has a batch dimension of 1 there. Mean ablation takes its mean over a whole
    evaluation set this way: a mean per chunk of ``batch_size`` examples made the ablation
    depend on the chunk size (a chunk of one example is its own mean: nothing ablated)."""

    def __init__(self, batch_dim: int = 0):
        self.batch_dim = batch_dim
        self.sum: torch.Tensor | None = None
        self.count: torch.Tensor | None = None  # [P]

    def add(self, acts: torch.Tensor, lengths: torch.Tensor | None) -> None:
        d = self.batch_dim
        B, P = acts.shape[d], acts.shape[d + 1]
        valid = mean_weights((B, P), lengths, acts.device) > 0
        w = valid.to(acts.dtype).reshape((1,) * d + (B, P) + (1,) * (acts.dim() - d - 2))
        part = (acts * w).sum(d, keepdim=True)
        n = valid.sum(0).to(acts.dtype)
        self.sum = part if self.sum is None else self.sum + part
        self.count = n if self.count is None else self.count + n

    def value(self) -> torch.Tensor:
        if self.sum is None or self.count is None:
            raise ValueError("RunningMean has no examples")
        d = self.batch_dim
        shape = (1,) * (d + 1) + (-1,) + (1,) * (self.sum.dim() - d - 2)
        return self.sum / self.count.clamp(min=1).reshape(shape)


@torch.no_grad()
def dataset_mean_source(model: Model, graph: Graph, batch, batch_size: int = 16,
                        hook_names: tuple[str, ...] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean-ablation sources over all of ``batch``'s clean prompts (a ``TaskBatch``), run
    ``batch_size`` at a time: sender outputs [n_senders, 1, pos, d_model] and the activations of
    ``hook_names`` [1, pos, ...], per position, padding excluded."""
    senders = RunningMean(batch_dim=1)
    named = {n: RunningMean() for n in hook_names}
    for i in range(0, len(batch), batch_size):
        sub = batch.subset(slice(i, min(len(batch), i + batch_size))).to(model.device)
        B, P = sub.clean.shape
        out = torch.empty(graph.n_senders, B, P, model.summary.d_model, device=model.device)

        def grab(name: str):
            def hook(x, hook):
                named[name].add(x.detach(), sub.lengths)
                return x

            return hook

        last = torch.full((B, 1), P - 1, dtype=torch.long)
        logits_at(model, sub.clean, last, capture_hooks(model, graph, out) + [(n, grab(n)) for n in hook_names])
        senders.add(out, sub.lengths)
    return senders.value(), {n: acc.value() for n, acc in named.items()}


def check_pair(clean: torch.Tensor, corrupt: torch.Tensor | None) -> torch.Tensor:
    """The corrupt tokens of a patching run, refused in one sentence when missing or of
    another shape than ``clean``."""
    if corrupt is None:
        raise MechscopeError("Patching ablation needs corrupted prompts; use --ablation mean or zero.")
    if corrupt.shape != clean.shape:
        raise MechscopeError(
            f"Clean and corrupt tokens differ in shape ({tuple(clean.shape)} vs {tuple(corrupt.shape)}); "
            "every corrupted prompt must have as many tokens as its clean prompt."
        )
    return corrupt


def source_activations(
    model: Model, graph: Graph, clean: torch.Tensor, corrupt: torch.Tensor | None, ablation: Ablation,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Source values for patching: [n_senders, batch or 1, pos, d_model].

    ``patching``: sender outputs on ``corrupt``; ``mean``: per-position mean of the clean
    outputs over the batch (padding excluded when ``lengths`` is given); ``zero``: zeros.
    """
    from mechscope.graph import check_graph_fits
    from mechscope.models import require_model

    require_model(model, "source_activations")
    check_graph_fits(model, graph, "source_activations")
    check_tokens(model, clean, "source_activations")
    if ablation == "patching":
        corrupt_ids = check_pair(clean, corrupt)
        check_tokens(model, corrupt_ids, "source_activations (corrupt)")
        return sender_activations(model, graph, corrupt_ids)
    if ablation == "mean":
        return mean_source(sender_activations(model, graph, clean), lengths)
    if ablation == "zero":
        return torch.zeros(graph.n_senders, 1, clean.shape[1], model.summary.d_model, device=model.device)
    raise MechscopeError(f"Unknown ablation '{ablation}'; choose patching, mean or zero.")


@dataclass
class _EdgePatch:
    """Hook state for one patched forward pass over K masks.

    The running total T [K, batch*pos*d_model] of all active senders' deltas (senders with any
    patched edge) is kept, and the deltas themselves only for senders some receiver needs
    individually. A receiver's correction sum_s m[s,r] delta_s is computed from whichever side
    is sparser: directly over the senders with m != 0, or as T - sum_s (1 - m[s,r]) delta_s
    over the senders with m != 1. Evaluating a small circuit (almost every edge patched) thus
    costs little more than a plain forward pass: a small batched matmul per receiver.

    In a parallel block (GPT-NeoX, GPT-J) the MLP's input hook runs after the same layer's
    heads, which are not upstream of it; a complement-side MLP receiver there starts from T as it
    stood before those heads (a snapshot taken in their hook), not from T.
    """

    graph: Graph
    mask: torch.Tensor  # [K, S, R]
    source: torch.Tensor  # [S, B or 1, P, D]
    K: int
    B: int
    shares: list | None = None  # per layer, ``HeadShares`` where a norm follows the attention

    def __post_init__(self) -> None:
        active = (self.mask.abs().sum((0, 2)) > 0).cpu()  # [S]
        self.active = active
        self.plans: dict[int, tuple] = {}  # receiver start -> (use_comp, sender ids, coef)
        needed = torch.zeros(self.graph.n_senders, dtype=torch.bool)
        self.snap_at: set[int] = set()  # sender starts before whose hook T is snapshotted
        self.snaps: dict[int, torch.Tensor] = {}
        for _, rs, n_up in receiver_hooks(self.graph):
            m = self.mask[:, :n_up, rs]  # [K, up, r]
            if not m.any():
                continue
            direct = m.ne(0).any(0).any(-1).cpu()
            comp = (m.ne(1).any(0).any(-1).cpu()) & active[:n_up]
            use_comp = int(comp.sum()) < int(direct.sum())
            ids = (comp if use_comp else direct).nonzero()[:, 0]
            coef = ((1 - m) if use_comp else m)[:, ids.to(m.device)].transpose(1, 2).contiguous()  # [K, r, n]
            self.plans[rs.start] = (use_comp, ids, coef)
            needed[ids] = True
            if use_comp and self.graph.parallel:
                self.snap_at.add(n_up)
        self.slot = torch.full((self.graph.n_senders,), -1, dtype=torch.long)
        self.slot[needed] = torch.arange(int(needed.sum()))
        self.n_needed = int(needed.sum())
        # Needed senders upstream of a receiver are a prefix of the slots (slots follow sender
        # order). When a receiver uses most of its prefix, multiply by the prefix (a view)
        # with zero coefficients for the unused rows instead of gathering rows (a copy).
        for key, (use_comp, ids, coef) in list(self.plans.items()):
            n_prefix = int(needed[: int(ids.max()) + 1].sum()) if len(ids) else 0
            if len(ids) and 2 * len(ids) >= n_prefix:
                full = torch.zeros(coef.shape[0], coef.shape[1], n_prefix, device=coef.device, dtype=coef.dtype)
                full[:, :, self.slot[ids].to(coef.device)] = coef
                self.plans[key] = (use_comp, slice(0, n_prefix), full)
            else:
                self.plans[key] = (use_comp, self.slot[ids], coef)
        self.delta: torch.Tensor | None = None  # [K, n_needed - n_static, N]
        self.total: torch.Tensor | None = None  # [K, N]
        self.n_static = 0  # slots of senders prefilled from a cache (see ``prefill``)
        self.static: torch.Tensor | None = None  # [n_static, N]
        self.static_total: torch.Tensor | None = None  # [N]

    def prefill(self, n_below: int, clean_delta: torch.Tensor, cache: dict | None = None) -> None:
        """Deltas of the senders ``0..n_below-1``, which do not run (see ``run_suffix_with_edge_mask``).

        ``clean_delta`` [n_senders, B, P, D]: clean output minus source, exact for senders
        below every patched receiver (nothing upstream of them is patched). These deltas are
        the same for all K masks, so they are kept once (not K times): the static slots
        ``0..n_static-1`` come first in slot order, and receivers multiply them with a
        broadcast matmul.
        """
        ids = self.active[:n_below].nonzero()[:, 0]
        self.n_static = int((self.slot[:n_below] >= 0).sum())
        if not len(ids):
            return
        flat = clean_delta.reshape(clean_delta.shape[0], -1)
        key = (n_below, bytes(self.active[:n_below].numpy()))
        if cache is not None and cache.get("key") == key:
            self.static_total = cache["total"]  # successive ACDC evaluations share the active set
        else:
            self.static_total = flat[ids.to(flat.device)].sum(0)
            if cache is not None:
                cache.update(key=key, total=self.static_total)
        needed = ids[self.slot[ids] >= 0]  # in slot order (ids are sorted)
        self.static = flat[needed.to(flat.device)]  # [n_static, N]

    def _alloc(self, x: torch.Tensor, N: int) -> None:
        if self.total is None:
            self.delta = torch.empty(self.K, self.n_needed - self.n_static, N, device=x.device, dtype=x.dtype)
            self.total = torch.zeros(self.K, N, device=x.device, dtype=x.dtype)
            if self.static_total is not None:
                self.total += self.static_total

    def sender(self, sl: slice, layer: int | None = None) -> Callable | None:
        """The hook of the senders ``sl``; ``layer``: they are that layer's heads."""
        idx = torch.arange(sl.start, sl.stop)
        keep = self.active[idx]
        if not keep.any():
            return None
        local = idx[keep] - sl.start
        slots = self.slot[idx[keep]]
        store = slots >= 0
        src_idx = idx[keep].to(self.source.device)
        snap = sl.start in self.snap_at
        share = self.shares[layer] if self.shares is not None and layer is not None else None

        def hook(x, hook):
            K, B = self.K, self.B
            live = _as_heads(x)  # [K*B, P, h, D]
            if share is not None:
                live = share(live)  # each head's share of the norm after the attention, at this run's scale
            _, P, _, D = live.shape
            self._alloc(x, B * P * D)
            if snap:
                self.snaps[sl.start] = self.total.clone()
            live = live[:, :, local].reshape(K, B, P, len(local), D).permute(0, 3, 1, 2, 4)
            d = (live - self.source[src_idx][None]).reshape(K, len(local), -1)  # [K, n, N]
            if store.any():
                self.delta[:, slots[store] - self.n_static] = d[:, store]
            self.total += d.sum(1)
            return x

        return hook

    def _split(self, slots, coef: torch.Tensor):
        """(static coef [K, r, a], static rows, dynamic coef [K, r, b], dynamic rows) of a plan."""
        ns = self.n_static
        if isinstance(slots, slice):  # a prefix 0..n of the slots
            a = min(slots.stop, ns)
            return coef[:, :, :a], slice(0, a), coef[:, :, a:], slice(0, max(0, slots.stop - ns))
        is_static = slots < ns
        return (coef[:, :, is_static.to(coef.device)], slots[is_static],
                coef[:, :, (~is_static).to(coef.device)], slots[~is_static] - ns)

    def receiver(self, rs: slice, n_up: int) -> Callable | None:
        if rs.start not in self.plans:
            return None
        use_comp, slots, coef = self.plans[rs.start]
        parts = self._split(slots, coef)

        def hook(x, hook):
            heads = x.dim() == 4
            xx = _as_heads(x)
            KB, P, h, D = xx.shape
            K, B = self.K, self.B
            self._alloc(x, B * P * D)
            c_s, rows_s, c_d, rows_d = parts
            if c_d.dtype != x.dtype:  # a float32 mask on a float64 (or half) model
                c_s, c_d = c_s.to(x.dtype), c_d.to(x.dtype)
            # sum_n coef[k, r, n] delta[n]: static rows shared by all K, dynamic rows per mask
            # T before any sender that is not upstream (a parallel block's same-layer heads)
            base = self.snaps.get(n_up, self.total)
            corr = base[:, None].expand(K, h, -1).clone() if use_comp else None
            if c_d.shape[-1]:
                prod = torch.bmm(c_d, self.delta[:, rows_d])
                corr = prod if corr is None else corr.sub_(prod)
            if c_s.shape[-1]:
                prod = torch.matmul(c_s, self.static[rows_s])  # [K, r, N]
                corr = prod if corr is None else (corr.sub_(prod) if use_comp else corr.add_(prod))
            if corr is None:
                return x
            out = torch.empty(K, B * P, h, D, device=x.device, dtype=x.dtype)
            torch.sub(xx.reshape(K, B * P, h, D), corr.reshape(K, h, B * P, D).transpose(1, 2), out=out)
            out = out.view(KB, P, h, D)
            return out if heads else out[:, :, 0]

        return hook


def _masks(model: Model, graph: Graph, mask: torch.Tensor) -> torch.Tensor:
    """[K, S, R] float masks on the model's device, restricted to existing edges."""
    if not isinstance(mask, torch.Tensor):
        raise MechscopeError(f"The edge mask must be a tensor, got a {type(mask).__name__}; start from graph.empty_mask() "
                             "or graph.full_mask().")
    want = (graph.n_senders, graph.n_receivers)
    if mask.dim() not in (2, 3) or tuple(mask.shape[-2:]) != want:
        raise MechscopeError(f"Edge mask has shape {tuple(mask.shape)}, expected {want} or (K, {want[0]}, {want[1]}) "
                             "(n_senders x n_receivers of this graph).")
    if mask.shape[0] == 0 and mask.dim() == 3:
        raise MechscopeError("The stack of edge masks is empty (K = 0); give at least one mask [n_senders, n_receivers].")
    masks = (mask[None] if mask.dim() == 2 else mask).to(model.device, torch.float32)
    if not bool(torch.isfinite(masks).all()):
        raise MechscopeError("The edge mask holds NaN or infinite values; give weights in [0, 1] (1 = patch the edge).")
    if bool((masks < 0).any() or (masks > 1).any()):
        raise MechscopeError(f"The edge mask holds values from {masks.min().item():g} to {masks.max().item():g}; give weights "
                             "in [0, 1] (1 = patch the edge, fractions interpolate).")
    return masks * graph.allowed.to(masks.device)


def _checked_hooks(model: Model, hooks: Any, who: str) -> list:
    """``hooks`` (None or a list of (hook name, function) pairs), each name checked against the
    model's hook points: one sentence, with near matches, instead of TransformerLens's KeyError."""
    from mechscope.models.hooks import check_hook_name

    if hooks is None:
        return []
    if not isinstance(hooks, (list, tuple)) or not all(isinstance(h, (list, tuple)) and len(h) == 2 and isinstance(h[0], str)
                                                      and callable(h[1]) for h in hooks):
        raise MechscopeError(f"{who}'s extra_hooks must be a list of (hook name, function) pairs, e.g. "
                             "[('blocks.0.hook_resid_post', fn)]; got " + repr(hooks)[:80] + ".")
    for name, _ in hooks:
        check_hook_name(model, name)
    return list(hooks)


def check_tokens(model: Model, tokens: Any, who: str) -> None:
    """Refuse (one sentence) ``tokens`` that are not an integer tensor [batch, pos] of at least
    one token, hold ids outside the vocabulary, or run past a learned-position model's context."""
    from mechscope.models.load import context_overrun

    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point() or tokens.dtype == torch.bool:
        what = (f"a {type(tokens).__name__}" if not isinstance(tokens, torch.Tensor)
                else f"shape {tuple(tokens.shape)} of {tokens.dtype}")
        raise MechscopeError(f"{who} needs tokens as an integer tensor [batch, pos], got {what}; e.g. "
                             "torch.tensor([model.to_tokens(prompt)]) for one prompt.")
    B, P = tokens.shape
    if B == 0 or P == 0:
        raise MechscopeError(f"{who} got no tokens (shape {(B, P)}); give at least one prompt of one token.")
    V = int(model.summary.d_vocab)
    if (span := ids_outside(tokens, V)) is not None:
        raise MechscopeError(f"{who}: token ids {span[0]}..{span[1]} lie outside the model's vocabulary 0..{V - 1}.")
    if (n_ctx := context_overrun(model, P)) is not None:
        raise MechscopeError(f"{who}: prompts of {P} tokens are longer than {model.summary.name}'s context of {n_ctx}; shorten them.")


def _check_run(model: Model, graph: Graph, tokens: torch.Tensor, source: torch.Tensor, who: str,
               positions: torch.Tensor | None = None) -> None:
    """Refuse (one sentence each) tokens, source and positions that do not fit ``model`` and
    ``graph``: O(batch x pos) checks, no forward pass."""
    from mechscope.graph import check_graph_fits
    from mechscope.models import require_model
    from mechscope.models.check import require_float32

    require_model(model, who)
    require_float32(model, who)
    check_graph_fits(model, graph, who)
    check_tokens(model, tokens, who)
    B, P = tokens.shape
    want = f"[{graph.n_senders}, {B} or 1, {P}, {model.summary.d_model}]"
    if not isinstance(source, torch.Tensor) or source.dim() != 4:
        what = f"a {type(source).__name__}" if not isinstance(source, torch.Tensor) else f"shape {tuple(source.shape)}"
        raise MechscopeError(f"{who} needs source activations {want} (source_activations(...)), got {what}.")
    S, SB, SP, D = source.shape
    if S != graph.n_senders or SB not in (B, 1) or SP != P or D != model.summary.d_model:
        raise MechscopeError(f"{who}: source has shape {tuple(source.shape)}, expected {want}; compute it with "
                             "source_activations(model, graph, clean, corrupt, ablation) on prompts of the same shape as tokens.")
    if positions is not None:
        if not isinstance(positions, torch.Tensor) or positions.dim() != 2 or positions.shape[0] != B \
                or positions.is_floating_point() or positions.dtype == torch.bool:
            what = (f"a {type(positions).__name__}" if not isinstance(positions, torch.Tensor)
                    else f"shape {tuple(positions.shape)} of {positions.dtype}")
            raise MechscopeError(f"{who} needs positions as an integer tensor [{B}, k], got {what}.")
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= P):
            raise MechscopeError(f"{who}: positions {int(positions.min())}..{int(positions.max())} lie outside the prompts' "
                                 f"0..{P - 1}.")


def _patch_hooks(graph: Graph, state: "_EdgePatch", n_below: int = 0, first: int = 0) -> list:
    """The sender and receiver hooks of ``state``, skipping senders below ``n_below`` and
    receivers below ``first`` (blocks a suffix run does not execute)."""
    hooks = []
    for name, sl in sender_hooks(graph):
        h = state.sender(sl, heads_layer(graph, name)) if sl.start >= n_below else None
        if h is not None:
            hooks.append((name, h))
    for name, rs, n_up in receiver_hooks(graph):
        h = state.receiver(rs, n_up) if rs.start >= first else None
        if h is not None:
            hooks.append((name, h))
    return hooks


def logits_at(model: Model, tokens: torch.Tensor, positions: torch.Tensor, fwd_hooks: list) -> torch.Tensor:
    """Logits [N, k, d_vocab] of ``tokens`` [N, pos] at ``positions`` [N or B, k] (repeated
    when N is a multiple B), run under ``fwd_hooks``.

    The unembedding, a fifth of a small model's forward FLOPs at vocabularies of 50k, runs at
    those positions only: a hook at ``unembed.hook_in`` hands it just their rows. A model
    without that hook computes every position and the rows are picked afterwards (same values).
    """
    N = tokens.shape[0]
    pos = positions.to(tokens.device)
    if N % pos.shape[0]:
        raise ValueError(f"positions for {pos.shape[0]} examples cannot be repeated over {N} token rows")
    if pos.shape[0] != N:
        pos = pos.repeat(N // pos.shape[0], 1)
    rows = torch.arange(N, device=tokens.device)[:, None]
    picked = []

    def pick(x, hook):
        picked.append(True)
        return x[rows, pos]

    hooks = list(fwd_hooks)
    if UNEMBED_IN in model.bridge.hook_dict:
        hooks.append((UNEMBED_IN, pick))
    logits = model.bridge.run_with_hooks(tokens, fwd_hooks=hooks)
    if not picked:
        return logits[rows, pos]
    if logits.shape[1] != pos.shape[1]:  # a bridge that did not use the hook's rows
        raise RuntimeError(f"the unembedding ignored the picked positions (logits over {logits.shape[1]} positions)")
    return logits


@torch.no_grad()  # an evaluation: its in-place corrections have no gradient (callers in grad mode crashed)
def run_with_edge_mask(
    model: Model,
    graph: Graph,
    tokens: torch.Tensor,
    source: torch.Tensor,
    mask: torch.Tensor,
    extra_hooks: list | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits with the masked edges patched from ``source``.

    Args:
        tokens: [batch, pos] token ids.
        source: [n_senders, batch or 1, pos, d_model] patch values (``source_activations``).
        mask: [n_senders, n_receivers] or [K, n_senders, n_receivers]; 1 = patch the edge.
        positions: [batch, k]: compute the logits at these positions only (``logits_at``).
    Returns:
        logits [batch, pos, d_vocab], or [K, batch, pos, d_vocab] for a stacked mask (pos = k
        with ``positions``).
    """
    _check_run(model, graph, tokens, source, "run_with_edge_mask", positions)
    masks = _masks(model, graph, mask)
    single = mask.dim() == 2
    K, B = masks.shape[0], tokens.shape[0]
    state = _EdgePatch(graph, masks, source.to(model.device), K, B, head_shares(model))
    hooks = _patch_hooks(graph, state) + _checked_hooks(model, extra_hooks, "run_with_edge_mask")
    toks = tokens.to(model.device).repeat(K, 1)
    if positions is None:
        logits = model.bridge.run_with_hooks(toks, fwd_hooks=hooks)
    else:
        logits = logits_at(model, toks, positions, hooks)
    logits = logits.view(K, B, logits.shape[1], -1)
    return logits[0] if single else logits


@torch.no_grad()
def run_with_node_mask(
    model: Model, graph: Graph, tokens: torch.Tensor, source: torch.Tensor, nodes: torch.Tensor
) -> torch.Tensor:
    """Logits with sender outputs replaced by ``source`` where ``nodes`` [n_senders] is 1.

    Fractional values interpolate: out <- out + nodes[s] * (src_s - out).
    """
    _check_run(model, graph, tokens, source, "run_with_node_mask")
    if not isinstance(nodes, torch.Tensor) or tuple(nodes.shape) != (graph.n_senders,):
        what = f"a {type(nodes).__name__}" if not isinstance(nodes, torch.Tensor) else f"shape {tuple(nodes.shape)}"
        raise MechscopeError(f"The node mask must be a tensor of shape ({graph.n_senders},), one weight per sender of this "
                             f"graph, got {what}.")
    nodes = nodes.to(model.device, torch.float32)
    if not bool(torch.isfinite(nodes).all()):
        raise MechscopeError("The node mask holds NaN or infinite values; give weights in [0, 1] (1 = patch the node).")
    src = source.to(model.device)
    shares = head_shares(model)
    hooks = []
    for name, sl in sender_hooks(graph):
        w = nodes[sl]
        if not w.any():
            continue
        layer = heads_layer(graph, name)
        if layer is not None and shares[layer] is not None:
            hooks += _shares_node_hooks(layer, shares[layer], src[sl].permute(1, 2, 0, 3), w)
            continue

        def hook(x, hook, sl=sl, w=w):
            xx = _as_heads(x)
            s = src[sl].permute(1, 2, 0, 3)  # [B|1, P, h, D]
            out = xx + w[None, None, :, None] * (s - xx)
            return out if x.dim() == 4 else out[:, :, 0]

        hooks.append((name, hook))
    return model.bridge.run_with_hooks(tokens.to(model.device), fwd_hooks=hooks)


def _shares_node_hooks(layer: int, share, src: torch.Tensor, w: torch.Tensor) -> list:
    """Node patching of heads whose outputs pass a norm together (``HeadShares``): the heads'
    own outputs run unchanged, and the norm's output (what the attention adds) swaps each
    patched head's share for its source share ``src`` [B|1, P, h, D], as patching all its
    out-edges does."""
    live: list[torch.Tensor] = []

    def read(x, hook):
        live.append(share(x))  # [B, P, h, D]
        return x

    def swap(x, hook):
        c = live.pop()
        return x + torch.einsum("h,bphd->bpd", w.to(x.dtype), (src - c).to(x.dtype))

    return [(attn_result(layer), read), (attn_out(layer), swap)]


@torch.no_grad()
def run_suffix_with_edge_mask(
    model: Model, graph: Graph, runner, source: torch.Tensor, clean_delta: torch.Tensor, mask: torch.Tensor, start: int
) -> torch.Tensor:
    """``run_with_edge_mask`` executing only blocks ``start..`` (a ``SuffixRunner``).

    Exact when no patched edge ends below layer ``start``: the lower blocks then run as in the
    clean batch, so their senders' deltas are ``clean_delta`` [n_senders, B, P, D] (clean
    output minus source) and the residual entering block ``start`` is the clean one.

    Returns logits [K, batch, len(runner.keep), d_vocab] (only the runner's kept positions).
    """
    masks = _masks(model, graph, mask)
    first = graph.first_receiver(start)
    if masks[:, :, :first].any():
        raise MechscopeError(f"The mask patches edges into layers below {start}; run the suffix from a lower layer.")
    K, B = masks.shape[0], runner.tokens.shape[0]
    if "shares" not in runner.cache:  # the same model for every run of an ACDC pass: looked up once
        runner.cache["shares"] = head_shares(model)
    state = _EdgePatch(graph, masks, source.to(model.device), K, B, runner.cache["shares"])
    n_below = graph.sender_slice_before(start)  # all senders when start == n_layers
    state.prefill(n_below, clean_delta, runner.cache)
    hooks = _patch_hooks(graph, state, n_below, first)  # lower blocks do not run: prefilled
    logits = runner.run(start, K, hooks)
    return logits.view(K, B, logits.shape[1], -1)


_EXACT = "_mechscope_patching_checked"


@torch.no_grad()
def check_patching_exact(model: Model, graph: Graph) -> None:
    """Once per model, on two short random prompts: every edge patched from a corrupt run must
    reproduce that run's logits (the identity the engine rests on). ``graph.block_layout``
    checks the hooks add up; this checks the patched forward itself, so an architecture whose
    blocks pass that check but whose patched run still differs (measured: Granite, with its
    embedding, residual and attention multipliers, off by 0.17 of 0.7) is refused in one
    sentence instead of yielding circuits that mean nothing."""
    if model.__dict__.get(_EXACT):
        return
    g = torch.Generator().manual_seed(0)
    hi = max(2, min(int(model.summary.d_vocab), 1000))
    clean, corrupt = (torch.randint(1, hi, (2, 6), generator=g) for _ in range(2))
    src = source_activations(model, graph, clean, corrupt, "patching")
    got = run_with_edge_mask(model, graph, clean, src, graph.full_mask()).float()
    want = model(corrupt.to(model.device)).float()
    half = model.summary.dtype in ("float16", "bfloat16")
    tol = (5e-2 if half else 1e-3) * max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    if err > tol:
        raise MechscopeError(
            f"Patching every edge of {model.summary.architecture}'s graph does not reproduce the corrupt run (off by {err:.2g}): "
            "something in its blocks is not a sum of the graph's senders, so edge patching would not mean what it says; "
            "use another model for the circuit commands.")
    # A few nodes' out-edges patched must equal those nodes patched: an MLP with a head of the
    # next layer (the order a parallel block runs its hooks in) and the last layer's first head.
    # Every edge patched at once cannot see a receiver that counts a sender it does not read.
    nodes = torch.zeros(graph.n_senders)
    names = ["m0", f"a{graph.n_layers - 1}.h0"] + (["a1.h0"] if graph.n_layers > 1 else [])
    nodes[[graph.sender_index(n) for n in names]] = 1
    want = run_with_node_mask(model, graph, clean, src, nodes).float()
    got = run_with_edge_mask(model, graph, clean, src, graph.node_mask(names)).float()
    err = float((got - want).abs().max())
    if err > tol:
        raise MechscopeError(
            f"Patching the out-edges of {', '.join(names)} in {model.summary.architecture}'s graph does not equal patching those "
            f"nodes (off by {err:.2g}): its hooks run in an order the patching engine does not follow, so edge patching would not "
            "mean what it says; use another model for the circuit commands.")
    model.__dict__[_EXACT] = True
