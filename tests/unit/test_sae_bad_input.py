"""Bad input to the SAE tools gets one sentence (exit code 2 at the CLI), never a traceback or a
silently wrong SAE: shards of another model, older SAELens configs, hooks without one vector per
token, malformed cfg.json values, sparsity coefficients, steering values, widths, token counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mechscope.activations import ShardStore, StoreConfig, get_corpus, harvest
from mechscope.cli.main import app
from mechscope.errors import MechscopeError
from mechscope.sae import SAE, SAEConfig, check_sae_fits, load_sae, save_sae
from mechscope.sae.config import GenerationConfig, TrainConfig
from mechscope.sae.io import config_from_saelens
from mechscope.sae.steer import check_feature_mode, steer_actadd
from mechscope.sae.train import check_shards_fit, sae_trainer

HOOK = "blocks.1.hook_resid_post"
SMALL = dict(tokens=512, batch_tokens=256, k=4, expansion=1)


def _one_sentence(r, *words: str) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for w in words:
        assert w in r.stderr, r.stderr


@pytest.fixture(scope="module")
def shards(tiny_gpt2, corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "acts"
    harvest(tiny_gpt2, get_corpus(corpus, split="train"), StoreConfig(hooks=[HOOK], context_len=32), out, 600, progress=False)
    return out


# ------------------------------------------------------------------ 1: shards of another model
def test_shards_record_the_weights_fingerprint_and_another_model_is_refused(shards, tiny_gpt2, tiny_llama, tmp_path):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["model_fingerprint"] == tiny_gpt2.fingerprint()
    check_shards_fit(ShardStore(shards), tiny_gpt2)  # the model they came from
    with pytest.raises(MechscopeError, match="weights differ"):
        check_shards_fit(ShardStore(shards), tiny_llama)
    # A manifest from before fingerprints were recorded: the model's name is compared instead.
    old = tmp_path / "old"
    old.mkdir()
    for f in shards.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    del manifest["model_fingerprint"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    check_shards_fit(ShardStore(old), tiny_gpt2)
    with pytest.raises(MechscopeError, match="were harvested from"):
        check_shards_fit(ShardStore(old), tiny_llama)
    manifest["d"][HOOK] = 96  # another width at the hook
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MechscopeError, match="hold width 96"):
        check_shards_fit(ShardStore(old), tiny_gpt2)


def test_cli_train_from_another_models_shards_is_refused(shards, tiny_llama_dir, tmp_path):
    r = CliRunner().invoke(app, ["sae", "train", "--model", tiny_llama_dir, "--hook", HOOK, "--from-shards", str(shards),
                                 "--tokens", "512", "--batch-tokens", "256", "--out", str(tmp_path / "sae"), "--device", "cpu"])
    _one_sentence(r, "harvested from", "weights differ")
    assert not (tmp_path / "sae" / "cfg.json").exists()


def test_resumed_harvest_by_another_model_is_refused(shards, tiny_llama, corpus, tmp_path):
    out = tmp_path / "acts"
    out.mkdir()
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["model"] = tiny_llama.summary.name  # same name, other weights
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MechscopeError, match="model_fingerprint"):
        harvest(tiny_llama, get_corpus(corpus, split="train"), StoreConfig(hooks=[HOOK], context_len=32), out, 600, progress=False)


# ------------------------------------------------------------------ 9: model_path, token counts
def test_trained_sae_records_an_absolute_model_path(shards, tiny_gpt2_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(tiny_gpt2_dir).parent)
    rel = "./" + Path(tiny_gpt2_dir).name
    r = CliRunner().invoke(app, ["sae", "train", "--model", rel, "--hook", HOOK, "--from-shards", str(shards),
                                 "--tokens", "512", "--batch-tokens", "256", "--expansion", "1", "--k", "4",
                                 "--out", str(tmp_path / "sae"), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert meta["model_path"] == str(Path(tiny_gpt2_dir).resolve())
    # trained from shards: the contexts and text are the shards' own, not the defaults of --context-len / --corpus
    man = json.loads((shards / "manifest.json").read_text())
    assert meta["context_size"] == man["context_len"] == 32 and meta["dataset_path"] == man["corpus"]
    from mechscope.cli.sae import model_path

    assert model_path("org/some-model") == "org/some-model" and model_path(None) is None and model_path("smollm2") == "smollm2"


def test_token_counts_below_one_are_refused(tiny_gpt2, tiny_gpt2_dir, corpus, tmp_path):
    r = CliRunner().invoke(app, ["sae", "harvest", "--model", tiny_gpt2_dir, "--hook", HOOK, "--tokens", "-5",
                                 "--out", str(tmp_path / "h"), "--device", "cpu"])
    _one_sentence(r, "--tokens must be at least 1")
    assert not (tmp_path / "h").exists()
    sae_dir = save_sae(SAE(SAEConfig(d_in=64, d_sae=16, k=4, hook_name=HOOK)), tmp_path / "sae")
    r = CliRunner().invoke(app, ["sae", "eval", str(sae_dir), "--model", tiny_gpt2_dir, "--tokens", "0", "--device", "cpu"])
    _one_sentence(r, "--tokens must be at least 1")
    with pytest.raises(MechscopeError, match="--tokens must be"):
        harvest(tiny_gpt2, get_corpus(corpus, split="train"), StoreConfig(hooks=[HOOK], context_len=32), tmp_path / "h2", 0)
    from mechscope.sae import evaluate_on_corpus

    with pytest.raises(MechscopeError, match="--tokens must be"):
        evaluate_on_corpus(tiny_gpt2, load_sae(sae_dir), corpus, n_tokens=0)


# ------------------------------------------------------------------ 2: SAELens configs before v6
def _pre6(tmp_path, sae: SAE, **keys) -> Path:
    """``sae`` saved, then its cfg.json rewritten the way SAELens before 6.0 wrote it."""
    d = save_sae(sae, tmp_path / "pre6")
    cfg = {"architecture": "standard", "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "dtype": "float32",
           "hook_point": sae.cfg.hook_name, "model_name": "gpt2", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "sae_lens_training_version": "3.13.0", **keys}
    (d / "cfg.json").write_text(json.dumps(cfg))
    return d


def test_pre_v6_saelens_topk_config_is_read_as_topk(tmp_path):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=3, hook_name=HOOK))
    with torch.no_grad():
        sae.b_enc.add_(torch.randn(16))
    back = load_sae(_pre6(tmp_path, sae, activation_fn_str="topk", activation_fn_kwargs={"k": 3}))
    x = torch.randn(5, 8)
    assert back.cfg.architecture == "topk" and back.cfg.k == 3 and back.cfg.hook_name == HOOK
    assert torch.equal(back(x), sae(x)) and ((back.encode(x) > 0).sum(-1) <= 3).all()
    relu = load_sae(_pre6(tmp_path, sae, activation_fn_str="relu", activation_fn_kwargs={}))
    assert relu.cfg.architecture == "relu" and torch.equal(relu.encode(x), relu.pre_acts(x).relu())
    for keys, msg in (({"activation_fn_str": "tanh-relu"}, "activation_fn_str='tanh-relu' is not supported"),
                      ({"activation_fn_str": "topk"}, "needs activation_fn_kwargs.k"),
                      ({"activation_fn_str": "topk", "activation_fn_kwargs": {"k": "x"}}, "k must be a whole number"),
                      ({"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "architecture": "jumprelu"},
                       "does not fit architecture 'jumprelu'")):
        with pytest.raises(MechscopeError, match=msg):
            config_from_saelens({"d_in": 8, "d_sae": 16, "architecture": "standard", **keys})


# ------------------------------------------------------------------ 5: malformed cfg.json values
@pytest.mark.parametrize("key, value, msg", [
    ("d_in", "abc", "d_in must be a whole number"),
    ("d_in", None, "d_in must be a whole number"),
    ("d_sae", 16.5, "d_sae must be a whole number"),
    ("k", "eight", "k must be a whole number"),
    ("metadata", "x", "metadata must be a JSON object"),
    ("apply_b_dec_to_input", "false", "apply_b_dec_to_input must be true or false"),
    ("reshape_activations", "hook_z", "reshape_activations='hook_z' is not supported"),
])
def test_malformed_cfg_values_name_the_key(tmp_path, key, value, msg):
    d = save_sae(SAE(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=3, hook_name=HOOK)), tmp_path / "sae")
    cfg = json.loads((d / "cfg.json").read_text())
    cfg[key] = value
    (d / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(MechscopeError, match=msg):
        load_sae(d)


def test_sae_without_a_hook_name_is_refused_in_one_sentence(tiny_gpt2, tiny_gpt2_dir, tmp_path):
    d = save_sae(SAE(SAEConfig(d_in=64, d_sae=16, architecture="topk", k=3, hook_name=HOOK)), tmp_path / "sae")
    cfg = json.loads((d / "cfg.json").read_text())
    del cfg["metadata"]["hook_name"]
    (d / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(MechscopeError, match="names no hook"):
        check_sae_fits(load_sae(d), tiny_gpt2)
    r = CliRunner().invoke(app, ["sae", "eval", str(d), "--model", tiny_gpt2_dir, "--tokens", "64", "--device", "cpu"])
    _one_sentence(r, "metadata.hook_name")
    tc = save_sae(SAE(SAEConfig(d_in=64, d_sae=16, architecture="topk", k=3, hook_name="blocks.1.ln2.hook_normalized",
                                d_out=64, hook_name_out="blocks.1.hook_mlp_out")), tmp_path / "tc")
    cfg = json.loads((tc / "cfg.json").read_text())
    del cfg["metadata"]["hook_name_out"]
    (tc / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(MechscopeError, match="names no output hook"):
        check_sae_fits(load_sae(tc), tiny_gpt2)


# ------------------------------------------------------------------ 3, 4: hooks without one vector per token
@pytest.mark.parametrize("hook, what", [("blocks.0.attn.hook_pattern", "attention weights"),
                                        ("blocks.0.attn.hook_attn_scores", "attention weights"),
                                        ("blocks.0.attn.hook_z", "one vector per head")])
def test_hooks_without_one_vector_per_token_are_refused_at_training(tiny_gpt2, tmp_path, hook, what):
    with pytest.raises(MechscopeError, match=f"{what}.*not one vector per token.*hook_resid_post"):
        sae_trainer(tiny_gpt2, hook, TrainConfig(**SMALL), tmp_path / "sae", context_len=32)


def test_cli_train_and_harvest_refuse_the_attention_pattern(tiny_gpt2_dir, corpus, tmp_path):
    r = CliRunner().invoke(app, ["sae", "train", "--model", tiny_gpt2_dir, "--hook", "blocks.0.attn.hook_pattern",
                                 "--corpus", corpus, "--tokens", "512", "--batch-tokens", "256", "--context-len", "32",
                                 "--out", str(tmp_path / "sae"), "--device", "cpu"])
    _one_sentence(r, "not one vector per token")
    r = CliRunner().invoke(app, ["sae", "harvest", "--model", tiny_gpt2_dir, "--hook", "blocks.0.attn.hook_z",
                                 "--corpus", corpus, "--tokens", "512", "--context-len", "32",
                                 "--out", str(tmp_path / "h"), "--device", "cpu"])
    _one_sentence(r, "one vector per head")


def test_per_head_sae_is_refused_by_eval_with_the_reason_not_a_width(tiny_gpt2):
    """A per-head SAE (SAELens's hook_z SAEs, or one trained before training refused them) reads
    n_heads x d_head = 64 values per token: refused as per-head, not as 'width 16 there'."""
    sae = SAE(SAEConfig(d_in=64, d_sae=16, architecture="topk", k=3, hook_name="blocks.0.attn.hook_z"))
    with pytest.raises(MechscopeError, match="one vector per head"):
        check_sae_fits(sae, tiny_gpt2)


# ------------------------------------------------------------------ 6, 9: training settings
@pytest.mark.parametrize("kw, msg", [
    ({"architecture": "relu", "l1": -1.0}, "--l1 must be a finite number of at least 0"),
    ({"architecture": "relu", "l1": math.nan}, "--l1 must be"),
    ({"architecture": "relu", "l1": math.inf}, "--l1 must be"),
    ({"architecture": "jumprelu", "l0": -0.1}, "--l0 must be"),
    ({"aux_coef": math.nan}, "aux_coef must be"),
    ({"jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth must be"),
    ({"d_sae": 0}, "--d-sae must be at least 1"),
    ({"d_sae": -4}, "--d-sae must be at least 1"),
    ({"expansion": 0}, "--expansion must be at least 1"),
])
def test_train_config_refuses_bad_coefficients_and_widths(kw, msg):
    with pytest.raises(MechscopeError, match=msg):
        TrainConfig(**{**SMALL, **kw})


def test_cli_train_refuses_a_negative_l1_and_a_zero_width(tiny_gpt2_dir, corpus, tmp_path):
    base = ["sae", "train", "--model", tiny_gpt2_dir, "--hook", HOOK, "--corpus", corpus, "--tokens", "512",
            "--batch-tokens", "256", "--out", str(tmp_path / "sae"), "--device", "cpu"]
    _one_sentence(CliRunner().invoke(app, [*base, "--arch", "relu", "--l1", "-1"]), "--l1 must be")
    _one_sentence(CliRunner().invoke(app, [*base, "--d-sae", "0"]), "--d-sae must be at least 1")
    _one_sentence(CliRunner().invoke(app, [*base, "--expansion", "0"]), "--expansion must be at least 1")


# ------------------------------------------------------------------ 7, 8: steering values
def test_steering_refuses_non_finite_values_and_top_k_below_one(tiny_gpt2, tiny_gpt2_dir, tmp_path):
    for scale, clamp, opt in ((math.nan, None, "--scale"), (math.inf, None, "--scale"), (None, math.nan, "--clamp")):
        with pytest.raises(MechscopeError, match=f"{opt} must be a finite number"):
            check_feature_mode(scale, clamp)
    with pytest.raises(MechscopeError, match="--coef must be a finite number"):
        steer_actadd(tiny_gpt2, "a b", "a", "b", layer=0, coef=math.nan)
    for kw, msg in (({"top_k": -5}, "--top-k must be at least 1"), ({"top_k": 0}, "--top-k must be at least 1"),
                    ({"temperature": math.nan}, "--temperature must be a finite number")):
        with pytest.raises(MechscopeError, match=msg):
            GenerationConfig(**kw)
    sae = SAE(SAEConfig(d_in=64, d_sae=16, architecture="relu", hook_name=HOOK, model_name=tiny_gpt2_dir))
    d = str(save_sae(sae, tmp_path / "sae"))
    steer = ["steer", "When Mary and John", "--sae", d, "--feature", "3", "-n", "2"]
    _one_sentence(CliRunner().invoke(app, [*steer, "--scale", "nan"]), "--scale must be a finite number")
    _one_sentence(CliRunner().invoke(app, [*steer, "--scale", "inf"]), "--scale must be a finite number")
    _one_sentence(CliRunner().invoke(app, [*steer, "--clamp", "nan"]), "--clamp must be a finite number")
    _one_sentence(CliRunner().invoke(app, [*steer, "--scale", "1", "--temperature", "1", "--top-k", "-5"]), "--top-k must be at least 1")
