"""Choosing the circuit without the held-out pairs: per-fold scores, cross-validated size,
bootstrap intervals, and stability across draws (circuits/crossval.py, evaluate.py, stability.py)."""

import pytest
import torch

from mechscope.circuits import DiscoverConfig, discover, edge_scores
from mechscope.circuits.attribution import edge_score_folds
from mechscope.circuits.crossval import choose_size, cv_curve, fold_sizes, size_rule
from mechscope.circuits.evaluate import Evaluator, bootstrap_faithfulness
from mechscope.circuits.result import CircuitResult
from mechscope.circuits.select import importance, prune, top_k
from mechscope.circuits.stability import jaccard, stability_summary
from mechscope.circuits.toy import induction_task, save_induction_toy
from mechscope.graph import Graph, build_graph
from mechscope.models import load_model
from mechscope.tasks.base import TaskBatch


def _batch(B=6, P=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randint(1, 512, s, generator=g)  # noqa: E731
    return TaskBatch(task="random", clean=r(B, P), corrupt=r(B, P), positions=torch.full((B, 1), P - 1),
                     answers=r(B, 1), wrongs=r(B, 1), lengths=torch.full((B,), P))


def test_fold_sizes():
    assert fold_sizes(25, 5) == [5] * 5
    assert fold_sizes(7, 3) == [3, 2, 2]
    assert fold_sizes(4, 5) == [2, 2]  # at least two pairs per fold
    assert sum(fold_sizes(13, 4)) == 13


@pytest.mark.slow
def test_fold_scores_are_each_folds_own_scores(tiny_llama):
    """Each fold's share equals the scores computed on that fold alone (times its weight), for
    folds that straddle the attribution batches; the shares sum to the scores of all pairs."""
    m, g, b = tiny_llama, build_graph(tiny_llama), _batch(B=6)
    folds = [2, 3, 1]
    fs = edge_score_folds(m, g, b, folds, "eap-ig", 2, batch_size=4)
    assert torch.allclose(fs.sum(0), edge_scores(m, g, b, "eap-ig", 2, batch_size=4), atol=1e-5)
    start = 0
    for f, n_f in enumerate(folds):
        own = edge_scores(m, g, b.subset(slice(start, start + n_f)), "eap-ig", 2)
        assert torch.allclose(fs[f] * len(b) / n_f, own, atol=1e-5, rtol=1e-4), f
        start += n_f


def test_cv_curve_ranks_without_the_fold_and_judges_on_it(tiny_gpt2):
    m, g, b = tiny_gpt2, build_graph(tiny_gpt2), _batch(B=6, seed=2)
    folds = [3, 3]
    fs = edge_score_folds(m, g, b, folds, "eap", 1)
    sizes = [5, 40, g.n_edges]
    cv = cv_curve(m, g, b, fs, sizes, "eap")
    assert abs(cv[-1]["faithfulness"] - 1) < 1e-4  # every edge kept: the clean run
    # fold 1's value at 40 edges, independently: ranked by fold 0's scores only
    ranking = importance(fs[0], "eap")
    ev = Evaluator(m, g, b.subset(slice(3, 6)))
    want = float(ev.faithfulness(prune(g, top_k(g, ranking, 40, False))[None])[0])
    assert abs(cv[1]["per_fold"][1] - want) < 1e-3
    assert choose_size(cv, 0.999)[0] in sizes
    assert choose_size([{"n_edges": 3, "faithfulness": 0.5}, {"n_edges": 9, "faithfulness": 0.9},
                        {"n_edges": 20, "faithfulness": 0.95}], 0.8) == (9, 0.9)
    assert choose_size([{"n_edges": 3, "faithfulness": 0.5}, {"n_edges": 9, "faithfulness": 0.7}], 0.8) == (9, 0.7)
    # with confidence: the smallest size whose lower bound passes, else the point estimate's
    conf = [{"n_edges": 3, "faithfulness": 0.85, "faithfulness_low": 0.6},
            {"n_edges": 9, "faithfulness": 0.9, "faithfulness_low": 0.82}]
    assert choose_size(conf, 0.8) == (9, 0.9)
    assert choose_size(conf, 0.83) == (3, 0.85)
    # nothing below the full model reaches the target: the knee, never the full model
    flat = [{"n_edges": 3, "fraction": 0.03, "faithfulness": 0.1}, {"n_edges": 9, "fraction": 0.09, "faithfulness": 0.42},
            {"n_edges": 30, "fraction": 0.3, "faithfulness": 0.45}, {"n_edges": 100, "fraction": 1.0, "faithfulness": 1.0,
                                                                     "faithfulness_low": 1.0}]
    assert choose_size(flat, 0.8) == (9, 0.42)
    assert size_rule(flat, 9, 0.8) == "plateau"
    assert size_rule(flat, 100, 0.8) == "all-edges"
    assert size_rule(conf, 9, 0.8) == "confidence-bound" and size_rule(conf, 3, 0.83) == "point-estimate"
    flat[2].update(faithfulness=0.9, faithfulness_low=0.81)  # a partial circuit passes at its bound
    assert choose_size(flat, 0.8) == (30, 0.9)
    dead = [{"n_edges": 3, "fraction": 0.03, "faithfulness": -0.01}, {"n_edges": 100, "fraction": 1.0, "faithfulness": 1.0}]
    assert choose_size(dead, 0.8) == (100, 1.0)  # no partial circuit carries anything
    for c in cv:  # the bound is below the point estimate (or equal, when every pair agrees)
        assert c["faithfulness_low"] <= c["faithfulness"] + 1e-6


def test_cv_curve_stops_where_the_choice_is_made(tiny_gpt2, monkeypatch):
    """With ``stop_at`` the curve is a prefix of the full one, ends with the chunk of sizes in
    which a bound reaches the target, and gives the same choice; the baselines and the
    all-edges circuit cost no patched pass."""
    import mechscope.circuits.evaluate as evaluate
    from mechscope.circuits.crossval import SIZE_CHUNK

    m, g, b = tiny_gpt2, build_graph(tiny_gpt2), _batch(B=6, seed=2)
    fs = edge_score_folds(m, g, b, [3, 3], "eap", 1)
    sizes = sorted({max(1, int(f * g.n_edges)) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)} | {g.n_edges})
    full = cv_curve(m, g, b, fs, sizes, "eap")
    lows = [c["faithfulness_low"] for c in full]
    target = max(lows[: 2 * SIZE_CHUNK])  # reached within the first two chunks
    i = next(j for j, low in enumerate(lows) if low >= target)
    passes = [0]
    real = evaluate.run_with_edge_mask

    def counted(*a, **kw):
        passes[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(evaluate, "run_with_edge_mask", counted)
    part = cv_curve(m, g, b, fs, sizes, "eap", stop_at=target)
    assert len(part) == min(len(full), (i // SIZE_CHUNK + 1) * SIZE_CHUNK) < len(full)
    for a, c in zip(part, full):
        assert a["n_edges"] == c["n_edges"] and a["faithfulness"] == pytest.approx(c["faithfulness"], abs=1e-6)
        assert a["faithfulness_low"] == pytest.approx(c["faithfulness_low"], abs=1e-6)
    assert choose_size(part, target) == choose_size(full, target)
    assert passes[0] == 2 * -(-len(part) // SIZE_CHUNK)  # two folds: one pass per chunk of sizes
    passes[0] = 0
    ev = Evaluator(m, g, b)
    assert passes[0] == 0  # clean and corrupt baselines from the source and clean passes
    every = ev.per_example(ev.patch_masks(g.allowed[None]))
    assert passes[0] == 0 and torch.equal(every[0], ev.clean_ex)


@pytest.mark.slow
def test_discover_never_looks_at_the_held_out_pairs(tmp_path):
    """Changing only the held-out pairs leaves the chosen circuit unchanged (and moves the
    held-out figures)."""
    m = load_model(save_induction_toy(tmp_path / "toy"), device="cpu")
    b = induction_task(m.tokenizer, n=12, seq_len=8, seed=0)
    # force: the garbled held-out prompts below make the whole batch look like a task the toy fails
    cfg = DiscoverConfig(task="toy", n=12, method="eap", ablation="zero", labels=False, random_seeds=1, force=True)
    a = discover(m, cfg, batch=b, progress=False)
    held = torch.randperm(12, generator=torch.Generator().manual_seed(0))[:6]  # the split's held-out rows
    b2 = b.subset(list(range(12)))
    b2.clean[held] = b2.clean[held].roll(1, dims=1)  # other held-out prompts
    b2.clean[held, 0] = 0
    c = discover(m, cfg, batch=b2, progress=False)
    assert torch.equal(a.circuit, c.circuit)
    assert a.metrics["faithfulness_scoring"] == c.metrics["faithfulness_scoring"]
    assert a.metrics["selection"] == "cross-validation" and a.cv_curve


def test_bootstrap_interval():
    g = torch.Generator().manual_seed(0)
    clean, corrupt = 5 + torch.randn(40, generator=g), torch.randn(40, generator=g)
    same = bootstrap_faithfulness(clean.clone(), clean, corrupt)
    assert same["faithfulness"] == 1.0 and abs(same["ci_low"] - 1) < 1e-6 and abs(same["ci_high"] - 1) < 1e-6
    circ = corrupt + 0.6 * (clean - corrupt) + torch.randn(40, generator=g)
    r = bootstrap_faithfulness(circ, clean, corrupt)
    point = float((circ.mean() - corrupt.mean()) / (clean.mean() - corrupt.mean()))
    assert abs(r["faithfulness"] - point) < 1e-6
    assert r["ci_low"] < point < r["ci_high"] and r["ci_high"] - r["ci_low"] < 0.5
    small = bootstrap_faithfulness(circ[:8], clean[:8], corrupt[:8])
    assert small["ci_high"] - small["ci_low"] > r["ci_high"] - r["ci_low"]  # fewer pairs, wider
    assert r["dropped"] == 0.0
    # Three pairs whose gaps nearly cancel in some resamples: those are dropped (and counted),
    # not allowed to put the interval's end at thousands.
    cl, co = torch.tensor([3.0, 2.9, -2.0]), torch.zeros(3)
    ci = co + 0.9 * (cl - co) + torch.tensor([0.05, -0.05, 0.3])
    mixed = bootstrap_faithfulness(ci, cl, co)
    assert 0 < mixed["dropped"] < 1 and -5 < mixed["ci_low"] <= mixed["ci_high"] < 5


def test_stability_summary():
    g = Graph(n_layers=2, n_heads=2, n_kv_heads=2)
    edges = g.edge_index.tolist()

    def run(seed, kept):
        c = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)
        sc = torch.zeros(g.n_senders, g.n_receivers)
        for j in kept:
            c[edges[j][0], edges[j][1]] = True
            sc[edges[j][0], edges[j][1]] = -1.0 - j
        return CircuitResult(model={}, task="t", method="eap", settings={"seed": seed, "rank": "signed"}, graph=g,
                             scores=sc, circuit=c, metrics={"faithfulness": 0.5 + seed / 10, "n_edges_kept": len(kept),
                                                            "clean": 1.0})

    runs = [run(0, [0, 1, 2, 3]), run(1, [0, 1, 2, 4]), run(2, [0, 1, 5, 6, 7])]
    st = stability_summary(runs, stable_threshold=0.6, top=3)
    assert abs(st["jaccard_circuit_mean"] - (3 / 5 + 2 / 7 + 2 / 7) / 3) < 1e-9
    names = {(a, b): f for a, b, f in st["stable_edges"]}
    assert {k for k in names} == {(g.senders[edges[j][0]], g.receivers[edges[j][1]]) for j in (0, 1, 2)}
    assert names[(g.senders[edges[0][0]], g.receivers[edges[0][1]])] == 1.0
    assert abs(st["faithfulness_min"] - 0.5) < 1e-9 and abs(st["faithfulness_max"] - 0.7) < 1e-9
    assert jaccard(runs[0].circuit, runs[0].circuit) == 1.0


def test_pick_rank():
    from mechscope.circuits.discover import pick_rank

    def found(k, f, low):
        return ([{"n_edges": k, "faithfulness": f, "faithfulness_low": low}], k, f)

    # reaching the target with confidence beats reaching it by the point estimate only
    assert pick_rank({"signed": found(10, 0.85, 0.7), "abs": found(50, 0.9, 0.82)}, 0.8) == "abs"
    # both with confidence: the smaller circuit
    assert pick_rank({"signed": found(10, 0.85, 0.81), "abs": found(50, 0.9, 0.82)}, 0.8) == "signed"
    # neither reaches it: the better faithfulness
    assert pick_rank({"signed": found(100, 0.45, 0.3), "abs": found(100, 0.7, 0.6)}, 0.8) == "abs"


@pytest.mark.parametrize("ablation", ["patching", "mean", "zero"])
def test_evaluator_baselines_equal_the_patched_runs_and_joined_equals_fresh(tiny_model, ablation):
    """The baselines that cost no patched pass are the patched runs' metrics: nothing patched
    (clean) and everything patched (corrupt; for mean and zero the fully ablated run); and an
    evaluator joined from consecutive slices equals one made over the whole batch."""
    from mechscope.circuits.crossval import fold_evaluators
    from mechscope.patching import run_with_edge_mask, source_activations

    m, g, b = tiny_model, build_graph(tiny_model), _batch(B=7, seed=3)
    ev = Evaluator(m, g, b, ablation, batch_size=4)
    clean, full = [], []
    whole = source_activations(m, g, b.clean, b.corrupt, ablation, b.lengths)  # mean: over all 7, not per chunk
    for i in range(0, 7, 4):
        sub = b.subset(slice(i, min(7, i + 4)))
        src = whole if ablation == "mean" else source_activations(m, g, sub.clean, sub.corrupt, ablation, sub.lengths)
        with torch.no_grad():
            clean.append(sub.per_example_metric(run_with_edge_mask(m, g, sub.clean, src, g.empty_mask())))
            full.append(sub.per_example_metric(run_with_edge_mask(m, g, sub.clean, src, g.full_mask())))
    assert torch.allclose(ev.clean_ex, torch.cat(clean), atol=1e-4)
    assert torch.allclose(ev.corrupt_ex, torch.cat(full), atol=1e-4)
    assert (torch.cat(clean) - torch.cat(full)).abs().max() > 1e-3  # the two baselines really differ
    assert abs(float(ev.faithfulness(g.empty_mask().bool()[None])[0])) < 1e-3  # empty circuit: no behaviour
    # folds (with mean ablation: sharing the whole batch's mean) joined equal the whole batch
    joined = Evaluator.joined(b, fold_evaluators(m, g, b, 2, ablation, batch_size=4))
    circuit = torch.rand(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.allclose(joined.clean_ex, ev.clean_ex, atol=1e-4) and torch.allclose(joined.corrupt_ex, ev.corrupt_ex, atol=1e-4)
    assert float(joined.faithfulness(circuit[None])[0]) == pytest.approx(float(ev.faithfulness(circuit[None])[0]), abs=1e-4)
    with pytest.raises(ValueError, match="cover the batch"):
        Evaluator.joined(b, [ev, ev])


def test_a_chosen_size_that_prunes_to_nothing_grows_to_the_smallest_connected_circuit(tiny_gpt2):
    """Cross-validation picks a size k on each fold's own ranking; the whole scoring set's top k
    may form no input -> logits path and prune to nothing (a sweep saw a 0-edge circuit reported
    with cross-validated faithfulness 1.52). The circuit is then the smallest top-k' that keeps
    an edge."""
    from mechscope.circuits.discover import _smallest_connected

    g = build_graph(tiny_gpt2)
    rank = torch.zeros(g.n_senders, g.n_receivers)
    s, r = g.sender_index, g.receiver_index
    rank[s("input"), r("a0.h0<q>")] = 5.0  # two dead ends: a0.h0 and a0.h1 feed nothing
    rank[s("input"), r("a0.h1<q>")] = 4.0
    rank[s("m0"), r("logits")] = 3.0  # needs input -> m0, ranked fifth
    rank[s("a1.h2"), r("logits")] = 2.5  # needs input -> a1.h2, ranked sixth
    rank[s("input"), r("m0")] = 2.0
    rank[s("input"), r("a1.kv2<v>")] = 1.0
    assert not prune(g, top_k(g, rank, 2, absolute=False)).any()
    k = _smallest_connected(g, rank, 2)
    assert k == 5 and prune(g, top_k(g, rank, k, absolute=False)).sum() == 2
    assert not prune(g, top_k(g, rank, k - 1, absolute=False)).any()
    assert _smallest_connected(g, rank, 7) == 7  # already connected: unchanged
