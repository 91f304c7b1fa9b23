"""Logit lens and direct logit attribution on tiny random GPT-2 (LayerNorm, biases) and
Llama (RMSNorm, GQA) models."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.errors import MechscopeError
from mechscope.lens import LensResult, direct_logit_attribution, run_lens
from mechscope.models import load_model
from mechscope.models.prompt import encode_prompt, single_token, subject_positions
from mechscope.models.unembed import check_matches, final_norm, project

PROMPT = "When Mary and John went to the store, John gave a drink to"
EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def biased_gpt2(tiny_gpt2_dir):
    """The tiny GPT-2 with random non-zero biases everywhere (attention out, LayerNorms,
    unembedding), so the DLA's constant and bias terms are exercised."""
    m = load_model(tiny_gpt2_dir, device="cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.bridge.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return m


@pytest.fixture(params=["biased_gpt2", "tiny_llama"])
def model(request):
    return request.getfixturevalue(request.param)


def test_final_norm_reproduces_the_model(model):
    tokens = encode_prompt(model, PROMPT)
    logits, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n.startswith("ln_final"))
    norm = final_norm(model)
    assert norm.kind == ("layernorm" if model.summary.architecture.startswith("GPT2") else "rmsnorm")
    check_matches(norm, cache["ln_final.hook_in"][0], cache["ln_final.hook_out"][0])
    assert torch.allclose(project(model, cache["ln_final.hook_in"][0], norm), logits[0].float(), atol=1e-4)


def test_lens_last_site_is_the_model_and_ranks_agree_with_top_tokens(model):
    res = run_lens(model, PROMPT, k=3)
    L = model.summary.n_layers
    assert res.rank.shape == (3 * L, len(res.tokens)) and res.sites[-1] == f"L{L - 1}.post"
    probs = model(encode_prompt(model, PROMPT))[0].float().softmax(-1)[:, res.target_id]
    assert torch.allclose(res.prob[-1], probs.cpu(), atol=1e-5)
    assert res.rank[-1, -1] == 0  # default target = the model's top prediction
    top_is_target = res.top_ids[..., 0] == res.target_id
    assert torch.equal(top_is_target, res.rank == 0)
    # resid_post of layer l is resid_pre of layer l + 1: the lens reads the same vector twice
    assert torch.allclose(res.prob[2:-1:3], res.prob[3::3], atol=1e-6)


def test_dla_sums_to_the_logit_difference(model):
    res = run_lens(model, PROMPT)
    d = res.dla
    assert abs(d.total - d.actual) < 1e-4 and d.error < 1e-4
    assert d.actual > 0  # target = top prediction, distractor = runner-up
    comps = dict(d.components())
    assert abs(sum(comps.values()) - d.actual) < 1e-4
    if model.summary.architecture.startswith("GPT2"):
        assert {"pos_embed", "attn_biases", "final_biases"} <= set(d.other)


def test_head_contributions_match_the_bridges_attention_output(model):
    """Independent check: per layer, the heads (z @ W_O) plus b_O give the contribution of the
    bridge's own hook_attn_out, pushed through the same frozen-scale map."""
    tokens = encode_prompt(model, PROMPT)
    tid, did = 5, 7
    d = direct_logit_attribution(model, tokens, tid, did)
    _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_attn_out") or n == "ln_final.hook_in")
    norm = final_norm(model)
    W_U = model.bridge.W_U.detach().float()
    direction = W_U[:, tid] - W_U[:, did]
    scale = norm.scale(cache["ln_final.hook_in"][0, -1])
    for l in range(model.summary.n_layers):
        b_O = getattr(model.bridge.blocks[l].attn, "b_O", None)
        bias = 0.0 if b_O is None else float(norm.linear(b_O.detach().float(), scale) @ direction)
        ref = float(norm.linear(cache[f"blocks.{l}.hook_attn_out"][0, -1], scale) @ direction)
        assert abs(float(d.heads[l].sum()) + bias - ref) < 1e-4


def test_result_round_trips(model, tmp_path):
    res = run_lens(model, PROMPT)
    res.save(tmp_path)
    back = LensResult.load(tmp_path)
    assert torch.equal(back.rank, res.rank) and torch.allclose(back.dla.heads, res.dla.heads)
    d = json.loads((tmp_path / "lens.json").read_text())
    assert d["schema_version"] == 1 and d["model"]["n_layers"] == model.summary.n_layers


