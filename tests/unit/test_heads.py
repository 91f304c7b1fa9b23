"""Head taxonomy on tiny random models: each score against an independent computation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.heads import (
    HeadsConfig,
    HeadsResult,
    ablation,
    composition,
    copying,
    head_scores,
    icl,
    patterns,
    sequences,
)
from mechscope.heads.weights import head_weights


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.flatten().argsort().argsort().float(), b.flatten().argsort().argsort().float()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def test_target_masks_match_definitions():
    t = torch.tensor([[0, 5, 6, 7, 5, 6, 8, 5]])
    m = patterns.target_masks(t)
    p = t.shape[1]
    for q in range(p):
        for k in range(p):
            tq, tk = int(t[0, q]), int(t[0, k])
            assert bool(m["previous_token"][0, q, k]) == (k == q - 1 and k >= 1)
            assert bool(m["duplicate_token"][0, q, k]) == (k < q and k >= 1 and tk == tq)
            assert bool(m["induction"][0, q, k]) == (1 <= k <= q and int(t[0, k - 1]) == tq and k - 1 < q)


def test_pattern_scores_agree_with_transformer_lens_head_detector(tiny_model):
    """Same sequences, same BOS exclusion: TL's detect_head ranks the heads as we do."""
    from transformer_lens.head_detector import detect_head

    b = tiny_model.bridge
    text = "When Mary and John went to the store, John gave a drink to Mary. " * 2
    toks = b.to_tokens(text).cpu()
    mine = patterns.pattern_scores(tiny_model, toks)
    for ours, theirs in (("previous_token", "previous_token_head"), ("duplicate_token", "duplicate_token_head"),
                         ("induction", "induction_head")):
        tl = detect_head(b, text, theirs, exclude_bos=True)
        assert spearman(mine[ours], tl) > 0.9, ours


def test_pattern_score_is_attention_share(tiny_gpt2):
    """The previous-token score equals the share computed directly from the cached pattern."""
    toks = sequences.repeated_random(tiny_gpt2, 3, 6)
    s = patterns.pattern_scores(tiny_gpt2, toks)
    _, cache = tiny_gpt2.bridge.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_pattern"))
    A = cache["blocks.1.attn.hook_pattern"][:, 2]  # [b, q, k]
    q = torch.arange(2, toks.shape[1])
    want = A[:, q, q - 1].sum() / A[:, 2:, 1:].sum()
    assert float(s["previous_token"][1, 2]) == pytest.approx(float(want), rel=1e-4)


def test_repeated_random_and_length_check(tiny_gpt2):
    toks = sequences.repeated_random(tiny_gpt2, 4, 7, seed=1)
    assert toks.shape == (4, 15) and (toks[:, 1:8] == toks[:, 8:]).all()
    with pytest.raises(MechscopeError, match="beyond the model's context of 64"):
        sequences.repeated_random(tiny_gpt2, 2, 40)


