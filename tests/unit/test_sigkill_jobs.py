"""Every long job with a checkpoint survives SIGKILL: ACDC, the exemplars pass, describe, tuned-lens
training and the few-shot knockout run. Each test starts the real job as a subprocess on a tiny
random model, kills it once its first checkpoint exists (``kill_when`` in ``tests/conftest.py``),
checks that it really died midway, runs the same job again (in this process, on one thread like
the killed one, so the arithmetic is the same), and compares the result with an uninterrupted
run: equal exactly, since every job's steps are deterministic and a resume restores all they
depend on. Each also checks that the rerun resumed (it did less work than a fresh run) and that
no temporary file is left. The SAE, transcoder and toy-training kill tests live beside their
jobs' other tests (``test_sae_cli.py``, ``test_transcoder_train.py``, ``test_toy_sigkill.py``)."""

from __future__ import annotations

import importlib
import json
import sqlite3
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from mechscope.cli.main import app


def _ok(args: list[str]) -> dict:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def _no_tmp(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name], "a temporary file was left behind"


def _without_times(d):
    """``d`` without wall-clock fields (seconds, times), which no two runs share."""
    if isinstance(d, dict):
        return {k: _without_times(v) for k, v in d.items() if "seconds" not in k and k not in ("time", "created")}
    if isinstance(d, list):
        return [_without_times(v) for v in d]
    return d


def _count_calls(monkeypatch, module, name: str) -> list[int]:
    """Count calls of ``module.name`` (patched for this test); returns the live counter."""
    calls = [0]
    real = getattr(module, name)

    def counted(*a, **kw):
        calls[0] += 1
        return real(*a, **kw)

    monkeypatch.setattr(module, name, counted)
    return calls


# ------------------------------------------------------------------------------------ ACDC
@pytest.mark.slow
def test_sigkilled_acdc_resumes_to_the_uninterrupted_circuit(tiny_llama_dir, tmp_path, kill_when, one_thread, monkeypatch):
    acdc_mod = importlib.import_module("mechscope.circuits.acdc")  # the module (the package exports the function)

    def args(out: Path) -> list[str]:
        return ["discover", "--task", "induction", "--method", "acdc", "--n", "200", "--threshold", "0.002", "--no-labels", "--force",
                "--model", tiny_llama_dir, "--device", "cpu", "--out", str(out), "--json"]

    killed = tmp_path / "killed"
    ck = killed / "acdc_checkpoint.safetensors"
    kill_when(args(killed), ck)
    with safe_open(str(ck), "pt") as f:
        left = int(f.metadata()["next_receiver"])
    assert left >= 0 and not (killed / "circuit.json").exists(), "killed after ACDC had finished; give it more work"
    calls = _count_calls(monkeypatch, acdc_mod._Scorer, "__call__")
    _ok(args(killed))  # the same command again: resumes from the checkpoint
    resumed_calls, calls[0] = calls[0], 0
    _ok(args(tmp_path / "straight"))
    assert 0 < resumed_calls < calls[0], "the rerun did not resume from the checkpoint"
    a, b = (load_file(str(tmp_path / name / "scores.safetensors")) for name in ("killed", "straight"))
    assert torch.equal(a["scores"], b["scores"]) and torch.equal(a["circuit"], b["circuit"])
    assert a["circuit"].sum() > 0
    ja, jb = (json.loads((tmp_path / name / "circuit.json").read_text()) for name in ("killed", "straight"))
    assert ja["settings"].pop("checkpoint") != jb["settings"].pop("checkpoint")  # each run's own --out
    assert _without_times(ja) == _without_times(jb)
    assert not ck.exists()  # the result is saved: the checkpoint is gone
    _no_tmp(killed)


