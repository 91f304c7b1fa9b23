"""The toy training settings (induction, icml, binding) survive SIGKILL: a run killed in the middle and started again with
the same command ends with exactly the weights of a run that was never interrupted (the
in-process resume tests stop cleanly between steps; this one kills the process wherever it is)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

SETTINGS = {
    "induction": ["--layers", "1", "--d-model", "16", "--heads", "2", "--vocab", "16", "--seq-len", "32",
                  "--steps", "600", "--batch", "16", "--checkpoints", "12"],
    "icml": ["--setting", "icml", "--tasks", "2", "--labels", "4", "--classes", "16", "--context", "4",
             "--steps", "600", "--batch", "16", "--checkpoints", "12"],
    "binding": ["--setting", "binding", "--lines", "3", "--hops", "2", "--layers", "1", "--d-model", "16",
                "--heads", "2", "--steps", "600", "--batch", "16", "--checkpoints", "12"],
}


def _cmd(setting: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "mechscope.cli.main", "train-toy", *SETTINGS[setting], "--out", str(out), "--json"]


def _run(setting: str, out: Path, env: dict) -> None:
    r = subprocess.run(_cmd(setting, out), capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]


def _final_weights(out: Path) -> dict:
    last = sorted(out.glob("ckpt_*"))[-1]
    files = sorted(last.glob("*.safetensors"))
    assert files, f"no weights in {last}"
    return {f.name: load_file(str(f)) for f in files}


@pytest.mark.slow
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_sigkilled_toy_run_resumes_to_the_uninterrupted_weights(setting, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(setting, killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    state = killed / "last" / "state.safetensors"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert state.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no resume state in time"
    time.sleep(0.3)  # let it run on past the first saved state, then kill it wherever it is
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log = json.loads((killed / "train.json").read_text())
    if log.get("done"):
        pytest.skip("the run finished before the kill landed (machine much faster than expected)")
    first = sorted(killed.glob("ckpt_*/*.safetensors"))[0]
    written = first.stat().st_mtime_ns
    _run(setting, killed, env)  # the same command again: resumes from killed/last
    assert first.stat().st_mtime_ns == written, "the rerun started over instead of resuming"
    straight = tmp_path / "straight"
    _run(setting, straight, env)
    assert json.loads((killed / "train.json").read_text()).get("done")
    assert not (killed / "last").exists()
    a, b = _final_weights(killed), _final_weights(straight)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert a[name][k].equal(b[name][k]), (name, k)
