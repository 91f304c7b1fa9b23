"""The model as a computational graph over the residual stream.

Node names are built and parsed by ``mechscope.graph.names``.

Nodes (senders, in forward order): ``input`` (token + position embeddings), ``a{l}.h{h}``
(each attention head's output, ``blocks.l.attn.hook_result``; where a norm follows the attention,
as in Gemma 2 and 3, the head's share of that norm's output, ``models.norms.HeadShares``),
``m{l}`` (each MLP's output, after its own norm where it has one).

Receivers (the places an edge ends, in forward order): per layer ``l`` the query input of
every head ``a{l}.h{h}<q>`` (``blocks.l.hook_q_input``), the key and value inputs of every
*KV head* ``a{l}.kv{g}<k>``/``<v>`` (``hook_k_input``/``hook_v_input``), the MLP input ``m{l}``
(``hook_mlp_in``), and finally ``logits`` (``ln_final.hook_in``).

Decision (see docs/decisions.md): attention receivers are always split into q/k/v, and k/v
receivers are per KV head. Under grouped-query attention a key/value input is shared by the
query heads of its group, so an edge into "head h's keys" is, physically, an edge into KV head
g(h); naming it that way keeps the graph exact and spares the n_heads/n_kv_heads-fold
ungrouping other tools pay. For multi-head models (n_kv_heads == n_heads) ``kv{g}`` is head g.

An edge is (sender, receiver) with the sender strictly upstream of the receiver: a layer-l
head feeds layer l's MLP and everything in later layers. In a *parallel* block (GPT-NeoX /
Pythia: attention and MLP both read the block's input, ``parallel=True``) the MLP reads only
what was written before its layer, so the same-layer head -> MLP edges do not exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from mechscope.errors import MechscopeError, near_matches
from mechscope.graph.names import INPUT, LOGITS, head_node, kv_receiver, mlp_node, q_receiver

if TYPE_CHECKING:
    from mechscope.models import Model


@dataclass
class Graph:
    """Senders, receivers and the edges between them for one architecture."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    parallel: bool = False
    """Attention and MLP of a block both read the block's input (GPT-NeoX, Pythia)."""
    senders: list[str] = field(init=False)
    receivers: list[str] = field(init=False)

    def __post_init__(self) -> None:
        L, H, KV = self.n_layers, self.n_heads, self.n_kv_heads
        if L < 1 or H < 1 or KV < 1 or H % KV:
            raise MechscopeError(
                f"Cannot build a graph for {L} layers, {H} heads and {KV} KV heads "
                "(the bridge shows no attention heads, or heads are not a multiple of KV heads)."
            )
        self.senders = [INPUT]
        self.receivers = []
        for l in range(L):
            self.receivers += [q_receiver(l, h) for h in range(H)]
            self.receivers += [kv_receiver(l, g, "k") for g in range(KV)]
            self.receivers += [kv_receiver(l, g, "v") for g in range(KV)]
            self.receivers.append(mlp_node(l))
            self.senders += [head_node(l, h) for h in range(H)]
            self.senders.append(mlp_node(l))
        self.receivers.append(LOGITS)

    # ---- layout --------------------------------------------------------------------------
    @property
    def n_senders(self) -> int:
        return len(self.senders)

    @property
    def n_receivers(self) -> int:
        return len(self.receivers)

    def sender_slice_before(self, layer: int, mlp: bool = False) -> int:
        """Number of senders upstream of layer ``layer``'s attention (or MLP if ``mlp``: the
        same layer's heads too, unless the block is parallel)."""
        n = 1 + layer * (self.n_heads + 1)
        return n + self.n_heads if mlp and not self.parallel else n

    def head_senders(self, layer: int) -> slice:
        start = 1 + layer * (self.n_heads + 1)
        return slice(start, start + self.n_heads)

    def mlp_sender(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def receiver_slices(self, layer: int) -> dict[str, slice]:
        """Receiver index ranges of layer ``layer``: q, k, v and mlp."""
        H, KV = self.n_heads, self.n_kv_heads
        start = layer * (H + 2 * KV + 1)
        return {
            "q": slice(start, start + H),
            "k": slice(start + H, start + H + KV),
            "v": slice(start + H + KV, start + H + 2 * KV),
            "mlp": slice(start + H + 2 * KV, start + H + 2 * KV + 1),
        }

    @property
    def logits_receiver(self) -> int:
        return self.n_receivers - 1

    def receiver_layer(self, r: int) -> int:
        """Layer of receiver ``r`` (``n_layers`` for the logits)."""
        return self.n_layers if r == self.logits_receiver else r // (self.n_heads + 2 * self.n_kv_heads + 1)

    def first_receiver(self, layer: int) -> int:
        """Index of the first receiver in ``layer`` (the logits for ``layer == n_layers``)."""
        return self.receiver_slices(layer)["q"].start if layer < self.n_layers else self.logits_receiver

    @cached_property
    def allowed(self) -> torch.Tensor:
        """Bool [n_senders, n_receivers]: True where an edge exists."""
        a = torch.zeros(self.n_senders, self.n_receivers, dtype=torch.bool)
        for l in range(self.n_layers):
            rs = self.receiver_slices(l)
            a[: self.sender_slice_before(l), rs["q"].start : rs["v"].stop] = True
            a[: self.sender_slice_before(l, mlp=True), rs["mlp"]] = True
        a[:, self.logits_receiver] = True
        return a

    @property
    def n_edges(self) -> int:
        return int(self.allowed.sum())

    @cached_property
    def edge_index(self) -> torch.Tensor:
        """Long [n_edges, 2]: (sender, receiver) of every edge, in a fixed order."""
        return self.allowed.nonzero()

    def edge_name(self, s: int, r: int) -> str:
        return f"{self.senders[s]}->{self.receivers[r]}"

    @cached_property
    def _sender_pos(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.senders)}

    @cached_property
    def _receiver_pos(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.receivers)}

    def sender_index(self, name: str) -> int:
        if name not in self._sender_pos:
            raise MechscopeError(f"The graph has no node '{name}'.{near_matches(name, self.senders)}")
        return self._sender_pos[name]

    def receiver_index(self, name: str) -> int:
        if name not in self._receiver_pos:
            raise MechscopeError(f"The graph has no receiver '{name}'.{near_matches(name, self.receivers)}")
        return self._receiver_pos[name]

    # ---- masks ---------------------------------------------------------------------------
    def empty_mask(self) -> torch.Tensor:
        """Float [n_senders, n_receivers] of zeros (nothing patched)."""
        return torch.zeros(self.n_senders, self.n_receivers)

    def full_mask(self) -> torch.Tensor:
        """Every edge patched."""
        return self.allowed.float()

    def mask_from_edges(self, edges: list[tuple[str, str]]) -> torch.Tensor:
        m = self.empty_mask()
        for s, r in edges:
            si, ri = self.sender_index(s), self.receiver_index(r)
            if not self.allowed[si, ri]:
                rl = self.receiver_layer(ri)
                same = self.parallel and rl < self.n_layers and self.head_senders(rl).start <= si < self.head_senders(rl).stop
                why = " (this model's attention and MLP run in parallel: an MLP does not read its own layer's heads)" if same else ""
                raise MechscopeError(f"There is no edge {s} -> {r}: the sender is not upstream of the receiver{why}.")
            m[si, ri] = 1.0
        return m

    def node_mask(self, nodes: list[str]) -> torch.Tensor:
        """Edge mask that patches every outgoing edge of the given sender nodes."""
        m = self.empty_mask()
        for n in nodes:
            m[self.sender_index(n)] = 1.0
        return m * self.allowed

    def summary(self) -> dict[str, int | bool]:
        return {
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "parallel_blocks": self.parallel,
            "n_nodes": self.n_senders + 1,  # + logits
            "n_senders": self.n_senders,
            "n_receivers": self.n_receivers,
            "n_edges": self.n_edges,
        }