def test_acdc_refuses_a_checkpoint_of_another_batch(tiny_llama, tmp_path):
    """A checkpoint is tied to the pairs it was made on: another draw of pairs (or another task
    in the same --out) is refused instead of resumed into a wrong circuit."""
    from mechscope.circuits.acdc import acdc
    from mechscope.errors import MechscopeError
    from mechscope.graph import build_graph
    from mechscope.tasks import get_task

    g = build_graph(tiny_llama)
    ck = tmp_path / "acdc.safetensors"
    task = get_task("induction")
    acdc(tiny_llama, g, task.build(tiny_llama.tokenizer, n=2, seed=0), tau=0.05, checkpoint=ck, max_seconds=0.0)
    with pytest.raises(MechscopeError, match="other settings"):
        acdc(tiny_llama, g, task.build(tiny_llama.tokenizer, n=2, seed=1), tau=0.05, checkpoint=ck)


def test_acdc_refuses_a_checkpoint_of_other_weights(tiny_llama, tiny_llama_dir, tmp_path):
    """Same folder name, same pairs, other weights (a fine-tune saved under the same name):
    refused, where it used to resume into a circuit of the other model."""
    from mechscope.circuits.acdc import acdc
    from mechscope.errors import MechscopeError
    from mechscope.graph import build_graph
    from mechscope.models import load_model
    from mechscope.tasks import get_task

    g = build_graph(tiny_llama)
    ck = tmp_path / "acdc.safetensors"
    batch = get_task("induction").build(tiny_llama.tokenizer, n=2, seed=0)
    acdc(tiny_llama, g, batch, tau=0.05, checkpoint=ck, max_seconds=0.0)
    other = load_model(tiny_llama_dir, device="cpu")
    with torch.no_grad():
        for p in other.bridge.parameters():
            p.mul_(1.3)
    assert other.summary.name == tiny_llama.summary.name and other.fingerprint() != tiny_llama.fingerprint()
    with pytest.raises(MechscopeError, match="other weights"):
        acdc(other, g, batch, tau=0.05, checkpoint=ck)
    acdc(tiny_llama, g, batch, tau=0.05, checkpoint=ck)  # the model that made it resumes


# ------------------------------------------------------------------------- exemplars pass
def _exemplar_args(model_dir: str, corpus: str, db: Path) -> list[str]:
    return ["exemplars", "--db", str(db), "--units", "mlp", "--layers", "0,2", "--tokens", "8192", "--corpus", corpus,
            "--context-len", "32", "--batch-size", "4", "--checkpoint-every", "8", "--k", "6", "--model", model_dir,
            "--device", "cpu", "--json"]


