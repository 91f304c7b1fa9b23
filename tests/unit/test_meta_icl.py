"""In-context meta-learning (Minegishi et al. 2025): the data rule, the attention metrics on
hand-set patterns, the model's patterns, exact resume, the phases summary, the CLI and its
bad input. Tiny sizes: a few seconds in all."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.icl.meta_config import MetaConfig, MetaDataConfig, MetaDynamicsConfig
from mechscope.icl.meta_data import MetaData, example_positions, label_positions, query_position
from mechscope.icl.meta_metrics import attention_metrics, peak_step, plateaus
from mechscope.progress import Recorder

EVIL = "<script>alert(1)</script>"


def tiny(steps: int = 12, optimizer: str = "adam", **data) -> MetaConfig:
    d = {"tasks": 2, "n_labels": 5, "n_classes": 12, "dim": 7, "n_context": 4, **data}
    return MetaConfig(d_model=16, steps=steps, batch=8, n_checkpoints=4, linear_checkpoints=2, n_eval=32,
                      optimizer=optimizer, lr=1e-2, data=MetaDataConfig(**d))


def test_labels_follow_the_rule():
    cfg = MetaDataConfig(tasks=3, n_labels=7, n_classes=20, dim=5, n_context=6, ways=2)
    data = MetaData(cfg)
    b = data.batch(50, torch.Generator().manual_seed(1))
    assert b.x.shape == (50, 7, 5) and b.labels.shape == (50, 6) and b.target.shape == (50,)
    for s in range(50):
        t = int(b.task[s])
        assert 0 <= t < 3
        for i in range(6):
            assert int(b.labels[s, i]) == (int(data.base[int(b.classes[s, i])]) + t) % 7
        assert int(b.target[s]) == (int(data.base[int(b.classes[s, 6])]) + t) % 7
        counts = torch.bincount(b.classes[s, :6], minlength=20)
        assert set(counts[counts > 0].tolist()) == {2}  # 3 distinct classes, each twice
        # each example is its class mean plus a little noise, rescaled
        mean = data.means[b.classes[s]] / (1 + cfg.eps**2) ** 0.5
        assert (b.x[s] - mean).norm(dim=-1).max() < 0.5 * data.means.norm(dim=-1).min()
    assert len(set(b.task.tolist())) == 3
    # the world is the seed's; batches differ with their generator
    assert torch.equal(MetaData(cfg).base, data.base)
    rnd = data.batch(50, torch.Generator().manual_seed(1), random_labels=True)
    assert torch.equal(rnd.target, b.target) and torch.equal(rnd.classes, b.classes)
    assert not torch.equal(rnd.labels, b.labels)


def _independent_metrics(p: torch.Tensor, n: int) -> tuple[list[float], list[float], list[float]]:
    L, B, H = p.shape[:3]
    q = 2 * n
    self_, label, chunk = [], [], []
    for l in range(L):
        s = lab = ch = 0.0
        for b in range(B):
            for h in range(H):
                s += float(p[l, b, h, q, q])
                lab += sum(float(p[l, b, h, q, 2 * i + 1]) for i in range(n))
                ch += sum(float(p[l, b, h, 2 * i + 1, 2 * i]) for i in range(n)) / n
        self_.append(s / (B * H))
        label.append(lab / (B * H))
        chunk.append(ch / (B * H))
    return self_, label, chunk


def test_metrics_on_hand_set_patterns():
    n = 3
    pos = 2 * n + 1
    assert example_positions(n) == [0, 2, 4] and label_positions(n) == [1, 3, 5] and query_position(n) == 6
    # one-hot patterns: layer 0 binds each label to its example, layer 1's query reads itself
    p = torch.zeros(2, 1, 1, pos, pos)
    for qp in range(pos):
        p[:, 0, 0, qp, qp] = 1.0
    for i in range(n):
        p[0, 0, 0, 2 * i + 1] = 0
        p[0, 0, 0, 2 * i + 1, 2 * i] = 1.0
    m = attention_metrics(p, n)
    assert (m["self"], m["label"], m["chunk"]) == (1.0, 0.0, 1.0)
    # in the last layer the query spreads its attention evenly over the labels
    p[1, 0, 0, 6] = 0
    p[1, 0, 0, 6, [1, 3, 5]] = 1 / 3
    m = attention_metrics(p, n)
    assert m["per_layer"]["self"] == [1.0, 0.0] and m["per_layer"]["label"] == pytest.approx([0.0, 1.0])
    assert (m["self"], m["label"], m["chunk"]) == (1.0, 0.0, 1.0)  # the first layer's
    # random causal patterns: equal to a loop over the definition, per layer
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 4, 2, pos, pos, generator=g).masked_fill(~torch.ones(pos, pos).tril().bool(), float("-inf"))
    p = scores.softmax(-1)
    m = attention_metrics(p, n)
    s, lab, ch = _independent_metrics(p, n)
    assert m["per_layer"]["self"] == pytest.approx(s) and m["per_layer"]["label"] == pytest.approx(lab)
    assert m["per_layer"]["chunk"] == pytest.approx(ch)
    assert (m["self"], m["label"], m["chunk"]) == pytest.approx((s[0], lab[0], ch[0]))


def test_model_patterns_are_causal_and_the_tokens_carry_positions():
    from mechscope.icl.meta_model import MetaModel

    cfg = tiny()
    model = MetaModel(cfg)
    b = MetaData(cfg.data).batch(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, pats = model(b.x, b.labels, return_attention=True)
        tok = model.embed(b.x, b.labels)
    n_pos = cfg.data.n_positions
    assert logits.shape == (3, cfg.data.n_labels) and pats.shape == (2, 3, 1, n_pos, n_pos)
    assert torch.allclose(pats.sum(-1), torch.ones(2, 3, 1, n_pos))
    assert float(pats.triu(1).abs().max()) == 0.0
    assert torch.equal(tok[:, :, cfg.data.dim:].argmax(-1), torch.arange(n_pos).expand(3, -1))
    assert torch.equal(tok[:, 0::2, : cfg.data.dim], b.x)
    assert torch.equal(tok[:, 1::2, : cfg.data.dim], model.label_emb[b.labels])


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_is_exact(tmp_path, optimizer):
    from safetensors.torch import load_file

    from mechscope.icl.meta_train import train_meta

    cfg = tiny(12, optimizer)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train_meta(cfg, whole)

    def crash():  # interrupted after step 9, before its checkpoint
        return Recorder(interrupt_at={"training": 9})

    with pytest.raises(KeyboardInterrupt):
        train_meta(cfg, broken, progress=crash())
    assert (broken / "last" / "state.safetensors").is_file() and not list(broken.rglob("*.pt"))
    assert "seconds" in json.loads((broken / "train.json").read_text())  # saved with the state, so a resume adds to it
    # What a SIGKILL mid-write leaves (the writers' own cleanup never runs): the rerun sweeps it.
    stale = [broken / "ckpt_000012" / ".config.json.tmp4242", broken / "last" / "state.safetensors.tmp",
             broken / "train.json.tmp"]
    for f in stale:
        f.parent.mkdir(exist_ok=True)
        f.write_text("half a file")
    keep = broken / "notes.tmp"  # a user's file that only looks like one is left alone
    keep.write_text("mine")
    train_meta(cfg, broken)
    assert not any(f.exists() for f in stale) and keep.read_text() == "mine"
    a, b = (load_file(str(d / "ckpt_000012" / "model.safetensors")) for d in (whole, broken))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = (json.loads((d / "train.json").read_text()) for d in (whole, broken))
    assert [c["accuracy"] for c in la["checkpoints"]] == [c["accuracy"] for c in lb["checkpoints"]]
    assert la["train_loss"] == lb["train_loss"] and lb["done"] and not (broken / "last").exists()
    with pytest.raises(MechscopeError, match="made with steps=12, not 13; pass a new --out"):
        train_meta(tiny(13, optimizer), broken)
    bad = tmp_path / "bad"
    with pytest.raises(KeyboardInterrupt):
        train_meta(cfg, bad, progress=crash())
    (bad / "last" / "state.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MechscopeError, match="not a readable resume state"):
        train_meta(cfg, bad)


def test_plateaus_and_peaks():
    steps = [0, 1, 2, 4, 8, 16, 32, 64, 128]
    acc = [0.03, 0.03, 0.04, 0.2, 0.33, 0.34, 0.35, 0.9, 0.98]
    ps = plateaus(steps, acc, band=0.05, min_span=1.5)
    assert [(p["start"], p["end"]) for p in ps] == [(1, 2), (8, 32)]
    assert ps[1]["mean"] == pytest.approx(0.34)
    assert plateaus(steps, acc, band=0.05, min_span=3) == [{"start": 8, "end": 32, "mean": pytest.approx(0.34), "n": 3}]
    assert peak_step([1, 2, 3], [0.1, 0.5, 0.5]) == 2 and peak_step([], []) is None


def test_summary_finds_the_phases():
    from mechscope.icl.meta_dynamics import summarize

    steps = [0, 10, 20, 40, 80, 160, 320, 640]
    acc = [0.03, 0.03, 0.33, 0.34, 0.33, 0.6, 0.95, 0.97]
    rnd = [0.03, 0.03, 0.33, 0.33, 0.32, 0.35, 0.34, 0.33]
    self_ = [0.1, 0.1, 0.9, 0.5, 0.2, 0.1, 0.1, 0.1]
    label = [0.1, 0.99, 0.2, 0.4, 0.8, 0.5, 0.3, 0.3]  # the peak at step 10 is before the learning onset
    chunk = [0.1, 0.1, 0.1, 0.1, 0.2, 0.5, 0.8, 0.9]
    rows = [{"step": s, "accuracy": a, "random_label_accuracy": r, "self": x, "label": y, "chunk": z,
             "per_layer": {"self": [x, 1 - x], "label": [y, 0.5], "chunk": [z, z]}}
            for s, a, r, x, y, z in zip(steps, acc, rnd, self_, label, chunk)]
    ph = summarize(rows, 3, 32, MetaDynamicsConfig())
    assert ph["learning_onset"] == 20
    assert ph["peaks"] == {"self": 20, "label": 80, "chunk": 640} and ph["peaks_in_order"] is True
    assert ph["peaks_per_layer"] == {"self": [20, 160], "label": [80, 20], "chunk": [640, 640]}
    assert ph["phase2"]["step"] == 80 and ph["phase2"]["gap"] == pytest.approx(0.01)
    assert ph["plateau_nearest_one_over_tasks"]["start"] == 20 and ph["distance_to_one_over_tasks"] < 0.01
    assert [p["start"] for p in ph["middle_plateaus"]] == [20]
    assert ph["unfinished"] is None  # it ends at 0.97
    rows[2]["self"], rows[5]["self"] = 0.1, 0.95  # self now peaks after label
    assert summarize(rows, 3, 32, MetaDynamicsConfig())["peaks_in_order"] is False
    # a run that stops before the jump (ends at 0.6, under half way from 1/3 to 1) says so, page and all
    stopped = summarize(rows[:6], 3, 32, MetaDynamicsConfig())
    assert "ends at accuracy 0.600, less than half way from 1/T (0.333)" in stopped["unfinished"]
    from mechscope.report.meta_dynamics import render_meta_dynamics

    page = render_meta_dynamics({"run": "r", "checkpoints": [r | {"loss": 1.0} for r in rows[:6]], "phases": stopped, "config": {}})
    assert "less than half way from 1/T" in page
    assert summarize(rows[:7], 3, 32, MetaDynamicsConfig())["unfinished"] is None  # 0.95
    assert summarize(rows[:6], 1, 32, MetaDynamicsConfig())["unfinished"] is None  # with T = 1 there is no jump to wait for


def test_summary_needs_an_onset_and_checkpoints_after_it():
    from mechscope.icl.meta_dynamics import summarize

    def rows_of(acc):
        return [{"step": 10 * i, "accuracy": a, "random_label_accuracy": a, "self": 0.1 * i, "label": 0.5, "chunk": 0.2,
                 "per_layer": {"self": [0.1], "label": [0.5], "chunk": [0.2]}} for i, a in enumerate(acc)]

    late = summarize(rows_of([0.03, 0.03, 0.03, 0.4]), 3, 32, MetaDynamicsConfig())  # onset at the last checkpoint
    assert late["learning_onset"] == 30 and late["peaks"] == {"self": None, "label": None, "chunk": None}
    assert late["phase2"] is None and "Only 1 checkpoint(s) from the learning onset (step 30)" in late["note"]
    never = summarize(rows_of([0.03, 0.03, 0.03]), 3, 32, MetaDynamicsConfig())
    assert never["learning_onset"] is None and never["phase2"] is None and "never reached" in never["note"]
    ok = summarize(rows_of([0.03, 0.4, 0.5, 0.6]), 3, 32, MetaDynamicsConfig())
    assert ok["note"] is None and ok["peaks"]["self"] == 30
    from mechscope.report.meta_dynamics import render_meta_dynamics

    rows = [{k: v for k, v in r.items() if k != "per_layer"} | {"loss": 1.0} for r in rows_of([0.03, 0.03, 0.03, 0.4])]
    page = render_meta_dynamics({"run": "r", "checkpoints": rows, "phases": late, "config": {}})
    assert "Only 1 checkpoint(s) from the learning onset (step 30)" in page  # the page says it too


def test_bad_settings_are_one_sentence():
    context = r"--context must be a positive multiple of 2 \(each context class appears 2 times; got 3\); pass e.g. --context 2\.$"
    for kw, msg in (({"tasks": 0}, "--tasks must be at least 1"), ({"n_labels": 1}, "--labels must be at least 2"),
                    ({"tasks": 5, "n_labels": 4}, "cannot exceed --labels"), ({"n_context": 3, "ways": 2}, context),
                    ({"dim": 0}, "dim and ways must be at least 1")):
        with pytest.raises(MechscopeError, match=msg):
            MetaDataConfig(**kw)
    with pytest.raises(MechscopeError, match="Unknown optimizer 'rmsprop'"):
        MetaConfig(optimizer="rmsprop")
    with pytest.raises(MechscopeError, match="one-hot position"):
        MetaConfig(d_model=70)


def _cli(*args):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_train_and_dynamics(tmp_path):
    run = tmp_path / EVIL.replace("/", "_")
    r = _cli("train-toy", "--setting", "icml", "--tasks", "2", "--labels", "5", "--classes", "12", "--context", "4",
             "--steps", "8", "--batch", "8", "--checkpoints", "3", "--linear-checkpoints", "0", "--out", run, "--json")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["setting"] == "icml" and s["settings"]["data"]["tasks"] == 2 and s["settings"]["heads"] == 1
    assert s["settings"]["batch"] == 8 and s["settings"]["optimizer"] == "adam"
    r = _cli("dynamics", run, "--n", "16")  # 8 steps: no learning onset, said in a sentence (no "step None", "nan")
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())  # rich wraps lines
    assert "None" not in said and "nan" not in said
    assert "too few to find the metric peaks" in said  # the onset is the last checkpoint (step 8)
    assert "less than half way from 1/T (0.500) to 1: the full-context circuit has not formed" in said  # and no jump
    r = _cli("dynamics", run, "--seq-len", "5")
    assert r.exit_code == 2 and "--seq-len does not apply to a --setting icml run; drop it." in r.output, r.output
    r = _cli("dynamics", run, "--n", "16", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["setting"] == "icml" and d["checkpoints"] == s["checkpoints"]
    assert set(d["phases"]["peaks"]) == {"self", "label", "chunk"} and d["phases"]["one_over_tasks"] == 0.5
    saved = json.loads((run / "dynamics.json").read_text())
    assert saved["config"]["n_eval"] == 16 and len(saved["checkpoints"]) == s["checkpoints"]
    page = (run / "dynamics.html").read_text()
    assert "<svg" in page and EVIL not in page and "&lt;script&gt;" in page
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}
    assert (run / "dynamics.svg").read_text().startswith("<svg")
    from mechscope.icl.meta_dynamics import MetaDynamicsResult

    assert MetaDynamicsResult.load(run).rows[-1]["accuracy"] == saved["checkpoints"][-1]["accuracy"]


@pytest.mark.parametrize("args, needle", [
    (["--setting", "icml", "--tasks", "0"], "--tasks must be at least 1"),
    (["--setting", "icml", "--labels", "1"], "--labels must be at least 2"),
    (["--setting", "icml", "--optimizer", "rmsprop"], "Unknown optimizer 'rmsprop'"),
    (["--setting", "nope"], "Unknown --setting 'nope'"),
    (["--tasks", "3"], "only apply to --setting icml"),
    (["--setting", "icml", "--vocab", "9"], "--vocab does not apply to --setting icml; drop it."),
])
def test_cli_bad_input_is_one_sentence_and_exit_2(tmp_path, args, needle):
    out = tmp_path / "run"
    r = _cli("train-toy", *args, "--steps", "2", "--out", out)
    assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output
    assert not out.exists()