def check_graph_fits(model: Model, graph: Graph, who: str) -> None:
    """Refuse (one sentence) a ``graph`` built for another model than ``model`` (its layer or
    head counts differ): its hook names or sender indices would not exist there."""
    if not isinstance(graph, Graph):
        raise MechscopeError(f"{who} needs a Graph, got a {type(graph).__name__}; make one with build_graph(model).")
    s = model.summary
    have = (graph.n_layers, graph.n_heads, graph.n_kv_heads)
    want = (s.n_layers, s.n_heads, s.n_kv_heads)
    if have != want:
        raise MechscopeError(f"{who}: the graph has {have[0]} layers of {have[1]} heads ({have[2]} key/value), but {s.name} has "
                             f"{want[0]} of {want[1]} ({want[2]}); build the graph for this model with build_graph(model).")


def build_graph(model: Model, check: bool = True) -> Graph:
    """The computational graph of a loaded ``mechscope.models.Model``; with ``check`` (the
    default) its blocks are measured first (``block_layout``): a model whose
    attention and MLP run in parallel gets the parallel graph, and one whose blocks fit
    neither shape is refused in one sentence."""
    from mechscope.models import require_model

    require_model(model, "build_graph")
    s = model.summary
    parallel = block_layout(model) == "parallel" if check else False
    return Graph(n_layers=s.n_layers, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads, parallel=parallel)


