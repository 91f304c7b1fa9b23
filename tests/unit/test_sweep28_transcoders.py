"""Sweep 28, transcoder sets in circuit-tracer's layout (``config.yaml`` + ``layer_<l>.safetensors``)
and ``intervene --top``: a config.yaml that is not a mapping, tensors of the wrong shape, NaN or
infinite weights, unknown tensors, a jump_relu set without thresholds, a ``transcoders`` entry
that is not a list and a TopK set with a bad k are each refused in one sentence naming the file
(they crashed or loaded silently); valid sets load as before; ``intervene --top`` above the
vocabulary lists the whole vocabulary. The sets are tiny (width 8, 4 features) and need no model,
except the CLI checks, which use the tiny GPT-2 of conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.errors import MechscopeError
from mechscope.features.transcoder_set import load_transcoders, random_transcoders, save_transcoders

D, D_SAE = 8, 4
BASE_CFG = "model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\nfeature_output_hook: hook_mlp_out\n"


def _ct_set(path: Path, cfg: str = BASE_CFG, change=None, threshold: bool = False, layers: int = 2) -> Path:
    """A random circuit-tracer set of ``layers`` layers; ``change(tensors)`` edits layer 0's file."""
    g = torch.Generator().manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    for i in range(layers):
        t = {"W_enc": torch.randn(D_SAE, D, generator=g), "W_dec": torch.randn(D_SAE, D, generator=g),
             "b_enc": torch.randn(D_SAE, generator=g), "b_dec": torch.randn(D, generator=g)}
        if threshold:
            t["activation_function.threshold"] = torch.rand(D_SAE, generator=g)
        if change is not None and i == 0:
            t = change(t)
        save_file({k: v.contiguous() for k, v in t.items()}, str(path / f"layer_{i}.safetensors"))
    (path / "config.yaml").write_text(cfg)
    return path


def _refused(path: Path, *words: str) -> str:
    with pytest.raises(MechscopeError) as err:
        load_transcoders(path)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


# ------------------------------------------------------------------ 1. config.yaml that is not a mapping
@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "YAML list"), ("hello\n", "YAML scalar ('hello')")])
def test_a_config_yaml_that_is_not_a_mapping_is_refused(tmp_path, text, kind):
    """It raised AttributeError ('list' object has no attribute 'get')."""
    _ct_set(tmp_path, cfg=text)
    _refused(tmp_path, "config.yaml holds a " + kind, "not a mapping of settings", "fix or remove that file")


# ------------------------------------------------------------------ 1. tensors of the wrong shape
@pytest.mark.parametrize("name, bad, want", [
    ("W_enc", torch.zeros(D_SAE * D), "is a matrix [d_sae, d_in]"),  # was ValueError (unpack)
    ("W_dec", torch.zeros(D_SAE), "is a matrix [d_sae, d_out]"),  # was IndexError
    ("b_enc", torch.zeros(7), f"imply [{D_SAE}]"),  # was RuntimeError in copy_
    ("b_dec", torch.zeros(7), f"imply [{D}]"),
    ("activation_function.threshold", torch.ones(3), f"imply [{D_SAE}]"),
])
def test_tensors_of_the_wrong_shape_are_refused_naming_file_tensor_and_shapes(tmp_path, name, bad, want):
    _ct_set(tmp_path, BASE_CFG + "activation_function: jump_relu\n", lambda t: {**t, name: bad}, threshold=True)
    _refused(tmp_path, "layer_0.safetensors", f"{name} has shape {list(bad.shape)}", want)


# ------------------------------------------------------------------ 2. NaN / inf, unknown tensors, thresholds
@pytest.mark.parametrize("name, value", [("W_dec", float("nan")), ("b_enc", float("inf")), ("activation_function.threshold", float("nan"))])
def test_nan_or_infinite_weights_are_refused(tmp_path, name, value):
    """They loaded, and eval then reported an FVU of null."""
    def poison(t):
        t[name] = t[name].clone()
        t[name].view(-1)[0] = value
        return t
    _ct_set(tmp_path, BASE_CFG + "activation_function: jump_relu\n", poison, threshold=True)
    _refused(tmp_path, "layer_0.safetensors", f"{name} holds NaN or infinite values", "re-save it")


def test_an_unknown_tensor_is_refused(tmp_path):
    """W_mystery was ignored: the set loaded without what it might change."""
    _ct_set(tmp_path, change=lambda t: {**t, "W_mystery": torch.ones(3)})
    _refused(tmp_path, "layer_0.safetensors holds tensors mechscope does not know (W_mystery;", "remove them")