def _db_rows(db: Path) -> dict[str, list]:
    """Everything a unit database holds, without row ids and creation times."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        units = con.execute("SELECT kind, source, layer, idx, max_act, min_act, density, quantiles, histogram, top_logits,"
                            " bottom_logits, n_tokens FROM units ORDER BY kind, source, layer, idx").fetchall()
        ex = con.execute("SELECT u.kind, u.source, u.layer, u.idx, e.kind, e.split, e.quantile, e.context, e.position, e.focus,"
                         " e.tokens, e.acts FROM exemplars e JOIN units u ON u.id = e.unit_id ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9"
                         ).fetchall()
        desc = con.execute("SELECT u.layer, u.idx, d.text, d.explainer, d.settings_key, d.scores, d.provenance FROM descriptions d"
                           " JOIN units u ON u.id = d.unit_id ORDER BY 1, 2, 3").fetchall()
    finally:
        con.close()
    desc = [(*row[:6], json.dumps(_without_times(json.loads(row[6])), sort_keys=True)) for row in desc]
    return {"units": units, "exemplars": ex, "descriptions": desc}


@pytest.mark.slow
def test_sigkilled_exemplars_pass_resumes_to_the_uninterrupted_database(tiny_llama_dir, corpus, tmp_path, kill_when,
                                                                        one_thread, monkeypatch):
    ex_mod = importlib.import_module("mechscope.explain.exemplars")

    db = tmp_path / "killed.db"
    ckpts = Path(f"{db}.exemplars")  # the command's default checkpoint folder: DB.exemplars/<settings>/
    kill_when(_exemplar_args(tiny_llama_dir, corpus, db), lambda: any(ckpts.glob("*/state.safetensors")))
    (state,) = ckpts.glob("*/state.safetensors")
    with safe_open(str(state), "pt") as f:
        at = json.loads(f.metadata()["state"])["contexts_done"]
    assert 0 < at < 256, "killed after the pass had finished; give it more work"
    # state.json is only a readable copy: one lagging behind the tensors (as a kill between two
    # writes would leave it) must not change the resume.
    (state.parent / "state.json").write_text(json.dumps({"contexts_done": 0}))
    calls = _count_calls(monkeypatch, ex_mod, "update")
    info = _ok(_exemplar_args(tiny_llama_dir, corpus, db))  # the same command again: resumes
    resumed_calls, calls[0] = calls[0], 0
    straight = _ok(_exemplar_args(tiny_llama_dir, corpus, tmp_path / "straight.db"))
    assert 0 < resumed_calls < calls[0], "the rerun did not resume from the checkpoint"
    assert info["contexts"] == straight["contexts"] == 256 and info["tokens"] == straight["tokens"]
    a, b = _db_rows(db), _db_rows(tmp_path / "straight.db")
    assert a["units"] and a["exemplars"]
    assert a == b
    assert not ckpts.exists()  # the default checkpoint is removed once the database is written
    _no_tmp(tmp_path)


# ------------------------------------------------------------------------------- describe
@pytest.fixture(scope="module")
def unit_db(tiny_llama_dir, corpus, tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("units") / "units.db"
    args = _exemplar_args(tiny_llama_dir, corpus, db)
    args[args.index("--tokens") + 1] = "2048"
    _ok(args)
    return db


def _copy_db(src: Path, dst: Path) -> Path:
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    try:
        a.backup(b)  # consistent whatever the journal mode
    finally:
        a.close()
        b.close()
    return dst


@pytest.mark.slow
def test_sigkilled_describe_resumes_to_the_uninterrupted_scores(tiny_llama_dir, unit_db, tmp_path, kill_when, one_thread,
                                                                monkeypatch):
    describe_mod = importlib.import_module("mechscope.explain.describe")  # the module, not the function

    def args(db: Path) -> list[str]:  # the offline baseline explainer, scored by the tiny model
        return ["describe", "--db", str(db), "--units", "mlp", "--layers", "0", "--limit", "8", "--explainer", "baseline",
                "--simulator", tiny_llama_dir, "--device", "cpu", "--json"]

    def scored(db: Path) -> int:
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.1)
            try:
                return con.execute("SELECT count(*) FROM descriptions WHERE scores != '{}'").fetchone()[0]
            finally:
                con.close()
        except sqlite3.Error:  # busy or not created yet: ask again
            return 0

    killed = _copy_db(unit_db, tmp_path / "killed.db")
    kill_when(args(killed), lambda: scored(killed) > 0)
    n = scored(killed)
    assert 0 < n < 8, "killed after describe had finished; give it more work"
    calls = _count_calls(monkeypatch, describe_mod, "pick_heldout")  # once per unit scored
    res = _ok(args(killed))  # the same command again: skips what is done
    resumed_calls, calls[0] = calls[0], 0
    assert res["already_described"] == 8 and res["described"] == 0 and res["scored"] == 8 - n
    straight = _ok(args(_copy_db(unit_db, tmp_path / "straight.db")))
    assert straight["scored"] == 8 and resumed_calls == 8 - n < calls[0]
    assert _without_times(res["summary"]) == _without_times(straight["summary"])
    a, b = _db_rows(killed), _db_rows(tmp_path / "straight.db")
    assert len(a["descriptions"]) == 8  # one description per unit, none twice
    assert a == b


# ---------------------------------------------------------------------------- tuned lens
@pytest.mark.slow
def test_sigkilled_tuned_lens_training_resumes_to_the_uninterrupted_translators(tiny_llama_dir, corpus, tmp_path, kill_when,
                                                                                one_thread, monkeypatch):
    tuned_train = importlib.import_module("mechscope.lens.tuned_train")

    def args(out: Path, *extra: str) -> list[str]:
        return ["tuned-lens", "train", "--model", tiny_llama_dir, "--corpus", corpus, "--tokens", "2500", "--kl-batch", "32",
                "--kl-tokens", "600", "--kl-steps", "120", "--checkpoint-every", "5", "--matmul-dtype", "float32", "--lr", "3e-3",
                "--device", "cpu", "--out", str(out), "--json", *extra]

    killed = tmp_path / "killed"
    state = killed / "checkpoint" / "state.safetensors"
    kill_when(args(killed), state)
    with safe_open(str(state), "pt") as f:
        at = json.loads(f.metadata()["json"])["step"]
    assert 0 < at < 120 and not (killed / "tuned_lens.json").exists(), "killed after training had finished; give it more work"
    # The .json files are readable copies: missing or lagging ones (a kill between two writes)
    # must not change the resume; the step comes from the file that holds the weights.
    (killed / "checkpoint" / "stage1.json").unlink()
    (killed / "checkpoint" / "state.json").write_text(json.dumps({"step": 0}))
    monkeypatch.setattr(tuned_train, "closed_form", lambda *a: pytest.fail("the resumed run redid the closed form"))
    steps = _count_calls(monkeypatch, tuned_train, "kl_step")
    _ok(args(killed, "--resume"))
    assert steps[0] == 120 - at  # only the steps after the checkpoint
    monkeypatch.undo()
    _ok(args(tmp_path / "straight"))
    a, b = (load_file(str(tmp_path / name / "tuned_lens.safetensors")) for name in ("killed", "straight"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ja, jb = (json.loads((tmp_path / name / "tuned_lens.json").read_text()) for name in ("killed", "straight"))
    assert _without_times(ja) == _without_times(jb) and len(ja["training"]["kl_log"]) == 120
    with safe_open(str(state), "pt") as f:  # kept at the final step, so --resume can extend the run
        assert json.loads(f.metadata()["json"])["step"] == 120
    _no_tmp(killed)


# ------------------------------------------------------------------------ few-shot knockout
# `mechscope icl` knocks out only prompts the model gets right, and a random tiny model gets none:
# the killed job is the library call with every prompt counted right (as test_icl.py does).
ICL_CODE = """
import sys, torch
import mechscope.icl.run as run
from mechscope.icl.config import FewShotConfig
from mechscope.models import load_model
run.fewshot_accuracy = lambda m, p, r: (torch.full((len(p),), 0.5), torch.ones(len(p), dtype=torch.bool))
model_dir, task, out = sys.argv[1:4]
run.fewshot_knockout(load_model(model_dir, device="cpu"), FewShotConfig(task=task, shots=2, n=10, max_knockout=10, force=True),
                     checkpoint=out)
