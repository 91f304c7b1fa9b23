"""Sweep 28: a circuit compared with itself (``mechscope evaluate RUN --reference RUN``) got edge
ROC AUC 0.71 and 40% of its edges in its own "top 15", with Jaccard 1.0: the AUC took |score|
though the run ranked by signed importance, and both figures ranked edges the circuit prunes
(on no input -> logits path) above its own. The figures now rank by the run's circuits: its
circuit, then the order edges join its pruned top-k circuits."""

import torch

from mechscope.circuits import compare_with_reference
from mechscope.circuits.reference import Reference, circuit_ranking
from mechscope.circuits.result import CircuitResult
from mechscope.circuits.select import entry_sizes, importance, prune, top_k
from mechscope.cli.circuits import reference_lines
from mechscope.graph import Graph, build_graph


def _pruned_run(g: Graph, k: int, seed: int = 0, rank: str = "signed") -> CircuitResult:
    """A run as ``discover`` makes one: EAP scores, the circuit the pruned top-k by the rank
    mode's importance (some of the top k lie on no input -> logits path and are pruned)."""
    scores = torch.randn(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(seed)) * g.allowed
    circuit = prune(g, top_k(g, importance(scores, "eap", rank), k, absolute=False))
    return CircuitResult(model={"name": "tiny", "n_layers": g.n_layers, "n_heads": g.n_heads, "n_kv_heads": g.n_kv_heads,
                                "source": "x"}, task="ioi", method="eap", settings={"rank": rank}, graph=g,
                         scores=scores, circuit=circuit)


def _ref(res: CircuitResult, mask: torch.Tensor) -> Reference:
    g = res.graph
    edges = [(g.senders[s], g.receivers[r]) for s, r in mask.nonzero().tolist()]
    return Reference(model="tiny", task="ioi", source="test", nodes=sorted({s for s, _ in edges if s != "input"}), edges=edges)


def test_entry_sizes_are_the_pruned_top_k_circuits():
    g = Graph(2, 4, 2)
    imp = torch.randn(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(3))
    entry = entry_sizes(g, imp)
    for k in range(g.n_edges + 1):
        assert torch.equal(prune(g, top_k(g, imp, k, absolute=False)), (entry <= k) & g.allowed), k


def test_a_circuit_compared_with_itself_gets_one_everywhere(tmp_path, tiny_gpt2):
    """On a tiny model's graph, pruned top-k circuits (signed and |score|), saved and read back as
    their own reference: every figure 1.0 (before: edge AUC and overlap well below 1)."""
    g = build_graph(tiny_gpt2)
    for rank, seed in (("signed", 0), ("abs", 1), ("signed", 2)):
        res = _pruned_run(g, 40, seed, rank)
        n = int(res.circuit.sum())
        assert 0 < n < 40, n  # pruning dropped some of the top 40: the case that went wrong
        res.save(tmp_path / f"{rank}{seed}")
        same = compare_with_reference(res, str(tmp_path / f"{rank}{seed}"))
        assert same["n_edges"] == n
        for key in ("edge_roc_auc", "edge_overlap", "node_roc_auc", "in_this_circuit", "jaccard"):
            assert same[key] == 1.0, (rank, seed, key, same[key])


def test_a_strict_subset_of_the_circuit(tiny_gpt2):
    """A smaller pruned top-k of the same ranking (a strict subset of the circuit) comes first in
    the run's ranking: AUC and overlap 1. Any strict subset is inside the circuit, which heads
    the ranking, so the subset ranks above every edge outside the circuit."""
    g = build_graph(tiny_gpt2)
    res = _pruned_run(g, 60, 4)
    small = prune(g, top_k(g, importance(res.scores, "eap", "signed"), 25, absolute=False))
    assert 0 < int(small.sum()) < int(res.circuit.sum()) and bool((small <= res.circuit).all())
    sub = compare_with_reference(res, _ref(res, small))
    assert sub["edge_roc_auc"] == sub["edge_overlap"] == sub["in_this_circuit"] == sub["node_roc_auc"] == 1.0
    assert sub["jaccard"] == int(small.sum()) / int(res.circuit.sum())
    rk, _ = circuit_ranking(res)
    assert bool((rk[g.allowed & ~res.circuit] < rk[res.circuit].min()).all())
    every_other = res.circuit.clone()
    idx = res.circuit.nonzero()[::2]
    every_other[idx[:, 0], idx[:, 1]] = False
    r = compare_with_reference(res, _ref(res, every_other))
    n_in, n_out = int(every_other.sum()), g.n_edges - int(every_other.sum())
    n_rest = int(res.circuit.sum()) - n_in  # the circuit's other edges may rank above the subset's
    assert r["in_this_circuit"] == 1.0 and r["edge_roc_auc"] >= 1 - n_rest / n_out


def test_evaluate_says_what_the_figures_rank_by():
    r = {"n_nodes": 4, "node_roc_auc": 1.0, "edge_roc_auc": 1.0, "n_edges": 15, "edge_overlap": 1.0,
         "chance_overlap": 15 / 110, "in_this_circuit": 1.0, "jaccard": 1.0}
    first, second = reference_lines(r, "signed")
    assert "edge ROC AUC 1.000" in first
    assert "this run's ranking: its circuit, then edges in the order they join its pruned top-k circuits by signed importance" in first
    assert "100.0% are among the first 15 of this run's ranking (chance 13.6%)" in second
    assert "top 15" not in second
    assert len(reference_lines({"n_nodes": 2, "node_roc_auc": 0.5}, "abs")) == 1
