"""Circuit evaluation: faithfulness, faithfulness curves, random baselines, CPR/CMD, ROC AUC,
and ``evaluate_saved`` (a saved circuit re-evaluated on its held-out pairs or another task's).

Faithfulness of a circuit C (normalised metric recovered) on pairs not used for scoring:

    f(C) = (m(C) - m(corrupt)) / (m(clean) - m(corrupt))

where m(C) is the metric when every edge *outside* C is patched from the source run.

CPR and CMD follow MIB (Mueller et al. 2025): over circuit sizes given as fractions of all
edges, CPR = area under f (higher is better) and CMD = area under |1 - f| (lower is better),
both by the trapezoid rule on the fraction axis from the smallest evaluated size to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from mechscope.circuits.config import DiscoverConfig, check_pair_count
from mechscope.circuits.select import importance, prune, top_k
from mechscope.errors import MechscopeError
from mechscope.graph import Graph, build_graph
from mechscope.patching.engine import (
    Ablation,
    RunningMean,
    check_pair,
    check_patching_exact,
    logits_at,
    run_with_edge_mask,
    sender_activations_and_logits,
    source_activations,
)
from mechscope.progress import PhaseHandle, ProgressArg, as_progress
from mechscope.tasks import check_fits
from mechscope.tasks.base import TaskBatch

if TYPE_CHECKING:
    from mechscope.circuits.result import CircuitResult
    from mechscope.models import Model

CURVE_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""Sizes of the held-out faithfulness curve (fractions of all edges). 0.1% and 0.2% were dropped
in session 10 to pay for 100 pairs: no default circuit on the embedded model is that small."""

GAP_FLOOR = 0.1
"""A bootstrap resample counts only if its clean-corrupt gap is at least this share of the full sample's."""


class CircuitEvaluator(Protocol):
    """What the curve, the random baseline and the selection need of an evaluator: the graph,
    the faithfulness of a stack of circuits (advancing ``bar`` once per pass) and how many
    passes that takes. ``Evaluator`` (language models) and ``vision.eap.ViTEvaluator`` (the
    ViT) both provide it."""

    graph: Graph

    def faithfulness(self, circuits: torch.Tensor, bar: PhaseHandle | None = None) -> torch.Tensor: ...

    def passes(self, n_masks: int) -> int: ...


