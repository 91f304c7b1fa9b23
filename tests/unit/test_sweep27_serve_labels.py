"""Sweep 27: attribution-graph logit labels of padded vocabulary rows, vision circuits in
``mechscope serve``, the sign-worded heads ablation line, the tuned-lens timing line."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mechscope.features.attribute import AttributionGraph
from mechscope.features.graph_files import graph_json
from mechscope.features.prune import prune


# ---- 1: logit labels use token_texts -------------------------------------------------------------
def _graph(logit_tokens: list[int]) -> AttributionGraph:
    """A hand-made graph: 2 positions, 1 layer, 1 feature, the given logit nodes (all kept)."""
    F, L, P, K = 1, 1, 2, len(logit_tokens)
    n = F + L * P + P + K
    A = torch.zeros(n, n)
    A[0, F + L * P] = 1.0  # token 0 -> feature
    A[F + L * P + P:, 0] = 0.5  # feature -> every logit
    A[F + L * P + P:, F + L * P + 1] = 0.25  # token 1 -> every logit
    probs = torch.linspace(0.5, 0.006, K)
    return AttributionGraph(tokens=torch.tensor([1, 2]), token_text=["a", "b"], features=torch.tensor([[0, 1, 3]]),
                            activations=torch.tensor([1.0]), logit_tokens=torch.tensor(logit_tokens), logit_probs=probs,
                            adjacency=A, n_layers=L, first_pos=0, error_norms=torch.zeros(L, P), n_active=1)


def _logit_labels(doc: dict) -> dict[int, str]:
    return {n["feature"]: n["clerp"] for n in doc["nodes"] if n["feature_type"] == "logit"}


def test_padded_vocabulary_logits_are_labelled_unused(tiny_gpt2):
    """The tiny GPT-2 unembeds 512 rows for a tokenizer of fewer tokens; ids past it decode to ''."""
    tok = tiny_gpt2.tokenizer
    n_real = len(tok)
    assert tiny_gpt2.summary.d_vocab > n_real + 2
    pad_a, pad_b = n_real + 1, tiny_gpt2.summary.d_vocab - 3
    assert tok.decode([pad_a]) == "" and tok.decode([pad_b]) == ""
    real = tok("Paris", add_special_tokens=False)["input_ids"][0]
    g = _graph([real, pad_a, pad_b])
    labels = _logit_labels(graph_json(g, prune(g), tok, "t", "a b", "scan", 0.8))
    assert labels[pad_a].startswith(f'Output "<unused id {pad_a}>" (p=')
    assert labels[pad_b].startswith(f'Output "<unused id {pad_b}>" (p=')
    assert labels[real].startswith(f'Output "{tok.decode([real])}" (p=')
    assert not any('Output ""' in v for v in labels.values())


def test_sentencepiece_logit_labels_keep_the_word_start_space():
    from conftest import _spm_tokenizer

    tok = _spm_tokenizer(["a Mary went to a store and Mary came back to Mary"] * 20)  # "a": token_texts' anchor
    mary = tok.convert_tokens_to_ids("▁Mary")
    assert tok.decode([mary]) == "Mary"  # decode alone drops the space, token_texts keeps it
    g = _graph([mary])
    labels = _logit_labels(graph_json(g, prune(g), tok, "t", "a b", "scan", 0.8))
    assert labels[mary].startswith('Output " Mary" (p=')


# ---- 2: vision circuits in serve --------------------------------------------------------------
starlette = pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from mechscope.server.app import create_app  # noqa: E402
from mechscope.server.runs import find_runs  # noqa: E402


def _vision_circuit(folder, pool_images: int = 0):
    """A circuit.json as ``mechscope vision circuit`` writes it (``VisionCircuit.save``): 8 units
    over 3 sites; ``pool_images`` reference images make the file large."""
    from mechscope.vision.circuit import VisionCircuit

    sites = {"conv0": {"kind": "conv", "n_units": 16}, "conv1": {"kind": "conv", "n_units": 16},
             "fc0": {"kind": "linear", "n_units": 8}}
    units = {"conv0": [2, 15, 7], "conv1": [4, 0, 9], "fc0": [1, 5]}
    scores = {s: [round(0.01 * (i + 1) * (3 - k), 4) for i in range(v["n_units"])] for k, (s, v) in enumerate(sites.items())}
    circ = VisionCircuit(concept={"name": "stripes", "target": 1, "target_name": "zebra"},
                         model={"path": "m", "arch": "cnn", "classes": ["a", "zebra"], "sites": sites},
                         settings={"k": 3}, units=units, scores=scores, edges={s: [] for s in sites},
                         pool=[[[i % 256] * 28 for _ in range(28)] for i in range(pool_images)])
    circ.save(folder)
    (folder / "report.html").write_text("<!DOCTYPE html><title>vision circuit</title>")
    return circ


@pytest.fixture
def vision_root(tmp_path):
    root = tmp_path / "runs"
    _vision_circuit(root / "vision" / "small")
    _vision_circuit(root / "vision" / "big", pool_images=600)
    assert (root / "vision" / "big" / "circuit.json").stat().st_size > (1 << 20)
    lang = root / "lang"
    lang.mkdir()
    (lang / "circuit.json").write_text(json.dumps({"schema_version": 1, "nodes": [
        {"name": "m1", "layer": 1, "head": None, "type": "mlp", "score": 0.5, "in_circuit": True}], "edges": []}))
    return root


def test_vision_circuit_runs_have_their_own_kind(vision_root):
    assert [(r.name, r.kind) for r in find_runs(vision_root)] == [
        ("lang", "circuit"), ("vision/big", "vision circuit"), ("vision/small", "vision circuit")]
    client = TestClient(create_app(vision_root))
    runs = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert runs["vision/small"]["kind"] == "vision circuit" and runs["vision/small"]["has_nodes"]
    html = client.get("/runs").text
    assert "<td>vision circuit</td>" in html
    assert "vision circuit" in client.get("/run/vision/small").text


@pytest.mark.parametrize("name", ["vision/small", "vision/big"])
def test_vision_circuit_nodes_page_lists_its_units(vision_root, name):
    client = TestClient(create_app(vision_root))
    r = client.get(f"/run/{name}/nodes")
    assert r.status_code == 200
    html = r.text
    assert "0 nodes" not in html and "8 nodes in the circuit" in html
    names = re.findall(r"<tr><td><code>([^<]+)</code>", html)
    assert names == ["conv0:2", "conv0:15", "conv0:7", "conv1:4", "conv1:0", "conv1:9", "fc0:1", "fc0:5"]
    assert "linear unit" in html and "conv unit" in html
    assert 'class="unit-link"' not in html and 'class="layer-link"' not in html  # vision units have no unit pages
    # the language circuit beside it still reads as one
    assert re.findall(r"<tr><td><code>([^<]+)</code>", client.get("/run/lang/nodes").text) == ["m1"]


def test_malformed_vision_circuit_is_a_404(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "circuit.json").write_text(json.dumps({"schema_version": 1, "kind": "vision-circuit", "units": [1, 2]}))
    client = TestClient(create_app(tmp_path))
    r = client.get("/run/bad/nodes")
    assert r.status_code == 404 and "circuit.json" in r.text


# ---- 3: heads ablation line worded by sign ----------------------------------------------------
def test_heads_ablation_sentence_words_the_sign():
    from mechscope.cli.heads import ablation_sentence

    down = ablation_sentence({"k": 3, "top_k_increase": -0.012, "random_mean_increase": 0.004, "random_increases": [0.0] * 5})
    assert "lowers the repeated-half loss by 0.012 nats" in down and "by -" not in down and "raises" not in down
    assert "3 random heads raise it by 0.004 (mean of 5)" in down
    up = ablation_sentence({"k": 2, "top_k_increase": 0.5, "random_mean_increase": -0.02, "random_increases": [0.0] * 4})
    assert "raises the repeated-half loss by 0.500 nats" in up and "2 random heads lower it by 0.020" in up
    assert "+" not in up and "by -" not in up


# ---- 4: tuned-lens timing line ----------------------------------------------------------------
def _secs(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"([\d.]+) s\b", text)]


@pytest.mark.parametrize("total,cf,kl", [(1.3, 0.6, 0.7), (0.9, 0.45, 0.4), (12.34, 8.9, 3.2), (250.4, 200.6, 49.5)])
def test_tuned_lens_timing_parts_never_exceed_the_whole(total, cf, kl):
    from mechscope.cli.tuned_lens import train_timing

    line = train_timing(total, cf, kl)
    t, a, b = _secs(line)
    assert a <= t and b <= t, line
    assert a + b <= t + (0.1 if total < 100 else 1), line
    if total < 100:
        assert line.startswith(f"{total:.1f} s (closed form {cf:.1f} s, KL {kl:.1f} s)")
    assert "this session" in train_timing(total, cf, kl, resume=True)


def test_tuned_lens_sub_second_times_show_a_decimal():
    from mechscope.cli.tuned_lens import train_timing

    assert train_timing(1.3, 0.6, 0.5) == "1.3 s (closed form 0.6 s, KL 0.5 s)"
