"""Labelled circuits on tiny random models: roles against independently computed head scores,
the head-score cache (reused, invalidated), where heads attend on the example, escaping in the
report, and circuit.json with and without labels."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.circuits import labels as L
from mechscope.circuits.result import CircuitResult
from mechscope.errors import MechscopeError
from mechscope.graph import build_graph
from mechscope.heads import HeadsConfig, copying, head_scores, patterns, sequences
from mechscope.heads.weights import head_weights
from mechscope.tasks.base import Pair, tokenize_pairs

CFG = HeadsConfig(n=6, seq_len=8, n_text=1, text_len=16, text="pydoc", copy_tokens=64, ablate=1, top_k=1,
                  n_random=1, composition=False, example_len=4)
PAIRS = [Pair("When Mary and John went to the store, John gave a drink to",
              "When Alice and Bob went to the store, Bob gave a drink to", " Mary", " John")] * 2


def _batch(model):
    return tokenize_pairs(model.tokenizer, PAIRS, "ioi-mini")


def _circuit(model, k: int = 40, seed: int = 0) -> CircuitResult:
    g = build_graph(model)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(g.n_senders, g.n_receivers, generator=gen) * g.allowed
    flat = scores.abs().flatten()
    circuit = torch.zeros_like(flat, dtype=torch.bool)
    circuit[flat.topk(k).indices] = True
    return CircuitResult(model=model.summary.to_dict(), task="ioi-mini", method="eap", settings={}, graph=g,
                         scores=scores, circuit=circuit.view_as(scores) & g.allowed)


def _independent_scores(model) -> dict[str, torch.Tensor]:
    """The role scores straight from the heads module's functions."""
    rep = sequences.repeated_random(model, CFG.n, CFG.seq_len, CFG.seed)
    out = dict(patterns.pattern_scores(model, rep))
    out["copying_eigen"] = copying.eigen_copying(head_weights(model))
    return out


def test_roles_are_the_largest_factor_over_thresholds(tiny_llama, tmp_path):
    model, batch = tiny_llama, _batch(tiny_llama)
    res = _circuit(model)
    ind = _independent_scores(model)
    # thresholds at each score's median, so some heads count in a category and some do not
    th = {c: max(0.01, float(ind[s].median())) for c, s in L.ROLES.items()}
    lab = L.label_heads(model, res, batch, cache_dir=tmp_path, progress=False, cfg=CFG, thresholds=th)
    heads = [n for n in lab if n != "_meta"]
    assert heads == L.circuit_heads(res) and heads
    assert set(heads) >= {n for n in res.circuit_nodes() if n.startswith("a")}
    n_roles = 0
    for name in heads:
        l, h = (int(x) for x in name[1:].split(".h"))
        s = {c: float(ind[sc][l, h]) for c, sc in L.ROLES.items()}
        assert lab[name]["scores"] == pytest.approx(s, abs=1e-3)
        counting = {c: s[c] / th[c] for c in s if s[c] >= th[c]}
        want = max(counting, key=counting.get) if counting else None
        assert lab[name]["role"] == want, name
        assert sorted(a["role"] for a in lab[name]["also"]) == sorted(set(counting) - {want})
        n_roles += want is not None
        if want:
            assert lab[name]["text"].startswith(f"{name}: {L.ROLE_NAMES[want]} ({s[want]:.2f}")
        else:
            assert lab[name]["text"].startswith(f"{name}: no role")
    assert 0 < n_roles
    assert lab["_meta"]["thresholds"] == th and lab["_meta"]["from_cache"] is False


def test_role_scores_are_mechscope_heads_scores(tiny_gpt2):
    """role_scores runs the steps of head_scores the roles read: the same numbers."""
    full, mine = head_scores(tiny_gpt2, CFG), L.role_scores(tiny_gpt2, CFG)
    for name in (*L.ROLES.values(), "copying_top1", "bos_mass"):
        assert torch.equal(mine.scores[name], full.scores[name]), name
    assert torch.equal(mine.example_patterns, full.example_patterns)
    assert L.default_heads_config(tiny_gpt2) == HeadsConfig()  # a 64-token context fits the defaults


def test_attends_reads_the_final_position(tiny_gpt2, tmp_path):
    model, batch = tiny_gpt2, _batch(tiny_gpt2)
    res = _circuit(model)
    lab = L.label_heads(model, res, batch, cache_dir=tmp_path, progress=False, cfg=CFG)
    n = int(batch.lengths[0])
    toks = batch.clean[:1, :n]
    _, cache = model.bridge.run_with_cache(toks, names_filter=lambda s: s.endswith("hook_pattern"))
    q = n - 1
    assert lab["_meta"]["query_position"] == q and lab["_meta"]["answer"] == " Mary" and lab["_meta"]["distractor"] == " John"
    ans, wrong = int(batch.answers[0, 0]), int(batch.wrongs[0, 0])
    for name in (x for x in lab if x != "_meta"):
        l, h = (int(x) for x in name[1:].split(".h"))
        row = cache[f"blocks.{l}.attn.hook_pattern"][0, h, q]
        att = lab[name]["attends"]
        assert [a["pos"] for a in att] == row.topk(2).indices.tolist()
        assert [a["weight"] for a in att] == pytest.approx(row.topk(2).values.tolist(), abs=1e-3)
        for a in att:
            tid = int(toks[0, a["pos"]])
            kind = "answer" if tid == ans else "distractor" if tid == wrong else None
            if kind:
                assert a["kind"] == kind and a["what"].startswith(f"the {kind}")
        assert f"({att[0]['weight']:.2f})" in lab[name]["text"]