"""


@pytest.mark.slow
def test_sigkilled_fewshot_knockout_resumes_to_the_uninterrupted_curves(tiny_gpt2_dir, tmp_path, kill_when, one_thread,
                                                                        monkeypatch):
    icl_run = importlib.import_module("mechscope.icl.run")
    from mechscope.icl.config import FewShotConfig
    from mechscope.models import load_model

    task = tmp_path / "pairs.jsonl"
    task.write_text("".join(json.dumps({"x": x, "y": y}) + "\n" for x, y in [("a", "b"), ("c", "d"), ("e", "f"), ("g", "h")]))
    killed = tmp_path / "killed"
    partial = killed / icl_run.PARTIAL
    kill_when(["-c", ICL_CODE, tiny_gpt2_dir, str(task), str(killed)], partial)
    n = len(json.loads(partial.read_text())["done"])
    assert 0 < n < 10, "killed after the run had finished; give it more work"
    monkeypatch.setattr(icl_run, "fewshot_accuracy", lambda m, p, r: (torch.full((len(p),), 0.5), torch.ones(len(p), dtype=torch.bool)))
    calls = _count_calls(monkeypatch, icl_run, "prompt_curves")
    model = load_model(tiny_gpt2_dir, device="cpu")
    cfg = FewShotConfig(task=str(task), shots=2, n=10, max_knockout=10, force=True)
    resumed = icl_run.fewshot_knockout(model, cfg, checkpoint=killed)
    assert calls[0] == 10 - n  # only the prompts the killed run had not finished
    straight = icl_run.fewshot_knockout(model, cfg, checkpoint=tmp_path / "straight")
    assert _without_times(resumed.to_dict()) == _without_times(straight.to_dict())
    assert all(len(c["effect_per_prompt"]) == 10 for c in resumed.curves.values())
    _no_tmp(killed)


# ------------------------------------------------------------------------ language confusion
# The killed process's cost checks are slowed, so the kill lands after the generation is kept and
# before the run ends, whatever the machine.
CONFUSION_CODE = """
import sys, time
from mechscope.confusion.cost import CostProbe
real = CostProbe.measure
CostProbe.measure = lambda self, *a, **k: time.sleep(2.0) or real(self, *a, **k)
from mechscope.cli.main import app
app(sys.argv[1:], standalone_mode=True)
"""


@pytest.mark.slow
def test_sigkilled_confusion_run_resumes_to_the_uninterrupted_result(tiny_llama_dir, tmp_path, kill_when, one_thread,
                                                                     monkeypatch):
    run_mod = importlib.import_module("mechscope.confusion.run")
    prompts = tmp_path / "p.jsonl"
    words = ["Hallo Welt", "Guten Tag", "Wie geht es dir", "Danke schön", "Bis bald", "Gute Nacht", "Ich bin hier",
             "Das ist gut", "Wo ist der Bahnhof", "Es regnet heute", "Ich lese ein Buch", "Wir gehen nach Hause"]
    prompts.write_text("".join(json.dumps({"prompt": w, "lang": "de"}) + "\n" for w in words))

    def args(out: Path) -> list[str]:
        return ["confusion", "--prompts", str(prompts), "--langs", "de", "--n-tokens", "8", "--top-n", "5",
                "--model", tiny_llama_dir, "--facts-n", "0", "--ppl-contexts", "32", "--out", str(out), "--json"]

    killed = tmp_path / "killed"
    pieces = killed / "confusion-partial"
    kill_when(["-c", CONFUSION_CODE, *args(killed)], pieces / "generate.json")
    assert (pieces / "generate.json").is_file() and not (killed / "confusion.json").exists()
    gens = _count_calls(monkeypatch, run_mod, "greedy_generate")
    _ok(args(killed))
    assert gens[0] == 0  # the generation was read back (a random model never switches: no edits to generate)
    assert not pieces.exists()  # the stages go once the result is saved
    _ok(args(tmp_path / "straight"))

    def result(folder: Path) -> dict:
        d = json.loads((folder / "confusion.json").read_text())
        return _without_times({k: v for k, v in d.items() if k != "timing"})

    assert result(killed) == result(tmp_path / "straight")
    _no_tmp(killed)


# ------------------------------------------------------------------------------------ probes
# Each fit is slowed down in the killed process only, so the kill lands between hooks whatever the machine.
PROBE_CODE = """
import sys, time
import mechscope.probes.run as run
from mechscope.models import load_model
from mechscope.probes import ProbeConfig, labels_from_file
real = run.fit_logistic
run.fit_logistic = lambda *a: time.sleep(0.5) or real(*a)
model_dir, labels, out = sys.argv[1:4]
m = load_model(model_dir, device="cpu")
run.run_probe(m, labels_from_file(m.tokenizer, labels), ProbeConfig(hook="resid_pre", max_items=200), checkpoint=out)
"""


@pytest.mark.slow
def test_sigkilled_probe_run_resumes_to_the_uninterrupted_result(tiny_llama_dir, tmp_path, kill_when, one_thread, monkeypatch):
    import random

    run_mod = importlib.import_module("mechscope.probes.run")
    from mechscope.models import load_model
    from mechscope.probes import ProbeConfig, labels_from_file

    rng = random.Random(0)
    words = ["Mary", "John", "store", "drink", "park", "ball", "went", "gave"]
    labels = tmp_path / "lab.jsonl"
    labels.write_text("\n".join(json.dumps({"words": ws, "labels": ["cap" if w[0].isupper() else "low" for w in ws]})
                                for ws in ([rng.choice(words) for _ in range(8)] for _ in range(60))) + "\n")
    killed = tmp_path / "killed"
    pieces = killed / "probe-partial"
    kill_when(["-c", PROBE_CODE, tiny_llama_dir, str(labels), str(killed)], pieces / "hook-0.json")
    done = sorted(p.name for p in pieces.glob("hook-*.json"))
    assert 1 <= len(done) < 3, done  # resid_pre of 3 layers
    fits = _count_calls(monkeypatch, run_mod, "fit_logistic")
    m = load_model(tiny_llama_dir, device="cpu")
    cfg = ProbeConfig(hook="resid_pre", max_items=200)
    resumed = run_mod.run_probe(m, labels_from_file(m.tokenizer, labels), cfg, checkpoint=killed)
    assert fits[0] == 2 * (3 - len(done))  # a probe and its control per hook not done
    straight = run_mod.run_probe(m, labels_from_file(m.tokenizer, labels), cfg)
    assert resumed.to_dict() == straight.to_dict()
    _no_tmp(killed)


# ------------------------------------------------------------------------------------ head scores
# The killed process's one-at-a-time ablations are slowed, so the kill lands after the pattern
# steps are kept and before the run ends, whatever the machine.
HEADS_CODE = """
import importlib, sys, time
a = importlib.import_module("mechscope.heads.ablation")
real = a.ablation_effects
a.ablation_effects = lambda *x, **k: time.sleep(2.0) or real(*x, **k)
from mechscope.cli.main import app
app(sys.argv[1:], standalone_mode=True)
"""


@pytest.mark.slow
def test_sigkilled_head_scoring_resumes_to_the_uninterrupted_result(tiny_gpt2_dir, tmp_path, kill_when, one_thread, monkeypatch):
    ablation = importlib.import_module("mechscope.heads.ablation")
    patterns = importlib.import_module("mechscope.heads.patterns")

    def args(out: Path) -> list[str]:
        return ["heads", "--model", tiny_gpt2_dir, "--n", "4", "--seq-len", "6", "--n-text", "2", "--text-len", "30",
                "--text", "pydoc", "--ablate", "2", "--top-k", "2", "--out", str(out), "--json"]

    killed = tmp_path / "killed"
    steps = killed / "heads-partial"
    kill_when(["-c", HEADS_CODE, *args(killed)], steps / "copying.safetensors")
    assert not (killed / "heads.json").exists() and not (steps / "ablation.safetensors").exists()
    counts = _count_calls(monkeypatch, patterns, "pattern_scores")
    abl = _count_calls(monkeypatch, ablation, "ablation_effects")
    _ok(args(killed))
    assert counts[0] == 0 and abl[0] == 1  # both pattern steps read back; the ablations run
    assert not steps.exists()
    _ok(args(tmp_path / "straight"))
    assert _without_times(json.loads((killed / "heads.json").read_text())) == \
        _without_times(json.loads((tmp_path / "straight" / "heads.json").read_text()))
    a, b = load_file(str(killed / "heads.safetensors")), load_file(str(tmp_path / "straight" / "heads.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True)
    _no_tmp(killed)
