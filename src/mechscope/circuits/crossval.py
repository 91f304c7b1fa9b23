"""Choosing the circuit's size without looking at the held-out pairs: cross-validation.

The smallest circuit that reaches the target faithfulness *on the pairs that ranked its edges*
overfits them: edges ranked high by chance on those pairs make the in-sample curve rise early
(IOI on the embedded model, seed 1: 573 edges reach 0.8 on the scoring pairs and hold 0.57
on the held-out pairs; docs/decisions.md). Cross-validation inside the scoring pairs gives an
honest estimate of the curve at no extra attribution cost:

1. Split the scoring pairs into F consecutive folds (the pairs are already shuffled by the
   split). Attribution scores are sums over examples, so ``edge_score_folds`` returns each
   fold's share and the scores *without* fold f are the total minus fold f.
2. For each fold f, rank edges by the scores without f and evaluate the top-k circuits
   (pruned) on fold f's pairs, for every k of a log-spaced grid of sizes.
3. Pool the folds: f_cv(k) = sum_f n_f (m_f(C_f,k) - corrupt_f) / sum_f n_f (clean_f - corrupt_f),
   the ratio-of-means faithfulness over all scoring pairs, each judged by a circuit ranked
   without it.
4. The chosen size is the smallest k on the grid whose f_cv is at least the target *with
   confidence*: the lower bound of a one-sided ``confidence`` (default 90%) bootstrap interval
   over the scoring pairs (each pair keeps the circuit that judged it; resampled pairs give
   the pooled ratio again). The point estimate sits on the steep part of the curve at its
   smallest passing size, where a new draw of pairs often falls short (IOI, seed 0: the
   point-estimate rule picked 1,060 edges with f_cv 0.84, which held 0.70 on the held-out
   pairs; docs/decisions.md). If no size's bound reaches the target, the smallest size whose
   point estimate does; if none below the full model does, the knee of the curve (the
   smallest size within ``PLATEAU`` of the best partial f_cv), never the full model while a
   partial circuit carries anything (``choose_size``). The final circuit is the
   top k of the ranking from *all* scoring pairs, which ranks at least as well as each fold's
   (more data).

Cost: every grid size is evaluated once per fold on that fold's pairs: as many patched
example-runs as evaluating the grid once on all scoring pairs. Sizes are evaluated smallest
first, four at a time, and stop once one reaches the target at its bound (``stop_at``): the
larger ones cannot change the choice. After one rank mode has chosen a size that way, the next
is evaluated only up to that size, the only sizes at which it could win (``discover``).
The all-edges circuit is the clean run and costs no pass (``Evaluator.per_example``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mechscope.circuits.evaluate import Evaluator
from mechscope.circuits.pooling import PairScores
from mechscope.circuits.select import importance, prune, top_k
from mechscope.graph import Graph
from mechscope.patching.engine import Ablation, dataset_mean_source
from mechscope.progress import ProgressArg, as_progress
from mechscope.tasks.base import TaskBatch

CV_FRACTIONS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                0.2, 0.3, 1.0)
"""Grid of sizes (fractions of all edges). Dense circuits cost the most to evaluate (each receiver
patches the smaller side of the mask), so the grid is fine where the targets lie (<= 5%) and
coarse above."""


def fold_sizes(n: int, folds: int) -> list[int]:
    """Sizes of ``folds`` consecutive, near-equal folds of n examples (fewer if n is small)."""
    folds = max(1, min(folds, n // 2 if n >= 4 else 1))
    base, extra = divmod(n, folds)
    return [base + (1 if i < extra else 0) for i in range(folds)]


def grid_sizes(graph: Graph, fractions=CV_FRACTIONS) -> list[int]:
    return sorted({max(1, int(round(f * graph.n_edges))) for f in fractions})


SIZE_CHUNK = 4
"""Grid sizes evaluated together (one patched pass per fold holds this many circuits); with
``stop_at``, the sizes after the first chunk that reaches it are not evaluated."""


def as_pair_scores(fold_scores: torch.Tensor | PairScores, n: int) -> PairScores:
    """``fold_scores`` as ``PairScores``: a tensor [F, S, R] is each of F folds' summed share of
    the scores over n pairs (``edge_score_folds``)."""
    if isinstance(fold_scores, PairScores):
        if sum(fold_scores.folds) != n:
            raise ValueError(f"scores over {sum(fold_scores.folds)} pairs for a batch of {n}")
        return fold_scores
    folds = fold_sizes(n, fold_scores.shape[0])
    if len(folds) != fold_scores.shape[0]:
        raise ValueError(f"{fold_scores.shape[0]} fold scores for {len(folds)} folds of {n} examples")
    return PairScores(fold_scores, folds, "sum")


@torch.no_grad()
def cv_curve(model, graph: Graph, batch: TaskBatch, fold_scores: torch.Tensor | PairScores, sizes: list[int],
             method: str, rank: str = "signed", ablation: Ablation = "patching", batch_size: int = 16,
             progress: ProgressArg = False, confidence: float = 0.9, n_boot: int = 1000, seed: int = 0,
             evaluators: list[Evaluator] | None = None, stop_at: float | None = None) -> list[dict]:
    """Cross-validated faithfulness of the top-k circuit for each k in ``sizes`` (ascending).

    ``fold_scores`` [F, S, R]: each fold's share of the scores (``edge_score_folds``) over
    ``batch``'s examples in order, or ``PairScores`` (folds and pooling over pairs). Returns [{n_edges, fraction, faithfulness,
    faithfulness_low (the one-sided ``confidence`` bootstrap bound), per_fold}].
    ``evaluators``: the folds' ``Evaluator``s (``fold_evaluators``), to reuse across calls.
    ``stop_at``: sizes are evaluated in chunks of ``SIZE_CHUNK``, smallest first, and the curve
    ends with the first chunk in which some size's lower bound reaches ``stop_at``: larger sizes
    cannot change what ``choose_size`` picks for that target (its rule 1 takes the smallest such
    size), so they are not evaluated. Each size's figures do not depend on which other sizes
    were evaluated (the bootstrap draws the same resamples for every size).
    """
    ps = as_pair_scores(fold_scores, len(batch))
    F, n_f = ps.n_folds, ps.folds
    sizes = sorted(sizes)
    bounds = torch.tensor([0] + n_f).cumsum(0).tolist()
    evs = evaluators if evaluators is not None else _evaluators(model, graph, batch, n_f, ablation, batch_size)
    clean = torch.cat([ev.clean_ex for ev in evs])
    corrupt = torch.cat([ev.corrupt_ex for ev in evs])
    den = sum(n * float(ev.clean - ev.corrupt) for n, ev in zip(n_f, evs))
    chunks = [sizes[i : i + SIZE_CHUNK] for i in range(0, len(sizes), SIZE_CHUNK)]
    bar = as_progress(progress).phase(f"cross-validating the size ({rank} ranking)", total=F * len(chunks), unit="fold x sizes")
    rows: list[dict] = []
    for c, ks in enumerate(chunks):
        per_ex = cv_per_pair(graph, evs, ps, ks, method, rank, on_fold=bar.advance)  # [len(ks), n]
        num = torch.zeros(len(ks))
        per_fold = []
        for f, ev in enumerate(evs):
            vals = per_ex[:, bounds[f] : bounds[f + 1]].mean(1)
            num += n_f[f] * (vals - ev.corrupt)
            gap = float(ev.clean - ev.corrupt)
            per_fold.append((vals - ev.corrupt) / (gap if abs(gap) > 1e-9 else 1e-9))
        faith = num / (den if abs(den) > 1e-9 else 1e-9)
        low = _lower_bounds(per_ex, clean, corrupt, confidence, n_boot, seed)
        rows += [{"n_edges": int(k), "fraction": k / graph.n_edges, "faithfulness": float(faith[i]),
                  "faithfulness_low": float(low[i]), "confidence": confidence,
                  "per_fold": [round(float(p[i]), 4) for p in per_fold]} for i, k in enumerate(ks)]
        if stop_at is not None and any(float(x) >= stop_at for x in low):
            bar.advance(F * (len(chunks) - c - 1))  # the chunks not needed count as done
            break
    bar.close()
    return rows


def cv_per_pair(graph: Graph, evaluators: list[Evaluator], fold_scores: torch.Tensor | PairScores, sizes: list[int],
                method: str, rank: str = "signed", on_fold: Callable[[], object] | None = None) -> torch.Tensor:
    """Each scoring pair's metric [len(sizes), n] under the top-k circuit (k in ``sizes``) ranked
    by the scores of the other folds: pair i of fold f is judged by the ranking of the scores
    pooled without fold f (for summed fold scores [F, S, R], ``fold_scores.sum(0) -
    fold_scores[f]``). Pairs in ``evaluators``' order; ``on_fold`` is called after each fold."""
    sizes_f = [len(ev.clean_ex) for ev in evaluators]
    ps = as_pair_scores(fold_scores, sum(sizes_f))
    if sizes_f != ps.folds:
        raise ValueError(f"fold evaluators of {sizes_f} pairs for scores over folds {ps.folds}")
    per = []
    for f, ev in enumerate(evaluators):
        ranking = importance(ps.without(f), method, rank)
        circuits = torch.stack([prune(graph, top_k(graph, ranking, k, False)) for k in sizes])
        per.append(ev.per_example(ev.patch_masks(circuits)))
        if on_fold is not None:
            on_fold()
    return torch.cat(per, 1)