def test_describe_key_names_task_roles():
    assert L._describe_key(3, 7, " Mary", 9, answer=7, wrong=8) == ("answer", "the answer token ' Mary'")
    assert L._describe_key(5, 8, " John", 9, answer=7, wrong=8) == ("distractor", "the distractor ' John'")
    assert L._describe_key(0, 1, "<s>", 9, answer=7, wrong=8)[0] == "first"
    assert L._describe_key(9, 2, " to", 9, answer=7, wrong=8)[0] == "self"
    assert L._describe_key(4, 2, " gave", 9, answer=7, wrong=7) == ("token", "' gave' at 4")


def test_cache_is_reused_and_invalidated(tiny_gpt2, tiny_llama, tmp_path, monkeypatch):
    res, batch = _circuit(tiny_gpt2), _batch(tiny_gpt2)
    first = L.label_heads(tiny_gpt2, res, batch, cache_dir=tmp_path, progress=False, cfg=CFG)
    folder = L.cache_path(tiny_gpt2, CFG, tmp_path)
    assert (folder / "heads.json").is_file() and (folder / "heads.safetensors").is_file()
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pt"))
    assert json.loads((folder / "identity.json").read_text())["model"]["weights"] == L.weights_fingerprint(tiny_gpt2)

    def boom(*a, **k):
        raise AssertionError("head scores recomputed")

    monkeypatch.setattr(L, "role_scores", boom)
    again = L.label_heads(tiny_gpt2, res, batch, cache_dir=tmp_path, progress=False, cfg=CFG)
    assert again["_meta"]["from_cache"] is True
    # settings the role scores do not read share the entry
    unread = HeadsConfig(**{**CFG.to_dict(), "n_text": 3, "composition": True})
    assert L.label_heads(tiny_gpt2, res, batch, cache_dir=tmp_path, progress=False, cfg=unread)["_meta"]["from_cache"]
    assert {k: v for k, v in again.items() if k != "_meta"} == {k: v for k, v in first.items() if k != "_meta"}
    # another model, other settings, or a tampered identity: no reuse
    with pytest.raises(AssertionError, match="recomputed"):
        L.label_heads(tiny_llama, _circuit(tiny_llama), _batch(tiny_llama), cache_dir=tmp_path, progress=False, cfg=CFG)
    with pytest.raises(AssertionError, match="recomputed"):
        L.label_heads(tiny_gpt2, res, batch, cache_dir=tmp_path, progress=False, cfg=HeadsConfig(**{**CFG.to_dict(), "seed": 1}))
    ident = json.loads((folder / "identity.json").read_text())
    ident["model"]["weights"] = "0" * 16
    (folder / "identity.json").write_text(json.dumps(ident))
    with pytest.raises(AssertionError, match="recomputed"):
        L.label_heads(tiny_gpt2, res, batch, cache_dir=tmp_path, progress=False, cfg=CFG)


def test_cache_location_and_explicit_heads_folder(tiny_gpt2, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "env"))
    assert L.cache_root() == tmp_path / "env" / "heads"
    hr, folder, hit = L.cached_head_scores(tiny_gpt2, CFG)
    assert not hit and folder.parent == tmp_path / "env" / "heads" and folder.name.startswith("tiny_gpt2")
    saved = tmp_path / "heads-run"
    hr.save(saved)
    monkeypatch.setattr(L, "role_scores", lambda *a, **k: pytest.fail("computed"))
    lab = L.label_heads(tiny_gpt2, _circuit(tiny_gpt2), _batch(tiny_gpt2), heads=saved / "heads.json", progress=False)
    assert lab["_meta"]["heads_source"] == str(saved / "heads.json") and lab["_meta"]["heads_settings"] == L.role_settings(CFG)
    with pytest.raises(MechscopeError, match="not for"):
        L.label_heads(tiny_llama, _circuit(tiny_llama), _batch(tiny_llama), heads=saved, progress=False)


