"""Steering: a zero intervention reproduces the unsteered text exactly, clamping keeps the SAE
error term, ActAdd follows Turner et al., and steering towards a token's unembedding raises it."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from mechscope.errors import MechscopeError
from mechscope.sae import SAE, SAEConfig, save_sae
from mechscope.sae.steer import (
    GenerationConfig,
    actadd_vector,
    add_hooks,
    clamp_hooks,
    generate_pair,
    steer_actadd,
    steer_feature,
)

PROMPT = "When Mary and John went to the store,"
SAMPLE = GenerationConfig(max_new_tokens=10, temperature=1.0, seed=3, stop_at_eos=False)
GREEDY = GenerationConfig(max_new_tokens=8, stop_at_eos=False)


def make_sae(model, layer: int = 1, d_sae: int = 48) -> SAE:
    return SAE(SAEConfig(d_in=model.summary.d_model, d_sae=d_sae, architecture="relu",
                         hook_name=f"blocks.{layer}.hook_resid_post", model_name="tiny"))


def test_scale_zero_is_unsteered_and_a_large_scale_is_not(tiny_llama):
    sae = make_sae(tiny_llama)
    r0 = steer_feature(tiny_llama, sae, PROMPT, 5, scale=0.0, gen=SAMPLE)  # sampled: same seed, same draws
    assert r0.steered_ids == r0.unsteered_ids and len(r0.steered_ids) == 10
    r1 = steer_feature(tiny_llama, sae, PROMPT, 5, scale=20 * r0.resid_norm, gen=SAMPLE)
    assert r1.unsteered_ids == r0.unsteered_ids and r1.steered_ids != r1.unsteered_ids


def test_unsteered_row_is_plain_greedy_decoding(tiny_gpt2):
    """Row 0 of the paired batch equals an independent greedy loop on the plain model."""
    sae = make_sae(tiny_gpt2)
    r = steer_feature(tiny_gpt2, sae, PROMPT, 3, scale=5.0, gen=GREEDY)
    ids = torch.tensor([tiny_gpt2.to_tokens(PROMPT)])
    with torch.no_grad():
        for _ in range(GREEDY.max_new_tokens):
            ids = torch.cat([ids, tiny_gpt2(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert r.unsteered_ids == ids[0, -GREEDY.max_new_tokens:].tolist()


def test_clamp_to_current_value_is_unsteered(tiny_llama):
    """Feature 7 reads nothing and has bias 2.5, so it is 2.5 everywhere: clamping it to 2.5 is
    a no-op (the SAE error is kept, so the reconstruction error does not leak in); clamping it
    higher changes the text."""
    sae = make_sae(tiny_llama)
    with torch.no_grad():
        sae.W_enc[:, 7] = 0
        sae.b_enc[7] = 2.5
    same = steer_feature(tiny_llama, sae, PROMPT, 7, clamp=2.5, gen=SAMPLE)
    assert same.steered_ids == same.unsteered_ids
    moved = steer_feature(tiny_llama, sae, PROMPT, 7, clamp=2.5 + 20 * same.resid_norm, gen=SAMPLE)
    assert moved.steered_ids != moved.unsteered_ids


def test_clamp_sets_the_feature_and_keeps_the_error(tiny_gpt2):
    """On a tied SAE (W_enc = W_dec^T, unit rows) a clamped, active feature re-encodes to exactly
    the clamp value; everything outside the feature's direction is untouched (error kept)."""
    sae = make_sae(tiny_gpt2, d_sae=32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, tiny_gpt2.summary.d_model, generator=g) * 2
    f = sae.encode(x[1]).detach()
    j = int((f > 0).sum(0).argmax())  # the feature active at most positions
    active = f[:, j] > 0
    assert active.sum() >= 3
    (_, hook), = clamp_hooks(sae, j, 4.0)
    out = hook(x.clone()).detach()
    assert torch.equal(out[0], x[0])  # row 0 is the unsteered row
    refit = sae.encode(out[1]).detach()[:, j]
    assert torch.allclose(refit[active], torch.full_like(refit[active], 4.0), atol=1e-4)
    w = sae.W_dec.detach()[j]
    resid = (out[1] - x[1]) - ((out[1] - x[1]) @ w)[:, None] * w / (w @ w)
    assert resid.abs().max() < 1e-5  # only W_dec[j]'s direction moved