_CHECKED = "_mechscope_graph_checked"


@torch.no_grad()
def block_layout(model: Model) -> str:
    """The layout of the model's blocks, "sequential" or "parallel", measured on one short
    random input (once per model); any other shape refused in one sentence.

    Sequential: in every block the heads' outputs (``attn.hook_result``, plus a constant bias)
    are what attention adds to the residual stream, the MLP reads that sum (``hook_mlp_in`` =
    block input + attention) and adds its output (``hook_mlp_out``). Parallel (GPT-NeoX,
    Pythia): the same, except that the MLP reads the block's input (``hook_mlp_in`` =
    ``hook_resid_pre``), in every block. A norm after the attention (Gemma 2 and 3) is read
    through each head's share of its output (``models.norms.HeadShares``), which must then add
    up the same way. Refused: an MLP that shares the attention's norm (Phi: ``hook_mlp_in``
    never fires, so no edge into the MLP could be patched), shares that do not add up (a bias
    on the attention's output before such a norm), and heads whose q/k/v inputs are not their
    own (``_cross_head_inputs``; OLMo-2's norm over all heads' projected queries passes, since
    each head's projection still reads its own input); on those, patching an edge would not do
    what its name says."""
    done = getattr(model, _CHECKED, None)
    if isinstance(done, str):
        return done
    from mechscope.models.hooks import attn_result, mlp_in, mlp_out, resid_post, resid_pre
    from mechscope.models.load import no_per_head_reason, per_head_hooks
    from mechscope.models.norms import head_shares

    if not per_head_hooks(model):
        raise MechscopeError(
            f"Circuit discovery needs each head's own query, key and value inputs and outputs, which TransformerLens's bridge "
            f"does not give {model.summary.architecture} ({no_per_head_reason(model)} is unavailable); the lens, recall, heads, "
            "SAEs and descriptions run on it, but for circuits use a model of another architecture (Llama, Qwen2, GPT-2 ...).")

    L, arch = model.summary.n_layers, model.summary.architecture
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, max(2, min(int(model.summary.d_vocab), 1000)), (1, 8), generator=g)
    names = {f(layer) for layer in range(L) for f in (resid_pre, attn_result, mlp_in, mlp_out, resid_post)}
    bridge = model.bridge
    was = bool(getattr(bridge.cfg, "use_attn_result", True))  # the per-head results, even inside plain_attention
    bridge.set_use_attn_result(True)
    try:
        _, cache = bridge.run_with_cache(tokens.to(model.device), names_filter=lambda n: n in names)
    finally:
        bridge.set_use_attn_result(was)
    half = model.summary.dtype in ("float16", "bfloat16")
    why = None
    layouts = {"sequential", "parallel"}  # the layouts every block so far fits (both where attention added ~0)
    shares = head_shares(model)
    for layer in range(L):
        got = {f.__name__: cache[f(layer)].float() if f(layer) in cache else None
               for f in (resid_pre, attn_result, mlp_in, mlp_out, resid_post)}
        if got["resid_pre"] is None or got["resid_post"] is None or got["attn_result"] is None or got["mlp_out"] is None:
            missing = next(f(layer) for f in (resid_pre, attn_result, mlp_out, resid_post) if got[f.__name__] is None)
            why = f"its hook {missing} never fires"
            break
        scale = max(1.0, float(got["resid_post"].abs().max()))
        tol = (2e-2 if half else 1e-4) * scale
        attn = got["resid_post"] - got["resid_pre"] - got["mlp_out"]  # what attention added [1, pos, d]
        share = shares[layer]
        heads = got["attn_result"] if share is None else share(got["attn_result"])  # a norm after attention: each head's share
        bias = attn - heads.sum(2)  # must be one constant vector (the output bias, or the norm's)
        if float((bias - bias[:, :1]).abs().max()) > tol:
            why = (f"the heads' outputs in block {layer} do not add up to what its attention adds to the residual stream"
                   + (" (a norm after the attention?)" if share is None else
                      " through the norm after its attention (a bias on the attention's output?)"))
            break
        if got["mlp_in"] is None:
            why = (f"block {layer}'s MLP input hook {mlp_in(layer)} never fires, so no edge into the MLP can be patched (the MLP "
                   "shares the attention's norm, as in Phi, Falcon and Cohere, or adds the residual stream inside itself, as in Bloom)")
            break
        reads = {kind for kind, x in (("sequential", got["resid_pre"] + attn), ("parallel", got["resid_pre"]))
                 if float((got["mlp_in"] - x).abs().max()) <= tol}
        if not reads:
            why = f"block {layer}'s MLP reads neither the block's input nor the input plus the attention's output"
            break
        if not layouts & reads:
            why = f"block {layer} runs attention and MLP {'in parallel' if 'parallel' in reads else 'in turn'} and an earlier block does not"
            break
        layouts &= reads
    if why is None and (cross := _cross_head_inputs(model, tokens.to(model.device))) is not None:
        raise MechscopeError(f"Circuit discovery needs each head to read its own query, key and value inputs, and {arch} "
                             f"does not: {cross}; use another model for the circuit commands.")
    if why is not None:
        raise MechscopeError(f"Circuit discovery needs blocks in which the attention heads and the MLP add their outputs "
                             f"to the residual stream, the MLP having an input of its own that reads the block's input (parallel) "
                             f"or that plus the attention's output (in turn), and {arch} does not: {why}; use another model for the "
                             f"circuit commands.")
    layout = "sequential" if "sequential" in layouts else "parallel"
    setattr(model, _CHECKED, layout)
    return layout


