"""The main job: score edges on most of the pairs, choose a circuit, evaluate it on the rest.

1. Build the task's pairs and check the model actually does the task (a circuit for a
   behaviour the model lacks is meaningless).
2. Split the pairs (``held_out``: a quarter by default, half for ACDC): the scoring pairs feed
   the method, the held-out pairs every reported figure.
3. Score edges (EAP, EAP-IG) or prune them (ACDC); at node level, heads and MLPs are the units.
4. Choose the circuit: top-K edges, a score threshold, or (the default) the smallest size
   whose *cross-validated* faithfulness inside the scoring pairs reaches the target
   (``circuits.crossval``: ranked without a fold, judged on it), then prune edges off
   input -> logits paths. The held-out pairs are never looked at for any choice.
5. Evaluate: faithfulness on the scoring pairs (in sample), the cross-validated estimate, and
   on the held-out pairs with a bootstrap interval over pairs; the held-out curve over sizes
   with a random baseline, CPR and CMD; attention patterns and roles of the circuit's heads.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mechscope.circuits.attribution import edge_score_folds, node_scores
from mechscope.circuits.config import METHODS as METHODS  # re-exported
from mechscope.circuits.config import DiscoverConfig, check_pair_count
from mechscope.circuits.crossval import (
    PLATEAU,
    choose_size,
    cv_curve,
    fold_evaluators,
    fold_sizes,
    grid_sizes,
    size_rule,
)
from mechscope.circuits.evaluate import (
    Evaluator,
    cpr_cmd,
    curve_sizes,
    faithfulness_curve,
    random_baseline,
    smallest_faithful,
)
from mechscope.circuits.pooling import PairScores
from mechscope.circuits.result import CircuitResult
from mechscope.circuits.select import importance, prune, receiver_owner, threshold, top_k
from mechscope.errors import MechscopeError
from mechscope.graph import Graph, build_graph
from mechscope.models.norms import head_shares
from mechscope.partial import Partial, model_key
from mechscope.patching.engine import check_patching_exact
from mechscope.progress import ProgressArg, as_progress
from mechscope.tasks.base import TaskBatch

if TYPE_CHECKING:
    from mechscope.models import Model


LOGPROB_CHANCE_FACTOR = 10.0
"""A logprob task is at chance when the answer's mean log-probability on the clean prompts is
at most log(10 / vocabulary): the answer is no more than 10 times as likely as a uniform guess."""


def check_task_performance(model: Model, batch: TaskBatch, force: bool = False) -> dict:
    """Evaluate the task and refuse (unless ``force``) when the model does not do it: accuracy
    at chance (tasks scored by a logit or probability difference), the answer hardly likelier
    than a uniform guess (``logprob`` tasks, ``LOGPROB_CHANCE_FACTOR``), or a clean-corrupt metric
    gap that is not positive (every metric is larger where the model does the task: a negative
    gap would turn the normalised faithfulness upside down). With ``force`` the figures are
    returned with ``at_chance`` set, and the run goes on."""
    from mechscope.tasks import evaluate_task

    res = evaluate_task(model, batch)
    gap = res["clean_metric"] - res["corrupt_metric"]
    if batch.metric_name == "logprob":
        # top-1 accuracy over a whole vocabulary is no test; the answer no more than
        # LOGPROB_CHANCE_FACTOR times as likely as a uniform guess (geometric mean) is
        at_chance = res["clean_metric"] <= math.log(LOGPROB_CHANCE_FACTOR * res["chance_accuracy"])
    else:
        at_chance = res["clean_accuracy"] <= res["chance_accuracy"] + 0.1
    if abs(gap) < 1e-3 and torch.equal(batch.clean, batch.corrupt):
        raise MechscopeError(
            f"the corrupt prompts of task '{batch.task}' are the clean prompts themselves, so there is nothing to patch "
            f"(clean-corrupt metric gap {gap:.3g}); make each corrupt prompt differ from its clean prompt where the answer "
            "is decided."
        )
    res["at_chance"] = bool(at_chance or gap < 1e-3)
    if res["at_chance"] and not force:
        why = (" (the corrupt prompts score as well as or better than the clean ones)" if gap < 1e-3 else "")
        if batch.metric_name == "logprob":
            figures = (f"mean clean log-probability of the answer {res['clean_metric']:.3g}, a uniform guess's "
                       f"{math.log(res['chance_accuracy']):.3g}")
        else:
            figures = f"clean accuracy {res['clean_accuracy']:.0%}, chance {res['chance_accuracy']:.0%}"
        raise MechscopeError(
            f"{model.summary.name} performs task '{batch.task}' at chance ({figures}, clean-corrupt metric gap "
            f"{gap:.3g}{why}); a circuit for a behaviour the model lacks is meaningless (--force runs it anyway)."
        )
    return res


def node_circuit(graph: Graph, nodes: torch.Tensor) -> torch.Tensor:
    """Edges among kept nodes (bool [n_senders]); input and logits always kept."""
    keep_nodes = nodes.bool().cpu().clone()
    keep_nodes[0] = True
    owners = receiver_owner(graph)
    recv_ok = torch.tensor([(not ow) or bool(keep_nodes[ow].any()) for ow in owners])
    return graph.allowed & keep_nodes[:, None] & recv_ok[None]


def _choose(cfg: DiscoverConfig, graph: Graph, ranking: torch.Tensor, ev_score: Evaluator,
            k_cv: int | None = None) -> torch.Tensor:
    if cfg.level == "node":
        ns = node_scores(graph, ranking).cpu()
        ns[0] = float("inf")
        n_nodes = graph.n_senders - 1
        if cfg.edges is not None:
            if cfg.edges > n_nodes:
                raise MechscopeError(f"Cannot keep {cfg.edges} nodes: the graph has {n_nodes} heads and MLPs.")
            k = cfg.edges
        elif cfg.threshold is not None and cfg.method != "acdc":  # (ACDC's threshold is its tau)
            return node_circuit(graph, ns >= cfg.threshold)  # the input's score is inf: always kept
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
    if k_cv is None:
        k_cv, _ = smallest_faithful(ev_score, ranking, cfg.target)
    return prune(graph, top_k(graph, ranking, k_cv, absolute=False))


def _smallest_connected(graph: Graph, ranking: torch.Tensor, k: int) -> int:
    """The smallest k' >= k whose pruned top-k' circuit keeps an edge (a path from the input to
    the logits). Monotone in k' (top-k sets are nested and a complete path stays complete), so a
    doubling then a bisection; the whole graph when no size does."""
    def kept(n: int) -> bool:
        return bool(prune(graph, top_k(graph, ranking, n, absolute=False)).any())

    lo, hi = k, max(k, 1)
    while not kept(hi):
        if hi >= graph.n_edges:
            return graph.n_edges
        lo, hi = hi, min(graph.n_edges, 2 * hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if kept(mid) else (mid, hi)
    return hi


def _stages(checkpoint: str | Path | None, model: Model, cfg: DiscoverConfig, batch: TaskBatch, graph: Graph) -> Partial:
    """Where one discovery keeps its finished stages (``mechscope.partial``; job
    ``discover-s<seed>``, so the draws of ``--seeds`` keep theirs side by side): keyed by the
    settings, the weights, the pairs and the graph, so a rerun resumes only the same run."""
    from mechscope.circuits.acdc import _digest

    settings = {k: v for k, v in asdict(cfg).items() if k != "checkpoint"}
    key = {"settings": settings, "model": model_key(model), "pairs": _digest(batch) if checkpoint is not None else None,
           "graph": [graph.n_senders, graph.n_receivers, graph.n_edges]}
    return Partial(checkpoint, f"discover-s{cfg.seed}", key)


def discover(model: Model, cfg: DiscoverConfig | None = None, batch: TaskBatch | None = None, progress: ProgressArg = True,
             checkpoint: str | Path | None = None) -> CircuitResult:
    """Run one circuit discovery (see module docstring) and return the result. ``progress``
    (``mechscope.progress``) sees the phases: scoring, cross-validating the size, evaluating,
    random circuits of the same size, the faithfulness curve, attention patterns and head roles.
    ``checkpoint``: a folder where the finished stages (the edge scores, each rank mode's
    cross-validated curve, the held-out evaluation, the faithfulness curve) are kept; a rerun of
    the same discovery reads them back instead of redoing them (``_stages``; every stage is
    deterministic, so the result is the same). The CLI's ``--out`` is that folder. ``batch``:
    the pairs instead of ``cfg.task``'s; the saved settings then name the batch's task and say
    so (``pairs_from_caller``), and ``evaluate_saved`` asks for the task to evaluate it on."""
    from mechscope.models import require_model
    from mechscope.tasks import get_task, task_spec

    require_model(model, "discover")
    from mechscope.models.check import require_float32

    require_float32(model, "discover (its edge patching and attribution)")
    cfg = DiscoverConfig() if cfg is None else cfg  # the CLI's defaults: IOI by EAP-IG
    if not isinstance(cfg, DiscoverConfig):
        raise MechscopeError(f"discover needs a DiscoverConfig, got a {type(cfg).__name__}; pass DiscoverConfig(...) "
                             "(e.g. DiscoverConfig(**settings) for a dict).")
    if batch is not None and not isinstance(batch, TaskBatch):
        raise MechscopeError(f"discover's batch must be a TaskBatch, got a {type(batch).__name__}; build one with "
                             "get_task(name).build(model.tokenizer), or leave it out to use cfg.task.")
    t0 = time.perf_counter()
    graph = build_graph(model)  # the settings were checked when cfg was made (circuits.config)
    check_patching_exact(model, graph)
    if cfg.edges is not None and cfg.level == "edge" and not 0 < cfg.edges <= graph.n_edges:
        raise MechscopeError(f"--edges {cfg.edges} is out of range: the graph has {graph.n_edges:,} edges.")
    if cfg.edges is not None and cfg.level == "node" and cfg.edges > graph.n_senders - 1:
        raise MechscopeError(f"Cannot keep {cfg.edges} nodes: the graph has {graph.n_senders - 1} heads and MLPs.")
    from_caller = batch is not None  # pairs a saved run cannot draw again from its settings
    if batch is None:
        batch = get_task(cfg.task).build(model.tokenizer, n=cfg.n, seed=cfg.seed)
    batch.check(model.summary.d_vocab)
    assert cfg.held_out is not None  # resolved by DiscoverConfig.__post_init__
    check_pair_count(len(batch), cfg.held_out, f"task '{batch.task}'")
    perf = check_task_performance(model, batch, cfg.force)
    score_set, test_set = batch.split(cfg.held_out, seed=cfg.seed)
    p = as_progress(progress)
    say = p.note
    done = _stages(checkpoint, model, cfg, batch, graph)
    if done.found:
        say(f"resuming: {done.found} finished stages of this discovery read from {checkpoint}")
    if done.discarded:
        say(f"{checkpoint} held stages of a discovery with other settings, weights or pairs (seed {cfg.seed}); they were discarded")
    t_score = time.perf_counter()
    use_cv = cfg.method != "acdc" and cfg.level == "edge" and cfg.edges is None and cfg.threshold is None
    folds = fold_sizes(len(score_set), cfg.folds) if use_cv and cfg.folds > 1 else None
    if folds is not None and len(folds) < cfg.folds:
        say(f"--folds {cfg.folds} is more than {len(score_set)} scoring pairs allow (at least two a fold): "
            f"cross-validating with {len(folds)} folds")
    fold_scores = None
    score_info: dict = {}
    earlier = 0.0  # scoring seconds of the run whose stored scores this one resumes (its timing is the real one)
    if cfg.method == "acdc":
        from mechscope.circuits.acdc import acdc

        ac = acdc(model, graph, score_set, tau=cfg.threshold if cfg.threshold is not None else 0.01,
                  ablation=cfg.ablation, metric=cfg.acdc_metric, progress=p, checkpoint=cfg.checkpoint)
        scores = ac.scores
        earlier = ac.seconds_before
    else:
        cv_folds = folds or [len(score_set)]
        stored = done.get_tensors("scores")
        if stored is not None and "parts" in stored:
            parts, score_info = stored["parts"], done.get("score-info") or {}
            earlier = float(score_info.get("seconds", 0.0))
        else:
            parts = edge_score_folds(model, graph, score_set, cv_folds if cfg.pool == "sum" else [1] * len(score_set),
                                     cfg.method, cfg.ig_steps, cfg.ablation, cfg.batch_size, progress=p, qk=cfg.qk,
                                     info=score_info).cpu()
            done.put("score-info", {**score_info, "seconds": time.perf_counter() - t_score})
            done.put_tensors("scores", {"parts": parts})
        fold_scores = PairScores(parts, cv_folds, cfg.pool)
        scores = fold_scores.total()
    t_score = time.perf_counter() - t_score + earlier
    scores = scores.cpu()
    rank: str = cfg.rank
    cv, k_cv, f_cv, rule = None, None, None, None
    if folds is not None and len(folds) > 1:
        modes = ("signed", "abs") if rank == "auto" else (rank,)
        found = {}
        evs = fold_evaluators(model, graph, score_set, len(folds), cfg.ablation, cfg.batch_size)  # shared by both modes
        ev_score = Evaluator.joined(score_set, evs)
        sizes = grid_sizes(graph)
        for mode in modes:
            assert fold_scores is not None  # folds are only used with per-fold scores (not ACDC)
            c = done.get(f"cv-{mode}")
            if c is None:
                c = done.put(f"cv-{mode}", cv_curve(model, graph, score_set, fold_scores, sizes, cfg.method, mode,
                                                    cfg.ablation, cfg.batch_size, progress=p, confidence=cfg.cv_confidence,
                                                    seed=cfg.seed, evaluators=evs, stop_at=cfg.target))
            found[mode] = (c, *choose_size(c, cfg.target))
            if size_rule(c, found[mode][1], cfg.target) == "confidence-bound":
                # a later mode can only win by reaching the target with confidence at a size no
                # larger (``pick_rank``), so larger sizes need no evaluation for it
                sizes = [k for k in sizes if k <= found[mode][1]]
        rank = pick_rank(found, cfg.target) if rank == "auto" else rank
        cv, k_cv, f_cv = found[rank]
        rule = size_rule(cv, k_cv, cfg.target)
    else:
        ev_score = Evaluator(model, graph, score_set, cfg.ablation, cfg.batch_size)
        rank = "signed" if rank == "auto" else rank
    ranking = importance(scores, cfg.method, rank)
    if cfg.method == "acdc" and cfg.edges is None and cfg.level == "edge":
        circuit = prune(graph, ac.circuit)
    else:
        if cfg.level == "node" or k_cv is None:
            say("choosing the circuit on the scoring pairs")
        circuit = _choose(cfg, graph, ranking, ev_score, k_cv)
    selected = None  # edges a count or threshold chose, before pruning to input -> logits paths
    if cfg.level == "edge" and k_cv is None and (cfg.edges is not None or cfg.method != "acdc"):
        chosen = (top_k(graph, ranking, cfg.edges, absolute=False) if cfg.edges is not None else
                  threshold(graph, ranking, cfg.threshold, absolute=False) if cfg.threshold is not None else None)
        selected = None if chosen is None else int(chosen.sum())
    grown_from = None
    if k_cv is not None and not bool(circuit.any()):
        grown_from, k_cv = k_cv, _smallest_connected(graph, ranking, k_cv)
        circuit = prune(graph, top_k(graph, ranking, k_cv, absolute=False))
        say(f"the top {grown_from:,} edges of the whole scoring set's ranking form no path from the input to the logits "
            f"(pruned to none), though each fold's did; the circuit is the smallest top-k that does: {k_cv:,} edges")
    say("evaluating the circuit on the scoring and held-out pairs")
    ev = Evaluator(model, graph, test_set, cfg.ablation, cfg.batch_size)
    evaluated = done.get("evaluate")
    if evaluated is None or evaluated.get("n_edges_kept") != int(circuit.sum()):
        in_sample = float(ev_score.faithfulness(circuit[None])[0])
        held = ev.faithfulness_interval(circuit, n_boot=cfg.bootstrap, seed=cfg.seed)
        with p.phase("random circuits of the same size", total=ev.passes(cfg.random_seeds), unit="pass") as bar:
            rand = random_baseline(ev, [max(1, int(circuit.sum()))], cfg.random_seeds, bar=bar)[0]
        done.put("evaluate", {"in_sample": in_sample, "held": held, "random": rand, "n_edges_kept": int(circuit.sum())})
    else:
        in_sample, held, rand = evaluated["in_sample"], evaluated["held"], evaluated["random"]
    faith = held["faithfulness"]
    curve = done.get("curve")
    if curve is None:
        curve = done.put("curve", faithfulness_curve(ev, ranking, curve_sizes(graph), cfg.curve_random_seeds, progress=p))
    cpr, cmd = cpr_cmd(curve)
    metrics = {
        "clean": float(ev.clean),
        "corrupt": float(ev.corrupt),
        "circuit": float(ev.corrupt + faith * (ev.clean - ev.corrupt)),
        "faithfulness": faith,
        "faithfulness_ci": [held["ci_low"], held["ci_high"]],
        "faithfulness_ci_level": held["level"],
        "faithfulness_ci_dropped": held["dropped"],
        "faithfulness_scoring": in_sample,
        "faithfulness_cv": f_cv,
        "rank": rank,
        "rank_chosen_by": "cross-validation" if cfg.rank == "auto" and k_cv is not None else "setting",
        "selection": ("cross-validation" if k_cv is not None else
                      "acdc" if cfg.method == "acdc" and cfg.edges is None else
                      "edges" if cfg.edges is not None else "threshold" if cfg.threshold is not None else "in-sample"),
        "size_rule": rule,
        **({"size_grown_from": grown_from} if grown_from is not None else {}),
        **({"n_edges_selected": selected} if selected is not None else {}),
        "plateau": PLATEAU if rule == "plateau" else None,
        "target": cfg.target,
        "random_same_size": rand,
        "n_edges": graph.n_edges,
        "n_edges_kept": int(circuit.sum()),
        "fraction_kept": int(circuit.sum()) / graph.n_edges,
        "n_scoring_pairs": len(score_set),
        "n_held_out_pairs": len(test_set),
        "n_folds": len(folds) if folds else 1,
        "clean_accuracy": perf["clean_accuracy"],
        **({"at_chance": True} if perf["at_chance"] else {}),
        "dropped_pairs": dict(batch.dropped),
        "task_notes": list(batch.notes),
        "scoring_seconds": round(t_score, 2),
        **({"qk_fallback_layers": score_info["qk_fallback_layers"]} if score_info.get("qk_fallback_layers") else {}),
    }
    model_info = model.summary.to_dict() | ({"parallel_blocks": True} if graph.parallel else {}) \
        | ({"heads_as_norm_shares": True} if any(s is not None for s in head_shares(model)) else {})
    res = CircuitResult(model=model_info, task=batch.task, method=cfg.method,
                        settings={**asdict(cfg), "task": batch.task if from_caller else task_spec(cfg.task), "rank": rank,
                                  **({"pairs_from_caller": True} if from_caller else {})},
                        graph=graph, scores=scores, circuit=circuit,
                        metrics=metrics, curve=curve, cpr=cpr, cmd=cmd, cv_curve=cv)
    say("attention patterns and head roles")
    from mechscope.circuits.labels import attention_patterns, circuit_heads, label_heads

    res.example = attention_patterns(model, batch, circuit_heads(res), res.node_scores())
    if cfg.labels:
        res.labels = label_heads(model, res, batch, progress=p)
    metrics["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def pick_rank(found: dict[str, tuple[list[dict], int, float]], target: float) -> str:
    """The rank mode (signed or abs) whose cross-validated curve does best: one that reaches
    the target at its confidence bound beats one that reaches it by the point estimate only,
    which beats one that never reaches it; then the smaller chosen circuit; then the higher
    cross-validated faithfulness. Signed ranking keeps edges that work against the behaviour
    out of the circuit, |score| is robust to sign errors of the linear estimate (induction and
    docstring on the embedded model: signed stalls below 0.5 up to half the edges)."""

    def key(mode: str):
        curve, k, f = found[mode]
        row = next(c for c in curve if c["n_edges"] == k)
        level = 2 if (row.get("faithfulness_low") or -1e9) >= target else 1 if f >= target else 0
        return (-level, k if level else 0, -f, mode != "signed")

    return min(found, key=key)

