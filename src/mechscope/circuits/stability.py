"""How much a circuit depends on the draw of pairs: the same discovery over several seeds.

Each seed draws its own pairs (and its own scoring / held-out split), so the runs differ only
in data. A task file's pairs do not depend on the seed (``jsonl.build``): there the runs share
their pairs and differ only in the split, and the summary says so (``same_pairs``). Reported:

- held-out faithfulness per seed (with each run's bootstrap interval) and its spread;
- the Jaccard overlap |A & B| / |A | B| of the chosen circuits, and of their top-100 edges
  by the ranking that chose them, averaged over all pairs of seeds;
- each edge's frequency: the share of the seeds' circuits that contain it. Edges in at least
  ``stable_threshold`` of them are *stable*; the report marks them.

The result is the first seed's run with ``stability`` filled in.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import combinations
from pathlib import Path

import torch

from mechscope.circuits.config import DiscoverConfig, check_seeds
from mechscope.circuits.discover import discover
from mechscope.circuits.result import CircuitResult
from mechscope.circuits.select import importance
from mechscope.errors import MechscopeError, check_config
from mechscope.graph import Graph
from mechscope.progress import ProgressArg, as_progress


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a & b| / |a | b| of two bool masks (1.0 when both are empty)."""
    a, b = a.bool(), b.bool()
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def top_edges(graph: Graph, ranking: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k highest-ranked allowed edges."""
    r = torch.where(graph.allowed, ranking.float(), torch.tensor(float("-inf")))
    keep = torch.zeros_like(graph.allowed)
    keep.view(-1)[r.flatten().topk(min(k, graph.n_edges)).indices] = True
    return keep


def stability_summary(runs: list[CircuitResult], stable_threshold: float = 0.8, top: int = 100,
                      same_pairs: bool = False) -> dict:
    """Overlaps and spread over runs of one discovery with different seeds (see module docstring);
    ``same_pairs``: the seeds drew the same pairs and only split them differently."""
    g = runs[0].graph
    circuits = [r.circuit.bool().cpu() for r in runs]
    tops = [top_edges(g, importance(r.scores, r.method, r.settings.get("rank", "signed")), top) for r in runs]
    pairs = list(combinations(range(len(runs)), 2))
    jc = [jaccard(circuits[i], circuits[j]) for i, j in pairs]
    jt = [jaccard(tops[i], tops[j]) for i, j in pairs]
    faith = torch.tensor([r.metrics["faithfulness"] for r in runs], dtype=torch.float64)
    freq = torch.stack([c.float() for c in circuits]).mean(0)
    stable = (freq >= stable_threshold) & g.allowed
    idx = stable.nonzero().tolist()
    idx.sort(key=lambda sr: -float(freq[sr[0], sr[1]]))
    return {
        "n_seeds": len(runs),
        "seeds": [r.settings["seed"] for r in runs],
        "same_pairs": same_pairs,
        "per_seed": [{"seed": r.settings["seed"], "n_edges_kept": r.metrics["n_edges_kept"],
                      "faithfulness": r.metrics["faithfulness"], "faithfulness_ci": r.metrics.get("faithfulness_ci"),
                      "faithfulness_scoring": r.metrics.get("faithfulness_scoring"),
                      "clean": r.metrics["clean"], "seconds": r.metrics.get("seconds")} for r in runs],
        "faithfulness_mean": float(faith.mean()),
        "faithfulness_min": float(faith.min()),
        "faithfulness_max": float(faith.max()),
        "faithfulness_std": float(faith.std()) if len(runs) > 1 else 0.0,
        "jaccard_circuit_mean": sum(jc) / len(jc) if jc else 1.0,
        "jaccard_circuit_min": min(jc) if jc else 1.0,
        "jaccard_top100_mean": sum(jt) / len(jt) if jt else 1.0,
        "top": top,
        "stable_threshold": stable_threshold,
        "stable_edges": [[g.senders[s], g.receivers[r], round(float(freq[s, r]), 3)] for s, r in idx],
    }


def discover_seeds(model, cfg: DiscoverConfig | None, n_seeds: int, progress: ProgressArg = True,
                   stable_threshold: float = 0.8, checkpoint: str | Path | None = None) -> CircuitResult:
    """Run ``discover`` for seeds cfg.seed .. cfg.seed + n_seeds - 1; the first run, with
    ``stability`` filled in. Head roles are labelled on the first run only. ``checkpoint``: the
    folder where each draw keeps its finished stages (``discover``'s), so a rerun resumes."""
    from mechscope.tasks import get_task

    check_config(cfg, DiscoverConfig, "discover_seeds")
    cfg = DiscoverConfig() if cfg is None else cfg
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int):
        raise MechscopeError(f"discover_seeds: n_seeds is a whole number of draws, not {n_seeds!r}.")
    check_seeds(cfg, n_seeds)
    same_pairs = not get_task(cfg.task).seeded
    p = as_progress(progress)
    runs = []
    for i in range(n_seeds):
        c = replace(cfg, seed=cfg.seed + i, labels=cfg.labels and i == 0)
        p.note(f"{'split' if same_pairs else 'draw'} {i + 1} of {n_seeds} (seed {c.seed})")
        runs.append(discover(model, c, progress=p, checkpoint=checkpoint))
    main = runs[0]
    main.stability = stability_summary(runs, stable_threshold, same_pairs=same_pairs)
    return main
