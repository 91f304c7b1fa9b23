"""The one progress protocol (mechscope.progress): phases in order with their totals, silent
by default, bars on stderr only, one sentence for a wrong argument."""

from __future__ import annotations

import os

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.progress import SILENT, Bars, Progress, Recorder, Silent, as_progress


def _finished(rec: Recorder) -> None:
    """Every phase was closed, and every phase with a total ended exactly at it."""
    for p in rec.phases:
        assert p.closed, p.name
        if p.total is not None:
            assert p.count == p.total, (p.name, p.count, p.total)


def test_as_progress_coerces_and_refuses():
    assert as_progress(None) is SILENT and as_progress(False) is SILENT
    assert isinstance(as_progress(True), Bars)
    rec = Recorder()
    assert as_progress(rec) is rec and isinstance(rec, Progress) and isinstance(Silent(), Progress)
    for bad in (lambda i, k: None, 1, "yes", print):
        with pytest.raises(MechscopeError) as e:
            as_progress(bad)  # type: ignore[arg-type]
        msg = str(e.value)
        assert msg.count(".") >= 1 and "\n" not in msg and "progress must be" in msg


def test_recorder_keeps_events_metrics_and_interrupts():
    rec = Recorder(interrupt_at={"b": 2})
    with rec.phase("a", total=3, unit="x", initial=1) as ph:
        ph.advance(loss=0.5)
        ph.advance(loss=0.25)
    rec.note("between")
    with pytest.raises(KeyboardInterrupt):
        with rec.phase("b", total=5) as ph:
            ph.advance()
            ph.advance()  # count 2: interrupted here
    assert rec.names == ["a", "b"] and rec.notes == ["between"]
    assert rec.phases[0].count == 3 and rec.history("loss") == [0.5, 0.25] and rec.history("loss", "b") == []
    assert rec.phases[1].count == 2 and rec.phases[1].closed  # the with block closed it on the way out
    assert [e.kind for e in rec.events] == ["start", "advance", "advance", "end", "note", "start", "advance", "advance", "end"]


def test_silent_writes_nothing(capfd):
    p = as_progress(False)
    with p.phase("work", total=3) as ph:
        for _ in range(3):
            ph.advance(loss=1.0)
    p.note("hello")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_bars_write_to_stderr_not_stdout(capsys):
    p = as_progress(True)
    with p.phase("outer phase", total=4, unit="step") as ph:
        with p.phase("inner phase", total=2) as inner:
            inner.advance(2)
        for _ in range(4):
            ph.advance(loss=0.125)
    p.note("a status line")
    out, err = capsys.readouterr()
    assert out == ""
    assert "outer phase" in err and "4/4" in err and "loss=0.125" in err and "a status line" in err
    with pytest.raises(KeyboardInterrupt):
        with p.phase("failing phase", total=3):
            raise KeyboardInterrupt
    out, err = capsys.readouterr()
    assert out == "" and "\n" not in err  # a failed phase leaves no line behind (the error message is the line)


def _toy(tmp_path):
    from mechscope.circuits.toy import induction_task, save_induction_toy
    from mechscope.models import load_model

    m = load_model(save_induction_toy(tmp_path / "toy"), device="cpu")
    return m, induction_task(m.tokenizer, n=12, seq_len=8, seed=0)


