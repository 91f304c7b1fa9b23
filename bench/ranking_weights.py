"""Which way of pooling the scoring pairs' attribution ranks edges that hold up on new pairs?

Attribution scores are sums over the scoring pairs. A pair whose clean-minus-corrupt metric gap
is small or negative (the model does not do the task on it, or the corrupted prompt happens to
favour the answer) and a pair with a very large gap pull the sum as much as or more than the
typical pair. This script scores each scoring pair separately (``edge_score_folds`` with one
fold per pair: the same passes as the default) and ranks edges by several poolings:

* ``sum``: the default, every pair's scores added;
* ``valid``: the sum over pairs whose clean metric beats the corrupted one (gap > 0);
* ``normalised``: each valid pair's scores divided by its gap (floored at a quarter of the
  median gap), so each pair votes with the same weight;
* ``trimmed``: per edge, the mean over pairs without the highest and lowest 10%;
* ``median``: per edge, the median over pairs (``discover --pool median``; the figures of
  session 12 in docs/decisions.md were measured with the lower of the two middle pairs instead).

For each seed (a draw of pairs as ``mechscope discover --task T --seed S`` makes it), it prints
the held-out faithfulness of each ranking's top-k circuit at fixed sizes. The held-out pairs
play no part in the rankings.

    python bench/ranking_weights.py --task ioi --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mechscope.circuits import DiscoverConfig
from mechscope.circuits.attribution import edge_score_folds
from mechscope.circuits.evaluate import Evaluator
from mechscope.circuits.pooling import PairScores
from mechscope.circuits.select import importance, prune, top_k
from mechscope.graph import build_graph
from mechscope.models import load_model
from mechscope.tasks import get_task

FRACTIONS = (0.01, 0.02, 0.03, 0.05)


def poolings(per_pair: torch.Tensor, gap: torch.Tensor) -> dict[str, torch.Tensor]:
    """Edge scores [S, R] pooled from per-pair scores [n, S, R] with the pairs' gaps [n]."""
    valid = gap > 0
    floor = 0.25 * gap[valid].median() if bool(valid.any()) else torch.tensor(1.0)
    w = torch.where(valid, 1 / gap.clamp(min=float(floor)), torch.zeros_like(gap))
    srt = per_pair.sort(0).values
    cut = int(0.1 * per_pair.shape[0])
    return {
        "sum": per_pair.sum(0),
        "valid": per_pair[valid].sum(0),
        "normalised": (per_pair * w[:, None, None]).sum(0),
        "trimmed": srt[cut : per_pair.shape[0] - cut].mean(0),
        "median": PairScores(per_pair, [per_pair.shape[0]], "median").total(),  # as discover --pool median
    }


def one_seed(model, graph, cfg: DiscoverConfig) -> dict:
    batch = get_task(cfg.task).build(model.tokenizer, n=cfg.n, seed=cfg.seed)
    score_set, test_set = batch.split(cfg.held_out, seed=cfg.seed)
    t0 = time.perf_counter()
    per_pair = edge_score_folds(
        model, graph, score_set, [1] * len(score_set), cfg.method, cfg.ig_steps, cfg.ablation, cfg.batch_size, qk=cfg.qk
    ).cpu()
    ev_s = Evaluator(model, graph, score_set, cfg.ablation, cfg.batch_size)
    gap = (ev_s.clean_ex - ev_s.corrupt_ex).cpu()
    ev = Evaluator(model, graph, test_set, cfg.ablation, cfg.batch_size)
    sizes = [int(f * graph.n_edges) for f in FRACTIONS]
    held = {}
    for name, sc in poolings(per_pair, gap).items():
        ranking = importance(sc, cfg.method, "signed")
        held[name] = ev.faithfulness(
            torch.stack([prune(graph, top_k(graph, ranking, k, False)) for k in sizes])
        ).tolist()
    return {
        "seed": cfg.seed,
        "held_out": held,
        "n_valid": int((gap > 0).sum()),
        "n": len(gap),
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="ioi")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--held-out", type=float, default=None, help="share held out (default: discover's; the session-12 figures: --n 100 --held-out 0.5)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args()
    model = load_model()
    graph = build_graph(model)
    print(
        f"{platform.machine()} | {torch.get_num_threads()} threads | torch {torch.__version__} | task {args.task} | "
        f"held-out faithfulness at {', '.join(f'{f:.0%}' for f in FRACTIONS)} of edges"
    )
    rows = []
    for s in (int(x) for x in args.seeds.split(",")):
        r = one_seed(model, graph, DiscoverConfig(task=args.task, n=args.n, held_out=args.held_out, seed=s, labels=False))
        rows.append(r)
        print(
            f"seed {s} ({r['seconds']:.0f} s, {r['n_valid']} of {r['n']} scoring pairs with gap > 0): "
            + " | ".join(f"{k} " + " ".join(f"{x:.2f}" for x in v) for k, v in r["held_out"].items()),
            flush=True,
        )
    for name in rows[0]["held_out"]:
        at = list(zip(*[r["held_out"][name] for r in rows]))
        print(
            f"{name}: "
            + ", ".join(f"{f:.0%} min {min(v):.2f} mean {sum(v) / len(v):.2f}" for f, v in zip(FRACTIONS, at))
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh)


if __name__ == "__main__":
    main()