def test_folded_weights_reproduce_values(tiny_model):
    """hook_v equals normalised residual @ folded W_V (+ the bias terms the fold drops)."""
    m = tiny_model
    toks = sequences.repeated_random(m, 2, 5)
    _, cache = m.bridge.run_with_cache(toks)
    w = head_weights(m)
    l = 1
    x = cache[f"blocks.{l}.hook_resid_pre"]  # [b, p, d]
    norm = m.bridge.blocks[l].ln1.original_component
    if isinstance(norm, torch.nn.LayerNorm):
        xc = x - x.mean(-1, keepdim=True)
        xs = x / (xc.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
        bias = norm.bias @ m.bridge.blocks[l].attn.W_V + m.bridge.blocks[l].attn.b_V  # [G, e]
    else:
        xs = x / (x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()
        bias = 0.0
    v = torch.einsum("bpd,gde->bpge", xs, w.W_V[l]) + bias
    got = cache[f"blocks.{l}.attn.hook_v"]
    if got.shape[2] != v.shape[2]:  # some bridges expand KV heads to query heads
        v = v[:, :, [w.kv_group(h) for h in range(w.n_heads)]]
    torch.testing.assert_close(got, v, atol=1e-4, rtol=1e-4)


def test_copying_scores_match_full_ov_matrix(tiny_model):
    w = head_weights(tiny_model)
    eig = copying.eigen_copying(w)
    toks = copying.copying_tokens(tiny_model, 60)
    top1 = copying.top1_copying(w, toks)
    for l, h in [(0, 0), (1, 3)]:
        full = w.W_E @ w.W_V[l][w.kv_group(h)] @ w.W_O[l][h] @ w.W_U  # [vocab, vocab]
        # the vocab-sized circuit's non-zero spectrum, from its d_model-sized cyclic version
        # (a 512 x 512 eigensolve takes tens of seconds here); the trace ties it to `full`
        dm = (w.W_V[l][w.kv_group(h)] @ w.W_O[l][h] @ w.W_U @ w.W_E).double()  # [d_model, d_model]
        ev = torch.linalg.eigvals(dm)
        assert float(ev.real.sum()) == pytest.approx(float(full.double().trace()), rel=1e-4, abs=1e-4)
        assert float(eig[l, h]) == pytest.approx(float(ev.real.sum() / ev.abs().sum()), abs=1e-4)
        sub = full[toks][:, toks]
        assert float(top1[l, h]) == pytest.approx(float((sub.argmax(-1) == torch.arange(len(toks))).float().mean()))


def test_copying_detects_planted_copying_and_anti_copying_heads(tiny_gpt2):
    """OV = R R^T C^T with C = W_U W_E: W_O C W_V-side spectrum is that of a PSD matrix, so the
    head copies (score 1); the negated OV suppresses (score -1)."""
    w = head_weights(tiny_gpt2)
    d, e = w.W_O[0].shape[2], w.W_O[0].shape[1]
    R = torch.linalg.qr(torch.randn(d, e, generator=torch.Generator().manual_seed(0)))[0]  # [d, e]
    C = w.W_U @ w.W_E  # [d_model, d_model]
    w.W_V[0][1], w.W_O[0][1] = R, R.T @ C.T
    w.W_V[0][2], w.W_O[0][2] = R, -(R.T @ C.T)
    eig = copying.eigen_copying(w)
    assert float(eig[0, 1]) > 0.999 and float(eig[0, 2]) < -0.999
    assert abs(float(eig[0, 0])) < 0.99


def test_composition_matches_direct_products(tiny_llama):
    w = head_weights(tiny_llama)
    c = composition.composition_scores(w)
    fro = torch.linalg.matrix_norm
    for l1, h1, l2, h2 in [(0, 1, 1, 2), (0, 3, 2, 0), (1, 2, 2, 3)]:
        g1, g2 = w.kv_group(h1), w.kv_group(h2)
        OV1 = w.W_V[l1][g1] @ w.W_O[l1][h1]
        QK2 = w.W_Q[l2][h2] @ w.W_K[l2][g2].T
        OV2 = w.W_V[l2][g2] @ w.W_O[l2][h2]
        assert float(c["q"][l1, h1, l2, h2]) == pytest.approx(float(fro(OV1 @ QK2) / fro(OV1) / fro(QK2)), rel=1e-4)
        assert float(c["k"][l1, h1, l2, h2]) == pytest.approx(float(fro(OV1 @ QK2.T) / fro(OV1) / fro(QK2)), rel=1e-4)
        assert float(c["v"][l1, h1, l2, h2]) == pytest.approx(float(fro(OV1 @ OV2) / fro(OV1) / fro(OV2)), rel=1e-4)
    assert float(c["k"][2, 0, 1, 0]) == 0.0  # later -> earlier layer: no composition
    assert len(composition.top_pairs(c["k"], 5)) == 5


def test_mean_ablation_properties(tiny_gpt2):
    toks = sequences.repeated_random(tiny_gpt2, 6, 8)
    means = ablation.head_means(tiny_gpt2, toks)
    clean = ablation.ablated_loss(tiny_gpt2, toks, 8, [], means)
    with torch.no_grad():
        logits = tiny_gpt2.bridge(toks)
    assert clean == pytest.approx(float(ablation.repeated_half_loss(logits, toks, 8)), rel=1e-5)
    # a batch of one sequence: its mean is itself, so ablation changes nothing
    one = toks[:1]
    m1 = ablation.head_means(tiny_gpt2, one)
    base = ablation.ablated_loss(tiny_gpt2, one, 8, [], m1)
    assert ablation.ablated_loss(tiny_gpt2, one, 8, [(0, 1), (1, 2)], m1) == pytest.approx(base, abs=1e-5)
    # on the batch, ablating every head changes the loss
    every = [(l, h) for l in range(2) for h in range(4)]
    assert abs(ablation.ablated_loss(tiny_gpt2, toks, 8, every, means) - clean) > 1e-5  # a no-op ablation gives exactly 0


def test_icl_score_is_late_minus_early(tiny_gpt2):
    toks = sequences.repeated_random(tiny_gpt2, 4, 20)  # [4, 41]
    per = icl.per_token_loss(tiny_gpt2, toks)
    assert per.shape == (40,)
    torch.testing.assert_close(patterns.pattern_scores(tiny_gpt2, toks, with_loss=True)["token_loss"], per, atol=1e-4, rtol=1e-4)
    r = icl.icl_score(tiny_gpt2, toks, prefix_len=1, early=3, late=30, window=2)
    assert r["icl_score"] == pytest.approx(float(per[30:32].mean() - per[3:5].mean()), abs=1e-5)


def test_head_scores_end_to_end_and_roundtrip(tiny_llama, tmp_path):
    res = head_scores(tiny_llama, HeadsConfig(n=6, seq_len=8, n_text=3, text_len=40, text="pydoc", copy_tokens=50,
                                              ablate=-1, top_k=2, n_random=2))
    assert set(res.scores) >= {"previous_token", "duplicate_token", "induction", "copying_eigen", "copying_top1",
                               "ablation", "text_induction"}
    assert res.scores["induction"].shape == (3, 4)
    assert not torch.isnan(res.scores["ablation"]).any()  # ablate=-1: every head
    assert res.composition["k"].shape == (3, 4, 3, 4)
    res.save(tmp_path)
    back = HeadsResult.load(tmp_path)
    torch.testing.assert_close(back.scores["induction"], res.scores["induction"])
    d = json.loads((tmp_path / "heads.json").read_text())
    assert d["schema_version"] == 1 and d["model"]["n_kv_heads"] == 2 and "top_heads" in d


def test_heads_report_escapes_tokens(tiny_gpt2, tmp_path):
    from mechscope.report.heads import write_heads

    res = head_scores(tiny_gpt2, HeadsConfig(n=4, seq_len=6, n_text=2, text_len=30, text="pydoc", copy_tokens=30,
                                             ablate=2, top_k=2, n_random=1))
    res.example_tokens[1] = "<script>alert(1)</script>"
    html = write_heads({**res.to_dict(), "example_patterns": res.example_patterns.tolist()}, tmp_path / "heads.html").read_text()
    assert "<script>alert(1)" not in html
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert html.count("<svg") >= len(res.scores)


def test_no_attention_heads_is_a_clear_error():
    fake = SimpleNamespace(bridge=SimpleNamespace(hook_dict={"blocks.0.hook_resid_pre": None}),
                           summary=SimpleNamespace(n_layers=1, n_heads=1, name="fake"))
    with pytest.raises(MechscopeError, match="no attention heads"):
        head_scores(fake)


def test_cli_bad_input_exits_2(tiny_gpt2_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mechscope.cli import heads as heads_cli
    from mechscope.cli.main import app

    r = CliRunner().invoke(app, ["heads", "--model", tiny_gpt2_dir, "--seq-len", "40", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "beyond the model's context" in r.output and "Traceback" not in r.output
    fake = SimpleNamespace(bridge=SimpleNamespace(hook_dict={}), summary=SimpleNamespace(n_layers=2, n_heads=0, name="fake"))
    monkeypatch.setattr(heads_cli, "load", lambda *a, **k: fake)
    r = CliRunner().invoke(app, ["heads", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "no attention heads" in r.output


def test_cli_heads_json(tiny_gpt2_dir, tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    r = CliRunner().invoke(app, ["heads", "--model", tiny_gpt2_dir, "--n", "4", "--seq-len", "6", "--n-text", "2",
                                 "--text-len", "30", "--text", "pydoc", "--ablate", "2", "--top-k", "2",
                                 "--out", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert set(d["top_heads"]) >= {"previous-token", "induction", "copying"}
    assert (tmp_path / "heads.html").is_file() and (tmp_path / "heads.safetensors").is_file()
    assert not (tmp_path / "heads-partial").exists()  # the steps go once heads.json is written


def test_cli_heads_context_rule_is_the_activation_stores(tiny_gpt2_dir, tmp_path):
    """One rule for every length (README): learned positions (GPT-2, 64 here) refuse a longer text
    window or repeated sequence; a rotary Llama of max_position_embeddings 32 runs on past it, as
    `sae train` and `exemplars` let it, and its default text window fits its context."""
    import sys
    from pathlib import Path

    from typer.testing import CliRunner

    from mechscope.cli.main import app

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
    from short_context import save_short

    small = ["--n", "2", "--n-text", "2", "--ablate", "1", "--top-k", "1", "--text", "pydoc", "--json"]
    for opts in (["--text-len", "64"], ["--seq-len", "32"]):
        r = CliRunner().invoke(app, ["heads", "--model", tiny_gpt2_dir, *opts, *small, "--out", str(tmp_path / "g")])
        assert r.exit_code == 2 and "beyond the model's context of 64" in r.stderr and "Traceback" not in r.output, r.output
    llama = save_short("llama", tmp_path / "llama")
    r = CliRunner().invoke(app, ["heads", "--model", llama, "--seq-len", "20", "--text-len", "40", *small, "--out", str(tmp_path / "l")])
    assert r.exit_code == 0, r.output  # 41 tokens of text and of repeated sequence, past 32: rotary
    r = CliRunner().invoke(app, ["heads", "--model", llama, "--seq-len", "4", *small, "--out", str(tmp_path / "d")])
    assert r.exit_code == 0, r.output


def test_head_weights_are_copies(tiny_gpt2):
    """Editing the returned weights (as the copying test does) must not change the model."""
    before = tiny_gpt2.bridge(torch.tensor([[1, 2, 3, 4]])).detach()
    w = head_weights(tiny_gpt2)
    w.W_O[0].mul_(0.0)
    w.W_E.mul_(0.0)
    assert torch.equal(tiny_gpt2.bridge(torch.tensor([[1, 2, 3, 4]])).detach(), before)


def test_settings_that_would_make_ablation_meaningless_are_refused():
    from mechscope.heads.config import HeadsConfig

    for kw, needle in (({"n": 1}, "--n 1 leaves mean ablation nothing to average"), ({"top_k": -1}, "--top-k must be at least 1"),
                       ({"top_k": 0}, "--top-k must be at least 1"), ({"ablate": -2}, r"at least 0 \(-1: every head\)")):
        with pytest.raises(MechscopeError, match=needle):
            HeadsConfig(**kw)
    HeadsConfig(n=2, top_k=1, ablate=-1)


def test_text_windows_of_unknown_tokens_are_refused(tiny_gpt2):
    """A word-level vocabulary (a train-toy checkpoint's) reads English as <unk> throughout:
    its text scores and ICL score would be scored on windows of one token, so it is refused."""
    from mechscope.heads import sequences

    class Tok:
        unk_token_id = 7
        bos_token_id = None

        def __call__(self, text):
            return {"input_ids": [7] * len(text.split())}

        def __len__(self):
            return 16

    model = SimpleNamespace(tokenizer=Tok(), summary=tiny_gpt2.summary)
    docs = ["the quick brown fox jumps over the lazy dog " * 20]
    with pytest.raises(MechscopeError, match="100% of the text windows' tokens are unknown"):
        sequences.text_windows(model, docs, 2, 16)
    real = sequences.text_windows(tiny_gpt2, docs, 2, 16)  # a real vocabulary passes
    assert real.shape[0] == 2


def test_a_checkpointed_head_scoring_resumes_only_the_missing_steps(tiny_llama, tmp_path, monkeypatch):
    import importlib

    mod = importlib.import_module("mechscope.heads.scores")
    cfg = HeadsConfig(n=6, seq_len=8, n_text=3, text_len=40, text="pydoc", copy_tokens=50, ablate=-1, top_k=2, n_random=2)
    straight = head_scores(tiny_llama, cfg)
    first = head_scores(tiny_llama, cfg, checkpoint=tmp_path)
    steps = tmp_path / "heads-partial"
    assert sorted(p.name for p in steps.iterdir()) == ["ablation.safetensors", "composition.safetensors", "copying.safetensors",
                                                      "key.json", "patterns.safetensors", "text-patterns.safetensors",
                                                      "topk-vs-random.json"]

    def same(a, b) -> None:
        assert a.to_dict() == b.to_dict() and a.icl == b.icl and a.ablation == b.ablation
        assert set(a.scores) == set(b.scores) and set(a.composition) == set(b.composition)
        for k in b.scores:  # bit for bit (NaN where a head was not ablated)
            torch.testing.assert_close(a.scores[k], b.scores[k], rtol=0, atol=0, equal_nan=True)
        for k in b.composition:
            torch.testing.assert_close(a.composition[k], b.composition[k], rtol=0, atol=0, equal_nan=True)

    same(first, straight)
    for name in ("ablation.safetensors", "topk-vs-random.json", "composition.safetensors"):  # a kill during the ablations
        (steps / name).unlink()
    calls = {"pattern_scores": 0, "ablation_effects": 0}
    for module, name in ((mod.patterns, "pattern_scores"), (mod.ablation, "ablation_effects")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name, **k: calls.__setitem__(_name, calls[_name] + 1) or _real(*a, **k))
    resumed = head_scores(tiny_llama, cfg, checkpoint=tmp_path)
    assert calls == {"pattern_scores": 0, "ablation_effects": 1}
    same(resumed, straight)
    other = head_scores(tiny_llama, HeadsConfig(**{**cfg.to_dict(), "seed": 1}), checkpoint=tmp_path)
    assert calls["pattern_scores"] == 2 and not torch.equal(other.scores["induction"], straight.scores["induction"])