def test_bad_inputs_raise_one_sentence(tiny_llama, tiny_gpt2):
    with pytest.raises(MechscopeError, match="not a single token: it splits into"):
        single_token(tiny_llama, " Maryxqz")
    with pytest.raises(MechscopeError, match="more than the model's context"):
        encode_prompt(tiny_gpt2, "Mary " * 100)  # learned positions end at 64
    assert encode_prompt(tiny_llama, "Mary " * 100).shape[1] > tiny_llama.summary.n_ctx  # rotary runs on
    with pytest.raises(MechscopeError, match="does not occur in the prompt"):
        subject_positions(tiny_llama, PROMPT, "Alice")
    assert single_token(tiny_llama, "Mary") == single_token(tiny_llama, " Mary")  # leading space added


def test_subject_positions_cover_the_subject(tiny_llama):
    pos = subject_positions(tiny_llama, PROMPT, "John gave")
    toks = tiny_llama.to_str_tokens(encode_prompt(tiny_llama, PROMPT)[0])
    assert "".join(toks[p] for p in pos).strip() == "John gave"


def test_cli_lens_json_and_escaped_report(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "lens"
    r = CliRunner().invoke(app, ["lens", f"{EVIL} {PROMPT}", "--model", tiny_gpt2_dir, "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["dla"]["error"] < 1e-4 and len(d["lens"]["sites"]) == 6
    html = (out / "report.html").read_text()
    assert "<script" not in html and "&lt;script&gt;" in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")


@pytest.mark.parametrize("args, needle", [
    (["--target", " Maryxqz"], "splits into"),
    (["--distractor", ""], "distractor is empty"),
])
def test_cli_lens_bad_input_exits_2(tiny_gpt2_dir, tmp_path, args, needle):
    r = CliRunner().invoke(app, ["lens", PROMPT, "--model", tiny_gpt2_dir, "--out", str(tmp_path), *args])
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output


def test_cli_lens_prompt_too_long_exits_2(tiny_gpt2_dir, tmp_path):
    r = CliRunner().invoke(app, ["lens", "Mary " * 100, "--model", tiny_gpt2_dir, "--out", str(tmp_path)])
    assert r.exit_code == 2 and "context" in r.output


def test_padded_vocabulary_rows_are_named_not_shown_empty(tmp_path):
    """A model whose unembedding has rows past the tokenizer (Pythia pads 50,277 tokens to
    50,304) showed those rows as '' among the lens's top tokens; they are named now."""
    import sys
    from pathlib import Path

    import transformers

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from conftest import _tiny_tokenizer, save_scaled

    n_tok = len(_tiny_tokenizer())
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=n_tok + 8, bos_token_id=0, eos_token_id=0, n_positions=32, n_embd=32,
                                  n_layer=1, n_head=2, n_inner=64, tie_word_embeddings=False)
    hf = transformers.GPT2LMHeadModel(cfg)
    save_scaled(hf, tmp_path / "padded")
    m = load_model(str(tmp_path / "padded"), device="cpu")
    res = run_lens(m, "When Mary and John went", target=" Mary", distractor=" John", k=100)
    flat = [t for site in res.top_tokens for pos in site for t in pos]
    padded = [int(i) for i in res.top_ids.flatten() if i >= n_tok]
    assert padded and sorted(t for t in flat if t.startswith("<unused id ")) == sorted(f"<unused id {i}>" for i in padded)
    assert "" not in flat


def test_lens_runs_on_a_bfloat16_load_close_to_float32(tiny_gpt2_dir):
    """A bfloat16 load rounds the model's own final-norm output (0.0076 off), which the norm
    check refused as "this norm variant is not supported"; the check allows 16-bit rounding now,
    and the lens's probabilities stay close to the float32 load's."""
    prompt = "When Mary and John went to the store, John gave a drink to"
    half = run_lens(load_model(tiny_gpt2_dir, device="cpu", dtype="bfloat16"), prompt, target=" Mary", distractor=" John")
    full = run_lens(load_model(tiny_gpt2_dir, device="cpu"), prompt, target=" Mary", distractor=" John")
    assert float((half.prob - full.prob).abs().max()) < 1e-3
    assert int((half.rank[-1] - full.rank[-1]).abs().max()) <= 2