def _norms_across_heads(model: Model) -> set[str]:
    """"query" and/or "key" where block 0 normalises the projections of all heads together
    (OLMo-2's ``q_norm``/``k_norm`` over heads x d_head, after the per-head projections)."""
    from mechscope.models.norms import head_norm_modules

    e = model.summary.d_head
    out = set()
    for t, mod in zip(("query", "key"), head_norm_modules(model, 0)):
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() > e and w.numel() % e == 0:
            out.add(t)
    return out


@torch.no_grad()
def _cross_head_inputs(model: Model, tokens: torch.Tensor) -> str | None:
    """Why an edge into one head's query, key or value could not be patched alone, or None.
    Measured in block 0: other inputs to the first head's query (or the first key/value head's
    key, value) may move only the attention scores (z) of the heads that read them. Where the
    model itself normalises all heads' queries (keys) together after their per-head projections
    (OLMo-2, session 29), the other heads' *projections* (``hook_q``/``hook_k``, before that norm)
    must not move: an edge then changes one head's projection input alone (the bridge's split
    inputs), and the norm spreads it to the other heads as it does in the model; the patching
    identities, EAP against finite differences and the q/k fallback are tested on a tiny OLMo-2."""
    from mechscope.models.hooks import attn_hook, attn_scores, k_input, q_input, v_input

    s = model.summary
    group = s.n_heads // max(1, s.n_kv_heads)  # query heads per key/value head
    half = model.summary.dtype in ("float16", "bfloat16")
    g = torch.Generator().manual_seed(1)

    def bump(x, hook):
        x = x.clone()
        noise = torch.randn(x[:, :, 0].shape, generator=g).to(x.device, x.dtype)
        x[:, :, 0] = x[:, :, 0] * 3.0 + noise * float(x.detach().float().std().clamp(min=1e-3))
        return x

    joint = _norms_across_heads(model)
    plan = [("query", q_input(0), attn_scores(0), 1), ("key", k_input(0), attn_scores(0), group),
            ("value", v_input(0), attn_hook(0, "z"), group)]
    # Where the model normalises all heads' projections together, the scores of every head move
    # by design; each head's own projection (before that norm) must still be the only one to move.
    own = {"query": attn_hook(0, "q"), "key": attn_hook(0, "k")}
    plan = [(t, into, own[t], 1) if t in joint else (t, into, read, first) for t, into, read, first in plan]
    for t, into, read, first in plan:
        if first >= (s.n_heads if read != attn_hook(0, "k") else max(1, s.n_kv_heads)):
            continue  # every head reads it
        got: list[torch.Tensor] = []

        def grab(x, hook):
            got.append(x.detach().float())
            return x

        model.bridge.run_with_hooks(tokens, fwd_hooks=[(read, grab)])
        model.bridge.run_with_hooks(tokens, fwd_hooks=[(into, bump), (read, grab)])  # (run_with_cache ignores fwd_hooks)
        x, y = got
        if read == attn_scores(0):  # [b, h, q, k] -> [b, q, h, k]
            x, y = x.transpose(1, 2), y.transpose(1, 2)
        x, y = (torch.where(v.abs() < 1e30, v, torch.zeros_like(v)) for v in (x, y))  # masked: -inf or float's minimum
        tol = (2e-2 if half else 1e-5) * max(1.0, float(x.abs().max()))
        # (Whether the first head's own input reaches it is left to ``check_patching_exact``: a
        # hand-built head with zero query weights legitimately ignores it.)
        if float((x[:, :, first:] - y[:, :, first:]).abs().max()) > tol:
            return (f"another {t} input to the first head in block 0 moves the other heads' attention too (as a {t} norm "
                    f"across all heads does), so an edge into one head could not be patched alone")
    return None