def test_actadd_identical_prompts_is_unsteered_and_follows_the_paper(tiny_gpt2):
    r = steer_actadd(tiny_gpt2, PROMPT, "Love", "Love", layer=1, coef=10.0, gen=SAMPLE)
    assert r.steered_ids == r.unsteered_ids
    hook = "blocks.1.hook_resid_pre"
    v = actadd_vector(tiny_gpt2, "The war lasted", "The Eiffel Tower is", hook)
    n_plus, n_minus = len(tiny_gpt2.to_tokens("The war lasted")), len(tiny_gpt2.to_tokens("The Eiffel Tower is"))
    assert len(v) == max(n_plus, n_minus)
    assert v[0].abs().max() == 0  # shared first token: a causal model's activations agree there
    assert v[1:].abs().max() > 0
    moved = steer_actadd(tiny_gpt2, PROMPT, "The war lasted", "The Eiffel Tower is", layer=1, coef=10.0, gen=SAMPLE)
    assert moved.steered_ids != moved.unsteered_ids


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_steering_towards_a_token_raises_its_probability(kind, request):
    model = request.getfixturevalue(f"tiny_{kind}")
    last = model.summary.n_layers - 1
    sae = make_sae(model, layer=last)
    probs0 = generate_pair(model, PROMPT, [], GREEDY)[2][0]
    t = int(probs0.argsort()[len(probs0) // 2])  # a middling token
    with torch.no_grad():
        sae.W_dec[11] = model.bridge.W_U[:, t]
    _, _, p = generate_pair(model, PROMPT, add_hooks(f"blocks.{last}.hook_resid_post", sae.W_dec[11].detach() / sae.W_dec[11].norm(), 3.0), GREEDY)
    assert p[1, t] > 2 * p[0, t]
    r = steer_feature(model, sae, PROMPT, 11, scale=200.0, gen=GREEDY)
    assert r.steered_ids[0] == t and r.unsteered_ids[0] != t


def test_bad_input(tiny_gpt2):
    sae = make_sae(tiny_gpt2)
    with pytest.raises(MechscopeError, match="out of range"):
        steer_feature(tiny_gpt2, sae, PROMPT, 48, scale=1.0)
    with pytest.raises(MechscopeError, match="exactly one"):
        steer_feature(tiny_gpt2, sae, PROMPT, 1, scale=1.0, clamp=2.0)
    with pytest.raises(MechscopeError, match="layers 0..1"):
        steer_actadd(tiny_gpt2, PROMPT, "a", "b", layer=5)


def test_cli_steer(tiny_gpt2, tiny_gpt2_dir, tmp_path):
    from mechscope.cli.steer import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands, so `steer` stays a sub-command
    sae = make_sae(tiny_gpt2)
    sae.cfg.model_name = tiny_gpt2_dir
    save_sae(sae, tmp_path / "sae")
    run = CliRunner().invoke
    r = run(app, ["steer", PROMPT, "--sae", str(tmp_path / "sae"), "--feature", "3", "--scale", "0",
                  "-n", "6", "--out", str(tmp_path / "o"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["mode"] == "add" and d["steered"] == d["unsteered"] and d["schema_version"] == 1
    assert json.loads((tmp_path / "o" / "steer.json").read_text())["steered_ids"] == d["steered_ids"]
    r = run(app, ["steer", PROMPT, "--plus", "Love", "--minus", "Hate", "--layer", "1", "--model", tiny_gpt2_dir, "-n", "4"])
    assert r.exit_code == 0 and "unsteered" in r.stdout
    for bad, msg in ((["--sae", str(tmp_path / "sae"), "--feature", "3"], "exactly one"),
                     (["--sae", str(tmp_path / "sae"), "--feature", "99", "--scale", "1"], "out of range"),
                     (["--plus", "a", "--layer", "1"], "needs --plus, --minus and --layer")):
        r = run(app, ["steer", PROMPT, *bad])
        assert r.exit_code == 2 and msg in r.output, r.output
