"""The shipped reference circuits: their class-to-class connections expand to the edges the
papers state, on GPT-2 small's graph."""

import json

import pytest

from mechscope.circuits.reference import load_reference
from mechscope.errors import MechscopeError
from mechscope.graph import Graph

GPT2 = Graph(12, 12, 12)


def test_ioi_edges_follow_the_paper():
    ref = load_reference("gpt2-ioi")
    m = ref.edge_mask(GPT2)  # every edge must exist in GPT-2 small's graph
    edges = set(ref.edges)
    assert len(edges) == int(m.sum()) > 500
    assert ("a7.h3", "a9.h9<q>") in edges  # S-inhibition -> name mover, through the query only
    assert ("a7.h3", "a9.kv9<k>") not in edges and ("a7.h3", "a9.kv9<v>") not in edges
    assert ("a2.h2", "a5.kv5<k>") in edges  # previous token -> induction key (K-composition)
    assert ("a2.h2", "a5.h5<q>") not in edges
    for h in ("a9.h9", "a10.h0", "a9.h6", "a10.h7", "a11.h10"):
        assert (h, "logits") in edges
    for h in ("a7.h3", "a7.h9", "a8.h6", "a8.h10", "a5.h5", "a2.h2"):
        assert (h, "logits") not in edges
    heads = {s for s, _ in edges if s.startswith("a")} | {r.split("<")[0] for _, r in edges if r.startswith("a") and ".h" in r}
    assert heads <= set(ref.nodes)  # no edge touches a head outside the circuit
    assert ("m3", "m7") in edges and ("input", "logits") in edges  # the MLP backbone stays


def test_greater_than_edges_follow_the_paper():
    ref = load_reference("gpt2-greater-than")
    edges = set(ref.edges)
    assert int(ref.edge_mask(GPT2).sum()) == len(edges) > 100
    assert ("a9.h1", "logits") in edges and ("m10", "logits") in edges
    assert ("m2", "a6.h9<q>") in edges and ("m6", "a7.h10<q>") in edges  # early MLPs -> mid heads' queries
    assert ("m6", "a7.kv10<k>") not in edges
    assert ("a0.h1", "m0") in edges and ("a6.h9", "m9") in edges
    assert ("a6.h9", "a7.h10<q>") not in edges  # mid heads are not chained to each other


def test_unknown_group_is_a_clear_error(tmp_path):
    p = tmp_path / "ref.json"
    p.write_text(json.dumps({"nodes": ["a0.h0"], "groups": {"g": ["a0.h0"]}, "connections": [{"from": ["nope"], "to": ["logits"]}]}))
    with pytest.raises(MechscopeError, match="unknown group"):
        load_reference(str(p))


def test_a_run_is_a_reference_and_overlap_counts_shared_edges(tmp_path):
    """Another run's circuit.json (e.g. ACDC's) is a reference: its kept edges; edge_overlap is
    the share of them in this ranking's top |ref|, and a random ranking gets about chance."""
    import torch

    from mechscope.circuits.reference import edge_overlap
    from mechscope.circuits.result import CircuitResult

    g = Graph(2, 4, 2)
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(g.n_senders, g.n_receivers, generator=gen) * g.allowed
    circuit = (scores > 1.0) & g.allowed
    CircuitResult(model={"name": "tiny", "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "source": "x"},
                  task="ioi", method="acdc", settings={}, graph=g, scores=scores, circuit=circuit).save(tmp_path)
    ref = load_reference(str(tmp_path))
    em = ref.edge_mask(g)
    assert torch.equal(em, circuit) and "acdc" in ref.source
    assert edge_overlap(scores, em, g.allowed) == 1.0  # its own ranking puts exactly its edges on top
    assert edge_overlap(-scores, em, g.allowed) == 0.0
    rnd = [edge_overlap(torch.rand(g.n_senders, g.n_receivers, generator=gen), em, g.allowed) for _ in range(200)]
    chance = int(em.sum()) / g.n_edges
    assert abs(sum(rnd) / len(rnd) - chance) < 0.05


def test_malformed_run_reference_is_a_clear_error(tmp_path):
    p = tmp_path / "circuit.json"
    p.write_text(json.dumps({"schema_version": 1, "method": "acdc", "edges": [{"src": "a0.h0"}], "nodes": []}))
    with pytest.raises(MechscopeError, match="malformed"):
        load_reference(str(tmp_path))


def test_compare_with_reference_gives_the_evaluate_figures(tmp_path):
    """``compare_with_reference``: what ``mechscope evaluate --reference`` prints, in one call."""
    import math

    import torch

    from mechscope.circuits import compare_with_reference
    from mechscope.circuits.reference import Reference
    from mechscope.circuits.result import CircuitResult

    g = Graph(2, 4, 2)
    scores = torch.randn(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(1)) * g.allowed
    res = CircuitResult(model={"name": "tiny", "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "source": "x"},
                        task="ioi", method="acdc", settings={}, graph=g, scores=scores, circuit=(scores > 1.0) & g.allowed)
    res.save(tmp_path)
    same = compare_with_reference(res, str(tmp_path))  # the run against its own circuit
    assert list(same) == ["source", "n_nodes", "node_roc_auc", "n_edges", "edge_roc_auc", "edge_overlap",
                          "chance_overlap", "in_this_circuit", "jaccard"]
    assert same["n_edges"] == int(res.circuit.sum()) and same["chance_overlap"] == same["n_edges"] / g.n_edges
    assert same["edge_overlap"] == same["in_this_circuit"] == same["jaccard"] == 1.0
    assert 0.0 <= same["node_roc_auc"] <= 1.0 and not math.isnan(same["edge_roc_auc"])
    nodes_only = compare_with_reference(res, Reference(model="tiny", task="ioi", source="test", nodes=["a1.h0", "m0"]))
    assert nodes_only["n_nodes"] == 2 and "n_edges" not in nodes_only
    with pytest.raises(MechscopeError, match="which this model does not have"):
        compare_with_reference(res, "gpt2-ioi")
