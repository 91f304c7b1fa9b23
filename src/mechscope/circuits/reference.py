"""Reference circuits: published circuits as data, compared to scores by ROC AUC.

File format (JSON)::

    {"model": "gpt2", "task": "ioi", "source": "citation", "nodes": ["a9.h6", "m0", ...],
     "edges": [["a9.h6", "a10.h7<q>"], ["a9.h6", "logits"], ...],      # optional
     "groups": {"name_mover": ["a9.h6", ...], ...},                        # optional
     "connections": [{"from": ["s_inhibition"], "to": ["name_mover"], "via": "q"}, ...]}

Edges are listed explicitly, or derived from group-to-group ``connections`` (how the papers
state their circuits): every sender of a ``from`` group feeds every receiver of a ``to`` group
that lies downstream of it (a later layer, or a head feeding its own layer's MLP), through the
head inputs named in ``via`` (any of q, k, v; MLPs and logits have one input). Besides the
file's groups, ``input`` (the embeddings), ``logits`` and ``mlps`` (every MLP) can be named.
Receivers are written as in the graph (``a9.h6<q>``, ``a9.kv6<k>``: for GPT-2, KV head g is
head g).

Both AUCs, and the top-k overlap, rank by the run's circuits (``circuit_ranking``): the run's
own circuit first, then every other edge in the order it joins the run's pruned top-k circuits
as k grows (how ``discover`` builds them, by the importance its rank mode chose: signed or
|score|), ties by that importance. Ranking by the raw scores instead put edges the circuit
prunes (on no input -> logits path) above its own, and took |score| whatever the rank mode: a
circuit compared with itself got edge ROC AUC 0.71 and 40% of its edges in its "top 15"
(sweep 28). Nodes (heads and MLPs) rank by the first edge of theirs in that order, so a
circuit compared with itself gets 1.0 on every figure. ``compare_with_reference`` gives every
figure ``mechscope evaluate --reference`` reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechscope.circuits.evaluate import roc_auc
from mechscope.circuits.select import entry_sizes, importance, receiver_owner
from mechscope.errors import MechscopeError
from mechscope.graph import Graph
from mechscope.graph.names import INPUT, LOGITS, attn_receiver, mlp_node, node_layer, parse_node

if TYPE_CHECKING:
    from mechscope.circuits.result import CircuitResult

SHIPPED = {"gpt2-ioi": "gpt2_ioi.json", "gpt2-greater-than": "gpt2_greater_than.json"}


@dataclass
class Reference:
    model: str
    task: str
    source: str
    nodes: list[str]
    edges: list[tuple[str, str]] = field(default_factory=list)

    def node_mask(self, graph: Graph) -> torch.Tensor:
        m = torch.zeros(graph.n_senders, dtype=torch.bool)
        for n in self.nodes:
            if n not in graph.senders:
                raise MechscopeError(
                    f"The reference circuit names node '{n}', which this model does not have "
                    f"({graph.n_layers} layers x {graph.n_heads} heads); is it for another model ({self.model})?"
                )
            m[graph.senders.index(n)] = True
        return m

    def edge_mask(self, graph: Graph) -> torch.Tensor | None:
        """Bool [n_senders, n_receivers] of the reference's edges, or None if it has none."""
        if not self.edges:
            return None
        return graph.mask_from_edges(self.edges).bool()  # unknown names raise a clear error


