"""End to end on the embedded model: a discovered IOI circuit carries the behaviour, and
ablating it (or its top heads) destroys the behaviour far more than random ablations."""

import pytest
import torch

from mechscope.circuits import DiscoverConfig, discover
from mechscope.patching import run_with_node_mask, source_activations
from mechscope.tasks import get_task

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def ioi_run(embedded):
    cfg = DiscoverConfig(task="ioi", method="eap-ig", n=16, held_out=0.5, ig_steps=2, edges=4000, random_seeds=1)
    return discover(embedded, cfg, progress=False)


def test_circuit_is_faithful_and_random_is_not(ioi_run):
    m = ioi_run.metrics
    assert m["clean"] > 2.0 and m["clean_accuracy"] >= 0.85
    assert m["faithfulness"] >= 0.4, m  # ~5.7% of edges, held-out pairs
    assert m["random_same_size"] < 0.1, m
    curve = {c["n_edges"]: c for c in ioi_run.curve}
    full = curve[max(curve)]
    assert abs(full["faithfulness"] - 1) < 1e-3  # every edge kept == the model itself
    lo, hi = m["faithfulness_ci"]
    assert lo <= m["faithfulness"] <= hi, m  # 8 held-out pairs: the interval is wide


def test_heads_are_labelled_with_roles(ioi_run):
    """The main job's report names head roles (computed from mechscope heads, cached)."""
    labs = {k: v for k, v in (ioi_run.labels or {}).items() if not k.startswith("_")}
    roles = {v["role"] for v in labs.values() if v.get("role")}
    assert len(labs) >= 10 and {"induction", "previous-token"} & roles, roles
    assert all(v["attends"] for v in labs.values())


@torch.no_grad()
def test_ablating_top_nodes_hurts_more_than_random(embedded, ioi_run):
    g = ioi_run.graph
    batch = get_task("ioi").build(embedded.tokenizer, n=12, seed=7)
    src = source_activations(embedded, g, batch.clean, batch.corrupt, "patching")
    ns = (ioi_run.scores * g.allowed).sum(1).abs()
    ns[0] = 0  # never the input itself
    top = torch.zeros(g.n_senders)
    top[ns.topk(10).indices] = 1
    gen = torch.Generator().manual_seed(0)
    rnd = torch.zeros(g.n_senders)
    rnd[1 + torch.randperm(g.n_senders - 1, generator=gen)[:10]] = 1
    clean = batch.metric(embedded(batch.clean)).item()
    hit_top = clean - batch.metric(run_with_node_mask(embedded, g, batch.clean, src, top)).item()
    hit_rnd = clean - batch.metric(run_with_node_mask(embedded, g, batch.clean, src, rnd)).item()
    assert hit_top > 3 * abs(hit_rnd) and hit_top > 1.0, (hit_top, hit_rnd)


def test_saved_result_round_trips(ioi_run, tmp_path):
    from mechscope.circuits import CircuitResult

    ioi_run.save(tmp_path)
    back = CircuitResult.load(tmp_path)
    assert torch.equal(back.circuit, ioi_run.circuit)
    assert torch.allclose(back.scores, ioi_run.scores)
    assert back.metrics == ioi_run.metrics
