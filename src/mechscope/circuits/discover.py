"""The main job: score edges on one half of the pairs, choose a circuit, evaluate it on the other.

1. Build the task's pairs and check the model actually does the task (a circuit for a
   behaviour the model lacks is meaningless).
2. Split the pairs: the scoring half feeds the method, the held-out half every reported figure.
3. Score edges (EAP, EAP-IG) or prune them (ACDC); at node level, heads and MLPs are the units.
4. Choose the circuit: top-K edges, a score threshold, or the smallest circuit reaching the
   target faithfulness on the scoring half; then prune edges off input -> logits paths.
5. Evaluate on held-out pairs: faithfulness, the curve over sizes with a random baseline,
   CPR and CMD; attention patterns of the top heads on an example prompt for the report.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from mechscope.circuits.attribution import edge_scores, node_scores
from mechscope.circuits.evaluate import (
    Evaluator,
    cpr_cmd,
    curve_sizes,
    faithfulness_curve,
    random_baseline,
    smallest_faithful,
)
from mechscope.circuits.result import CircuitResult
from mechscope.circuits.select import importance, prune, receiver_owner, threshold, top_k
from mechscope.errors import MechscopeError
from mechscope.graph import Graph, build_graph
from mechscope.tasks.base import TaskBatch


METHODS = ("eap", "eap-ig", "eap-ig-act", "acdc")


@dataclass
class DiscoverConfig:
    """Settings of one circuit-discovery run (also the saved ``settings``)."""

    task: str = "ioi"
    """Task name or path to a JSONL file of pairs."""
    method: Literal["eap", "eap-ig", "eap-ig-act", "acdc"] = "eap-ig"
    """eap, eap-ig (integrated gradients on the input embeddings), eap-ig-act (on each layer's
    activations: slower, (2 n_layers + 1) x ig_steps passes) or acdc."""
    n: int = 50
    """Number of clean/corrupt pairs (half scores, half is held out)."""
    ablation: Literal["patching", "mean", "zero"] = "patching"
    level: Literal["edge", "node"] = "edge"
    edges: int | None = None
    """Keep this many edges (nodes at node level); default: smallest circuit reaching ``target``."""
    threshold: float | None = None
    """Keep edges with |score| >= threshold (ACDC: its pruning threshold tau)."""
    target: float = 0.8
    ig_steps: int = 5
    seed: int = 0
    held_out: float = 0.5
    batch_size: int = 16
    random_seeds: int = 2
    rank: Literal["signed", "abs"] = "signed"
    """Edge order for selection and curves: signed (edges that carry the behaviour) or |score|."""
    acdc_metric: Literal["kl", "task"] = "kl"
    """ACDC's pruning metric: KL divergence from the full model at the scored positions, or the
    distance of the task metric (e.g. logit difference) from its full-model value."""
    checkpoint: str | None = None
    """ACDC state file: written after every receiver, resumed from when it exists."""


def check_task_performance(model, batch: TaskBatch) -> dict:
    """Evaluate the task and refuse when the model performs at chance."""
    from mechscope.tasks import evaluate_task

    res = evaluate_task(model, batch)
    gap = res["clean_metric"] - res["corrupt_metric"]
    at_chance = res["clean_accuracy"] <= res["chance_accuracy"] + 0.1 if batch.metric_name != "logprob" else False
    if at_chance or abs(gap) < 1e-3:
        raise MechscopeError(
            f"{model.summary.name} performs task '{batch.task}' at chance (clean accuracy "
            f"{res['clean_accuracy']:.0%}, chance {res['chance_accuracy']:.0%}, clean-corrupt metric gap "
            f"{gap:.3g}); a circuit for a behaviour the model lacks is meaningless."
        )
    return res


def node_circuit(graph: Graph, nodes: torch.Tensor) -> torch.Tensor:
    """Edges among kept nodes (bool [n_senders]); input and logits always kept."""
    keep_nodes = nodes.bool().cpu().clone()
    keep_nodes[0] = True
    owners = receiver_owner(graph)
    recv_ok = torch.tensor([(not ow) or bool(keep_nodes[ow].any()) for ow in owners])
    return graph.allowed & keep_nodes[:, None] & recv_ok[None]


def _choose(cfg: DiscoverConfig, graph: Graph, ranking: torch.Tensor, ev_score: Evaluator) -> torch.Tensor:
    if cfg.level == "node":
        ns = node_scores(graph, ranking).cpu()
        ns[0] = float("inf")
        n_nodes = graph.n_senders - 1
        if cfg.edges is not None:
            if cfg.edges > n_nodes:
                raise MechscopeError(f"Cannot keep {cfg.edges} nodes: the graph has {n_nodes} heads and MLPs.")
            k = cfg.edges
        else:
            k = n_nodes
            for cand in range(1, n_nodes + 1):  # node counts are small: scan in steps
                if cand < n_nodes and cand % max(1, n_nodes // 30):
                    continue
                keep = torch.zeros(graph.n_senders, dtype=torch.bool)
                keep[ns.topk(cand + 1).indices] = True
                if float(ev_score.faithfulness(node_circuit(graph, keep)[None])[0]) >= cfg.target:
                    k = cand
                    break
        keep = torch.zeros(graph.n_senders, dtype=torch.bool)
        keep[ns.topk(k + 1).indices] = True
        return node_circuit(graph, keep)
    if cfg.edges is not None:
        return prune(graph, top_k(graph, ranking, cfg.edges, absolute=False))
    if cfg.threshold is not None:
        return prune(graph, threshold(graph, ranking, cfg.threshold, absolute=False))
    k, _ = smallest_faithful(ev_score, ranking, cfg.target)
    return prune(graph, top_k(graph, ranking, k, absolute=False))


def discover(model, cfg: DiscoverConfig, batch: TaskBatch | None = None, progress: bool = True) -> CircuitResult:
    """Run one circuit discovery (see module docstring) and return the result."""
    from mechscope.tasks import get_task

    t0 = time.perf_counter()
    if cfg.method not in METHODS:
        raise MechscopeError(f"Unknown method '{cfg.method}'; choose {', '.join(METHODS)}.")
    graph = build_graph(model)
    if cfg.edges is not None and cfg.level == "edge" and not 0 < cfg.edges <= graph.n_edges:
        raise MechscopeError(f"--edges {cfg.edges} is out of range: the graph has {graph.n_edges:,} edges.")
    if batch is None:
        batch = get_task(cfg.task).build(model.tokenizer, n=cfg.n, seed=cfg.seed)
    perf = check_task_performance(model, batch)
    score_set, test_set = batch.split(cfg.held_out, seed=cfg.seed)
    t_score = time.perf_counter()
    if cfg.method == "acdc":
        from mechscope.circuits.acdc import acdc

        ac = acdc(model, graph, score_set, tau=cfg.threshold if cfg.threshold is not None else 0.01,
                  ablation=cfg.ablation, metric=cfg.acdc_metric, progress=progress, checkpoint=cfg.checkpoint)
        scores = ac.scores
    else:
        scores = edge_scores(model, graph, score_set, cfg.method, cfg.ig_steps, cfg.ablation,
                             cfg.batch_size, progress=progress)
    t_score = time.perf_counter() - t_score
    scores = scores.cpu()
    ranking = importance(scores, cfg.method, cfg.rank)
    ev_score = Evaluator(model, graph, score_set, cfg.ablation, cfg.batch_size)
    if cfg.method == "acdc" and cfg.edges is None and cfg.level == "edge":
        circuit = prune(graph, ac.circuit)
    else:
        circuit = _choose(cfg, graph, ranking, ev_score)
    ev = Evaluator(model, graph, test_set, cfg.ablation, cfg.batch_size)
    faith = float(ev.faithfulness(circuit[None])[0])
    rand = random_baseline(ev, [max(1, int(circuit.sum()))], cfg.random_seeds)[0]
    curve = faithfulness_curve(ev, ranking, curve_sizes(graph), cfg.random_seeds)
    cpr, cmd = cpr_cmd(curve)
    metrics = {
        "clean": float(ev.clean),
        "corrupt": float(ev.corrupt),
        "circuit": float(ev.corrupt + faith * (ev.clean - ev.corrupt)),
        "faithfulness": faith,
        "random_same_size": rand,
        "n_edges": graph.n_edges,
        "n_edges_kept": int(circuit.sum()),
        "fraction_kept": int(circuit.sum()) / graph.n_edges,
        "n_scoring_pairs": len(score_set),
        "n_held_out_pairs": len(test_set),
        "clean_accuracy": perf["clean_accuracy"],
        "scoring_seconds": round(t_score, 2),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    res = CircuitResult(model=model.summary.to_dict(), task=batch.task, method=cfg.method,
                        settings=asdict(cfg), graph=graph, scores=scores, circuit=circuit,
                        metrics=metrics, curve=curve, cpr=cpr, cmd=cmd)
    res.example = attention_example(model, graph, batch, res)
    return res


@torch.no_grad()
def attention_example(model, graph: Graph, batch: TaskBatch, res: CircuitResult, n_heads: int = 4) -> dict:
    """Attention patterns [q, k] of the top heads on the first clean prompt."""
    heads = [c["name"] for c in res.top_components(50) if c["name"].startswith("a")][:n_heads]
    L = int(batch.lengths[0])
    toks = batch.clean[:1, :L].to(model.device)
    names = {f"blocks.{h[1:].split('.h')[0]}.attn.hook_pattern" for h in heads}
    _, cache = model.bridge.run_with_cache(toks, names_filter=lambda n: n in names)
    att = {}
    for h in heads:
        l, i = (int(x) for x in h[1:].split(".h"))
        att[h] = [[round(float(v), 4) for v in row] for row in cache[f"blocks.{l}.attn.hook_pattern"][0, i]]
    return {"prompt": batch.clean_text[0] if batch.clean_text else "", "tokens": model.to_str_tokens(toks[0]), "attention": att}
