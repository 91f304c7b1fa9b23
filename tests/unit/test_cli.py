"""CLI: --json output and one-sentence errors with exit code 2 (no traceback).

Commands run in this process (``helpers/cli_inprocess.py``: the console script's ``app``, without
a subprocess's 8-12 s of imports each); those given a working folder (``cwd=``) run as real
``python -m mechscope.cli.main`` processes, which also keeps the entry point itself tested."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from cli_inprocess import run_cli  # noqa: E402

CLI = [sys.executable, "-m", "mechscope.cli.main"]


def run(*args, cwd=None):
    if cwd is None:
        return run_cli(*args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


def assert_clear_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


@pytest.mark.slow
def test_info_json(tiny_llama_dir):
    r = run("info", "--model", tiny_llama_dir, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["n_layers"], d["n_heads"], d["n_kv_heads"]) == (3, 4, 2)


@pytest.mark.slow
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


@pytest.mark.slow
def test_bad_acdc_metric():
    assert_clear_error(run("discover", "--method", "acdc", "--metric", "kld"), "Unknown ACDC metric", "kl or task")
    assert_clear_error(run("discover", "--method", "eap", "--metric", "task"), "ACDC only")


@pytest.mark.slow
def test_bad_hook_name(tiny_gpt2_dir):
    assert_clear_error(run("hooks", "--model", tiny_gpt2_dir, "--check", "blocks.0.hook_resid_pots"),
                       "Did you mean", "blocks.0.hook_resid_post")


@pytest.mark.slow
def test_malformed_jsonl_line(tmp_path, tiny_gpt2_dir):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"clean": "a b", "corrupt": "a c", "answer": " b", "wrong": " c"}\n{"clean": oops}\n')
    assert_clear_error(run("task-eval", "--task", str(f), "--model", tiny_gpt2_dir), "line 2")


@pytest.mark.slow
def test_mismatched_lengths_report_dropped(tmp_path, tiny_gpt2_dir):
    f = tmp_path / "pairs.jsonl"
    f.write_text('{"clean": "When Mary and John went", "corrupt": "When", "answer": " Mary", "wrong": " John"}\n')
    assert_clear_error(run("task-eval", "--task", str(f), "--model", tiny_gpt2_dir), "differ in token length")


@pytest.mark.slow
def test_task_eval_names_dropped_pairs_and_answers_without_their_space(tmp_path, tiny_gpt2_dir):
    f = tmp_path / "pairs.jsonl"
    good = {"clean": "When Mary and John went to the store, John gave a drink to", "corrupt":
            "When Mary and John went to the store, Mary gave a drink to", "answer": " Mary", "wrong": " John"}
    f.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": "Mary"}) + "\n")
    r = run("task-eval", "--task", str(f), "--model", tiny_gpt2_dir)
    assert r.returncode == 0, r.stderr
    assert "dropped pairs: 1 (answer is not a single token (but is one with a leading space))" in " ".join(r.stdout.split())
    r = run("task-eval", "--task", str(f), "--model", tiny_gpt2_dir, "--json")
    assert json.loads(r.stdout)["dropped"] == {"answer is not a single token (but is one with a leading space)": 1}


def test_debug_shows_traceback():
    r = run("--debug", "info", "--model", "./no/such/dir")
    assert r.returncode == 2 and "Traceback" in r.stderr
    # --debug holds for its own command only, also when one process runs several (a notebook)
    r = run("info", "--model", "./no/such/dir")
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    from mechscope.circuits.toy import save_induction_toy

    return save_induction_toy(tmp_path_factory.mktemp("toy"))


def _toy_pairs(path, n=8):
    import random

    rng = random.Random(0)
    lines = []
    for _ in range(n):
        r = rng.sample(range(62), 8)
        seq = " ".join(f"t{i}" for i in r[:4])
        other = " ".join(f"t{i}" for i in r[4:8])
        lines.append(json.dumps({"clean": f"<bos> {seq} {seq[:seq.rindex(' ')]}",
                                 "corrupt": f"<bos> {seq} {other[:other.rindex(' ')]}",
                                 "answer": f"t{r[3]}", "wrong": f"t{r[7]}"}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.slow
def test_discover_and_evaluate_json_on_toy(toy_dir, tmp_path):
    """The main job end to end on the hand-built induction model, through the CLI."""
    task = _toy_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    # The task file named relative to the working folder, as a user types it.
    r = run("discover", "--task", "pairs.jsonl", "--model", toy_dir, "--n", "8", "--method", "eap", "--out", str(out), "--json",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["faithfulness_held_out"] > 0.8 and d["edges_kept"] < d["edges_total"] / 4
    assert (out / "circuit.json").is_file() and (out / "report.html").is_file()
    # ... and evaluated from another folder without --task: the run recorded the file's absolute path.
    (tmp_path / "elsewhere").mkdir()
    r = run("evaluate", str(out), "--model", toy_dir, "--json", cwd=tmp_path / "elsewhere")
    assert r.returncode == 0, r.stderr
    # A task file with fewer usable pairs than a run needs is refused, whatever --n says.
    short = tmp_path / "short.jsonl"
    short.write_text("".join((tmp_path / "pairs.jsonl").read_text().splitlines(keepends=True)[:3]))
    assert_clear_error(run("discover", "--task", str(short), "--model", toy_dir, "--method", "eap"), "has only 3 usable pairs")
    same = tmp_path / "same.jsonl"
    same.write_text("".join(json.dumps({**p, "corrupt": p["clean"]}) + "\n"
                            for p in map(json.loads, (tmp_path / "pairs.jsonl").read_text().splitlines())))
    assert_clear_error(run("discover", "--task", str(same), "--model", toy_dir, "--method", "eap"),
                       "corrupt prompts of task 'same' are the clean prompts themselves")
    # evaluate makes discover's checks: nothing to patch, too few pairs, --n below 1
    assert_clear_error(run("evaluate", str(out), "--task", str(same), "--model", toy_dir),
                       "corrupt prompts of task 'same' are the clean prompts themselves")
    assert_clear_error(run("evaluate", str(out), "--task", str(short), "--model", toy_dir), "has only 3 usable pairs")
    assert_clear_error(run("evaluate", str(out), "--n", "0", "--model", toy_dir), "--n must be at least 1 pair; got 0")
    r = run("evaluate", str(out), "--task", task, "--model", toy_dir, "--json")
    assert r.returncode == 0, r.stderr
    e = json.loads(r.stdout)
    assert abs(e["curve"][-1]["faithfulness"] - 1) < 1e-3 and e["edges_kept"] == d["edges_kept"]
    assert e["n_held_out"] == 2 and d["empty"] is False  # a quarter of the 8 pairs held out
    assert d["dropped_pairs"] == e["dropped_pairs"] == {} and d["task_notes"] == e["task_notes"] == []
    # another run as the reference: ACDC's circuit against EAP's ranking (both patch from the
    # corrupted prompts, which change only the query token: the edges that see it are few)
    acdc_out = tmp_path / "acdc"
    r = run("discover", "--task", task, "--model", toy_dir, "--n", "8", "--method", "acdc",
            "--threshold", "0.05", "--out", str(acdc_out), "--json")
    assert r.returncode == 0, r.stderr
    r = run("evaluate", str(out), "--task", task, "--model", toy_dir, "--reference", str(acdc_out), "--json")
    assert r.returncode == 0, r.stderr
    ref = json.loads(r.stdout)["reference"]
    assert ref["n_edges"] == json.loads((acdc_out / "circuit.json").read_text())["metrics"]["n_edges_kept"]
    assert ref["edge_overlap"] > 10 * ref["chance_overlap"] and 0 < ref["jaccard"] <= 1
    r = run("evaluate", str(acdc_out), "--task", task, "--model", toy_dir, "--reference", str(acdc_out), "--json")
    same = json.loads(r.stdout)["reference"]
    assert same["in_this_circuit"] == 1.0 and same["jaccard"] == 1.0
    # ACDC pruning by the task metric (logit difference) reaches the planted circuit too
    task_out = tmp_path / "acdc_task"
    r = run("discover", "--task", task, "--model", toy_dir, "--n", "8", "--method", "acdc", "--ablation", "zero",
            "--metric", "task", "--threshold", "0.05", "--out", str(task_out), "--json")
    assert r.returncode == 0, r.stderr
    saved = json.loads((task_out / "circuit.json").read_text())
    assert saved["settings"]["acdc_metric"] == "task"
    r = run("evaluate", str(task_out), "--task", task, "--model", toy_dir, "--reference", str(acdc_out), "--json")
    assert json.loads(r.stdout)["reference"]["in_this_circuit"] > 0.5


@pytest.mark.slow
def test_discover_refuses_task_at_chance(tiny_gpt2_dir, tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"clean": f"Mary and John {w}", "corrupt": f"Alice and Bob {w}",
                                     "answer": " Mary", "wrong": " John"}) + "\n"
                         for w in ["went", "gave", "saw", "met", "had", "was"]))
    # the tiny random model (seed 0) prefers " John" or " Mary" regardless of the prompt
    assert_clear_error(run("discover", "--task", str(f), "--model", tiny_gpt2_dir, "--n", "6"), "at chance")


def test_a_task_whose_corrupt_prompts_score_better_is_at_chance(tiny_gpt2, tiny_gpt2_dir, tmp_path):
    """Induction (scored by log-probability, so no accuracy check) on a random model: the
    corrupt prompts score better; that used to pass (only |gap| < 1e-3 was refused) and gave
    faithfulness 74 on the scoring pairs. --force runs it, flagged."""
    from mechscope.tasks import evaluate_task, get_task

    res = evaluate_task(tiny_gpt2, get_task("induction").build(tiny_gpt2.tokenizer, n=8, seed=0))
    assert res["clean_metric"] - res["corrupt_metric"] < -1e-3  # the situation under test
    args = ["discover", "--task", "induction", "--model", tiny_gpt2_dir, "--n", "8", "--method", "eap", "--no-labels"]
    assert_clear_error(run(*args, "--out", str(tmp_path / "a")), "at chance", "score as well as or better")
    r = run(*args, "--force", "--out", str(tmp_path / "b"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["at_chance"] is True
    assert json.loads((tmp_path / "b" / "circuit.json").read_text())["metrics"]["at_chance"] is True


@pytest.mark.slow
def test_discover_seeds_json_on_toy(toy_dir, tmp_path):
    """--seeds: per-draw figures, overlaps and stable edges in --json and in circuit.json."""
    task = _toy_pairs(tmp_path / "pairs.jsonl", n=12)
    out = tmp_path / "run"
    r = run("discover", "--task", task, "--model", toy_dir, "--n", "12", "--method", "eap", "--seeds", "2",
            "--no-labels", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)["stability"]
    assert st["n_seeds"] == 2 and 0 <= st["jaccard_circuit_mean"] <= 1 and st["n_stable_edges"] >= 1
    saved = json.loads((out / "circuit.json").read_text())["stability"]
    assert [p["seed"] for p in saved["per_seed"]] == [0, 1] and len(saved["stable_edges"]) == st["n_stable_edges"]
    assert "stable" in (out / "report.html").read_text()