def test_discover_reports_its_phases_in_order(tmp_path):
    from mechscope.circuits import DiscoverConfig, discover

    m, b = _toy(tmp_path)
    cfg = DiscoverConfig(task="toy", n=12, method="eap", ablation="zero", labels=False, random_seeds=1, folds=2,
                         rank="signed", bootstrap=50)
    rec = Recorder()
    discover(m, cfg, batch=b, progress=rec)
    names = rec.names
    assert names[0] == "eap scores"
    assert names[1] == "cross-validating the size (signed ranking)"
    assert names[-2:] == ["random circuits of the same size", "faithfulness curve (top-k and random circuits)"]
    _finished(rec)
    from mechscope.circuits.crossval import SIZE_CHUNK, grid_sizes
    from mechscope.graph import build_graph

    assert rec.phases[1].total == 2 * -(-len(grid_sizes(build_graph(m))) // SIZE_CHUNK)  # per fold, per chunk of sizes
    assert any("held-out" in n for n in rec.notes)


def test_acdc_counts_every_edge(tmp_path):
    from mechscope.circuits.acdc import acdc
    from mechscope.graph import build_graph

    m, b = _toy(tmp_path)
    g = build_graph(m)
    rec = Recorder()
    acdc(m, g, b, tau=0.05, ablation="zero", progress=rec)
    assert rec.names == ["acdc (edges tried)"] and rec.phases[0].total == g.n_edges
    _finished(rec)


def test_sae_training_reports_steps_and_loss_history(tmp_path):
    from mechscope.sae.sources import TensorSource
    from mechscope.sae.train import TrainConfig, Trainer

    x = torch.randn(4000, 16, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(architecture="topk", d_sae=32, k=4, tokens=4000, batch_tokens=200, checkpoint_every=2000,
                      log_every=2, norm_batches=2)
    rec = Recorder()
    Trainer(TensorSource(x), cfg, tmp_path / "a", d_in=16, hook_name="h", model_name="m", progress=rec).run()
    assert rec.names == ["training"]
    _finished(rec)
    assert rec.phases[0].total == cfg.steps == 20
    fvu = rec.history("fvu")
    assert len(fvu) == cfg.steps // 2 and all(v >= 0 for v in fvu)  # every log_every steps

    # a resumed run opens its phase at the step it resumes from and still ends at the total
    first = Trainer(TensorSource(x), cfg, tmp_path / "b", d_in=16, hook_name="h", model_name="m")
    first.run(stop_after_steps=13)  # dies after the checkpoint at 2,000 tokens (step 10)
    rec2 = Recorder()
    Trainer(TensorSource(x), cfg, tmp_path / "b", d_in=16, hook_name="h", model_name="m", progress=rec2).run(resume=True)
    start = rec2.events[0]
    assert start.kind == "start" and start.n == 10
    _finished(rec2)


def test_toy_training_loss_history_matches_the_log(tmp_path):
    import json

    from mechscope.heads.config import DataConfig, ToyConfig
    from mechscope.heads.train import train_toy

    cfg = ToyConfig(layers=1, heads=2, d_model=32, steps=6, batch=8, n_checkpoints=3, linear_checkpoints=1, n_eval=8,
                    warmup=2, data=DataConfig(vocab=16, seq_len=24, n_repeats=2, min_span=3, max_span=6))
    rec = Recorder()
    out = train_toy(cfg, tmp_path / "run", progress=rec)
    _finished(rec)
    log = json.loads((out / "train.json").read_text())
    assert rec.history("loss", "training") == [loss for _, loss in log["train_loss"]]


def test_quiet_silences_bars_but_not_results(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mechscope.cli.main import app
    from mechscope.progress import QUIET_ENV, Silent, as_progress

    monkeypatch.setenv(QUIET_ENV, "0")
    assert not isinstance(as_progress(True), Silent)
    args = ["vision", "train", "--arch", "cnn", "--data", "shapes", "--epochs", "2", "--width", "8"]
    loud = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    quiet = CliRunner().invoke(app, ["--quiet", *args, "--out", str(tmp_path / "b")])
    assert loud.exit_code == 0 and quiet.exit_code == 0, (loud.output, quiet.output)
    assert "epoch" in loud.stderr and quiet.stderr.strip() == ""
    assert "model:" in quiet.stdout
    # --quiet holds for its own command: the process's setting is back (a notebook runs several)
    assert os.environ[QUIET_ENV] == "0" and not isinstance(as_progress(True), Silent)
