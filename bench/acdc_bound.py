"""How long would exact ACDC take? Run it for a budget, then bound the rest from below.

Runs mechscope's ACDC exactly as ``mechscope discover --method acdc`` does (same pairs, same
scoring half, KL, resample ablation) for ``--seconds``, checkpointing, then computes a lower
bound on the time the unvisited receivers still need:

* A node (head or MLP) below the last visited receiver that already has a *kept* edge into a
  visited receiver stays in the circuit (ACDC never revisits a decision), so each of its
  receivers (a head's query, its KV group's key and value; an MLP's input) will be visited and
  every one of their allowed incoming edges will cost one evaluation.
* One evaluation of a layer-l receiver costs at least what one speculative pass of
  ``k_batch`` masks costs per mask at that layer (timed here, every layer), i.e. the bound
  assumes every speculation succeeds and that no other node stays alive.

The run resumes from ``--checkpoint`` if it exists, so the budget can be spent in pieces.

    python bench/acdc_bound.py --task ioi --n 50 --tau 0.01 --seconds 1800 --checkpoint /tmp/acdc.ckpt
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from mechscope.circuits import DiscoverConfig
from mechscope.circuits.acdc import _Scorer, acdc, default_k_batch
from mechscope.circuits.select import receiver_owner
from mechscope.graph import build_graph
from mechscope.models import load_model
from mechscope.tasks import get_task


def per_mask_seconds(model, graph, score_set, cfg, k: int) -> list[float]:
    """Seconds per mask of one speculative pass of k masks, for a receiver at each layer (and logits)."""
    scorer = _Scorer(model, graph, score_set, cfg.ablation, cfg.acdc_metric)
    out = []
    for layer in range(graph.n_layers + 1):
        masks = graph.empty_mask()[None].repeat(k, 1, 1)
        scorer(masks, layer)  # warm
        t = time.perf_counter()
        scorer(masks, layer)
        out.append((time.perf_counter() - t) / k)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--task", default="ioi")
    ap.add_argument("--n", type=int, default=50, help="pairs, half used for scoring (as discover)")
    ap.add_argument("--tau", type=float, default=0.01)
    ap.add_argument("--seconds", type=float, default=1800)
    ap.add_argument("--checkpoint", required=True)
    a = ap.parse_args()
    model = load_model(a.model, device="cpu")
    graph = build_graph(model)
    cfg = DiscoverConfig(task=a.task, method="acdc", n=a.n)  # the pairs and split discover uses
    batch = get_task(cfg.task).build(model.tokenizer, n=cfg.n, seed=cfg.seed)
    score_set, _ = batch.split(cfg.held_out, seed=cfg.seed)
    t0 = time.perf_counter()
    res = acdc(model, graph, score_set, tau=a.tau, ablation=cfg.ablation, metric=cfg.acdc_metric,
               checkpoint=a.checkpoint, max_seconds=a.seconds, progress=True)
    spent = time.perf_counter() - t0

    from safetensors import safe_open

    with safe_open(a.checkpoint, "pt") as f:
        mask, next_r = f.get_tensor("mask"), int(f.metadata()["next_receiver"])
    kept = graph.allowed & (mask == 0)
    owners = receiver_owner(graph)
    visited = torch.zeros(graph.n_receivers, dtype=torch.bool)
    visited[next_r + 1 :] = True
    alive_nodes = (kept & visited[None]).any(1)  # senders with a kept edge into a visited receiver
    k = default_k_batch(model, len(score_set))
    cost = per_mask_seconds(model, graph, score_set, cfg, k)
    evals, bound = 0, 0.0
    for r in range(next_r + 1):
        if owners[r] and alive_nodes[owners[r]].any():
            n_in = int(graph.allowed[:, r].sum())
            evals += n_in
            bound += n_in * cost[graph.receiver_layer(r)]
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model {model.summary.name}; {graph.n_edges:,} edges; task {a.task}, {len(score_set)} scoring pairs "
          f"x {score_set.n_pos} tokens; tau {a.tau}; speculative batch {k}")
    print(f"this call: {spent:.0f} s; ACDC complete: {res.complete}; receivers left: {next_r + 1} of {graph.n_receivers} "
          f"(next: layer {graph.receiver_layer(max(next_r, 0))})")
    print("seconds per evaluation by receiver layer: " + ", ".join(f"{c:.2f}" for c in cost))
    print(f"still to come, at least: {evals:,} evaluations, {bound / 60:.0f} min")


if __name__ == "__main__":
    main()
