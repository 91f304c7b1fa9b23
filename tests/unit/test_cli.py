"""CLI: --json output and one-sentence errors with exit code 2 (no traceback)."""

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "mechscope.cli.main"]


def run(*args, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=300, **kw)


def assert_clear_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_info_json(tiny_llama_dir):
    r = run("info", "--model", tiny_llama_dir, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["n_layers"], d["n_heads"], d["n_kv_heads"]) == (3, 4, 2)


def test_graph_json(tiny_gpt2_dir):
    r = run("graph", "--model", tiny_gpt2_dir, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n_edges"] == 110


def test_tasks_json():
    r = run("tasks", "--json")
    assert r.returncode == 0
    names = {t["name"] for t in json.loads(r.stdout)}
    assert {"ioi", "greater-than", "induction", "facts"} <= names


def test_unknown_model():
    assert_clear_error(run("info", "--model", "./no/such/dir"), "No model file or directory")


def test_unknown_task():
    assert_clear_error(run("task-eval", "--task", "ioj"), "ioi")


def test_unknown_method():
    assert_clear_error(run("discover", "--method", "acdcx"), "Unknown method")


def test_bad_hook_name(tiny_gpt2_dir):
    assert_clear_error(run("hooks", "--model", tiny_gpt2_dir, "--check", "blocks.0.hook_resid_pots"),
                       "Did you mean", "blocks.0.hook_resid_post")


def test_malformed_jsonl_line(tmp_path, tiny_gpt2_dir):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"clean": "a b", "corrupt": "a c", "answer": " b", "wrong": " c"}\n{"clean": oops}\n')
    assert_clear_error(run("task-eval", "--task", str(f), "--model", tiny_gpt2_dir), "line 2")


def test_mismatched_lengths_report_dropped(tmp_path, tiny_gpt2_dir):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"clean": "When Mary and John went", "corrupt": "When", "answer": " Mary", "wrong": " John"}\n')
    assert_clear_error(run("task-eval", "--task", str(f), "--model", tiny_gpt2_dir), "differ in token length")


def test_debug_shows_traceback():
    r = run("--debug", "info", "--model", "./no/such/dir")
    assert r.returncode == 2 and "Traceback" in r.stderr


def test_discover_edges_too_many(tiny_gpt2_dir, tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join('{"clean": "Mary", "corrupt": "John", "answer": " Mary", "wrong": " John"}\n' for _ in range(4)))
    r = run("discover", "--task", str(f), "--model", tiny_gpt2_dir, "--edges", "999999", "--n", "4")
    assert_clear_error(r, "out of range")


def test_evaluate_reference_names_missing_node(tmp_path):
    """A GPT-2-small reference on a 2-layer model names nodes the model lacks."""
    import torch

    from mechscope.circuits.result import CircuitResult
    from mechscope.graph import Graph

    g = Graph(2, 4, 4)
    CircuitResult(model={"name": "tiny", "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "source": "x"},
                  task="ioi", method="eap", settings={}, graph=g,
                  scores=torch.zeros(g.n_senders, g.n_receivers),
                  circuit=torch.zeros(g.n_senders, g.n_receivers, dtype=torch.bool)).save(tmp_path)
    assert_clear_error(run("evaluate", str(tmp_path), "--reference", "gpt2-ioi"), "which this model does not have", "gpt2")


@pytest.mark.embedded
def test_task_eval_embedded_json():
    r = run("task-eval", "--task", "ioi", "--n", "16", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["clean_accuracy"] >= 0.85 and d["chance_accuracy"] == 0.5