def _lower_bounds(circ: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor, confidence: float,
                  n_boot: int, seed: int) -> torch.Tensor:
    """One-sided lower bootstrap bound [K] of the pooled faithfulness of K circuits' per-pair
    metrics circ [K, n] (the same resamples for every size)."""
    n = circ.shape[1]
    idx = torch.randint(0, n, (n_boot, n), generator=torch.Generator().manual_seed(seed))
    c, k = clean[idx].mean(1), corrupt[idx].mean(1)  # [n_boot]
    x = circ[:, idx].mean(-1)  # [K, n_boot]
    gap = c - k
    f = (x - k) / torch.where(gap.abs() > 1e-9, gap, torch.full_like(gap, float("nan")))
    return torch.nanquantile(f, 1 - confidence, dim=1)


def fold_evaluators(model, graph: Graph, batch: TaskBatch, folds: int, ablation: Ablation = "patching",
                    batch_size: int = 16) -> list[Evaluator]:
    """One ``Evaluator`` per fold (its source run and clean/corrupt baselines computed once), so
    several rankings can be cross-validated on the same folds."""
    return _evaluators(model, graph, batch, fold_sizes(len(batch), folds), ablation, batch_size)


def _evaluators(model, graph: Graph, batch: TaskBatch, n_f: list[int], ablation: Ablation,
                batch_size: int) -> list[Evaluator]:
    """Evaluators of consecutive folds of ``n_f`` pairs; with mean ablation all of them ablate
    to the mean over the whole ``batch`` (a fold of two pairs is too few to be its own mean)."""
    bounds = torch.tensor([0] + n_f).cumsum(0).tolist()
    mean = dataset_mean_source(model, graph, batch, batch_size)[0] if ablation == "mean" else None
    return [Evaluator(model, graph, batch.subset(slice(a, b)), ablation, batch_size, mean)
            for a, b in zip(bounds, bounds[1:])]


