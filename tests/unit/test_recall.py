"""Recall analyses on tiny random models: the intervention engine, causal tracing, attention
knockout, extraction, enrichment helpers and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.models.prompt import encode_prompt, subject_positions
from mechscope.recall import RecallConfig, attention_knockout, attribute_extraction, causal_trace, recall
from mechscope.recall.aggregate import aggregate
from mechscope.recall.categories import position_categories
from mechscope.recall.engine import Row, clean_states, run_rows
from mechscope.recall.enrichment import attribute_rate, normalise
from mechscope.recall.knockout import key_groups

PROMPT = "Then, Alice and Bob went to the park. Bob gave a ball to"
SUBJECT = "Bob gave"
EVIL = "<script>alert(1)</script>"


@pytest.fixture
def setup(tiny_model):
    tokens = encode_prompt(tiny_model, PROMPT)
    spos = subject_positions(tiny_model, PROMPT, SUBJECT)
    target = int(tiny_model(tokens)[0, -1].argmax())
    return tiny_model, tokens, spos, target


def _clean_prob(model, tokens, target):
    return float(model(tokens)[0, -1].detach().float().softmax(-1)[target])


def test_no_intervention_is_the_clean_run(setup):
    m, tokens, _, t = setup
    assert abs(float(run_rows(m, tokens, t, [Row()])[0]) - _clean_prob(m, tokens, t)) < 1e-5


def test_restoration_undoes_the_noise_exactly_where_it_must(setup):
    m, tokens, spos, t = setup
    L, P, D = m.summary.n_layers, tokens.shape[1], m.summary.d_model
    hooks = ["blocks.0.hook_resid_pre", f"blocks.{L - 1}.hook_resid_post", "blocks.0.hook_mlp_out"]
    clean = clean_states(m, tokens, hooks)
    bank = torch.randn(1, len(spos), D) * 5
    rows = [
        Row(noise=0),  # corrupted
        Row(noise=0, restore={"blocks.0.hook_resid_pre": spos}),  # undoes the noise entirely
        Row(noise=0, restore={f"blocks.{L - 1}.hook_resid_post": [P - 1]}),  # last state restored
        Row(noise=0, restore={"blocks.0.hook_mlp_out": list(range(spos[0]))}),  # before the subject: no-op
    ]
    p = run_rows(m, tokens, t, rows, noise_pos=spos, noise_bank=bank, clean=clean, max_rows=2)
    clean_p = _clean_prob(m, tokens, t)
    assert abs(float(p[0]) - clean_p) > 1e-4  # the noise does something
    assert abs(float(p[1]) - clean_p) < 1e-5 and abs(float(p[2]) - clean_p) < 1e-5
    assert abs(float(p[3]) - float(p[0])) < 1e-6


def test_causal_trace_shapes_and_anchors(setup):
    m, tokens, spos, t = setup
    cfg = RecallConfig(samples=2, layer_stride=1)
    tr = causal_trace(m, tokens, spos, t, noise_std=2.0, cfg=cfg)
    L, P = m.summary.n_layers, tokens.shape[1]
    assert set(tr.restored) == {"resid", "mlp", "attn"} and tr.restored["resid"].shape == (L, P)
    assert abs(tr.restored["resid"][L - 1, P - 1] - tr.clean_prob) < 1e-5  # last state restored = clean
    assert torch.all(tr.restored["mlp"][:, : spos[0]] == tr.corrupt_prob)
    assert abs(tr.clean_prob - _clean_prob(m, tokens, t)) < 1e-5
    strided = causal_trace(m, tokens, spos, t, noise_std=2.0, cfg=RecallConfig(samples=2, layer_stride=2, kinds=("resid",)))
    assert strided.layers == list(range(0, L, 2))
    assert torch.allclose(strided.restored["resid"], tr.restored["resid"][::2], atol=1e-6)  # same noise, same rows


def test_knockout_of_nothing_is_clean_and_scores_hook_matches_pattern_renormalisation(setup):
    m, tokens, spos, t = setup
    clean_p = _clean_prob(m, tokens, t)
    P = tokens.shape[1]
    assert abs(float(run_rows(m, tokens, t, [Row(block={0: []})])[0]) - clean_p) < 1e-5
    keys = [0, 2]
    p_block = float(run_rows(m, tokens, t, [Row(block={1: keys})])[0])
    assert abs(p_block - clean_p) > 1e-5

    def renorm(pat, hook):  # independent: zero the edges in the pattern and renormalise the row
        pat = pat.clone()
        pat[:, :, -1, keys] = 0
        pat[:, :, -1] /= pat[:, :, -1].sum(-1, keepdim=True)
        return pat

    with torch.no_grad():
        logits = m.bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_pattern", renorm)])
    assert abs(float(logits[0, -1].float().softmax(-1)[t]) - p_block) < 1e-5
    ko = attention_knockout(m, tokens, spos, t, RecallConfig(knockout_window=1))
    assert set(ko.relative_change) <= {"subject", "non_subject", "non_subject_matched", "first", "last"}
    assert ko.relative_change["subject"].shape == (m.summary.n_layers,) and ko.layers == list(range(m.summary.n_layers))
    assert P - 1 not in sum(ko.positions.values(), []) or ko.positions["last"] == [P - 1]


def test_key_groups():
    g = key_groups(10, [3, 4, 5], seed=1)
    assert g["subject"] == [3, 4, 5] and g["non_subject"] == [0, 1, 2, 6, 7, 8] and g["first"] == [0] and g["last"] == [9]
    assert len(g["non_subject_matched"]) == 3 and not set(g["non_subject_matched"]) & {0, 3, 4, 5, 9}
    g0 = key_groups(6, [0, 1], seed=0)
    assert "first" not in g0 and g0["subject"] == [0, 1]


def test_position_categories_partition_the_prompt():
    for n, s in [(10, [3, 4, 5]), (6, [0]), (5, [1, 2, 3, 4]), (7, [2, 3])]:
        cats = position_categories(n, s)
        allp = sorted(p for v in cats.values() for p in v)
        assert allp == list(range(n)), (n, s, cats)
    c = position_categories(10, [3, 4, 5])
    assert c["last_subject"] == [5] and c["first_subsequent"] == [6] and c["further"] == [7, 8] and c["last_token"] == [9]


def test_extraction_ranks_agree_with_the_models_own_final_norm(setup):
    m, tokens, _, t = setup
    ex = attribute_extraction(m, tokens, t)
    _, cache = m.bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_attn_out"))
    for l in range(m.summary.n_layers):
        x = cache[f"blocks.{l}.hook_attn_out"][0, -1]
        logits = m.bridge.ln_final(x[None, None])[0, 0] @ m.bridge.W_U
        if m.bridge.b_U is not None:
            logits = logits + m.bridge.b_U
        assert int((logits > logits[t]).sum()) == int(ex.attn_rank[l])
        assert int(logits.argmax()) == int(ex.attn_top[l])


def test_enrichment_measure():
    assert normalise(" Paris") == "paris" and normalise(" the") == "" and normalise("12") == "" and normalise(" ab") == ""
    rate = attribute_rate([[" Paris", " France", " the", "x"], [" Berlin", " a", ",", ";"]], {"paris", "france"})
    assert rate.tolist() == [0.5, 0.0]


def test_greedy_continuations_stop_at_the_models_context(tiny_gpt2):
    """The subject-enrichment generations of a short-context model stop where its learned
    positions end (they ran past them: an IndexError), and match step-by-step argmax before."""
    from mechscope.recall.engine import greedy_continuations

    n_ctx = tiny_gpt2.summary.n_ctx  # 64 learned positions
    long = " ".join(["Mary"] * (n_ctx - 3))
    n_long = len(tiny_gpt2.to_tokens(long))
    assert n_long < n_ctx
    short, near = greedy_continuations(tiny_gpt2, ["When Mary and John", long], 24)
    assert len(short) == 24 and len(near) == n_ctx - n_long
    ids = tiny_gpt2.to_tokens("When Mary and John")
    with torch.no_grad():
        for t in short[:3]:
            nxt = int(tiny_gpt2(torch.tensor([ids]))[0, -1].argmax())
            assert nxt == t
            ids.append(nxt)
    assert greedy_continuations(tiny_gpt2, [" ".join(["Mary"] * (n_ctx + 5))], 4) == [[]]  # no room: nothing, no crash


def test_recall_one_fact_and_aggregate(tiny_llama):
    cfg = RecallConfig(samples=1, gen_tokens=4)
    r = recall(tiny_llama, PROMPT, SUBJECT, cfg=cfg)
    d = r.to_dict()
    assert {"causal_tracing", "attention_knockout", "attribute_extraction", "subject_enrichment"} <= set(d)
    json.dumps(d)  # plain JSON
    agg = aggregate([r, r], tiny_llama.summary.n_layers)
    last = agg["causal_tracing"]["by_category"]["resid"]["last_token"]
    assert last["n"] == 2 and len(last["recovered"]) == tiny_llama.summary.n_layers
    assert agg["headline"]["knockout"]["all"]["subject"]["min"]["value"] <= 1


@pytest.mark.slow
def test_cli_recall_json_report_and_errors(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "r"
    r = CliRunner().invoke(app, ["recall", f"{EVIL} {PROMPT}", "--subject", SUBJECT, "--model", tiny_gpt2_dir,
                                 "--samples", "1", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["kind"] == "recall" and len(d["causal_tracing"]["restored_prob"]["mlp"]) == 2
    html = (out / "report.html").read_text()
    assert "<script" not in html and "&lt;script&gt;" in html
    assert (out / "recall.json").is_file() and (out / "recall.safetensors").is_file()
    for args, needle in [
        ([PROMPT, "--subject", "Carol"], "does not occur in the prompt"),
        ([PROMPT, "--subject", SUBJECT, "--target", " Maryxqz"], "splits into"),
        (["Bob " * 80, "--subject", "Bob"], "context"),
        (["--dataset", "wiki"], "Unknown dataset"),
        ([PROMPT], "--subject"),
    ]:
        bad = CliRunner().invoke(app, ["recall", *args, "--model", tiny_gpt2_dir, "--out", str(tmp_path / "x")])
        assert bad.exit_code == 2 and needle in bad.output and "Traceback" not in bad.output, (args, bad.output)
