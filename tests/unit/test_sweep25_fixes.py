"""Sweep 25: transcoders train (model path in the metadata, --arch against --skip, empty --layers,
the context length checked before the tokens), train-toy's resume message, tuned-lens train and
eval's wording, intervene's generation at the context limit, dynamics on unfinished or
one-checkpoint runs, recall's note on a trace the noise did not move."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.errors import MechscopeError

TC = ["--tokens", "1000", "--context-len", "32", "--batch-contexts", "4", "--shuffle-contexts", "16", "--expansion", "2",
      "--k", "4", "--device", "cpu"]


def _one_error(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [line for line in r.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ 1. transcoders train: model path
def test_transcoders_record_a_relative_model_folder_as_an_absolute_path(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    folder = Path(tiny_llama_dir)
    monkeypatch.chdir(folder.parent)
    out = tmp_path / "tc"
    r = CliRunner().invoke(app, ["transcoders", "train", "--model", folder.name, "--corpus", corpus, "--layers", "0",
                                 "--out", str(out), *TC, "--json"])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "layer_0" / "cfg.json").read_text())["metadata"]
    assert meta["model_path"] == str(folder.resolve())  # was "tiny_llama..." (the relative name)


# ------------------------------------------------------------------ 2. --arch against --skip/--no-skip
def test_arch_with_a_skip_and_no_skip_is_refused_and_unknown_arch_lists_the_help_names(tmp_path):
    runner = CliRunner()
    base = ["transcoders", "train", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "x")]
    _one_error(runner.invoke(app, [*base, "--arch", "skip_relu", "--no-skip"]), "--arch skip_relu", "--no-skip",
               "--arch relu")
    err = _one_error(runner.invoke(app, [*base, "--arch", "foo"]), "unknown --arch 'foo'", "relu, topk, batchtopk, jumprelu")
    assert "skip_" not in err
    assert not (tmp_path / "x").exists()


def test_arch_with_a_skip_name_still_trains_a_skip_transcoder(tiny_llama_dir, corpus, tmp_path):
    out = tmp_path / "tc"
    i = TC.index("--k")  # relu reads no k, and a --k it would ignore is refused (session 35)
    r = CliRunner().invoke(app, ["transcoders", "train", "--model", tiny_llama_dir, "--corpus", corpus, "--layers", "0",
                                 "--arch", "skip_relu", "--out", str(out), *TC[:i], *TC[i + 2:], "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["architecture"] == "skip_relu"


# ------------------------------------------------------------------ 9. --layers '' and the context checked first
def test_empty_layers_and_a_context_too_long_before_the_tokens(tiny_gpt2_dir, corpus, tmp_path):
    runner = CliRunner()
    out = tmp_path / "x"
    base = ["transcoders", "train", "--model", tiny_gpt2_dir, "--corpus", corpus, "--out", str(out), "--device", "cpu"]
    _one_error(runner.invoke(app, [*base, "--layers", ""]), "--layers is empty")
    _one_error(runner.invoke(app, [*base, "--layers", " "]), "--layers is empty")
    _one_error(runner.invoke(app, [*base, "--context-len", "1000", "--tokens", "3000"]), "--context-len 1000 is longer than",
               "64")
    # a context the model reads: the batch refusal stands
    _one_error(runner.invoke(app, [*base, "--context-len", "64", "--tokens", "100"]), "less than one batch")
    assert not out.exists()


# ------------------------------------------------------------------ 3. train-toy resume names the setting
def test_toy_resume_with_other_settings_names_them(tmp_path):
    from mechscope.heads.train import resume_run

    (tmp_path / "train.json").write_text(json.dumps({"settings": {"d_model": 32, "steps": 10, "data": {"vocab": 16}}}))
    with pytest.raises(MechscopeError, match=r"made with d_model=32, not 64; pass a new --out"):
        resume_run(tmp_path, {"d_model": 64, "steps": 10, "data": {"vocab": 16}}, None, None, None, {})
    with pytest.raises(MechscopeError) as exc:
        resume_run(tmp_path, {"d_model": 64, "steps": 10, "data": {"vocab": 8}}, None, None, None, {})
    assert "data.vocab=16 (not 8)" in str(exc.value) and "d_model=32 (not 64)" in str(exc.value)


@pytest.mark.parametrize("args, needle", [
    (["--vocab", "9"], "--vocab does not apply to --setting icml; drop it."),
    (["--vocab", "9", "--seq-len", "5"], "--vocab, --seq-len do not apply to --setting icml; drop them."),
])
def test_icml_refuses_induction_options_in_grammatical_sentences(tmp_path, args, needle):
    r = CliRunner().invoke(app, ["train-toy", "--setting", "icml", *args, "--steps", "2", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and needle in r.output, r.output


# ------------------------------------------------------------------ 4-6. tuned lens
def test_tuned_lens_cache_dtype_mismatch_names_the_matmul_dtype_flag(tiny_llama, corpus, tmp_path):
    from mechscope.lens import TunedLensTrainConfig
    from mechscope.lens.tuned_train import _Run
    from mechscope.progress import as_progress

    cfg = TunedLensTrainConfig(tokens=500, context_len=32, kl_tokens=100, matmul_dtype="bfloat16", cache_dtype="bfloat16")
    run = _Run(tiny_llama, corpus, cfg, tmp_path, as_progress(False))
    with pytest.raises(MechscopeError) as exc:
        run._check_settings({"cache_dtype": "float32"})
    msg = str(exc.value)
    assert "--matmul-dtype float32, not auto or bfloat16" in msg and "resume with --matmul-dtype float32" in msg
    assert "cache_dtype=" not in msg


def test_tuned_lens_resume_says_the_total_is_this_session_and_eval_names_the_corpus(tiny_llama, tiny_llama_dir, corpus,
                                                                                     tmp_path):
    from mechscope.lens.tuned import TunedLens
    from mechscope.lens.tuned_eval import evaluate_tuned_lens

    runner = CliRunner()
    out = tmp_path / "tl"
    base = ["tuned-lens", "train", "--out", str(out), "--tokens", "600", "--kl-batch", "16", "--kl-tokens", "100",
            "--context-len", "32", "--matmul-dtype", "float32", "--corpus", corpus, "--model", tiny_llama_dir, "--device", "cpu"]
    r = runner.invoke(app, [*base, "--kl-steps", "2"])
    assert r.exit_code == 0 and "this session" not in r.stdout, r.output
    r = runner.invoke(app, [*base, "--kl-steps", "3", "--resume"])
    assert r.exit_code == 0, r.output
    assert "this session (closed form" in r.stdout and "over all runs)" in r.stdout, r.stdout
    lens = TunedLens.load(out)
    assert evaluate_tuned_lens(tiny_llama, lens, None, 40, context_len=32)["corpus"] == "embedded"  # was "None"
    assert evaluate_tuned_lens(tiny_llama, lens, Path(corpus), 40, context_len=32)["corpus"] == corpus  # was "?"


# ------------------------------------------------------------------ 7. intervene at the context limit
def test_intervene_generation_notes_the_context_limit(tiny_gpt2):
    from mechscope.features.intervene import intervene
    from mechscope.features.transcoder_set import random_transcoders

    tset = random_transcoders(tiny_gpt2, d_sae=16, k=4, seed=3)
    toks = torch.randint(1, 500, (60,)).tolist()  # the tiny GPT-2 reads 64 positions
    res = intervene(tiny_gpt2, tset, toks, [(0, 0, 1, 2.0)], generate=10)
    assert res["generated_tokens"] == 4
    assert res["generate_note"] == "generation stopped at the model's context limit (64 positions) after 4 of 10 tokens."
    short = intervene(tiny_gpt2, tset, toks[:20], [(0, 0, 1, 2.0)], generate=3)
    assert short["generated_tokens"] == 3 and "generate_note" not in short


# ------------------------------------------------------------------ 8. dynamics on unfinished / one-checkpoint runs
def test_dynamics_notes_an_unfinished_run_and_too_few_checkpoints(tmp_path):
    from mechscope.heads.config import DataConfig, ToyConfig
    from mechscope.heads.train import train_toy

    cfg = ToyConfig(layers=1, heads=2, d_model=16, steps=4, batch=4, n_checkpoints=2, linear_checkpoints=0, n_eval=4, warmup=2,
                    data=DataConfig(vocab=16, seq_len=12, n_repeats=2, min_span=3, max_span=4))
    run = tmp_path / "run"
    train_toy(cfg, run)
    log = json.loads((run / "train.json").read_text())
    log["settings"]["steps"], log["done"] = 40, False  # as if stopped at step 4 of 40
    (run / "train.json").write_text(json.dumps(log))
    runner = CliRunner()
    r = runner.invoke(app, ["dynamics", str(run), "--n", "4", "--seq-len", "5", "--json"])
    assert r.exit_code == 0, r.output
    f = json.loads(r.stdout)["formation"]
    assert f["unfinished"] and (f["steps_reached"], f["steps_planned"]) == (4, 40) and "step 4 of 40" in f["note"]
    assert not f["too_few_checkpoints"]

    one = tmp_path / "one"
    one.mkdir()
    shutil.copytree(run / "ckpt_000000", one / "ckpt_000000")
    shutil.copy(run / "train.json", one / "train.json")  # without it, English text: all unknown to the toy vocabulary
    r = runner.invoke(app, ["dynamics", str(one), "--n", "4", "--seq-len", "5"])
    assert r.exit_code == 0, r.output
    assert "too few checkpoints to judge formation" in r.stdout and "not formed" not in r.stdout, r.stdout


# ------------------------------------------------------------------ 10. recall: a trace the noise did not move
def test_recall_notes_a_trace_whose_noise_did_not_lower_the_target(capsys):
    from mechscope.cli.recall import _print_summary
    from mechscope.recall.result import RecallResult
    from mechscope.recall.tracing import Trace

    def result(clean: float, corrupt: float) -> dict:
        t = Trace(clean_prob=clean, corrupt_prob=corrupt, restored={"resid": torch.zeros(1, 3)}, noise_std=0.1, window=1,
                  layers=[0])
        return RecallResult(model={}, settings={}, prompt="a b c", subject="b", tokens=["a", "b", "c"], subject_pos=[1],
                            target=" d", target_id=5, trace=t).to_dict()

    d = result(0.008, 0.00825)
    assert "no information" in d["causal_tracing"]["note"] and "another subject span" in d["causal_tracing"]["note"]
    _print_summary(d)
    assert "did not lower p(target)" in capsys.readouterr().err
    assert "note" not in result(0.6, 0.05)["causal_tracing"]
