"""Sweep 26, training and its artefacts: a finished SAE is never overwritten and --resume needs a
checkpoint; a diverged run is refused and saves nothing; weights of whole numbers are refused;
a whole transcoder set missing a layer is refused by eval; steering and intervention values
beyond float32 are refused; huge feature ranges are checked before they are built; too short
contexts; messages that name the option typed; `sae convert` on a missing file; Ctrl-C says
how to resume. Each test drives the tiny models of conftest.py and takes seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.errors import MechscopeError
from mechscope.sae import SAE, SAEConfig, load_sae, save_sae

HOOK = "blocks.1.hook_resid_post"


def _refused(r, *words: str) -> None:
    """Exit code 2, one sentence, no traceback, every word in it."""
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    for w in words:
        assert w in r.stderr, r.stderr


def _tiny_sae(model, out: Path) -> Path:
    """A random TopK SAE of ``model`` at HOOK, saved to ``out``."""
    cfg = SAEConfig(d_in=model.summary.d_model, d_sae=16, architecture="topk", k=4, hook_name=HOOK,
                    model_name=model.summary.name)
    torch.manual_seed(0)
    return save_sae(SAE(cfg), out)


def _train_args(model_dir, corpus, out, extra=()):
    return ["sae", "train", "--model", model_dir, "--hook", HOOK, "--corpus", corpus, "--tokens", "2048",
            "--batch-tokens", "256", "--expansion", "1", "--k", "4", "--context-len", "32",
            "--checkpoint-every", "512", "--out", str(out), "--device", "cpu", *extra]


# ------------------------------------------------------------------ 1: --out of a finished SAE, --resume of nothing
def test_sae_train_refuses_an_out_holding_a_finished_sae_and_a_resume_without_checkpoint(tiny_gpt2, tiny_gpt2_dir, corpus, tmp_path):
    done = _tiny_sae(tiny_gpt2, tmp_path / "done")
    before = (done / "sae_weights.safetensors").read_bytes()
    r = CliRunner().invoke(app, _train_args(tiny_gpt2_dir, corpus, done))
    _refused(r, "already holds a finished SAE", "choose a new --out")
    assert (done / "sae_weights.safetensors").read_bytes() == before
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(app, _train_args(tiny_gpt2_dir, corpus, empty, ["--resume"]))
    _refused(r, "nothing to resume in", "drop --resume")
    assert not (empty / "cfg.json").exists()


# ------------------------------------------------------------------ 2: a diverged run
def test_sae_train_with_a_huge_lr_is_refused_as_diverged_and_saves_nothing(tiny_gpt2_dir, corpus, tmp_path):
    out = tmp_path / "nan"
    r = CliRunner().invoke(app, _train_args(tiny_gpt2_dir, corpus, out, ["--lr", "1e30"]))
    _refused(r, "diverged at step", "lower --lr")
    assert not (out / "cfg.json").exists() and not (out / "sae_weights.safetensors").exists()


def test_transcoders_train_with_a_huge_lr_is_refused_as_diverged(tiny_llama_dir, corpus, tmp_path):
    out = tmp_path / "tc"
    r = CliRunner().invoke(app, ["transcoders", "train", "--model", tiny_llama_dir, "--corpus", corpus, "--tokens", "1024",
                                 "--context-len", "32", "--batch-contexts", "4", "--shuffle-contexts", "16", "--expansion", "1",
                                 "--k", "4", "--lr", "1e30", "--layers", "0", "--out", str(out), "--device", "cpu"])
    _refused(r, "diverged at step", "lower --lr")
    assert not list(out.glob("layer_*"))


# ------------------------------------------------------------------ 3: weights of whole numbers
def test_an_sae_whose_weights_are_integers_is_refused(tiny_gpt2, tmp_path):
    d = _tiny_sae(tiny_gpt2, tmp_path / "ints")
    w = d / "sae_weights.safetensors"
    save_file({k: (v * 10).to(torch.int32) for k, v in load_file(str(w)).items()}, str(w))
    with pytest.raises(MechscopeError, match="torch.int32 values in"):
        load_sae(d)


def test_a_vision_model_whose_weights_are_integers_is_refused(tmp_path):
    from mechscope.vision.config import DataConfig, TrainConfig
    from mechscope.vision.models import VisionModel, build_model, load_vision_model

    cfg = TrainConfig(arch="cnn", width=8, heads=2, seed=1, data=DataConfig(dataset="shapes", size=8, per_class=10, shift=0))
    torch.manual_seed(0)
    VisionModel(build_model(cfg, cfg.data.n_classes), cfg, cfg.data.class_names(), {}).save(tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    save_file({k: v.to(torch.int16) for k, v in load_file(str(w)).items()}, str(w))
    with pytest.raises(MechscopeError, match="torch.int16 values in"):
        load_vision_model(tmp_path / "m")


# ------------------------------------------------------------------ 4: a whole set missing a layer
def test_transcoders_eval_refuses_a_whole_set_missing_a_layer(tset_dir, tiny_gpt2_dir, corpus, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tset_dir, broken)
    shutil.rmtree(broken / "layer_1")
    (broken / "layer_1.safetensors").unlink()
    r = CliRunner().invoke(app, ["transcoders", "eval", str(broken), "--model", tiny_gpt2_dir, "--corpus", corpus,
                                 "--tokens", "64", "--context-len", "16", "--device", "cpu"])
    _refused(r, "lacks layer_1")


# ------------------------------------------------------------------ 5: steering beyond float32
def test_steer_refuses_values_beyond_float32(tiny_gpt2, tiny_gpt2_dir, tmp_path):
    r = CliRunner().invoke(app, ["steer", "hello there", "--plus", "love", "--minus", "hate", "--layer", "1",
                                 "--coef", "1e39", "--model", tiny_gpt2_dir, "--device", "cpu", "-n", "3"])
    _refused(r, "--coef", "float32")
    from mechscope.sae.steer import check_feature_mode

    with pytest.raises(MechscopeError, match="--scale .*float32"):
        check_feature_mode(-1e39, None)
    with pytest.raises(MechscopeError, match="--clamp .*float32"):
        check_feature_mode(None, 1e39)


# ------------------------------------------------------------------ 6: a huge feature range
def test_parse_features_checks_bounds_before_building_the_range(monkeypatch):
    from mechscope.sae import dashboard

    def small_range(*args: int) -> range:  # a range this big would fill the memory before the check
        r = range(*args)
        assert len(r) <= 1_000_000, f"parse_features built a range of {len(r):,} features"
        return r

    monkeypatch.setattr(dashboard, "range", small_range, raising=False)
    with pytest.raises(MechscopeError, match="0..15"):
        dashboard.parse_features("0-99999999999", 16)
    assert dashboard.parse_features("3,0-2", 16) == [0, 1, 2, 3]


# ------------------------------------------------------------------ 7: sae eval on too short contexts
@pytest.mark.parametrize("n", ["0", "1"])
def test_sae_eval_refuses_a_context_shorter_than_two(tiny_gpt2, tiny_gpt2_dir, corpus, tmp_path, n):
    d = _tiny_sae(tiny_gpt2, tmp_path / "sae")
    r = CliRunner().invoke(app, ["sae", "eval", str(d), "--model", tiny_gpt2_dir, "--corpus", corpus, "--tokens", "64",
                                 "--context-len", n, "--device", "cpu"])
    _refused(r, "--context-len must be at least 2", f"got {n}")


def test_evaluate_on_corpus_refuses_a_context_shorter_than_two(tiny_gpt2, tmp_path):
    from mechscope.sae import evaluate_on_corpus

    sae = load_sae(_tiny_sae(tiny_gpt2, tmp_path / "sae"))
    with pytest.raises(MechscopeError, match="at least 2"):
        evaluate_on_corpus(tiny_gpt2, sae, n_tokens=64, context_len=1)


# ------------------------------------------------------------------ 8: intervene
def test_intervene_refuses_a_value_beyond_float32_and_a_feature_set_twice(tset_dir, tiny_gpt2_dir):
    base = ["intervene", "hello there", "--transcoders", str(tset_dir), "--model", tiny_gpt2_dir, "--device", "cpu"]
    _refused(CliRunner().invoke(app, base + ["--set", "0:1:1=1e40"]), "0:1:1", "float32")
    _refused(CliRunner().invoke(app, base + ["--set", "0:1:1=2", "--set", "0:1:1=5"]), "given twice")


# ------------------------------------------------------------------ 9: messages name the option typed
def test_messages_name_the_option_and_its_value(tiny_gpt2, tiny_gpt2_dir, tset_dir, corpus, tmp_path):
    run = CliRunner().invoke
    r = run(app, _train_args(tiny_gpt2_dir, corpus, tmp_path / "a", ["--batch-tokens", "0"]))
    _refused(r, "--batch-tokens must be at least 1", "got 0")
    r = run(app, _train_args(tiny_gpt2_dir, corpus, tmp_path / "b", ["--checkpoint-every", "0"]))
    _refused(r, "--checkpoint-every must be at least 1", "got 0")
    r = run(app, _train_args(tiny_gpt2_dir, corpus, tmp_path / "c", ["--context-len", "1"]))
    _refused(r, "--context-len must be at least 2", "got 1")
    r = run(app, ["sae", "harvest", "--hook", HOOK, "--out", str(tmp_path / "h"), "--model", tiny_gpt2_dir,
                  "--context-len", "1", "--tokens", "64"])
    _refused(r, "--context-len must be at least 2", "got 1")
    r = run(app, ["sae", "harvest", "--hook", HOOK, "--out", str(tmp_path / "h"), "--model", tiny_gpt2_dir,
                  "--batch-size", "0", "--tokens", "64"])
    _refused(r, "--batch-size must be at least 1", "got 0")
    sae = _tiny_sae(tiny_gpt2, tmp_path / "sae")
    r = run(app, ["sae", "dashboard", str(sae), "--model", tiny_gpt2_dir, "--top", "0"])
    _refused(r, "--top must be at least 1", "got 0")
    r = run(app, ["tuned-lens", "train", "--out", str(tmp_path / "tl"), "--model", tiny_gpt2_dir, "--reads", "foo"])
    _refused(r, "--reads 'foo'")
    r = run(app, ["tuned-lens", "train", "--out", str(tmp_path / "tl"), "--model", tiny_gpt2_dir, "--matmul-dtype", "int8"])
    _refused(r, "--matmul-dtype 'int8'")
    r = run(app, ["tuned-lens", "train", "--out", str(tmp_path / "tl"), "--model", tiny_gpt2_dir, "--kl-batch", "0"])
    _refused(r, "--kl-batch must be at least 1", "got 0")
    r = run(app, ["transcoders", "eval", str(tset_dir), "--model", tiny_gpt2_dir, "--sink-ratio", "0.5"])
    _refused(r, "--sink-ratio 0.5")
    r = run(app, ["transcoders", "eval", str(tset_dir), "--model", tiny_gpt2_dir, "--batch-size", "0"])
    _refused(r, "--batch-size must be at least 1", "got 0")
    r = run(app, ["intervene", "hi", "--transcoders", str(tset_dir), "--model", tiny_gpt2_dir, "--set", "0:1:1=0", "--top", "0"])
    _refused(r, "--top must be at least 1", "got 0")
    r = run(app, ["steer", "hi", "--plus", "a", "--minus", "b", "--layer", "0", "--model", tiny_gpt2_dir, "-n", "0"])
    _refused(r, "--max-new-tokens must be at least 1", "got 0")
    from mechscope.features.config import TranscoderTrainConfig
    from mechscope.vision.config import CircuitConfig

    with pytest.raises(MechscopeError, match="--random-draws must be at least 1; got 0"):
        CircuitConfig(random_draws=0)
    with pytest.raises(MechscopeError, match="--sink-ratio .*0.5"):
        TranscoderTrainConfig(sink_ratio=0.5)
    with pytest.raises(MechscopeError, match="--expansion must be at least 1; got 0"):
        TranscoderTrainConfig(expansion=0)


# ------------------------------------------------------------------ 10: sae convert on a bad file
def test_sae_convert_says_what_is_wrong_with_the_file_first(tmp_path):
    run = CliRunner().invoke
    _refused(run(app, ["sae", "convert", str(tmp_path / "nonexistent.npz"), "--out", str(tmp_path / "x")]), "no such file")
    (tmp_path / "dir.npz").mkdir()
    _refused(run(app, ["sae", "convert", str(tmp_path / "dir.npz"), "--out", str(tmp_path / "y")]), "is a folder")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    _refused(run(app, ["sae", "convert", str(tmp_path / "junk.npz"), "--out", str(tmp_path / "z")]), "not a readable .npz")


# ------------------------------------------------------------------ 11: Ctrl-C during sae train
def test_an_interrupted_sae_train_says_how_to_resume(tiny_gpt2_dir, corpus, tmp_path, monkeypatch):
    from mechscope.sae.train import Trainer

    step = Trainer._train_step

    def interrupted_after_a_checkpoint(self, x, y):  # noqa: ANN001
        if self.step == 20:  # checkpoints every 512 tokens once the 8 scale-estimate batches are trained on
            raise KeyboardInterrupt
        return step(self, x, y)

    monkeypatch.setattr(Trainer, "_train_step", interrupted_after_a_checkpoint)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, _train_args(tiny_gpt2_dir, corpus, out, ["--tokens", "8192"]))
    _refused(r, "interrupted", "--resume")
    assert (out / "checkpoint" / "state.json").is_file()
    monkeypatch.setattr(Trainer, "_train_step", step)
    r = CliRunner().invoke(app, _train_args(tiny_gpt2_dir, corpus, out, ["--tokens", "8192", "--resume", "--json"]))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tokens"] == 8192