PLATEAU = 0.9
"""Fallback when no circuit below the full model reaches the target in cross-validation: the
smallest size whose cross-validated faithfulness is at least this share of the best below the
full model (the knee of the curve; ``choose_size``)."""


def choose_size(curve: list[dict], target: float) -> tuple[int, float]:
    """(k, f_cv) for the circuit's size (``size_rule`` says which rule chose it):

    1. the smallest size below the full model whose cross-validated faithfulness reaches
       ``target`` with confidence (``faithfulness_low``, where the curve has it);
    2. else the smallest below the full model whose point estimate does;
    3. else, when some size below the full model carries part of the behaviour (best f_cv
       > 0), the smallest with f_cv >= ``PLATEAU`` x that best: a circuit that does not
       reach the target but holds nearly all that any partial circuit on the grid holds;
    4. else the largest size (all edges when the grid has them).

    Rules 1-3 skip the full model: it reaches 1 by construction and is no circuit.
    """
    below = [c for c in curve if c.get("fraction", 0.0) < 1.0] or curve
    for key in ("faithfulness_low", "faithfulness"):
        for c in below:
            if c.get(key) is not None and c[key] >= target:
                return c["n_edges"], c["faithfulness"]
    best = max(c["faithfulness"] for c in below)
    if best > 0:
        c = next(c for c in below if c["faithfulness"] >= PLATEAU * best)
        return c["n_edges"], c["faithfulness"]
    last = max(curve, key=lambda c: c["n_edges"])
    return last["n_edges"], last["faithfulness"]


def size_rule(curve: list[dict], k: int, target: float) -> str:
    """Which rule of ``choose_size`` picked size k: "confidence-bound", "point-estimate",
    "plateau" (target not reached below the full model) or "all-edges"."""
    row = next(c for c in curve if c["n_edges"] == k)
    if row.get("fraction", 0.0) >= 1.0:
        return "all-edges"
    if row.get("faithfulness_low") is not None and row["faithfulness_low"] >= target:
        return "confidence-bound"
    return "point-estimate" if row["faithfulness"] >= target else "plateau"
