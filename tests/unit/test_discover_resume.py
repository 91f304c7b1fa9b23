"""``discover`` keeps its finished stages (edge scores, each rank mode's cross-validated curve, the
held-out evaluation, the faithfulness curve) in its ``--out`` folder, and a rerun of the same
discovery reads them back: the result is the one an uninterrupted run gives, and only the
missing stages run again. Another run (other settings, pairs or seed) does not read them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mechscope.circuits import DiscoverConfig, discover


def _toy(tmp_path):
    from mechscope.circuits.toy import induction_task, save_induction_toy
    from mechscope.models import load_model

    m = load_model(save_induction_toy(tmp_path / "toy"), device="cpu")
    return m, induction_task(m.tokenizer, n=12, seq_len=8, seed=0)


def _comparable(res) -> dict:
    """The result without wall-clock fields."""
    d = json.loads(json.dumps(res.to_dict()))
    for k in ("seconds", "scoring_seconds"):
        d["metrics"].pop(k, None)
    return d


def _counting(monkeypatch, module, *names):
    counts = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(module, name)

        def counted(*a, _real=real, _name=name, **kw):
            counts[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(module, name, counted)
    return counts


CFG = dict(task="toy", n=12, method="eap", ablation="zero", labels=False, random_seeds=1, folds=2, bootstrap=50)


@pytest.mark.slow
def test_a_rerun_reads_the_finished_stages_and_gives_the_same_circuit(tmp_path, monkeypatch):
    import importlib

    mod = importlib.import_module("mechscope.circuits.discover")
    m, b = _toy(tmp_path)
    cfg = DiscoverConfig(**CFG)
    straight = discover(m, cfg, batch=b, progress=False)
    out = tmp_path / "run"
    first = discover(m, cfg, batch=b, progress=False, checkpoint=out)
    assert _comparable(first) == _comparable(straight)
    stages = out / "discover-s0-partial"
    names = sorted(p.name for p in stages.iterdir())
    assert names == ["curve.json", "cv-abs.json", "cv-signed.json", "evaluate.json", "key.json", "score-info.json",
                     "scores.safetensors"]
    # everything read back: no scoring, no cross-validation, no evaluation
    counts = _counting(monkeypatch, mod, "edge_score_folds", "cv_curve", "faithfulness_curve", "random_baseline")
    again = discover(m, cfg, batch=b, progress=False, checkpoint=out)
    assert counts == dict.fromkeys(counts, 0)
    assert _comparable(again) == _comparable(straight)
    # a kill during the second rank mode's cross-validation: scoring and the first mode are read
    for name in ("cv-abs.json", "evaluate.json", "curve.json"):
        (stages / name).unlink()
    resumed = discover(m, cfg, batch=b, progress=False, checkpoint=out)
    assert counts == {"edge_score_folds": 0, "cv_curve": 1, "faithfulness_curve": 1, "random_baseline": 1}
    assert _comparable(resumed) == _comparable(straight)


@pytest.mark.slow
def test_another_seed_or_setting_does_not_read_the_stages(tmp_path, monkeypatch):
    import importlib

    mod = importlib.import_module("mechscope.circuits.discover")
    m, b = _toy(tmp_path)
    out = tmp_path / "run"
    discover(m, DiscoverConfig(**CFG), batch=b, progress=False, checkpoint=out)
    counts = _counting(monkeypatch, mod, "edge_score_folds")
    discover(m, DiscoverConfig(**{**CFG, "seed": 1}), batch=b, progress=False, checkpoint=out)
    assert counts["edge_score_folds"] == 1 and (out / "discover-s0-partial").is_dir()  # each seed its own stages
    assert (out / "discover-s1-partial" / "scores.safetensors").is_file()
    other = discover(m, DiscoverConfig(**{**CFG, "ig_steps": 3, "method": "eap-ig"}), batch=b, progress=False, checkpoint=out)
    assert counts["edge_score_folds"] == 2 and other.method == "eap-ig"
    b2 = b.subset(list(range(12)))
    b2.clean[0, 1] = (b2.clean[0, 1] + 1) % 10  # other pairs
    discover(m, DiscoverConfig(**{**CFG, "force": True}), batch=b2, progress=False, checkpoint=out)
    assert counts["edge_score_folds"] == 3


# The killed process's cross-validation is slowed, so the kill lands after the scores are kept
# and before the run ends, whatever the machine.
DISCOVER_CODE = """
import importlib, sys, time
d = importlib.import_module("mechscope.circuits.discover")  # the module (the package exports the function by that name)
real = d.cv_curve
d.cv_curve = lambda *a, **k: time.sleep(2.0) or real(*a, **k)
from mechscope.cli.main import app
app(sys.argv[1:], standalone_mode=True)
"""


@pytest.mark.slow
def test_sigkilled_discover_resumes_from_its_stages(tmp_path, kill_when, one_thread, monkeypatch):
    import importlib
    import random

    from typer.testing import CliRunner

    from mechscope.circuits.toy import save_induction_toy
    from mechscope.cli.main import app

    mod = importlib.import_module("mechscope.circuits.discover")
    toy_dir = str(save_induction_toy(tmp_path / "toy"))
    rng = random.Random(0)
    lines = []
    for _ in range(12):  # repeated random tokens: the toy model's induction task, as a task file
        r = rng.sample(range(62), 8)
        seq, other = " ".join(f"t{i}" for i in r[:4]), " ".join(f"t{i}" for i in r[4:8])
        lines.append(json.dumps({"clean": f"<bos> {seq} {seq[:seq.rindex(' ')]}", "corrupt": f"<bos> {seq} {other[:other.rindex(' ')]}",
                                 "answer": f"t{r[3]}", "wrong": f"t{r[7]}"}))
    task = str(tmp_path / "pairs.jsonl")
    Path(task).write_text("\n".join(lines) + "\n")

    def args(out: Path) -> list[str]:
        return ["discover", "--task", task, "--model", toy_dir, "--n", "12", "--method", "eap", "--no-labels",
                "--out", str(out), "--json"]

    killed = tmp_path / "killed"
    kill_when(["-c", DISCOVER_CODE, *args(killed)], killed / "discover-s0-partial" / "scores.safetensors")
    assert not (killed / "circuit.json").exists()
    counts = _counting(monkeypatch, mod, "edge_score_folds")
    r = CliRunner().invoke(app, args(killed))
    assert r.exit_code == 0, r.output
    assert counts["edge_score_folds"] == 0  # the scores were read back
    assert not list(killed.glob("discover-s*-partial"))  # the stages go once circuit.json is written
    r2 = CliRunner().invoke(app, args(tmp_path / "straight"))
    assert r2.exit_code == 0, r2.output

    def saved(folder: Path) -> dict:
        d = json.loads((folder / "circuit.json").read_text())
        for k in ("seconds", "scoring_seconds"):
            d["metrics"].pop(k, None)
        d.get("settings", {}).pop("created", None)
        return d

    assert saved(killed) == saved(tmp_path / "straight")
    assert not [p for p in killed.rglob("*") if ".tmp" in p.name]
