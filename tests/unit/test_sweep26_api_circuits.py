"""Bad inputs to the public circuits / patching / tasks / graph API: one MechscopeError sentence
each, never a deep torch traceback or a silently wrong result (sweep 26)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mechscope.circuits import (
    CircuitResult,
    DiscoverConfig,
    compare_with_reference,
    discover,
    edge_scores,
    evaluate_saved,
)
from mechscope.circuits.attribution import edge_score_folds
from mechscope.circuits.evaluate import Evaluator
from mechscope.errors import MechscopeError
from mechscope.graph import Graph, build_graph
from mechscope.patching import run_with_edge_mask, run_with_node_mask, source_activations
from mechscope.patching.interchange import Site, interchange_accuracy, sites_for
from mechscope.tasks import evaluate_task, get_task
from mechscope.tasks.base import TaskBatch


def _batch(B=6, P=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randint(1, 512, s, generator=g)  # noqa: E731
    return TaskBatch(task="random", clean=r(B, P), corrupt=r(B, P), positions=torch.full((B, 1), P - 1),
                     answers=r(B, 1), wrongs=r(B, 1), lengths=torch.full((B,), P))


def _result(n_layers=2, n_heads=4, n_kv=2):
    g = Graph(n_layers, n_heads, n_kv)
    scores = torch.randn(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(1)) * g.allowed
    return CircuitResult(model={"name": "tiny", "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv, "source": "x"},
                         task="ioi", method="eap", settings={}, graph=g, scores=scores, circuit=(scores > 1.0) & g.allowed)


# ---- (A1) method names ----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["eap-igg", "acdc", "EAP"])
def test_edge_scores_refuses_unknown_method(tiny_gpt2, method):
    g, b = build_graph(tiny_gpt2), _batch()
    with pytest.raises(MechscopeError, match="Unknown attribution method"):
        edge_scores(tiny_gpt2, g, b, method)
    with pytest.raises(MechscopeError, match="Unknown attribution method"):
        edge_score_folds(tiny_gpt2, g, b, None, method)


# ---- (A2) batch sizes -----------------------------------------------------------------------
@pytest.mark.parametrize("bs", [0, -1])
def test_batch_size_below_one_is_refused(tiny_gpt2, bs):
    g, b = build_graph(tiny_gpt2), _batch()
    with pytest.raises(MechscopeError, match="batch_size"):
        evaluate_task(tiny_gpt2, b, batch_size=bs)
    with pytest.raises(MechscopeError, match="batch_size"):
        edge_scores(tiny_gpt2, g, b, "eap", batch_size=bs)
    with pytest.raises(MechscopeError, match="batch_size"):
        Evaluator(tiny_gpt2, g, b, batch_size=bs)
    with pytest.raises(MechscopeError, match="--batch-size"):
        DiscoverConfig(batch_size=bs)


# ---- (A3) TaskBatch validation --------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    (lambda b: dict(corrupt=b.corrupt[:, :-3]), "corrupt has shape"),
    (lambda b: dict(corrupt=b.corrupt[:3]), "corrupt has shape"),
    (lambda b: dict(positions=b.positions + 100), "positions range"),
    (lambda b: dict(positions=b.positions * 0 - 1), "positions range"),
    (lambda b: dict(positions=b.positions[:2]), "positions has shape"),
    (lambda b: dict(positions=b.positions.float()), "dtype"),
    (lambda b: dict(answers=b.answers * 0 + 600), "answers holds token ids"),
    (lambda b: dict(answers=b.answers * 0 - 1), "answers holds token ids"),
    (lambda b: dict(wrongs=b.wrongs[:, [0, 0]]), "wrongs has shape"),
    (lambda b: dict(clean=b.clean * 0 + 600), "clean holds token ids"),
    (lambda b: dict(lengths=b.lengths * 0 - 1), "lengths range"),
    (lambda b: dict(clean=b.clean.tolist()), "not a tensor"),
])
def test_malformed_batch_is_refused(tiny_gpt2, change, match):
    b = _batch()
    bad = dataclasses.replace(b, **change(b))
    with pytest.raises(MechscopeError, match=match):
        evaluate_task(tiny_gpt2, bad)
    with pytest.raises(MechscopeError, match=match):
        edge_scores(tiny_gpt2, build_graph(tiny_gpt2), bad, "eap")


def test_empty_batch_split_and_subset_are_refused(tiny_gpt2):
    b = _batch()
    with pytest.raises(MechscopeError, match="empty"):
        evaluate_task(tiny_gpt2, b.subset(slice(0, 0)))
    with pytest.raises(MechscopeError, match="empty"):
        Evaluator(tiny_gpt2, build_graph(tiny_gpt2), b.subset(slice(0, 0)))
    for held_out in (0, -1, 0.0, 1.5):
        with pytest.raises(MechscopeError, match="held_out"):
            b.split(held_out=held_out)
    with pytest.raises(MechscopeError, match="out of range"):
        b.subset([100])
    assert len(b.split(0.5)[1]) == 3 and len(b.subset([0, 5])) == 2  # valid input unchanged


def test_discover_refuses_a_malformed_batch(tiny_gpt2):
    b = _batch(B=8)
    bad = dataclasses.replace(b, positions=b.positions + 100)
    cfg = DiscoverConfig(task="ioi", n=8, method="eap", bootstrap=10, labels=False, force=True)
    with pytest.raises(MechscopeError, match="positions range"):
        discover(tiny_gpt2, cfg, batch=bad, progress=False)


# ---- (A4) patching masks --------------------------------------------------------------------
def test_masks_of_wrong_length_shape_or_nan_are_refused(tiny_gpt2):
    g = build_graph(tiny_gpt2)
    b = _batch(B=2)
    src = source_activations(tiny_gpt2, g, b.clean, b.corrupt, "patching")
    for nodes in (torch.zeros(g.n_senders + 3), torch.zeros(g.n_senders - 1), torch.zeros(2, g.n_senders)):
        with pytest.raises(MechscopeError, match="node mask must be a tensor of shape"):
            run_with_node_mask(tiny_gpt2, g, b.clean, src, nodes)
    with pytest.raises(MechscopeError, match="NaN"):
        run_with_node_mask(tiny_gpt2, g, b.clean, src, torch.full((g.n_senders,), float("nan")))
    with pytest.raises(MechscopeError, match="NaN"):
        run_with_edge_mask(tiny_gpt2, g, b.clean, src, torch.full((g.n_senders, g.n_receivers), float("nan")))
    with pytest.raises(MechscopeError, match=r"has shape \(27,\)"):
        run_with_edge_mask(tiny_gpt2, g, b.clean, src, torch.zeros(27))
    with pytest.raises(MechscopeError, match=rf"has shape \(1, 1, {g.n_senders}, {g.n_receivers}\)"):
        run_with_edge_mask(tiny_gpt2, g, b.clean, src, torch.zeros(1, 1, g.n_senders, g.n_receivers))


# ---- (A5) DiscoverConfig ----------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(target=5.0), "--target must lie in"),
    (dict(target=-1.0), "--target must lie in"),
    (dict(target=0.0), "--target must lie in"),
    (dict(edges=2.5), "edges must be a whole number"),
    (dict(ig_steps=2.5), "ig_steps must be a whole number"),
    (dict(ig_steps=0), "--ig-steps"),
    (dict(edges=-3), "--edges"),
    (dict(batch_size=-4), "--batch-size"),
    (dict(bootstrap=0), "bootstrap"),
    (dict(bootstrap=-1), "bootstrap"),
    (dict(n="20"), "n must be a whole number"),
    (dict(target="0.8"), "target must be a number"),
    (dict(task=None), "task must be a string"),
])
def test_discover_config_checks_values_and_types(kw, match):
    with pytest.raises(MechscopeError, match=match):
        DiscoverConfig(**kw)


def test_discover_config_valid_values_unchanged():
    cfg = DiscoverConfig(target=1.0, ig_steps=1, bootstrap=1, batch_size=1, task=Path("x.jsonl"))
    assert cfg.target == 1.0 and cfg.task == "x.jsonl"
    assert DiscoverConfig(edges=5).edges == 5  # (with a --target too it is refused: --edges chooses the circuit)


# ---- (A6) CircuitResult.load ------------------------------------------------------------------
def test_load_refuses_scores_of_another_graph(tmp_path):
    from safetensors.torch import save_file

    _result().save(tmp_path / "a")
    other = _result(n_layers=3)
    save_file({"scores": other.scores.contiguous(), "circuit": other.circuit.to(torch.uint8)},
              str(tmp_path / "a" / "scores.safetensors"))
    with pytest.raises(MechscopeError, match="damaged or not a mechscope circuit folder.*shape"):
        CircuitResult.load(tmp_path / "a")


@pytest.mark.parametrize("damage", ["no_model", "no_n_heads", "no_score", "no_scores_key", "truncated", "array"])
def test_load_of_damaged_folders_is_one_sentence(tmp_path, damage):
    from safetensors.torch import save_file

    d = tmp_path / "r"
    _result().save(d)
    j = json.loads((d / "circuit.json").read_text())
    st = d / "scores.safetensors"
    if damage == "no_model":
        j.pop("model")
    elif damage == "no_n_heads":
        j["model"].pop("n_heads")
    elif damage == "no_score":
        st.unlink()
        j["edges"][0].pop("score")
    elif damage == "no_scores_key":
        save_file({"x": torch.zeros(2)}, str(st))
    elif damage == "truncated":
        st.write_bytes(st.read_bytes()[:100])
    elif damage == "array":
        j = []
    (d / "circuit.json").write_text(json.dumps(j))
    with pytest.raises(MechscopeError, match="damaged or not a mechscope circuit folder"):
        CircuitResult.load(d)


# ---- (A7) run_with_edge_mask / run_with_node_mask inputs ---------------------------------------
def test_patching_runs_check_tokens_source_positions_and_graph(tiny_gpt2, tiny_llama):
    g = build_graph(tiny_gpt2)
    b = _batch(B=2)
    src = source_activations(tiny_gpt2, g, b.clean, b.corrupt, "patching")
    mask = g.empty_mask() if hasattr(g, "empty_mask") else torch.zeros(g.n_senders, g.n_receivers)
    nodes = torch.zeros(g.n_senders)
    cases = [
        (dict(source=src[:, :1].repeat(1, 3, 1, 1)), "source has shape"),  # batch 3 for 2 prompts
        (dict(source=src[:, :, :4]), "source has shape"),
        (dict(source=src[..., :10]), "source has shape"),
        (dict(source=src[:-1]), "source has shape"),
        (dict(tokens=b.clean[0]), "integer tensor"),
        (dict(tokens=b.clean.float()), "integer tensor"),
        (dict(tokens=b.clean + 1000), "vocabulary"),
        (dict(tokens=torch.randint(1, 500, (2, 100)), source=torch.zeros(g.n_senders, 2, 100, 64)), "context"),
        (dict(graph=build_graph(tiny_llama)), "graph has"),
    ]
    for kw, match in cases:
        args = dict(graph=g, tokens=b.clean, source=src) | kw
        with pytest.raises(MechscopeError, match=match):
            run_with_edge_mask(tiny_gpt2, args["graph"], args["tokens"], args["source"], mask)
        with pytest.raises(MechscopeError, match=match):
            run_with_node_mask(tiny_gpt2, args["graph"], args["tokens"], args["source"], nodes)
    with pytest.raises(MechscopeError, match="positions"):
        run_with_edge_mask(tiny_gpt2, g, b.clean, src, mask, positions=torch.full((2, 1), 8))
    with pytest.raises(MechscopeError, match="positions"):
        run_with_edge_mask(tiny_gpt2, g, b.clean, src, mask, positions=torch.full((3, 1), 2))
    # valid input: an empty mask gives the clean logits
    assert torch.allclose(run_with_edge_mask(tiny_gpt2, g, b.clean, src, mask), tiny_gpt2(b.clean), atol=1e-4)


# ---- (A8) entry points' other arguments ---------------------------------------------------------
def test_compare_with_reference_takes_a_path_and_refuses_others(tmp_path):
    res = _result()
    res.save(tmp_path)
    assert compare_with_reference(res, tmp_path)["jaccard"] == 1.0
    with pytest.raises(MechscopeError, match="needs a reference circuit"):
        compare_with_reference(res, {"nodes": ["a0.h1"]})
    (tmp_path / "ne.json").write_text(json.dumps({"nodes": []}))
    with pytest.raises(MechscopeError, match="names no nodes"):
        compare_with_reference(res, str(tmp_path / "ne.json"))


def test_graph_of_another_model_and_wrong_argument_types(tiny_gpt2, tiny_llama, tmp_path):
    b = _batch()
    with pytest.raises(MechscopeError, match="graph has"):
        edge_scores(tiny_gpt2, build_graph(tiny_llama), b, "eap")
    with pytest.raises(MechscopeError, match="CircuitResult.load"):
        evaluate_saved(tiny_gpt2, 5)
    with pytest.raises(MechscopeError, match="No circuit.json"):
        evaluate_saved(tiny_gpt2, str(tmp_path / "missing"))
    with pytest.raises(MechscopeError, match="needs a DiscoverConfig"):
        discover(tiny_gpt2, {"task": "ioi"}, progress=False)
    with pytest.raises(MechscopeError, match="needs a TaskBatch"):
        evaluate_task(tiny_gpt2, "ioi")
    with pytest.raises(MechscopeError, match="get_task needs a task name"):
        get_task(None)
    with pytest.raises(MechscopeError, match="get_task needs a task name"):
        get_task(tiny_gpt2)


def test_interchange_refuses_head_on_resid_empty_and_string_sites(tiny_gpt2):
    base = torch.randint(1, 500, (2, 6))
    source = torch.randint(1, 500, (2, 6))
    expected = torch.randint(1, 500, (2,))
    with pytest.raises(MechscopeError, match="head=1 applies to site='head' only"):
        interchange_accuracy(tiny_gpt2, base, source, expected, site="resid", head=1)
    with pytest.raises(MechscopeError, match="--head 1 applies"):
        sites_for(tiny_gpt2, "resid", 1)
    with pytest.raises(MechscopeError, match="sites is empty"):
        interchange_accuracy(tiny_gpt2, base, source, expected, sites=[])
    with pytest.raises(MechscopeError, match="Site objects"):
        interchange_accuracy(tiny_gpt2, base, source, expected, sites=["blocks.0.hook_resid_pre"])
    r = interchange_accuracy(tiny_gpt2, base, source, expected, sites=[Site("blocks.0.hook_resid_pre")], positions=[0])
    assert r.accuracy.shape == (1, 1)


# ---- (A9) model type checks ---------------------------------------------------------------------
def test_entry_points_refuse_a_model_that_is_not_loaded(tiny_gpt2):
    g, b = build_graph(tiny_gpt2), _batch(B=2)
    src = torch.zeros(g.n_senders, 2, 8, 64)
    calls = {
        "discover": lambda: discover("gpt2", DiscoverConfig(), progress=False),
        "evaluate_saved": lambda: evaluate_saved("gpt2", _result()),
        "edge_scores": lambda: edge_scores("gpt2", g, b, "eap"),
        "build_graph": lambda: build_graph("gpt2"),
        "run_with_edge_mask": lambda: run_with_edge_mask("gpt2", g, b.clean, src, torch.zeros(g.n_senders, g.n_receivers)),
        "run_with_node_mask": lambda: run_with_node_mask("gpt2", g, b.clean, src, torch.zeros(g.n_senders)),
        "interchange_accuracy": lambda: interchange_accuracy("gpt2", b.clean, b.corrupt, b.answers[:, 0]),
        "source_activations": lambda: source_activations("gpt2", g, b.clean, b.corrupt, "patching"),
        "evaluate_task": lambda: evaluate_task("gpt2", b),
    }
    for who, call in calls.items():
        with pytest.raises(MechscopeError, match=f"{who} needs a model loaded by mechscope.load_model"):
            call()
    assert evaluate_task(tiny_gpt2.bridge, b)["n"] == 2  # any module mapping tokens to logits still works
