"""Which size rule generalises across draws of pairs? Every rule side by side, on the same runs.

For each seed (a new draw of pairs, as ``mechscope discover --task T --seed S`` makes it, with
the discovery's defaults otherwise) this computes once: the per-fold EAP-IG scores of the
scoring pairs, the whole cross-validated curve over the size grid (each scoring pair judged by
the circuit ranked without its fold), and the held-out faithfulness of the top-k circuit at
every grid size. Each size rule then picks a size from the cross-validated curve alone, and
the script prints the held-out faithfulness at that size, so rules are compared on identical
scores and pairs:

* ``bound90``: the smallest size whose one-sided 90% bootstrap lower bound reaches the target
  (the rule of ``circuits.crossval.choose_size``);
* ``bound99``: the same at 99%;
* ``bonferroni``: the same at 1 - 0.1 / (number of grid sizes below the full model), since
  the rule tests every size and keeps the first that passes;
* ``point``: the smallest size whose cross-validated point estimate reaches the target.

Signed ranking only (the mode IOI, greater-than and facts choose). The held-out pairs play no
part in any choice; they are the judge here.

    python bench/selection_rules.py --task ioi --seeds 0,1,2,3,4
    python bench/selection_rules.py --task ioi --seeds 2,4 --n 200 --held-out 0.25   # 150 score, 50 held out
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from mechscope.circuits import DiscoverConfig
from mechscope.circuits.attribution import edge_score_folds
from mechscope.circuits.crossval import _lower_bounds, cv_per_pair, fold_evaluators, fold_sizes, grid_sizes
from mechscope.circuits.evaluate import Evaluator
from mechscope.circuits.select import importance, prune, top_k
from mechscope.graph import build_graph
from mechscope.models import load_model
from mechscope.tasks import get_task


def one_seed(model, graph, cfg: DiscoverConfig) -> dict:
    batch = get_task(cfg.task).build(model.tokenizer, n=cfg.n, seed=cfg.seed)
    score_set, test_set = batch.split(cfg.held_out, seed=cfg.seed)
    folds = fold_sizes(len(score_set), cfg.folds)
    t0 = time.perf_counter()
    fs = edge_score_folds(model, graph, score_set, folds, cfg.method, cfg.ig_steps, cfg.ablation, cfg.batch_size,
                          qk=cfg.qk).cpu()
    t_score = time.perf_counter() - t0
    total = fs.sum(0)
    sizes = [k for k in grid_sizes(graph) if k < graph.n_edges]
    evs = fold_evaluators(model, graph, score_set, len(folds), cfg.ablation, cfg.batch_size)
    per_ex = cv_per_pair(graph, evs, fs, sizes, cfg.method, "signed")  # [K, n_scoring]
    clean = torch.cat([ev.clean_ex for ev in evs])
    corrupt = torch.cat([ev.corrupt_ex for ev in evs])
    cv = ((per_ex.mean(1) - corrupt.mean()) / (clean.mean() - corrupt.mean())).tolist()
    levels = {"bound90": 0.9, "bound99": 0.99, "bonferroni": 1 - 0.1 / len(sizes)}
    lows = {name: _lower_bounds(per_ex, clean, corrupt, c, cfg.bootstrap, cfg.seed).tolist() for name, c in levels.items()}
    ranking = importance(total, cfg.method, "signed")
    ev = Evaluator(model, graph, test_set, cfg.ablation, cfg.batch_size)
    held = ev.faithfulness(torch.stack([prune(graph, top_k(graph, ranking, k, False)) for k in sizes])).tolist()
    picks = {}
    for name, low in {**lows, "point": cv}.items():
        i = next((j for j, x in enumerate(low) if x >= cfg.target), None)
        picks[name] = None if i is None else {"n_edges": sizes[i], "fraction": sizes[i] / graph.n_edges,
                                              "cv": cv[i], "held_out": held[i]}
    return {"seed": cfg.seed, "sizes": sizes, "cv": cv, "lows": lows, "held_out": held, "picks": picks,
            "scoring_seconds": t_score, "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="ioi")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--held-out", type=float, default=None, help="fraction of the pairs held out (default: discover's)")
    ap.add_argument("--json", default=None, help="also write every curve to this file")
    args = ap.parse_args()
    model = load_model()
    graph = build_graph(model)
    print(f"{platform.machine()} | {torch.get_num_threads()} threads | torch {torch.__version__} | task {args.task}")
    rows = []
    for s in (int(x) for x in args.seeds.split(",")):
        r = one_seed(model, graph, DiscoverConfig(task=args.task, n=args.n, seed=s, labels=False, held_out=args.held_out))
        rows.append(r)
        cells = [f"{name} {p['fraction']:.2%} cv {p['cv']:.2f} held {p['held_out']:.2f}" if p else f"{name} none"
                 for name, p in r["picks"].items()]
        print(f"seed {s} ({r['seconds']:.0f} s): " + " | ".join(cells), flush=True)
    for name in rows[0]["picks"]:
        got = [r["picks"][name] for r in rows]
        ok = [p for p in got if p and p["held_out"] >= 0.8 and p["fraction"] <= 0.05]
        held = [p["held_out"] for p in got if p]
        print(f"{name}: {len(ok)} of {len(rows)} draws hold >= 0.8 at <= 5% of edges; held-out "
              f"{min(held, default=float('nan')):.2f}-{max(held, default=float('nan')):.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh)


if __name__ == "__main__":
    main()
