"""The CLI on the embedded SmolLM2-135M-Instruct (the CLI's fast tests, on tiny models, are in
tests/unit/test_cli.py). Each call is a subprocess that loads the model itself."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.embedded

CLI = [sys.executable, "-m", "mechscope.cli.main"]


def run(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=300, **kw)


def test_task_eval_embedded_json():
    r = run("task-eval", "--task", "ioi", "--n", "16", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["clean_accuracy"] >= 0.85 and d["chance_accuracy"] == 0.5