def test_unwritable_cache_only_warns(tiny_gpt2, tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    lab = L.label_heads(tiny_gpt2, _circuit(tiny_gpt2), _batch(tiny_gpt2), cache_dir=blocker / "heads", progress=False,
                        cfg=CFG)
    assert lab["_meta"]["from_cache"] is False and len(lab) > 1
    assert "could not cache head scores" in capsys.readouterr().err


def test_attention_patterns_caps_and_rounds(tiny_llama):
    model, batch = tiny_llama, _batch(tiny_llama)
    res = _circuit(model)
    ns = res.node_scores()
    heads = [f"a{l}.h{h}" for l in range(3) for h in range(4)]
    ex = L.attention_patterns(model, batch, heads, node_scores=ns, max_heads=5)
    want = sorted(heads, key=lambda n: -abs(ns[n]))[:5]
    assert list(ex["attention"]) == want and ex["n_heads"] == 12
    n = int(batch.lengths[0])
    assert ex["tokens"] == model.to_str_tokens(batch.clean[0, :n]) and ex["prompt"] == PAIRS[0].clean
    _, cache = model.bridge.run_with_cache(batch.clean[:1, :n], names_filter=lambda s: s.endswith("hook_pattern"))
    for name, m in ex["attention"].items():
        l, h = (int(x) for x in name[1:].split(".h"))
        ref = cache[f"blocks.{l}.attn.hook_pattern"][0, h]
        assert torch.tensor(m) == pytest.approx(ref, abs=6e-4)
        assert all(round(v, 3) == v for row in m for v in row)


def test_labels_saved_loaded_and_escaped_in_report(tiny_gpt2, tmp_path):
    from mechscope.report.circuit import write_circuit

    model, batch = tiny_gpt2, _batch(tiny_gpt2)
    res = _circuit(model)
    res.labels = L.label_heads(model, res, batch, cache_dir=tmp_path / "cache", progress=False, cfg=CFG,
                               thresholds={c: 0.01 for c in L.ROLES})
    res.example = L.attention_patterns(model, batch, L.circuit_heads(res), res.node_scores())
    head = next(n for n in res.labels if n != "_meta")
    evil = "<script>alert(1)</script>"
    res.labels[head]["attends"][0]["token"] = evil  # a hostile model token, in the label and the heatmap
    res.labels[head]["text"] = f"{head}: copying head (0.99), attends to the answer token '{evil}' (0.91)"
    res.example["tokens"][1] = evil
    out = tmp_path / "run"
    res.save(out)
    back = CircuitResult.load(out)
    assert back.labels == json.loads(json.dumps(res.labels)) and back.example["attention"]
    page = write_circuit(json.loads((out / "circuit.json").read_text()), out).read_text()
    assert evil not in page and page.count("<script") == 1
    assert "copying head (0.99), attends to the answer token &#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27; (0.91)" in page
    for name in res.example["attention"]:
        assert f'id="att-{name}"' in page and page.count(f'href="#att-{name}"') >= 2  # graph node + a table


def test_old_circuit_json_without_labels_loads(tiny_gpt2, tmp_path):
    res = _circuit(tiny_gpt2)
    res.save(tmp_path)
    d = json.loads((tmp_path / "circuit.json").read_text())
    assert d["labels"] is None
    del d["labels"]
    (tmp_path / "circuit.json").write_text(json.dumps(d))
    back = CircuitResult.load(tmp_path)
    assert back.labels is None and torch.equal(back.circuit, res.circuit)


def test_planted_induction_toy_is_labelled_as_built(tmp_path):
    """Ground truth: the hand-built toy's a0.h0 is a previous-token head and its a1.h0 an
    induction head that, at the last scored position, attends to the token it must predict."""
    from mechscope.circuits.toy import induction_task, planted_edges, save_induction_toy
    from mechscope.models import load_model

    toy = load_model(save_induction_toy(tmp_path / "toy"), device="cpu")
    batch = induction_task(toy.tokenizer, n=4, seq_len=10, seed=0)
    g = build_graph(toy)
    circuit = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)
    for s, r in planted_edges():
        circuit[g.sender_index(s), g.receiver_index(r)] = True
    res = CircuitResult(model=toy.summary.to_dict(), task=batch.task, method="planted", settings={}, graph=g,
                        scores=circuit.float(), circuit=circuit)
    lab = L.label_heads(toy, res, batch, cache_dir=tmp_path / "cache", progress=False, cfg=CFG)
    assert lab["a0.h0"]["role"] == "previous-token" and lab["a0.h0"]["role_score"] > 0.9
    assert lab["a1.h0"]["role"] == "induction" and lab["a1.h0"]["role_score"] > 0.9
    top = lab["a1.h0"]["attends"][0]
    assert top["kind"] == "answer" and top["weight"] > 0.9 and top["token"] == lab["_meta"]["answer"]
    assert lab["a1.h0"]["text"].startswith("a1.h0: induction head (") and "attends to the answer token" in lab["a1.h0"]["text"]
    assert lab["_meta"]["query_position"] == int(batch.positions[0].max()) and lab["_meta"]["distractor"] is None
