"""Circuits on a model whose attention and MLP run in parallel (GPT-NeoX / Pythia): the graph
drops the same-layer head -> MLP edges, and everything else holds as on sequential models
(the patching engine's identities, EAP against finite differences, the CLI round trip)."""

from __future__ import annotations

import json

import pytest
import torch
from test_attribution import check_eap_against_finite_differences

from mechscope.errors import MechscopeError
from mechscope.graph import Graph, build_graph
from mechscope.graph.graph import block_layout
from mechscope.patching import run_with_edge_mask, run_with_node_mask, source_activations
from mechscope.tasks.base import TaskBatch

TOL = 1e-4


def _batch(B=4, P=9, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randint(1, 512, s, generator=g)  # noqa: E731
    return TaskBatch(task="random", clean=r(B, P), corrupt=r(B, P), positions=torch.full((B, 1), P - 1),
                     answers=r(B, 1), wrongs=r(B, 1), lengths=torch.full((B,), P))


def test_the_graph_of_a_parallel_model_has_no_same_layer_head_to_mlp_edges(tiny_neox):
    assert block_layout(tiny_neox) == "parallel"
    g = build_graph(tiny_neox)
    s = tiny_neox.summary
    seq = Graph(n_layers=s.n_layers, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads)
    assert g.parallel and not seq.parallel
    assert g.n_edges == seq.n_edges - s.n_layers * s.n_heads
    for layer in range(s.n_layers):
        mlp = g.receiver_slices(layer)["mlp"].start
        assert not g.allowed[g.head_senders(layer), mlp].any()
        assert g.allowed[: g.sender_slice_before(layer), mlp].all()  # everything written before the layer
        if layer:
            assert g.allowed[g.head_senders(layer - 1), mlp].all()
    with pytest.raises(MechscopeError, match="run in parallel"):
        g.mask_from_edges([("a1.h2", "m1")])
    assert g.summary()["parallel_blocks"] is True


@torch.no_grad()
def test_patching_identities_hold_on_the_parallel_graph_and_fail_on_the_sequential_one(tiny_neox):
    m, g = tiny_neox, build_graph(tiny_neox)
    b = _batch()
    src = source_activations(m, g, b.clean, b.corrupt, "patching")
    clean, corrupt = m(b.clean), m(b.corrupt)
    assert (clean - corrupt).abs().max() > 0.1
    assert torch.allclose(run_with_edge_mask(m, g, b.clean, src, g.empty_mask()), clean, atol=TOL)
    assert torch.allclose(run_with_edge_mask(m, g, b.clean, src, g.full_mask()), corrupt, atol=TOL)
    same = source_activations(m, g, b.clean, b.clean, "patching")
    assert torch.allclose(run_with_edge_mask(m, g, b.clean, same, g.full_mask()), clean, atol=TOL)
    # ["m0", "a1.h1"]: layer 1's MLP input hook runs after layer 1's heads; its correction
    # taken as "everything patched so far" once counted a1.h1, which does not reach it.
    for nodes in (["a0.h1", "m0"], ["a1.h3"], ["m1"], ["input"], ["m0", "a1.h1"], ["a0.h1", "a1.h1"], ["input", "a1.h0", "a1.h2"]):
        nm = torch.zeros(g.n_senders)
        nm[[g.sender_index(n) for n in nodes]] = 1
        a = run_with_node_mask(m, g, b.clean, src, nm)
        assert (a - clean).abs().max() > 1e-3
        assert torch.allclose(a, run_with_edge_mask(m, g, b.clean, src, g.node_mask(nodes)), atol=TOL), nodes
    # The sequential graph's head -> same-layer MLP edges do not exist in this model: patching a
    # head's outgoing edges on it no longer equals patching the head (so the identity above can
    # tell the two graphs apart; every edge patched at once cannot: each MLP's wrong input is
    # then overwritten at every receiver).
    s = m.summary
    seq = Graph(n_layers=s.n_layers, n_heads=s.n_heads, n_kv_heads=s.n_kv_heads)
    nm = torch.zeros(g.n_senders)
    nm[g.sender_index("a0.h1")] = 1
    wrong = run_with_edge_mask(m, seq, b.clean, src, seq.node_mask(["a0.h1"]))
    assert (wrong - run_with_node_mask(m, g, b.clean, src, nm)).abs().max() > 1e-2


def test_eap_equals_finite_differences_on_the_parallel_graph(tiny_neox):
    m, g, b = tiny_neox, build_graph(tiny_neox), _batch(B=5, P=10, seed=1)
    mlp_edges = [j for j, (s, r) in enumerate(g.edge_index.tolist()) if g.receivers[r].startswith("m")]
    picks = torch.randperm(g.n_edges, generator=torch.Generator().manual_seed(0))[:10].tolist() + mlp_edges[-4:]
    check_eap_against_finite_differences(m, g, b, picks)


def test_discover_and_evaluate_run_on_a_parallel_model(tiny_neox, tmp_path):
    from typer.testing import CliRunner

    from mechscope.circuits.result import CircuitResult
    from mechscope.cli.main import app

    out, tiny_neox_dir = tmp_path / "run", tiny_neox.summary.source
    r = CliRunner().invoke(app, ["discover", "--model", tiny_neox_dir, "--task", "induction", "--n", "8", "--method", "eap",
                                 "--force", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    res = CircuitResult.load(out)
    assert res.graph.parallel and res.model["parallel_blocks"] is True
    assert not (res.circuit & ~res.graph.allowed).any()
    assert json.loads((out / "circuit.json").read_text())["metrics"]["n_edges"] == res.graph.n_edges
    r = CliRunner().invoke(app, ["evaluate", str(out), "--model", tiny_neox_dir, "--json"])
    assert r.exit_code == 0, r.output


def test_attribution_graphs_are_exact_on_a_parallel_model(tiny_neox):
    """The feature-circuit side needs no graph of its own: the adjacency columns equal the
    frozen replacement model's measured changes, and frozen interventions the graph's
    prediction, on the parallel model too (the sequential models' checks, reused)."""
    from test_attribution_graph import test_adjacency_columns_are_exact as adjacency_exact
    from test_attribution_graph import test_interventions_in_the_replacement_model as interventions

    adjacency_exact(tiny_neox, "topk", 6)
    interventions(tiny_neox)


def test_the_runtime_check_catches_an_engine_that_miscounts_same_layer_heads(tiny_neox, monkeypatch):
    """``check_patching_exact`` patches a few nodes' out-edges against the nodes themselves:
    with the parallel-block snapshot switched off (the engine before the fix) it refuses the
    model in one sentence; with it, the model passes."""
    from mechscope.patching import engine

    g = build_graph(tiny_neox)
    tiny_neox.__dict__.pop(engine._EXACT, None)
    engine.check_patching_exact(tiny_neox, g)  # the engine as it is
    tiny_neox.__dict__.pop(engine._EXACT, None)
    init = engine._EdgePatch.__post_init__

    def without_snapshots(self):
        init(self)
        self.snap_at = set()

    monkeypatch.setattr(engine._EdgePatch, "__post_init__", without_snapshots)
    try:
        with pytest.raises(MechscopeError, match="does not equal patching those nodes"):
            engine.check_patching_exact(tiny_neox, g)
    finally:
        tiny_neox.__dict__.pop(engine._EXACT, None)
