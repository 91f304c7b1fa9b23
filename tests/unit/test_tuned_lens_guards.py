"""Bad input to the tuned lens gets one sentence, never a traceback, and nothing non-finite is
saved or reported: a diverged fit saves no translators, NaN translators are refused wherever they
load (and by ``tuned-lens convert``), tensors of the wrong shape and layer counts that are not
whole numbers are named, and a context longer than the model reads is refused before any work."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.errors import MechscopeError
from mechscope.lens import TunedLens
from mechscope.lens.tuned import WEIGHTS_FILE, convert_tuned_lens
from mechscope.lens.tuned_eval import evaluate_tuned_lens

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from tuned_lens_package import write_package  # noqa: E402

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _refused(r, msg: str) -> str:
    """Exit code 2 and one sentence holding ``msg`` (no traceback)."""
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    said = r.stderr.rsplit("error: ", 1)[1]
    assert said.count("\n") == 1 and msg in said and "Traceback" not in r.output, r.output
    return said


def _nan_lens_dir(model, path):
    """A mechscope tuned-lens folder whose layer-1 weight holds NaN."""
    TunedLens.identity(model).save(path)
    t = load_file(str(path / WEIGHTS_FILE))
    t["layers.1.weight"][0, 0] = float("nan")
    save_file(t, str(path / WEIGHTS_FILE))
    return path


# ---------------------------------------------------------------------------- bug 1: non-finite
@pytest.mark.parametrize("lr, steps", [("3e37", "2"), ("1e38", "1")])  # NaN translators; Adam's step overflowing float32
def test_a_diverged_fit_saves_no_translators(tiny_llama_dir, corpus, tmp_path, lr, steps):
    out = tmp_path / "tl"
    r = CliRunner().invoke(app, ["tuned-lens", "train", "--out", str(out), "--tokens", "256", "--kl-steps", steps,
                                 "--kl-batch", "8", "--kl-tokens", "256", "--context-len", "32", "--lr", lr,
                                 "--matmul-dtype", "float32", "--corpus", corpus, "--model", tiny_llama_dir, "--device", "cpu"])
    said = _refused(r, "diverged")
    assert "lower --lr" in said
    assert not (out / WEIGHTS_FILE).exists() and not (out / "tuned_lens.json").exists()


def test_non_finite_translators_are_refused_wherever_they_load(tiny_llama, tiny_llama_dir, corpus, tmp_path):
    bad = _nan_lens_dir(tiny_llama, tmp_path / "nan")
    with pytest.raises(MechscopeError, match="NaN or inf values in layers.1.weight"):
        TunedLens.load(bad)
    runner = CliRunner()
    _refused(runner.invoke(app, ["lens", PROMPT, "--tuned", str(bad), "--model", tiny_llama_dir, "--device", "cpu",
                                 "--out", str(tmp_path / "lens")]), "NaN or inf")
    _refused(runner.invoke(app, ["tuned-lens", "eval", str(bad), "--tokens", "40", "--corpus", corpus,
                                 "--model", tiny_llama_dir, "--device", "cpu"]), "NaN or inf")
    assert not (bad / "eval.json").exists()
    lens = TunedLens.identity(tiny_llama)
    with torch.no_grad():
        lens.bias[0, 0] = float("inf")
    with pytest.raises(MechscopeError, match="NaN or inf"):
        lens.save(tmp_path / "inf")
    assert not (tmp_path / "inf" / WEIGHTS_FILE).exists()


def test_eval_reports_no_non_finite_kl(tiny_llama, corpus):
    lens = TunedLens.identity(tiny_llama)
    with torch.no_grad():
        lens.weight[1] = float("nan")  # in memory, past the load-time check
    with pytest.raises(MechscopeError, match=r"NaN or inf at layers \[1\]"):
        evaluate_tuned_lens(tiny_llama, lens, corpus, n_tokens=40, context_len=32)


def test_eval_json_is_strict_json(tiny_llama, tiny_llama_dir, corpus, tmp_path):
    lens_dir = tmp_path / "id"
    TunedLens.identity(tiny_llama).save(lens_dir)  # the final translator's ratio is 0 / 0: None, never NaN
    r = CliRunner().invoke(app, ["tuned-lens", "eval", str(lens_dir), "--tokens", "40", "--corpus", corpus,
                                 "--model", tiny_llama_dir, "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "nan" not in r.stdout.lower()

    def no_constant(c: str):
        raise AssertionError(f"eval.json holds {c}")

    d = json.loads((lens_dir / "eval.json").read_text(), parse_constant=no_constant)
    assert d["layers"][-1]["ratio"] is None


def test_convert_refuses_non_finite_params(tiny_llama, tmp_path):
    L, D = tiny_llama.summary.n_layers, tiny_llama.summary.d_model
    state = write_package(tmp_path / "pkg", L, D)
    state["2.bias"][3] = float("nan")
    torch.save(state, tmp_path / "pkg" / "params.pt")
    r = CliRunner().invoke(app, ["tuned-lens", "convert", str(tmp_path / "pkg" / "params.pt"), "--out", str(tmp_path / "o")])
    assert "2.bias" in _refused(r, "NaN or inf")
    assert not (tmp_path / "o" / WEIGHTS_FILE).exists()


# ---------------------------------------------------------------------------- bug 2: shapes, layer counts
@pytest.mark.parametrize("key, shape", [("1.bias", (65,)), ("1.bias", (1, 64)), ("0.weight", (64, 65))])
def test_convert_names_a_tensor_of_the_wrong_shape(tiny_llama, tmp_path, key, shape):
    L, D = tiny_llama.summary.n_layers, tiny_llama.summary.d_model
    assert D == 64
    state = write_package(tmp_path / "pkg", L, D)
    state[key] = torch.zeros(shape)
    torch.save(state, tmp_path / "pkg" / "params.pt")
    r = CliRunner().invoke(app, ["tuned-lens", "convert", str(tmp_path / "pkg" / "params.pt"), "--out", str(tmp_path / "o")])
    said = _refused(r, f"{key} of shape {shape}")
    assert f"needs {(D,) if key.endswith('bias') else (D, D)}" in said


@pytest.mark.parametrize("value", [-3, 0, 3.7, "3", True, None])
def test_convert_refuses_a_layer_count_that_is_not_a_whole_number(tiny_llama, tmp_path, value):
    L, D = tiny_llama.summary.n_layers, tiny_llama.summary.d_model
    state = write_package(tmp_path / "pkg", L, D, num_hidden_layers=value)
    torch.save(state, tmp_path / "pkg" / "params.pt")
    with pytest.raises(MechscopeError, match=f"num_hidden_layers = {json.dumps(value)}, which is not a whole number"):
        convert_tuned_lens(tmp_path / "pkg" / "params.pt", tmp_path / "o")
    r = CliRunner().invoke(app, ["tuned-lens", "convert", str(tmp_path / "pkg" / "params.pt"), "--out", str(tmp_path / "o")])
    _refused(r, "num_hidden_layers")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- bug 3: context length
def test_a_context_longer_than_the_model_reads_is_refused(tiny_gpt2_dir, corpus, tmp_path, monkeypatch):
    """GPT-2's learned positions end at n_positions (64 here): a longer --context-len is refused
    before any work (README: contexts longer than a model with learned positions takes)."""
    from mechscope.lens import tuned_train

    monkeypatch.setattr(tuned_train, "train_tuned_lens", lambda *a, **k: pytest.fail("training started"))
    r = CliRunner().invoke(app, ["tuned-lens", "train", "--out", str(tmp_path / "tl"), "--context-len", "100000",
                                 "--corpus", corpus, "--model", tiny_gpt2_dir, "--device", "cpu"])
    _refused(r, "give --context-len 64 or less")
    assert not (tmp_path / "tl").exists()


def _settings_reached(monkeypatch):
    """Stop ``tuned-lens train`` where training would start, with a sentence naming the settings it got."""
    from mechscope.lens import tuned_train

    def stop(model, corpus, cfg, out, **kw):
        raise MechscopeError(f"reached training: context_len {cfg.context_len}, kl_tokens {cfg.kl_tokens}")

    monkeypatch.setattr(tuned_train, "train_tuned_lens", stop)


def test_defaults_fit_a_short_model_and_the_tokens(corpus, tmp_path, monkeypatch):
    """Left out, --context-len is min(128, the model's context) and --kl-tokens min(4096, --tokens);
    given, a --kl-tokens above --tokens is still refused. A rotary model runs on past its
    max_position_embeddings (as the activation store lets it), so a longer --context-len is kept."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
    from short_context import save_short

    _settings_reached(monkeypatch)
    gpt2, llama = save_short("gpt2", tmp_path / "gpt2"), save_short("llama", tmp_path / "llama")
    base = ["tuned-lens", "train", "--out", str(tmp_path / "tl"), "--corpus", corpus, "--device", "cpu"]
    _refused(CliRunner().invoke(app, [*base, "--model", gpt2, "--tokens", "1024"]), "context_len 32, kl_tokens 1024")
    _refused(CliRunner().invoke(app, [*base, "--model", gpt2]), "context_len 32, kl_tokens 4096")
    _refused(CliRunner().invoke(app, [*base, "--model", gpt2, "--tokens", "1024", "--kl-tokens", "512", "--context-len", "16"]),
             "context_len 16, kl_tokens 512")
    _refused(CliRunner().invoke(app, [*base, "--model", gpt2, "--tokens", "1024", "--kl-tokens", "2048"]),
             "--kl-tokens 2048 exceeds --tokens 1024")
    _refused(CliRunner().invoke(app, [*base, "--model", gpt2, "--context-len", "33"]), "give --context-len 32 or less")
    _refused(CliRunner().invoke(app, [*base, "--model", llama, "--tokens", "1024"]), "context_len 32, kl_tokens 1024")
    _refused(CliRunner().invoke(app, [*base, "--model", llama, "--tokens", "1024", "--context-len", "48"]), "context_len 48")
    assert not (tmp_path / "tl").exists()
