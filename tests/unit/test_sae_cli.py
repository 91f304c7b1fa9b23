"""`mechscope sae train / eval` end to end on a tiny model and a small text file, including a
run killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechscope.cli.main import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from short_context import save_short  # noqa: E402

HOOK = "blocks.1.hook_resid_pre"


def _train_args(model_dir, corpus, out, tokens=24_576, extra=()):
    return ["sae", "train", "--model", model_dir, "--hook", HOOK, "--corpus", corpus, "--tokens", str(tokens),
            "--batch-tokens", "512", "--expansion", "4", "--k", "8", "--lr", "2e-3", "--context-len", "32",
            "--checkpoint-every", "4096", "--out", str(out), "--device", "cpu", *extra]


@pytest.mark.slow
def test_train_then_eval_writes_an_saelens_folder_and_a_report(tiny_gpt2_dir, tiny_llama_dir, corpus, tmp_path):
    r = CliRunner().invoke(app, _train_args(tiny_gpt2_dir, corpus, tmp_path / "sae", extra=["--json"]))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["tokens"] == 24_576 and summary["sae"]["d_sae"] == 256
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["metadata"]["hook_name"] == HOOK
    r = CliRunner().invoke(app, ["sae", "eval", str(tmp_path / "sae"), "--corpus", corpus, "--tokens", "2048",
                                 "--context-len", "32", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["l0"] <= 8 and 0 <= ev["fvu"] < 0.8 and ev["ce_recovered"] > 0.3
    html = (tmp_path / "sae" / "eval.html").read_text()
    assert "feature density" in html and "<script" not in html
    # Another model of the same width and hook names is refused by the recorded weights fingerprint.
    assert cfg["metadata"]["model_fingerprint"].startswith("v1:")
    r = CliRunner().invoke(app, ["sae", "eval", str(tmp_path / "sae"), "--model", tiny_llama_dir, "--corpus", corpus,
                                 "--tokens", "2048", "--context-len", "32", "--device", "cpu"])
    assert r.exit_code == 2 and "weights differ" in r.stderr and "Traceback" not in r.output


@pytest.mark.slow
def test_transcoder_training_from_the_cli(tiny_llama_dir, corpus, tmp_path):
    args = _train_args(tiny_llama_dir, corpus, tmp_path / "tc", tokens=8192, extra=["--transcoder", "--json"])
    args[args.index("--hook") + 1] = "blocks.1.ln2.hook_normalized"
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out" and cfg["d_out"] == 64


def test_bad_input_is_one_sentence(tiny_gpt2_dir, corpus, tmp_path):
    r = CliRunner().invoke(app, _train_args(tiny_gpt2_dir, corpus, tmp_path / "x") + ["--arch", "gated"])
    assert r.exit_code == 2 and "unknown SAE architecture" in r.stderr
    args = _train_args(tiny_gpt2_dir, corpus, tmp_path / "y")
    args[args.index("--hook") + 1] = "blocks.1.hook_resid_psot"
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "no hook named" in r.stderr and "blocks.1.hook_resid_post" in r.stderr
    r = CliRunner().invoke(app, ["sae", "eval", str(tmp_path), "--model", tiny_gpt2_dir])
    assert r.exit_code == 2 and "no cfg.json" in r.stderr
    r = CliRunner().invoke(app, _train_args(tiny_gpt2_dir, str(tmp_path / "missing.jsonl"), tmp_path / "z"))
    assert r.exit_code == 2 and "missing.jsonl" in r.stderr


@pytest.mark.slow
def test_sigkilled_run_resumes_from_its_checkpoint(tiny_gpt2_dir, corpus, tmp_path, kill_when, one_thread):
    """Training from a streaming corpus, killed after a checkpoint, ends with exactly the weights
    of an uninterrupted run: the rows waiting in the shuffle buffer come back from the checkpoint."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "killed"
    state = out / "checkpoint" / "state.json"
    kill_when(_train_args(tiny_gpt2_dir, corpus, out, tokens=65_536), state)
    assert not (out / "cfg.json").exists()  # it really died before finishing
    at = json.loads(state.read_text())["tokens"]
    assert 0 < at < 65_536
    saved = load_file(str(out / "checkpoint" / "state.safetensors"))
    assert any(k.startswith("source.buffer.") for k in saved)  # the killed run had rows waiting
    r = CliRunner().invoke(app, _train_args(tiny_gpt2_dir, corpus, out, tokens=65_536, extra=["--resume", "--json"]))
    assert r.exit_code == 0, r.output
    resumed = json.loads(r.stdout)
    assert resumed["tokens"] == 65_536 and not (out / "checkpoint").exists()
    r = CliRunner().invoke(app, _train_args(tiny_gpt2_dir, corpus, tmp_path / "straight", tokens=65_536, extra=["--json"]))
    straight = json.loads(r.stdout)
    assert straight["tokens"] == 65_536
    a, b = (load_file(str(tmp_path / name / "sae_weights.safetensors")) for name in ("killed", "straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkilled_harvest_and_shard_training_resume_exactly(tiny_gpt2_dir, corpus, tmp_path, kill_when, one_thread,
                                                             monkeypatch):
    """A harvest killed after its first shard, and an SAE trained from shards killed after its
    first checkpoint, each end exactly as an uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    from mechscope.activations.store import Harvester

    def harvest(out):  # 4 shards of 32768 rows (the default shard size)
        return ["sae", "harvest", "--model", tiny_gpt2_dir, "--hook", HOOK, "--corpus", corpus, "--tokens", "131072",
                "--context-len", "32", "--out", str(out), "--device", "cpu", "--json"]

    def shards_done(out) -> int:
        try:
            return len(json.loads((out / "manifest.json").read_text())["shards"])
        except (OSError, ValueError):
            return 0

    acts = tmp_path / "acts"
    kill_when(harvest(acts), lambda: shards_done(acts) > 0)
    assert not json.loads((acts / "manifest.json").read_text())["complete"], "killed after the harvest had finished"
    forwards = [0]
    real_run = Harvester.run

    def counted(self, *a, **kw):
        forwards[0] += 1
        return real_run(self, *a, **kw)

    monkeypatch.setattr(Harvester, "run", counted)
    r = CliRunner().invoke(app, harvest(acts))  # the same command again: resumes
    assert r.exit_code == 0, r.output
    resumed, forwards[0] = forwards[0], 0
    r = CliRunner().invoke(app, harvest(tmp_path / "acts_straight"))
    assert r.exit_code == 0, r.output
    assert 0 < resumed < forwards[0], "the rerun harvested the finished shards again"
    files = sorted(p.name for p in acts.glob("shard_*"))
    assert len(files) == 4 and files == sorted(p.name for p in (tmp_path / "acts_straight").glob("shard_*"))
    for name in files:
        a, b = load_file(str(acts / name)), load_file(str(tmp_path / "acts_straight" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not list(acts.glob("*.tmp*"))

    def train(out):
        args = _train_args(tiny_gpt2_dir, corpus, out, tokens=65_536, extra=["--from-shards", str(acts), "--json"])
        i = args.index("--corpus")
        return args[:i] + args[i + 2:]

    killed = tmp_path / "sae_killed"
    kill_when(train(killed), killed / "checkpoint" / "state.json")
    assert not (killed / "cfg.json").exists(), "killed after training had finished"
    r = CliRunner().invoke(app, [*train(killed), "--resume"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, train(tmp_path / "sae_straight"))
    assert r.exit_code == 0, r.output
    a, b = (load_file(str(tmp_path / name / "sae_weights.safetensors")) for name in ("sae_killed", "sae_straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (killed / "checkpoint").exists() and not list(killed.rglob("*.tmp*"))


def test_harvest_json_and_bad_input(tiny_gpt2_dir, corpus, tmp_path):
    from mechscope.activations import ShardStore

    args = ["sae", "harvest", "--model", tiny_gpt2_dir, "--hook", HOOK, "--corpus", corpus, "--tokens", "2000",
            "--context-len", "32", "--out", str(tmp_path / "acts"), "--device", "cpu"]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.stdout)
    assert manifest["hooks"] == [HOOK] and manifest["n_tokens"] >= 2000
    assert ShardStore(tmp_path / "acts").next_batch(100)[HOOK].shape == (100, 64)
    r = CliRunner().invoke(app, [*args[:-4], "--out", str(tmp_path / "b"), "--dtype", "float8"])
    assert r.exit_code == 2 and "Unknown dtype" in r.stderr and "Traceback" not in r.output


def test_context_len_defaults_to_a_short_models_context(corpus, tmp_path, monkeypatch):
    """A hand-built GPT-2 of 32 learned positions: --context-len (--ctx-len) left out is 32, not
    128 (64), in harvest, train, eval and dashboard; one given beyond 32 is refused in one sentence
    before anything is written."""
    from mechscope.errors import MechscopeError
    from mechscope.sae import SAE, SAEConfig, save_sae
    from mechscope.sae import train as sae_train

    short = save_short("gpt2", tmp_path / "short")
    run = CliRunner().invoke
    r = run(app, ["sae", "harvest", "--model", short, "--hook", HOOK, "--corpus", corpus, "--tokens", "256",
                  "--out", str(tmp_path / "acts"), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["context_len"] == 32
    sae_dir = save_sae(SAE(SAEConfig(d_in=64, d_sae=16, k=4, hook_name=HOOK)), tmp_path / "sae")
    r = run(app, ["sae", "eval", str(sae_dir), "--model", short, "--corpus", corpus, "--tokens", "256", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["settings"]["ctx_len"] == 32
    r = run(app, ["sae", "dashboard", str(sae_dir), "--features", "0-3", "--tokens", "256", "--corpus", corpus,
                  "--model", short, "--out", str(tmp_path / "dash"), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "dash" / "dashboard.json").read_text())["settings"]["ctx_len"] == 32
    def started(model, hook, cfg, out, **kw):  # where the run would fill its activation buffer (seconds)
        raise MechscopeError(f"training started with contexts of {kw['context_len']}")

    monkeypatch.setattr(sae_train, "sae_trainer", started)
    train = ["sae", "train", "--model", short, "--hook", HOOK, "--corpus", corpus, "--tokens", "1024", "--batch-tokens", "256",
             "--out", str(tmp_path / "s"), "--device", "cpu"]
    r = run(app, train)
    assert r.exit_code == 2 and "training started with contexts of 32" in r.stderr, r.output
    for args, option in ((["sae", "harvest", "--hook", HOOK, "--tokens", "256", "--out", str(tmp_path / "a2")], "--context-len"),
                         ([*train[:-4], "--out", str(tmp_path / "s2")], "--context-len"),
                         (["sae", "eval", str(sae_dir), "--tokens", "256", "--out", str(tmp_path / "e2")], "--context-len"),
                         (["sae", "dashboard", str(sae_dir), "--out", str(tmp_path / "d2")], "--ctx-len")):
        r = run(app, [*args, "--model", short, "--corpus", corpus, option, "33", "--device", "cpu"])
        assert r.exit_code == 2 and f"give {option} 32 or less" in r.stderr and "Traceback" not in r.output, (args, r.output)
        assert r.stderr.count("\n") == 1 and not (tmp_path / args[-1]).exists(), args