def test_jump_relu_without_thresholds_is_refused_and_thresholds_are_never_dropped(tmp_path):
    """jump_relu with no threshold tensor loaded with thresholds 0 (a plain ReLU)."""
    _ct_set(tmp_path / "a", BASE_CFG + "activation_function: jump_relu\n")
    _refused(tmp_path / "a", "layer_0.safetensors lacks 'activation_function.threshold'", "jump_relu")
    # thresholds that an explicit relu would ignore: refused, not dropped
    _ct_set(tmp_path / "b", BASE_CFG + "activation_function: relu\n", threshold=True)
    _refused(tmp_path / "b", "activation_function.threshold", "set activation_function: jump_relu")
    # no activation_function and thresholds in the files: a JumpReLU, as circuit-tracer reads it
    _ct_set(tmp_path / "c", threshold=True)
    tset = load_transcoders(tmp_path / "c")
    t = load_file(str(tmp_path / "c" / "layer_1.safetensors"))
    assert tset.layers[1].cfg.architecture == "jumprelu"
    assert torch.equal(tset.layers[1].threshold.detach(), t["activation_function.threshold"])


def test_other_bad_settings_are_refused_in_one_sentence(tmp_path):
    """transcoders as a string was read letter by letter ('holds 19 layers'); an unknown
    activation was read as ReLU; k: 0 said 'needs k'."""
    _ct_set(tmp_path, BASE_CFG + "transcoders: layer_0.safetensors\n")
    _refused(tmp_path, "transcoders must be a YAML list of per-layer file names", "got 'layer_0.safetensors'")
    _ct_set(tmp_path, BASE_CFG + "activation_function: gelu\n")
    _refused(tmp_path, "activation_function 'gelu' is not one mechscope reads")
    _ct_set(tmp_path, BASE_CFG + "activation_function: topk\nk: 0\n")
    _refused(tmp_path, "config.yaml: k must be one whole number of at least 1", "got 0")
    _ct_set(tmp_path, BASE_CFG + "activation_function: topk\n")
    _refused(tmp_path, "sets activation_function: topk but no k")


# ------------------------------------------------------------------ valid sets load as before
@pytest.mark.parametrize("arch, skip", [("topk", False), ("jumprelu", False), ("relu", True)])
def test_valid_circuit_tracer_sets_still_load_exactly(tiny_gpt2, tmp_path, arch, skip):
    tset = random_transcoders(tiny_gpt2, d_sae=16, architecture=arch, k=4 if arch == "topk" else None, seed=3, skip=skip)
    if arch == "jumprelu":
        for tc in tset.layers:
            with torch.no_grad():
                tc.threshold.copy_(torch.rand(16) * 0.2)
    save_transcoders(tset, tmp_path)
    for p in tmp_path.glob("layer_*"):  # circuit-tracer's files alone
        if p.is_dir():
            for f in p.iterdir():
                f.unlink()
            p.rmdir()
    back = load_transcoders(tmp_path)
    x = torch.randn(5, tiny_gpt2.summary.d_model)
    for a, b in zip(tset.layers, back.layers):
        assert b.cfg.architecture == a.cfg.architecture and b.cfg.k == a.cfg.k
        assert torch.allclose(a(x), b(x), atol=1e-6)


# ------------------------------------------------------------------ the CLI: one line, exit 2; intervene --top
def test_transcoders_eval_of_a_damaged_set_is_one_line(tset_dir, tiny_gpt2_dir, corpus, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.yaml").write_text((tset_dir / "config.yaml").read_text())
    for i in range(2):
        t = load_file(str(tset_dir / f"layer_{i}.safetensors"))
        if i == 0:
            t["b_enc"] = torch.zeros(7)
        save_file(t, str(bad / f"layer_{i}.safetensors"))
    r = CliRunner().invoke(app, ["transcoders", "eval", str(bad), "--model", tiny_gpt2_dir, "--corpus", corpus, "--device", "cpu"])
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and "Traceback" not in r.output, r.stderr
    assert "b_enc has shape [7]" in lines[0] and "imply [16]" in lines[0]


def test_intervene_top_beyond_the_vocabulary_lists_the_whole_vocabulary(tset_dir, tiny_gpt2, tiny_gpt2_dir):
    """--top 100000 raised 'selected index k out of range' (and --json printed nothing)."""
    base = ["intervene", "Mary and", "--transcoders", str(tset_dir), "--model", tiny_gpt2_dir, "--device", "cpu",
            "--set", "0:1:0=1", "--json"]
    r = CliRunner().invoke(app, base + ["--top", "100000"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["logits"]
    assert len(rows) == tiny_gpt2.summary.d_vocab and len({row["id"] for row in rows}) == len(rows)
    r = CliRunner().invoke(app, base + ["--top", "-3"])
    assert r.exit_code == 2 and "--top must be at least 1" in r.stderr and "Traceback" not in r.output
