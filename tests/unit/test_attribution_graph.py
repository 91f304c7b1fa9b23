"""Attribution graphs are exact: changing one node in the frozen replacement model moves every
feature pre-activation and every (demeaned) logit by exactly that node's adjacency column.

The reference is ``frozen_forward``, which *replaces* the patterns and norm scales by their
clean values, while the graph comes from gradients with them detached: a missed norm scale, an
unfrozen pattern, a wrong sign or a source read at the wrong layer or position breaks it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mechscope.features.attribute import attribute
from mechscope.features.prune import influence, normalise_rows, prune, scores
from mechscope.features.replacement import capture, frozen_forward
from mechscope.features.transcoder_set import load_transcoders, random_transcoders, save_transcoders

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from cli_inprocess import run_cli  # noqa: E402


def _prompt(model, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, model.summary.d_vocab, (n,), generator=g)
    toks[0] = model.tokenizer.bos_token_id
    return toks


def _column_check(model, tset, g, run, pre0, lg0, kind, idx, forward=frozen_forward):
    """Predicted (adjacency column) vs measured change of every target for one source
    (measured by ``forward``, ``frozen_forward`` unless given)."""
    mlp_delta = torch.zeros_like(run.mlp_out)
    emb_delta = torch.zeros_like(run.embed)
    if kind == "feature":
        layer, pos, f = g.features[idx].tolist()
        mlp_delta[layer, pos] = g.activations[idx] * tset.layers[layer].W_dec[f].detach().float()
        col = idx
    elif kind == "error":
        layer, pos = idx
        mlp_delta[layer, pos] = run.errors[layer, pos]
        col = g.error_index(layer, pos)
    else:
        emb_delta[idx] = run.embed[idx]
        col = g.token_start + idx
    pre1, lg1 = forward(model, tset, run, mlp_delta, emb_delta)
    fl, fp, ff = g.features.T
    got_feat = (pre1 - pre0)[fl, fp, ff]
    dm = lambda x: x[-1] - x[-1].mean()  # noqa: E731
    got_logit = (dm(lg1) - dm(lg0))[g.logit_tokens]
    want = g.adjacency[:, col]
    return torch.cat([got_feat, got_logit]), torch.cat([want[: g.n_features], want[g.logit_start:]])


@pytest.mark.parametrize("arch,k", [("topk", 6), ("relu", None)])
def test_adjacency_columns_are_exact(tiny_model, arch, k):
    torch.manual_seed(0)
    tset = random_transcoders(tiny_model, d_sae=40, architecture=arch, k=k, seed=1)
    toks = _prompt(tiny_model)
    g = attribute(tiny_model, tset, toks, max_features=10_000, batch_size=16)
    run = capture(tiny_model, tset, toks)
    pre0, lg0 = frozen_forward(tiny_model, tset, run)
    with torch.no_grad():
        clean = tiny_model(toks[None])[0].float()
    assert (lg0 - clean).abs().max() < 1e-4  # the frozen model at its clean point is the model
    assert g.n_features == run.active.shape[0] > 10 and g.first_pos == 1
    # sources: features in every layer but the last (the last has no feature targets above it)
    picks = [("feature", int(torch.nonzero(g.features[:, 0] == layer)[j])) for layer in range(g.n_layers) for j in (0, -1)]
    picks += [("error", (0, 3)), ("error", (g.n_layers - 1, g.n_pos - 1)), ("token", 2), ("token", g.n_pos - 1)]
    moved = 0.0
    for kind, idx in picks:
        got, want = _column_check(tiny_model, tset, g, run, pre0, lg0, kind, idx)
        scale = max(1.0, float(want.abs().max()))
        assert (got - want).abs().max() < 1e-4 * scale, (kind, idx, float((got - want).abs().max()))
        moved = max(moved, float(want.abs().max()))
    assert moved > 0.1  # the checks compared real effects, not zeros
    # causality: a feature row holds only sources at earlier layers and earlier-or-same positions
    A = g.adjacency
    for i in range(g.n_features):
        layer, pos, _ = g.features[i].tolist()
        src_layers, src_pos = g.features[:, 0], g.features[:, 1]
        bad = (src_layers >= layer) | (src_pos > pos)
        assert not A[i, : g.n_features][bad].any()


def test_columns_are_exact_with_norms_after_the_block_and_soft_capped_logits(tmp_path):
    """Gemma 2 normalises attention's and the MLP's outputs before adding them (ln1_post,
    ln2_post) and soft-caps its logits. The frozen model holds those norms' scales too (without
    them a feature column was off by 3% here), and the logit nodes are the logits before the cap
    (recovered from the frozen model's capped logits by atanh)."""
    import transformers as T
    from conftest import save_scaled

    from mechscope.models import load_model

    cap = 3.0
    cfg = T.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=64, sliding_window=16, final_logit_softcapping=cap,
                         vocab_size=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    m = load_model(save_scaled(T.Gemma2ForCausalLM(cfg), tmp_path / "g2"), device="cpu")
    tset = random_transcoders(m, d_sae=40, architecture="topk", k=6, seed=1)
    toks = _prompt(m)
    g = attribute(m, tset, toks, max_features=10_000, batch_size=16)
    run = capture(m, tset, toks)
    assert any("ln1_post" in n for n in run.frozen) and any("ln2_post" in n for n in run.frozen)
    raw = lambda x: cap * torch.atanh(x / cap)  # noqa: E731

    def before_cap(*args):
        pre, logits = frozen_forward(*args)
        return pre, raw(logits)

    pre0, lg0 = before_cap(m, tset, run)
    moved = 0.0
    for kind, idx in (("feature", int(torch.nonzero(g.features[:, 0] == 0)[0])), ("error", (0, 3)), ("token", 2)):
        got, want = _column_check(m, tset, g, run, pre0, lg0, kind, idx, forward=before_cap)
        assert (got - want).abs().max() < 1e-4 * max(1.0, float(want.abs().max())), (kind, idx)
        moved = max(moved, float(want.abs().max()))
    assert moved > 0.05


def test_cap_folds_dropped_features_into_errors(tiny_llama):
    tset = random_transcoders(tiny_llama, d_sae=40, k=6, seed=2)
    toks = _prompt(tiny_llama, seed=3)
    full = attribute(tiny_llama, tset, toks, max_features=10_000, batch_size=16)
    capped = attribute(tiny_llama, tset, toks, max_features=20, batch_size=8)
    assert capped.n_features == 20 and capped.n_active == full.n_features
    # every logit row sums to the same total: dropped features' effects moved to error nodes
    fr, cr = full.adjacency[full.logit_start:], capped.adjacency[capped.logit_start:]
    assert torch.allclose(fr.sum(1), cr.sum(1), atol=1e-4)
    # kept features keep their exact logit edges
    for i in range(capped.n_features):
        j = int(((full.features == capped.features[i]).all(1)).nonzero())
        assert torch.allclose(cr[:, i], fr[:, j], atol=1e-5)
    # the visited features are the most influential ones (ranked by the full graph's influence)
    infl = influence(normalise_rows(full.adjacency), full.logit_weights())[: full.n_features]
    top = set(infl.topk(20).indices.tolist())
    kept = {int(((full.features == capped.features[i]).all(1)).nonzero()) for i in range(20)}
    assert len(top & kept) >= 10


def test_prune_and_scores(tiny_gpt2):
    tset = random_transcoders(tiny_gpt2, d_sae=40, k=6, seed=4)
    g = attribute(tiny_gpt2, tset, _prompt(tiny_gpt2, seed=5), batch_size=16)
    full = scores(g)
    assert 0.0 <= full["replacement"] <= 1.0 and 0.0 <= full["completeness"] <= 1.0
    pr = prune(g, 0.8, 0.98)
    assert pr.node_mask[g.token_start:].all()
    assert 0 < int(pr.node_mask[: g.n_features].sum()) < g.n_features
    # no kept edge touches a dropped node
    assert not pr.edge_mask[~pr.node_mask].any() and not pr.edge_mask[:, ~pr.node_mask].any()
    # with every feature folded into the error nodes, only the logit rows carry influence: the
    # replacement score is the probability-weighted share of |direct token edges| in them
    g0 = attribute(tiny_gpt2, tset, _prompt(tiny_gpt2, seed=5), max_features=0, batch_size=16)
    rows = g0.adjacency[g0.logit_start:].abs()
    tok_share = rows[:, g0.token_start:g0.logit_start].sum(1) / rows.sum(1)
    want = float((g0.logit_probs * tok_share).sum() / g0.logit_probs.sum())
    assert g0.n_features == 0 and abs(scores(g0)["replacement"] - want) < 1e-5
    assert scores(g0)["completeness"] < full["completeness"]
    with pytest.raises(Exception, match="node_threshold"):
        prune(g, 1.5)


def test_transcoder_set_round_trip(tiny_llama, tmp_path):
    tset = random_transcoders(tiny_llama, d_sae=24, k=4, seed=6)
    save_transcoders(tset, tmp_path / "tc")
    back = load_transcoders(tmp_path / "tc")
    x = torch.randn(5, tiny_llama.summary.d_model)
    for a, b in zip(tset.layers, back.layers):
        assert torch.allclose(a(x), b(x), atol=1e-6)
    # circuit-tracer's layout alone (config.yaml + layer_<l>.safetensors) loads the same set
    for p in (tmp_path / "tc").glob("layer_*"):
        if p.is_dir():
            for f in p.iterdir():
                f.unlink()
            p.rmdir()
    ct = load_transcoders(tmp_path / "tc")
    for a, b in zip(tset.layers, ct.layers):
        assert torch.allclose(a(x), b(x), atol=1e-6)
    assert "model_kind: transcoder_set" in (tmp_path / "tc" / "config.yaml").read_text()


@pytest.mark.slow
def test_cli_attribute_writes_a_complete_folder(tiny_llama, tiny_llama_dir, tmp_path):
    import json

    from mechscope.features.graph_files import load_graph

    tset = random_transcoders(tiny_llama, d_sae=32, k=4, seed=7)
    save_transcoders(tset, tmp_path / "tc")

    def run(*args):  # in this process: a subprocess would spend 8-12 s on imports per command
        return run_cli("attribute", *args)

    out = tmp_path / "g"
    corpus = tmp_path / "corpus.txt"  # 60 paragraphs: enough documents for a held-out split of 1 in 20
    corpus.write_text("\n\n".join(" ".join(f"Then, Alice and Bob went to the park number {i}{j}. Bob gave a ball to Alice."
                                            for j in range(40)) for i in range(60)))
    r = run("When Mary and John went to the store", "--transcoders", str(tmp_path / "tc"), "--model", tiny_llama_dir,
            "--out", str(out), "--json", "--qk", "2:3:5:2", "--contexts", "512", "--corpus", str(corpus))
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    qk = json.loads((out / "qk.json").read_text())
    assert s["qk"] == qk and qk[0]["layer"] == 2 and qk[0]["key_pos"] == 2
    assert qk[0]["n_query_components"] <= 20  # all listed, so the shares add up to the score
    assert abs(sum(c["value"] for c in qk[0]["query_side"]) - qk[0]["score"]) < 1e-3
    assert 0 <= s["replacement_score"] <= 1 and s["nodes_kept"] > 0
    doc = json.loads((out / "graph.json").read_text())
    ids = {n["node_id"] for n in doc["nodes"]}
    assert all(link["source"] in ids and link["target"] in ids for link in doc["links"])
    assert {n["feature_type"] for n in doc["nodes"]} >= {"embedding", "logit"}
    assert json.loads((out / "graph-metadata.json").read_text())["graphs"][0]["slug"] == "g"
    back = load_graph(out)
    assert back.adjacency.shape[0] == back.n_nodes and back.n_layers == 3
    page = (out / "report.html").read_text()
    assert 'id="graph-data"' in page and "attribution.js" not in page  # assets inlined, not linked
    n_feat = len({(n["layer"], n["feature"]) for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"})
    assert s["feature_cards"] == n_feat > 0 and not s["feature_cards_note"] and 'id="feature-cards"' in page
    assert '"contexts": [{"tokens"' in page  # exemplars found in the corpus, not only the output tokens
    # bad inputs: one sentence, exit 2, nothing written
    bad = [
        (["--transcoders", str(tmp_path / "missing")], "not a folder"),
        (["--target", " Mary and John"], "not a single token"),
        (["--node-threshold", "1.5"], "between 0 and 1"),
        (["--qk", "9:0:1:0"], "layer 9 does not exist"),
        (["--qk", "1:0:1:3"], "key position <= query position"),
        (["--qk", "1:0:x"], "LAYER:HEAD:QUERY_POS:KEY_POS"),
        (["--corpus", str(tmp_path / "no-such.txt")], "No corpus at"),
        (["--contexts", "-1"], "--contexts must be at least 0"),
    ]
    for extra, needle in bad:
        args = ["When Mary went", "--transcoders", str(tmp_path / "tc"), "--model", tiny_llama_dir,
                "--out", str(tmp_path / "bad")] + extra
        r = run(*args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr)
        assert not (tmp_path / "bad").exists()


def test_report_escapes_tokens(tiny_llama, tmp_path):
    from mechscope.features.graph_files import graph_json
    from mechscope.report.attribution import render_attribution

    tset = random_transcoders(tiny_llama, d_sae=32, k=4, seed=8)
    g = attribute(tiny_llama, tset, _prompt(tiny_llama, seed=9), batch_size=16)
    g.token_text = ["</script><script>alert(1)</script>"] * g.n_pos
    doc = graph_json(g, prune(g), tiny_llama.tokenizer, "x", "<b>prompt</b>", "scan", 0.8)
    page = render_attribution(doc)
    assert "<script>alert(1)" not in page and "<b>prompt</b>" not in page
    assert page.count("<script") == 2  # the data element and the drawing script, nothing injected
    assert "alert(1)" in page  # the hostile token is there, as escaped data
    qk = [{"layer": 1, "head": 0, "query_pos": 3, "key_pos": 1, "score": 0.5, "weight": 0.2,
           "top_pairs": [{"query_label": "token '<img src=x onerror=alert(2)>' @3", "key_label": "<i>k</i>", "value": 0.4}],
           "query_side": [{"label": "<svg onload=alert(3)>", "value": 0.5}], "key_side": []}]
    page = render_attribution(doc, qk=qk)
    assert "<img src=x" not in page and "<svg onload" not in page and "<i>k</i>" not in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page and "QK attribution" in page


def test_local_circuit_of_a_feature(tiny_llama):
    """--target-feature: the sink is one feature; its row equals the full graph's row for it
    (restricted to the sources that can feed it), and nothing after it is a node."""
    tset = random_transcoders(tiny_llama, d_sae=40, k=6, seed=10)
    toks = _prompt(tiny_llama, seed=11)
    full = attribute(tiny_llama, tset, toks, batch_size=16)
    last = full.features[:, 0] == full.n_layers - 1
    i = int(torch.nonzero(last & (full.features[:, 1] == full.n_pos - 1))[0])
    layer, pos, f = full.features[i].tolist()
    loc = attribute(tiny_llama, tset, toks, batch_size=16, target_feature=(layer, f, pos))
    assert loc.n_logits == 0 and loc.target_feature == loc.n_features - 1
    assert (loc.features[: -1, 0] < layer).all() and (loc.features[: -1, 1] <= pos).all()
    for j in range(loc.n_features - 1):
        k = int(((full.features == loc.features[j]).all(1)).nonzero())
        assert abs(float(loc.adjacency[loc.target_feature, j] - full.adjacency[i, k])) < 1e-5
    w = loc.logit_weights()
    assert w.sum() == 1 and w[loc.target_feature] == 1
    pr = prune(loc)
    assert pr.node_mask[loc.target_feature]
    assert 0 <= scores(loc)["replacement"] <= 1
    with pytest.raises(Exception, match="not active"):
        attribute(tiny_llama, tset, toks, target_feature=(layer, _inactive(full, layer, pos), pos))


def _inactive(g, layer, pos) -> int:
    on = set(g.features[(g.features[:, 0] == layer) & (g.features[:, 1] == pos), 2].tolist())
    return next(f for f in range(40) if f not in on)


@pytest.mark.filterwarnings("ignore:A forward hook edited hook_scale")  # the bridge's notice for the frozen scale
def test_virtual_weights_match_the_direct_path(tiny_model):
    """Each virtual weight equals the measured direct-path effect: add eps x d_f to the residual
    stream entering the later block's second norm (its scale frozen) and read the change of
    feature g's pre-activation, times the scale (the weights are at scale 1). With norm gains far
    from 1 (a weight that multiplies by the gain fails), on LayerNorm (GPT-2: centring) and
    RMSNorm (Llama). Outputs mirror inputs."""
    from mechscope.features.weights import centred_norms, virtual_weights
    from mechscope.models.hooks import ln_normalized, ln_scale

    m = tiny_model
    tset = random_transcoders(m, d_sae=40, k=6, seed=12)
    lns = [getattr(b.ln2, "_original_component", b.ln2) for b in m.bridge.blocks]
    saved = [ln.weight.detach().clone() for ln in lns]
    try:
        with torch.no_grad():
            for i, ln in enumerate(lns):
                ln.weight.copy_(torch.rand(ln.weight.shape, generator=torch.Generator().manual_seed(i)) * 2.8 + 0.2)
        tgt, g = m.summary.n_layers - 1, 5
        vw = virtual_weights(tset, tgt, g, top=3, centred=centred_norms(m))
        assert len(vw["inputs"]) == 3 and all(r["layer"] < tgt for r in vw["inputs"])
        ids, p, eps = torch.tensor([[5, 17, 33, 9, 100, 42]]), 4, 1e-2
        _, cache = m.bridge.run_with_cache(ids, names_filter=lambda n: n == ln_scale(tgt, 2))
        scale = cache[ln_scale(tgt, 2)]

        def pre_act(delta: torch.Tensor) -> float:
            got = {}

            def add(t, hook):
                t = t.clone()
                t[0, p] += delta
                return t

            def grab(t, hook):
                got["x"] = t.detach()

            m.bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{tgt}.hook_resid_mid", add),
                                                    (ln_scale(tgt, 2), lambda t, hook: scale.to(t.dtype)),
                                                    (ln_normalized(tgt, 2), grab)])
            with torch.no_grad():
                return float(tset.layers[tgt].pre_acts(got["x"][0, p])[g])

        s = float(scale[0, p])
        for r in vw["inputs"]:
            d = tset.layers[r["layer"]].W_dec[r["feature"]].detach()
            measured = (pre_act(eps * d) - pre_act(0 * d)) / eps * s
            assert abs(measured - r["weight"]) < 1e-3 * max(1.0, abs(r["weight"])), (r, measured)
    finally:
        with torch.no_grad():
            for ln, w in zip(lns, saved):
                ln.weight.copy_(w)
    src = vw["inputs"][0]
    back = virtual_weights(tset, src["layer"], src["feature"], top=40 * 3, centred=centred_norms(m))["outputs"]
    assert any(r["layer"] == tgt and r["feature"] == g and abs(r["weight"] - src["weight"]) < 1e-5 for r in back)
    with pytest.raises(Exception, match="out of range"):
        virtual_weights(tset, m.summary.n_layers, 0, centred=centred_norms(m))


def test_interventions_in_the_replacement_model(tiny_model):
    """Nothing set: the replacement model is the model. Frozen: the logit change of setting
    features is exactly the graph's prediction. Unfrozen: features downstream respond, so the
    change differs from the frozen one."""
    from mechscope.features.intervene import intervene, replacement_forward

    tset = random_transcoders(tiny_model, d_sae=40, k=6, seed=13)
    toks = _prompt(tiny_model, seed=14)
    run = capture(tiny_model, tset, toks)
    with torch.no_grad():
        clean = tiny_model(toks[None])[0].float()
    assert (replacement_forward(tiny_model, tset, run, []) - clean).abs().max() < 1e-4
    g = attribute(tiny_model, tset, toks, batch_size=16)
    picks = [int(torch.nonzero(g.features[:, 0] == layer)[-1]) for layer in range(g.n_layers - 1)]
    clamps = []
    for i in picks:
        layer, pos, f = g.features[i].tolist()
        clamps.append((layer, f, pos, 3.0 * float(g.activations[i])))  # triple it: (3 - 1) x the column
    res = intervene(tiny_model, tset, toks, clamps, frozen=True)
    dm = lambda x: x - x.mean()  # noqa: E731
    got = (dm(res["changed"]) - dm(res["base"]))[g.logit_tokens]
    want = sum(2.0 * g.adjacency[g.logit_start:, i] for i in picks)
    assert (got - want).abs().max() < 1e-4 * max(1.0, float(want.abs().max())), (got, want)
    free = intervene(tiny_model, tset, toks, clamps, frozen=False, generate=3)
    assert (free["changed"] - res["changed"]).abs().max() > 1e-3
    assert isinstance(free["changed_text"], str)
    with pytest.raises(Exception, match="position"):
        intervene(tiny_model, tset, toks, [(0, 0, 99, 1.0)])


@pytest.mark.slow
def test_cli_intervene_and_weights(tiny_llama, tiny_llama_dir, tmp_path):
    import json

    tset = random_transcoders(tiny_llama, d_sae=32, k=4, seed=15)
    save_transcoders(tset, tmp_path / "tc")
    toks = [tiny_llama.tokenizer.bos_token_id] + tiny_llama.to_tokens("When Mary went")
    run = capture(tiny_llama, tset, toks)
    layer, pos, f = run.active[0].tolist()
    go = run_cli  # in this process: a subprocess would spend 8-12 s on imports per command
    common = ["--transcoders", str(tmp_path / "tc"), "--model", tiny_llama_dir]
    r = go("intervene", "When Mary went", "--set", f"{layer}:{f}:{pos}=0", "--frozen", "--json", *common)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["frozen"] and len(d["logits"]) == 10 and d["set"] == [[layer, f, pos, 0.0]]
    r = go("transcoders", "weights", str(tmp_path / "tc"), "--feature", "2:3", "--top", "4", "--model", tiny_llama_dir, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert len(d["inputs"]) == 4 and all(x["layer"] < 2 for x in d["inputs"])
    for args, needle in ((["intervene", "When Mary went", "--set", "0:1=3", *common], "LAYER:FEATURE:POS"),
                         (["intervene", "When Mary went", "--set", "0:1:99=3", *common], "position 99"),
                         (["intervene", "When Mary went", "--set", "0:1:1=abc", *common], "=VALUE"),
                         (["transcoders", "weights", str(tmp_path / "tc"), "--feature", "9:0", "--model", tiny_llama_dir], "out of range")):
        r = go(*args)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_progress_bar_counts_every_backward_pass(tiny_llama):
    """The bar's total is the number of backward passes, whatever the mix of logit and feature
    batches (it once overran: '5/4 pass'), with and without the cap, and for a target feature."""
    from mechscope.progress import Recorder

    tset = random_transcoders(tiny_llama, d_sae=40, k=6, seed=2)
    toks = _prompt(tiny_llama, seed=3)
    full = attribute(tiny_llama, tset, toks, max_features=10_000, batch_size=16)
    layer, pos = int(full.features[-1, 0]), int(full.features[-1, 1])
    f = int(full.features[-1, 2])
    for kw in (dict(max_features=10_000, batch_size=7), dict(max_features=20, batch_size=8),
               dict(max_features=10_000, batch_size=5, target_feature=(layer, f, pos))):
        rec = Recorder()
        g = attribute(tiny_llama, tset, toks, progress=rec, **kw)
        (bar,) = [p for p in rec.phases if p.name == "attribution backward passes"]
        assert bar.count == bar.total == g.settings["backward_passes"], (kw, bar.count, bar.total)