def load_reference(path_or_name: str) -> Reference:
    """Load a reference circuit: a JSON file, a shipped name (gpt2-ioi, gpt2-greater-than), or
    another mechscope run (its folder or ``circuit.json``: its kept edges and nodes), which
    compares two methods' circuits."""
    if Path(path_or_name).is_dir() and (Path(path_or_name) / "circuit.json").is_file():
        path_or_name = str(Path(path_or_name) / "circuit.json")
    if path_or_name in SHIPPED:
        text = resources.files("mechscope.circuits").joinpath("data").joinpath(SHIPPED[path_or_name]).read_text()
        where = path_or_name
    else:
        p = Path(path_or_name)
        if not p.is_file():
            raise MechscopeError(
                f"No reference circuit at '{path_or_name}'; pass a JSON file or one of {', '.join(SHIPPED)}."
            )
        try:
            text, where = p.read_bytes().decode("utf-8-sig"), str(p)  # a byte-order mark is allowed
        except UnicodeDecodeError as exc:
            raise MechscopeError(f"'{p}' is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MechscopeError(f"'{where}' is not JSON ({exc.msg} at line {exc.lineno}); {_SHAPE}.") from exc
    if isinstance(d, dict) and "schema_version" in d and "method" in d:
        return _from_run(d, where)
    nodes, edges = _nodes_and_edges(d, where)
    if d.get("connections"):
        edges += expand_connections(d.get("groups", {}), d["connections"], where, d.get("n_layers"))
    source = d.get("source", "")
    if d.get("edge_source"):
        source += " Edges: " + d["edge_source"]
    return Reference(model=d.get("model", "?"), task=d.get("task", "?"), source=source, nodes=nodes,
                     edges=list(dict.fromkeys(edges)))


_SHAPE = ('a reference circuit file is a JSON object with a "nodes" list of node names (e.g. "a9.h6", "m3") and, '
          'optionally, an "edges" list of [sender, receiver] name pairs')


def _nodes_and_edges(d: Any, where: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The node names and edges of a reference file's JSON ``d``, checked against ``_SHAPE``: any
    other JSON (an array, a node that is not a name, an edge that is not a pair) is refused in one
    sentence instead of failing later, or being read as something else (a string as its letters)."""
    if not isinstance(d, dict):
        raise MechscopeError(f"'{where}' holds a JSON {type(d).__name__ if d is not None else 'null'}, not an object; {_SHAPE}.")
    nodes, edges = d.get("nodes"), d.get("edges", [])
    if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
        raise MechscopeError(f"'{where}' has no \"nodes\" list of names; {_SHAPE}.")
    if not isinstance(edges, list) or not all(isinstance(e, list) and len(e) == 2 and all(isinstance(x, str) for x in e)
                                              for e in edges):
        raise MechscopeError(f"'{where}' has an \"edges\" entry that is not a [sender, receiver] pair of names; {_SHAPE}.")
    return nodes, [(e[0], e[1]) for e in edges]


def _from_run(d: dict, where: str) -> Reference:
    """A mechscope circuit.json as a reference: its kept edges and the nodes they touch."""
    try:
        edges = [(e["src"], e["dst"]) for e in d["edges"] if e["in_circuit"]]
        nodes = [n["name"] for n in d["nodes"] if n["in_circuit"] and n["type"] in ("head", "mlp")]
    except (KeyError, TypeError) as exc:
        raise MechscopeError(f"'{where}' looks like a mechscope circuit but its edges or nodes are malformed ({exc}).") from exc
    model = d.get("model", {}).get("name", "?") if isinstance(d.get("model"), dict) else str(d.get("model"))
    return Reference(model=model, task=d.get("task", "?"), source=f"mechscope {d['method']} circuit ({where})",
                     nodes=nodes, edges=edges)


def edge_overlap(ranking: torch.Tensor, reference: torch.Tensor, allowed: torch.Tensor) -> float:
    """Share of the reference's edges among the top-|reference| edges of ``ranking`` [S, R].

    With two methods' circuits of different sizes, this compares the second method's ranking
    at the first one's size (1.0: the same edges; a random ranking gets |ref| / n_edges).
    """
    k = int(reference.sum())
    if k == 0:
        return float("nan")
    r = ranking.double().masked_fill(~allowed.bool(), float("-inf")).flatten()
    top = torch.zeros_like(r, dtype=torch.bool)
    top[r.topk(k).indices] = True
    return float((top & reference.flatten().bool()).sum()) / k


def circuit_ranking(res: "CircuitResult") -> tuple[torch.Tensor, torch.Tensor]:
    """The run's ranking of edges [n_senders, n_receivers] and of nodes [n_senders] that the
    reference figures use, higher = earlier: the run's circuit first, then the edges in the
    order they join its pruned top-k circuits (``select.entry_sizes`` of the importance under the
    run's rank mode), ties by that importance; a node ranks with its first edge (as sender, or
    into one of its inputs). For a circuit ``discover`` chose (a pruned top-k) the circuit-first
    rule changes nothing; it keeps the order consistent with other circuits (ACDC's, a node-level
    circuit, one built by hand)."""
    g = res.graph
    imp = importance(res.scores.detach().cpu().float(), res.method, res.settings.get("rank") or "signed")
    entry = entry_sizes(g, imp)
    kept = res.circuit.bool().cpu() & g.allowed
    n = g.allowed.numel()
    # sort by importance, then (stable) by entry size, then by being outside the circuit
    order = torch.argsort(imp.double().masked_fill(~g.allowed, float("-inf")).flatten(), descending=True, stable=True)
    order = order[torch.argsort(entry.flatten()[order], stable=True)]
    order = order[torch.argsort((~kept).flatten()[order].to(torch.uint8), stable=True)]
    pos = torch.empty(n, dtype=torch.float64)
    pos[order] = torch.arange(n, dtype=torch.float64)
    pos = pos.view_as(entry).masked_fill(~g.allowed, float("inf"))
    edge_rank = (n - pos).masked_fill(~g.allowed, float("-inf"))  # n .. 1 on the allowed edges
    own = torch.zeros(g.n_receivers, g.n_senders, dtype=torch.bool)
    for r, ss in enumerate(receiver_owner(g)):
        own[r, ss] = True
    first_in = torch.where(own, pos.min(0).values[:, None], torch.tensor(float("inf"), dtype=torch.float64)).min(0).values
    node_rank = n - torch.minimum(pos.min(1).values, first_in)
    return edge_rank, node_rank


def compare_with_reference(res: "CircuitResult", reference: Reference | str | Path) -> dict[str, Any]:
    """How a discovered circuit ``res`` matches a reference (a ``Reference`` or anything
    ``load_reference`` takes): its source, node count and ``node_roc_auc`` (the run's node
    ranking against the reference's nodes; the input is in every circuit, so it is not ranked).
    When the reference lists edges, also ``n_edges``, ``edge_roc_auc`` (the run's edge ranking),
    ``edge_overlap`` (share of the reference's edges among the first |reference| edges of that
    ranking), ranked by ``circuit_ranking`` (the run's circuit first, then the order edges join
    its pruned top-k circuits), so the run's own circuit gets 1.0 on each,
    ``chance_overlap`` (what a random ranking gets), ``in_this_circuit`` (share of the
    reference's edges in the run's circuit) and ``jaccard`` (of the two circuits' edge sets)."""
    from mechscope.circuits.result import CircuitResult

    if not isinstance(res, CircuitResult):
        raise MechscopeError(f"compare_with_reference needs a CircuitResult (from discover or CircuitResult.load(path)), "
                             f"got a {type(res).__name__}.")
    if isinstance(reference, (str, Path)):
        ref = load_reference(str(reference))
    elif isinstance(reference, Reference):
        ref = reference
    else:
        raise MechscopeError(f"compare_with_reference needs a reference circuit: a JSON file or run folder (str or Path), "
                             f"one of {', '.join(SHIPPED)}, or a Reference; got a {type(reference).__name__}.")
    g = res.graph
    nodes = ref.node_mask(g)
    sel = torch.ones(g.n_senders, dtype=torch.bool)
    sel[0] = False  # the input is in every circuit: not ranked
    if not bool((nodes & sel).any()):
        raise MechscopeError("The reference circuit names no nodes besides the input, so there is "
                             "nothing to compare against; list its heads and MLPs under \"nodes\".")
    rk, ns = circuit_ranking(res)
    out: dict[str, Any] = {"source": ref.source, "n_nodes": int(nodes.sum()),
                           "node_roc_auc": roc_auc(ns, nodes, sel, absolute=False)}
    mine = res.model.get("name") if isinstance(res.model, dict) else None
    if ref.source.startswith("mechscope ") and mine and ref.model not in ("?", mine):  # another run, another model
        out["note"] = (f"the reference circuit was found on {ref.model}, this one on {mine}: the graphs share node names, "
                       "so the figures compare circuits across models")
    em = ref.edge_mask(g)
    if em is not None:
        kept = res.circuit.bool()
        out.update({
            "n_edges": int(em.sum()),
            "edge_roc_auc": roc_auc(rk, em, g.allowed, absolute=False),
            "edge_overlap": edge_overlap(rk, em, g.allowed),
            "chance_overlap": int(em.sum()) / g.n_edges,
            "in_this_circuit": float((kept & em).sum()) / max(1, int(em.sum())),
            "jaccard": float((kept & em).sum()) / max(1, int((kept | em).sum())),
        })
    return out


def expand_connections(
    groups: dict[str, list[str]], connections: list[dict], where: str = "the file", n_layers: int | None = None
) -> list[tuple[str, str]]:
    """Edges (sender, receiver name) from group-to-group connections (see the module docstring)."""
    if n_layers is None:
        n_layers = 1 + max((l for g in groups.values() for n in g if (l := node_layer(n)) is not None), default=0)
    named = {**groups, INPUT: [INPUT], LOGITS: [LOGITS], "mlps": [mlp_node(l) for l in range(n_layers)]}
    out: list[tuple[str, str]] = []
    for c in connections:
        try:
            src = [n for g in c["from"] for n in named[g]]
            dst = [n for g in c["to"] for n in named[g]]
        except (KeyError, TypeError) as exc:
            raise MechscopeError(
                f"A connection in {where} names an unknown group ({exc}); groups are {', '.join(named)}."
            ) from exc
        via = c.get("via", "qkv")
        for s in src:
            sn = parse_node(s)
            for r in dst:
                if r == LOGITS:
                    out.append((s, LOGITS))
                    continue
                rn = parse_node(r)
                if rn.layer is None or sn.kind == "logits":
                    raise MechscopeError(f"A connection in {where} runs from '{s}' to '{r}'; edges run from input, heads "
                                         "or MLPs to heads, MLPs or logits.")
                if sn.kind != "input" and sn.layer is not None and not (sn.layer < rn.layer or (sn.kind == "head" and rn.kind == "mlp" and sn.layer == rn.layer)):
                    continue  # not downstream
                if rn.kind == "mlp":
                    out.append((s, r))
                else:
                    assert rn.head is not None  # a head or kv node (mlp handled above)
                    out += [(s, attn_receiver(rn.layer, rn.head, t)) for t in via]
    return out