@dataclass
class Evaluator:
    """Caches the clean/corrupt baselines and source activations of one evaluation set."""

    model: Model
    graph: Graph
    batch: TaskBatch
    ablation: Ablation = "patching"
    batch_size: int = 16
    mean: torch.Tensor | None = None
    """mean ablation's source [n_senders, 1, pos, d_model] (``dataset_mean_source``); None: the
    mean over this evaluator's whole batch (never per chunk of ``batch_size``)"""

    def __post_init__(self) -> None:
        """Source run and baselines per chunk. With patching, every edge patched is the corrupt
        run itself, so the corrupt baseline comes from the source pass and the clean one from a
        plain clean pass; with mean ablation the clean pass is the source pass (its outputs
        summed into the mean over the whole batch). The mean and zero ablations need a patched
        pass for the fully patched baseline."""
        from mechscope.graph import check_graph_fits
        from mechscope.tasks import check_batch_size

        check_batch_size(self.batch_size)
        if self.ablation not in ("patching", "mean", "zero"):
            raise MechscopeError(f"Unknown ablation {self.ablation!r}; choose patching, mean or zero.")
        if not isinstance(self.batch, TaskBatch):
            raise MechscopeError(f"Evaluator needs a TaskBatch, got a {type(self.batch).__name__}; build one with "
                                 "get_task(name).build(model.tokenizer).")
        check_graph_fits(self.model, self.graph, "Evaluator")
        self.batch.check(self.model.summary.d_vocab)
        check_fits(self.model, self.batch)
        dev = self.model.device
        chunks: list[tuple[TaskBatch, torch.Tensor | None]] = []
        clean_ex, corrupt_ex = [], []
        running = RunningMean(batch_dim=1)
        for i in range(0, len(self.batch), self.batch_size):
            sub = self.batch.subset(slice(i, min(len(self.batch), i + self.batch_size))).to(dev)
            with torch.no_grad():
                if self.ablation == "patching":
                    corrupt = check_pair(sub.clean, sub.corrupt)
                    src, at = sender_activations_and_logits(self.model, self.graph, corrupt, sub.positions)
                    corrupt_ex.append(sub.metric_at(at).cpu())
                    at = logits_at(self.model, sub.clean, sub.positions, [])
                elif self.ablation == "mean" and self.mean is not None:
                    src = self.mean.to(dev)
                    at = logits_at(self.model, sub.clean, sub.positions, [])
                elif self.ablation == "mean":  # the clean pass is the source pass
                    acts, at = sender_activations_and_logits(self.model, self.graph, sub.clean, sub.positions)
                    running.add(acts, sub.lengths)
                    src = None
                else:
                    src = source_activations(self.model, self.graph, sub.clean, sub.corrupt, self.ablation, sub.lengths)
                    at = logits_at(self.model, sub.clean, sub.positions, [])
                clean_ex.append(sub.metric_at(at).cpu())
            chunks.append((sub, src))
        if self.ablation == "mean":
            if self.mean is None:
                self.mean = running.value()
            elif self.mean.shape[2] != self.batch.clean.shape[1]:
                raise ValueError(f"a mean source over {self.mean.shape[2]} positions for prompts of {self.batch.clean.shape[1]}")
            chunks = [(sub, self.mean.to(dev)) for sub, _ in chunks]
        self._chunks: list[tuple[TaskBatch, torch.Tensor]] = [(sub, src) for sub, src in chunks if src is not None]
        self.clean_ex = torch.cat(clean_ex)  # per-example metric [n]
        if self.ablation == "patching":
            self.corrupt_ex = torch.cat(corrupt_ex)
        else:
            self.corrupt_ex = self.per_example(self.graph.full_mask()[None])[0]
        self.clean, self.corrupt = self.clean_ex.mean(), self.corrupt_ex.mean()

    @classmethod
    def joined(cls, batch: TaskBatch, parts: list["Evaluator"]) -> "Evaluator":
        """The evaluator of ``batch`` from evaluators of its consecutive slices (the folds of
        ``crossval.fold_evaluators``): their source runs and baselines, no new pass. With mean
        ablation the parts must share one mean (``fold_evaluators`` gives them the whole batch's)."""
        same = len({(ev.ablation, ev.batch_size, id(ev.model), id(ev.graph), id(ev.mean)) for ev in parts}) == 1
        if not parts or not same or sum(len(ev.batch) for ev in parts) != len(batch):
            raise ValueError("joined evaluators must cover the batch in order, with one model, graph, ablation and batch size")
        ev = cls.__new__(cls)
        ev.model, ev.graph, ev.batch = parts[0].model, parts[0].graph, batch
        ev.ablation, ev.batch_size, ev.mean = parts[0].ablation, parts[0].batch_size, parts[0].mean
        ev._chunks = [c for p in parts for c in p._chunks]
        ev.clean_ex = torch.cat([p.clean_ex for p in parts])
        ev.corrupt_ex = torch.cat([p.corrupt_ex for p in parts])
        ev.clean, ev.corrupt = ev.clean_ex.mean(), ev.corrupt_ex.mean()
        return ev

    @torch.no_grad()
    def per_example(self, masks: torch.Tensor, k_batch: int = 4, bar: PhaseHandle | None = None) -> torch.Tensor:
        """Per-example metric [K, n] for K patch masks [K, S, R] (1 = patched); ``bar`` advances
        once per patched pass (``passes`` of them)."""
        out = torch.zeros(masks.shape[0], len(self.batch))
        todo = torch.arange(masks.shape[0])
        if hasattr(self, "clean_ex"):  # a mask that patches nothing is the clean run: no pass needed
            none = masks.flatten(1).abs().sum(1) == 0
            out[none] = self.clean_ex
            todo = todo[~none]
        i = 0
        for sub, src in self._chunks:
            for j in range(0, len(todo), k_batch):
                ix = todo[j : j + k_batch]
                logits = run_with_edge_mask(self.model, self.graph, sub.clean, src, masks[ix], positions=sub.positions)
                out[ix, i : i + len(sub)] = torch.stack([sub.metric_at(lg) for lg in logits]).cpu()
                if bar is not None:
                    bar.advance()
            i += len(sub)
        if bar is not None and len(todo) < masks.shape[0]:  # count the passes not needed as done
            bar.advance(self.passes(masks.shape[0], k_batch) - self.passes(len(todo), k_batch))
        return out

    def passes(self, n_masks: int, k_batch: int = 4) -> int:
        """Patched passes ``per_example`` makes for ``n_masks`` masks (a progress total)."""
        return len(self._chunks) * -(-n_masks // k_batch)

    def metric(self, masks: torch.Tensor, k_batch: int = 4, bar: PhaseHandle | None = None) -> torch.Tensor:
        """Mean metric [K] for K patch masks [K, S, R] (1 = patched)."""
        return self.per_example(masks, k_batch, bar).mean(1)

    def faithfulness(self, circuits: torch.Tensor, bar: PhaseHandle | None = None) -> torch.Tensor:
        """Faithfulness [K] of K circuits [K, S, R] (bool, True = kept)."""
        vals = self.metric(self.patch_masks(circuits), bar=bar)
        denom = self.clean - self.corrupt
        return (vals - self.corrupt) / (denom if abs(denom) > 1e-9 else 1e-9)

    def patch_masks(self, circuits: torch.Tensor) -> torch.Tensor:
        """Circuits (True = kept) -> patch masks (1 = patched) over the graph's edges."""
        return (~circuits.bool() & self.graph.allowed).float()

    def faithfulness_interval(self, circuit: torch.Tensor, n_boot: int = 1000, level: float = 0.95,
                              seed: int = 0) -> dict:
        """Faithfulness of one circuit with a bootstrap interval over this set's pairs.

        Pairs are resampled with replacement; each resample's faithfulness is computed from its
        own clean, corrupt and circuit means (ratio of means, as ``faithfulness``); the interval
        is the percentile interval. Costs one patched evaluation (clean and corrupt are cached).
        """
        per = self.per_example(self.patch_masks(circuit[None]))[0]
        return bootstrap_faithfulness(per, self.clean_ex, self.corrupt_ex, n_boot, level, seed)


def bootstrap_faithfulness(circ: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor, n_boot: int = 1000,
                           level: float = 0.95, seed: int = 0) -> dict:
    """Faithfulness of per-example circuit metrics [n] against per-example clean/corrupt, with a
    percentile bootstrap interval over examples.

    A resample whose clean-corrupt gap is below ``GAP_FLOOR`` of the full sample's (or of the
    other sign) is dropped: its ratio is not a faithfulness but noise over almost nothing (with
    a few held-out pairs of mixed gaps one such resample put the upper end at 149,157).
    ``dropped`` says which share of resamples that was; a large one means too few or too
    varied pairs for an interval."""
    n = circ.shape[0]
    full_gap = float(clean.mean(-1) - corrupt.mean(-1))

    def faith(idx):
        c, k, x = clean[idx].mean(-1), corrupt[idx].mean(-1), circ[idx].mean(-1)
        gap = c - k
        ok = (gap * math.copysign(1.0, full_gap) > GAP_FLOOR * abs(full_gap)) & (gap.abs() > 1e-9)
        return (x - k) / torch.where(ok, gap, torch.full_like(gap, float("nan")))

    point = float(faith(torch.arange(n)))
    gen = torch.Generator().manual_seed(seed)
    boots = faith(torch.randint(0, n, (n_boot, n), generator=gen))
    boots = boots[~boots.isnan()]
    a = (1 - level) / 2
    lo, hi = (torch.quantile(boots, torch.tensor([a, 1 - a], dtype=boots.dtype)).tolist() if len(boots) else (float("nan"),) * 2)
    return {"faithfulness": point, "ci_low": float(lo), "ci_high": float(hi), "level": level, "n_pairs": n,
            "n_boot": n_boot, "dropped": 1.0 - len(boots) / n_boot}


def curve_sizes(graph: Graph, fractions=CURVE_FRACTIONS) -> list[int]:
    return sorted({max(1, int(round(f * graph.n_edges))) for f in fractions})


def faithfulness_curve(
    ev: CircuitEvaluator, ranking: torch.Tensor, sizes: list[int], random_seeds: int = 2, do_prune: bool = True,
    progress: ProgressArg = False,
) -> list[dict]:
    """Faithfulness of the top-k circuit (and of random circuits) for each k in ``sizes``.

    ``ranking``: edge importance, higher first (``select.importance``).
    """
    g = ev.graph
    circuits = [prune(g, top_k(g, ranking, k, False)) if do_prune else top_k(g, ranking, k, False) for k in sizes]
    total = ev.passes(len(sizes)) + ev.passes(len(sizes) * random_seeds)
    with as_progress(progress).phase("faithfulness curve (top-k and random circuits)", total=total, unit="pass") as bar:
        faith = ev.faithfulness(torch.stack(circuits), bar)
        rand = random_baseline(ev, sizes, random_seeds, bar=bar)
    return [
        {
            "n_edges": int(k),
            "n_edges_after_pruning": int(c.sum()),
            "fraction": k / g.n_edges,
            "faithfulness": float(f),
            "random": float(r),
        }
        for k, c, f, r in zip(sizes, circuits, faith, rand)
    ]


def random_baseline(ev: CircuitEvaluator, sizes: list[int], seeds: int = 2, bar: PhaseHandle | None = None) -> list[float]:
    """Mean faithfulness of circuits of k uniformly random edges (no pruning), for each k in
    ``sizes``; all sizes' circuits go in one stack, so the evaluator batches them across sizes
    (``bar`` advances ``ev.passes(len(sizes) * seeds)`` times)."""
    g = ev.graph
    if not sizes:
        return []
    rnd = [torch.rand(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(1000 + s)) for s in range(seeds)]
    cs = torch.stack([top_k(g, r, k, absolute=False) for k in sizes for r in rnd])
    return ev.faithfulness(cs, bar).view(len(sizes), seeds).mean(1).tolist()


def cpr_cmd(curve: list[dict]) -> tuple[float, float]:
    """(CPR, CMD) by the trapezoid rule over the curve's fraction axis."""
    xs = torch.tensor([c["fraction"] for c in curve], dtype=torch.float64)
    fs = torch.tensor([c["faithfulness"] for c in curve], dtype=torch.float64)
    if len(xs) < 2:
        return float(fs[0]) if len(fs) else 0.0, float((1 - fs).abs()[0]) if len(fs) else 1.0
    cpr = torch.trapezoid(fs, xs) / (xs[-1] - xs[0])
    cmd = torch.trapezoid((1 - fs).abs(), xs) / (xs[-1] - xs[0])
    return float(cpr), float(cmd)


def smallest_faithful(
    ev: CircuitEvaluator, ranking: torch.Tensor, target: float = 0.8, max_iters: int = 12
) -> tuple[int, float]:
    """Smallest top-k (pruned) circuit whose faithfulness on ``ev`` reaches ``target``.

    Bisection over k on a log scale; faithfulness need not be monotone in k, so the answer is
    the smallest k found, not a guaranteed global minimum. Returns (k, faithfulness).
    """
    g = ev.graph
    lo, hi = 0, g.n_edges
    f_hi = float(ev.faithfulness(prune(g, top_k(g, ranking, hi, False))[None])[0])
    best = (hi, f_hi)
    for _ in range(max_iters):
        if hi - lo <= max(1, hi // 50):
            break
        mid = int(round((max(lo, 1) * hi) ** 0.5)) if lo > 0 else max(1, hi // 8)
        mid = min(max(mid, lo + 1), hi - 1)
        f = float(ev.faithfulness(prune(g, top_k(g, ranking, mid, False))[None])[0])
        if f >= target:
            hi, best = mid, (mid, f)
        else:
            lo = mid
    return best


def roc_auc(scores: torch.Tensor, positives: torch.Tensor, allowed: torch.Tensor, absolute: bool = True) -> float:
    """ROC AUC of |scores| (of ``scores`` as they are when ``absolute`` is False: a ranking,
    higher = more likely positive) for recovering ``positives`` among ``allowed`` entries (ties: half)."""
    s = scores.detach().cpu().double()  # a ranking of > 2**24 edges stays exact
    s = (s.abs() if absolute else s)[allowed]
    y = positives.bool().cpu()[allowed]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    # tied scores share their average rank
    _, inv, counts = torch.unique_consecutive(s[order], return_inverse=True, return_counts=True)
    avg = torch.cumsum(counts, 0).to(s.dtype) - (counts.to(s.dtype) - 1) / 2
    ranks[order] = avg[inv]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate_saved(model: Model, res: "CircuitResult | str | Path", task: str | None = None, n: int | None = None,
                   progress: ProgressArg = False) -> dict[str, Any]:
    """Re-evaluate a saved circuit (a ``CircuitResult`` or the folder it was saved to) on ``model``: the held-out pairs drawn as the run
    drew them (its task, ``n``, seed and split), or of ``task``'s pairs, with its ablation.

    Returns ``faithfulness`` and ``edges_kept`` of the circuit, the ``clean`` and ``corrupt``
    metrics, ``cpr``, ``cmd``, the faithfulness ``curve`` over sizes (with random circuits) and
    ``n_held_out`` (pairs evaluated). Settings a run did not save take ``DiscoverConfig``'s
    defaults; a run saved without ``rank`` ranked its edges signed.
    """
    from mechscope.circuits.result import CircuitResult
    from mechscope.models import require_model
    from mechscope.tasks import get_task

    require_model(model, "evaluate_saved")
    if isinstance(res, (str, Path)):
        res = CircuitResult.load(res)
    if not isinstance(res, CircuitResult):
        raise MechscopeError(f"evaluate_saved needs a CircuitResult, got a {type(res).__name__}; pass CircuitResult.load(path) "
                             "or the folder `mechscope discover` wrote.")
    g = build_graph(model)
    check_patching_exact(model, g)
    if g.summary() != res.graph.summary():
        raise MechscopeError(f"The model {model.summary.name} has a different graph than the one the circuit was found on ({res.model.get('name')}).")
    st, d = res.settings, DiscoverConfig
    if task is None and st.get("pairs_from_caller"):  # its settings would draw other pairs (those of cfg.task)
        raise MechscopeError(f"this circuit was found on pairs passed to discover(batch=...) (task '{res.task}'), which a "
                             "saved run cannot draw again; give the task to evaluate it on (task= here, --task for "
                             "mechscope evaluate): a built-in task or a .jsonl file of pairs.")
    seed = st.get("seed", d.seed)
    same_task = task is None or task == st.get("task", res.task)
    if n is not None and n < 1:
        raise MechscopeError(f"--n must be at least 1 pair; got {n}.")
    if same_task and n is not None and st.get("n") is not None and n != st["n"]:  # its held-out split would hold scoring pairs
        raise MechscopeError(f"n={n} draws other pairs than the run's {st['n']}, so its held-out share would hold pairs the "
                             "circuit was scored on; leave n out to use the run's own held-out pairs (--n for mechscope "
                             "evaluate), or evaluate on another task.")
    batch = get_task(task or st.get("task", res.task)).build(model.tokenizer, n=n if n is not None else st.get("n", d.n),
                                                            seed=seed)
    held_out = st.get("held_out") or 0.5  # runs before session 14 held out half
    check_pair_count(len(batch), held_out, f"task '{batch.task}'")
    check_fits(model, batch)
    if torch.equal(batch.clean, batch.corrupt):
        raise MechscopeError(f"the corrupt prompts of task '{batch.task}' are the clean prompts themselves, so patching "
                             "changes nothing; give corrupt prompts that differ where the answer is decided.")
    _, test = batch.split(held_out, seed=seed)
    p = as_progress(progress)
    p.note(f"evaluating the circuit on {len(test)} held-out pairs")
    ev = Evaluator(model, g, test, st.get("ablation", d.ablation))
    if float(ev.clean) - float(ev.corrupt) < 1e-3 and not st.get("force"):
        raise MechscopeError(f"on the {len(test)} held-out pairs of task '{batch.task}' the clean prompts score no better than "
                             f"the corrupt ones (metric {float(ev.clean):.3g} vs {float(ev.corrupt):.3g}), so faithfulness, "
                             "(circuit - corrupt) / (clean - corrupt), has no meaning; evaluate on a task the model does.")
    # the run's own random circuits per size (its curve's), so the random column repeats the run's
    curve = faithfulness_curve(ev, importance(res.scores, res.method, st.get("rank", "signed")), curve_sizes(g),
                               random_seeds=int(st.get("curve_random_seeds", d.curve_random_seeds)), progress=p)
    cpr, cmd = cpr_cmd(curve)
    return {"faithfulness": float(ev.faithfulness(res.circuit[None])[0]), "edges_kept": int(res.circuit.sum()),
            "clean": float(ev.clean), "corrupt": float(ev.corrupt), "cpr": cpr, "cmd": cmd, "curve": curve,
            "n_held_out": len(test), "dropped_pairs": dict(batch.dropped), "task_notes": list(batch.notes)}
