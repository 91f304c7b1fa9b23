"""The toy training settings (induction, icml, binding) survive SIGKILL: a run killed in the middle and started again with
the same command ends with exactly the weights of a run that was never interrupted (the
in-process resume tests stop cleanly between steps; this one kills the process wherever it is)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from mechscope.cli.main import app

SETTINGS = {
    "induction": ["--layers", "1", "--d-model", "16", "--heads", "2", "--vocab", "16", "--seq-len", "32",
                  "--steps", "600", "--batch", "16", "--checkpoints", "12"],
    "icml": ["--setting", "icml", "--tasks", "2", "--labels", "4", "--classes", "16", "--context", "4",
             "--steps", "600", "--batch", "16", "--checkpoints", "12"],
    "binding": ["--setting", "binding", "--lines", "3", "--hops", "2", "--layers", "1", "--d-model", "16",
                "--heads", "2", "--steps", "600", "--batch", "16", "--checkpoints", "12"],
}


def _args(setting: str, out: Path) -> list[str]:
    return ["train-toy", *SETTINGS[setting], "--out", str(out), "--json"]


def _run(setting: str, out: Path) -> None:
    r = CliRunner().invoke(app, _args(setting, out))
    assert r.exit_code == 0, r.output


def _final_weights(out: Path) -> dict:
    last = sorted(out.glob("ckpt_*"))[-1]
    files = sorted(last.glob("*.safetensors"))
    assert files, f"no weights in {last}"
    return {f.name: load_file(str(f)) for f in files}


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_sigkilled_toy_run_resumes_to_the_uninterrupted_weights(setting, tmp_path, kill_when, one_thread):
    killed = tmp_path / "killed"
    # Let it run on past the first saved state, then kill it wherever it is.
    kill_when(_args(setting, killed), killed / "last" / "state.safetensors", settle=0.3)
    log = json.loads((killed / "train.json").read_text())
    assert not log.get("done")
    # A kill between the state file and train.json leaves train.json a checkpoint behind: make it
    # lag on purpose; the resume must take the log saved with the state, not this one.
    log["train_loss"], log["checkpoints"] = log["train_loss"][:1], log["checkpoints"][:1]
    (killed / "train.json").write_text(json.dumps(log))
    first = sorted(killed.glob("ckpt_*/*.safetensors"))[0]
    written = first.stat().st_mtime_ns
    _run(setting, killed)  # the same command again: resumes from killed/last
    assert first.stat().st_mtime_ns == written, "the rerun started over instead of resuming"
    straight = tmp_path / "straight"
    _run(setting, straight)
    assert json.loads((killed / "train.json").read_text()).get("done")
    assert not (killed / "last").exists() and not list(killed.rglob("*.tmp*"))
    logs = [json.loads((p / "train.json").read_text()) for p in (killed, straight)]
    for lg in logs:  # wall-clock times differ between any two runs
        lg.pop("seconds", None), lg.pop("elapsed", None)
        for c in lg["checkpoints"]:
            c.pop("seconds", None)
    assert logs[0] == logs[1]
    a, b = _final_weights(killed), _final_weights(straight)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert a[name][k].equal(b[name][k]), (name, k)
