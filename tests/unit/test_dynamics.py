"""Toy training and per-checkpoint dynamics: a tiny run of a few seconds."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.heads.dynamics import DynamicsConfig, DynamicsResult, dynamics, find_checkpoints, formation_step
from mechscope.heads.toydata import DataConfig, ToyData
from mechscope.heads.train import ToyConfig, schedule, train_toy
from mechscope.progress import Recorder


def tiny_cfg(steps: int = 24) -> ToyConfig:
    return ToyConfig(layers=2, heads=2, d_model=32, steps=steps, batch=8, n_checkpoints=5, linear_checkpoints=2, n_eval=8, warmup=5,
                     data=DataConfig(vocab=16, seq_len=24, n_repeats=2, min_span=3, max_span=6))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_run")
    train_toy(tiny_cfg(), out)
    return out


def test_schedule_is_log_spaced():
    s = schedule(1000, 10)
    assert s[0] == 0 and s[-1] == 1000 and s == sorted(set(s))
    gaps = [b - a for a, b in zip(s[1:], s[2:])]
    assert gaps == sorted(gaps)  # spacing grows: log-spaced
    both = schedule(1000, 10, 4)
    assert set(s) | {250, 500, 750} == set(both)


def test_toy_data_has_copied_spans():
    d = ToyData(DataConfig(vocab=16, seq_len=40, n_repeats=2, min_span=5, max_span=5))
    x = d.batch(20, torch.Generator().manual_seed(0))
    assert x.shape == (20, 41) and (x[:, 0] == 0).all() and (x[:, 1:] >= 1).all()
    # every sequence contains a repeated 5-gram (the copied span)
    for row in x[:, 1:].tolist():
        grams = [tuple(row[i : i + 5]) for i in range(len(row) - 4)]
        assert len(set(grams)) < len(grams)


@pytest.mark.slow
def test_attn_only_checkpoints_load_and_scores_per_checkpoint(tiny_run):
    from mechscope.models import load_model

    log = json.loads((tiny_run / "train.json").read_text())
    steps = [c["step"] for c in log["checkpoints"]]
    assert steps == schedule(24, 5, 2) and 12 in steps and log["done"]
    m = load_model(str(tiny_run / "ckpt_000024"), device="cpu")
    assert m.summary.n_layers == 2 and m.summary.n_heads == 2
    hf = m.bridge.original_model
    assert all(float(p.detach().abs().sum()) == 0.0 for b in hf.transformer.h for p in b.mlp.parameters())  # attention-only
    res = dynamics(tiny_run, DynamicsConfig(n=4, seq_len=6, n_eval=8))
    assert [r["step"] for r in res.rows] == steps
    for r in res.rows:
        for k in ("loss", "repeated_loss", "icl_score", "max_previous_token", "max_induction", "max_k_composition"):
            assert r[k] == r[k], k  # not NaN
        assert torch.tensor(r["heads"]["induction"]).shape == (2, 2)
    assert res.rows[-1]["loss"] < res.rows[0]["loss"]  # training lowered the held-out loss
    res.save(tiny_run / "dyn")
    back = DynamicsResult.load(tiny_run / "dyn")
    assert back.rows[-1]["max_induction"] == pytest.approx(res.rows[-1]["max_induction"])


def test_resume_gives_the_same_model(tmp_path):
    """A run interrupted after a checkpoint and resumed ends with the same weights as one run."""
    from safetensors.torch import load_file

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train_toy(tiny_cfg(12), whole)

    def crash():  # interrupted after step 10, before its checkpoint
        return Recorder(interrupt_at={"training": 10})

    with pytest.raises(KeyboardInterrupt):
        train_toy(tiny_cfg(12), broken, progress=crash())
    assert (broken / "last" / "state.safetensors").is_file()  # no pickle: safetensors + JSON metadata
    assert not list(broken.rglob("*.pt"))
    train_toy(tiny_cfg(12), broken)
    a, b = load_file(str(whole / "ckpt_000012" / "model.safetensors")), load_file(str(broken / "ckpt_000012" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    with pytest.raises(MechscopeError, match="made with steps=12, not 13; pass a new --out"):
        train_toy(tiny_cfg(13), broken)
    # a damaged resume state is one clear sentence, not a traceback
    bad = tmp_path / "bad"
    with pytest.raises(KeyboardInterrupt):
        train_toy(tiny_cfg(12), bad, progress=crash())
    (bad / "last" / "state.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(MechscopeError, match="not a readable resume state"):
        train_toy(tiny_cfg(12), bad)


def test_formation_step():
    assert formation_step([0, 1, 2, 4, 8], [0.1, 0.1, 0.2, 0.6, 0.7]) == 4
    assert formation_step([0, 1], [0.3, 0.3]) is None
    assert formation_step([0, 20, 40, 60], [0.12737, 0.12737, 0.12738, 0.12740]) is None  # noise, not formation
    assert formation_step([0, 20, 40], [0.10, 0.12, 0.16]) == 40  # a rise of 0.06 counts
    assert formation_step([0, 20, 40], [0.10, 0.12, 0.16], min_rise=0.1) is None
    # a score that first moves the other way forms where it turns (-ICL score of a toy run)
    assert formation_step([0, 10, 20, 30, 40], [-0.01, -0.38, -0.30, -0.10, -0.04]) == 30
    assert formation_step([0, 10, 20], [0.3, 0.0, 0.3]) == 20  # not at step 0, before the dip


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MechscopeError, match="holds no checkpoints"):
        find_checkpoints(tmp_path)


@pytest.mark.slow
def test_cli_train_toy_and_dynamics(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train-toy", "--layers", "2", "--attn-only", "--d-model", "32", "--heads", "2", "--steps", "8",
                                 "--batch", "4", "--vocab", "16", "--seq-len", "16", "--checkpoints", "2", "--linear-checkpoints", "0", "--out", str(run), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["checkpoints"] == len(schedule(8, 2))
    r = CliRunner().invoke(app, ["dynamics", str(run), "--n", "4", "--seq-len", "5", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["checkpoints"] == len(schedule(8, 2)) and "induction_step" in d["formation"]
    html = (run / "dynamics.html").read_text()
    assert "<svg" in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert (run / "dynamics.svg").read_text().startswith("<svg")
    empty = tmp_path / "empty"
    empty.mkdir()
    r = CliRunner().invoke(app, ["dynamics", str(empty)])
    assert r.exit_code == 2 and "holds no checkpoints" in r.output


def test_cli_train_toy_bad_input_is_one_sentence(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    r = CliRunner().invoke(app, ["train-toy", "--layers", "2", "--attn-only", "--d-model", "30", "--heads", "4",
                                 "--steps", "4", "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "divisible by the number of heads" in r.output and "Traceback" not in r.output


def test_a_diverging_run_stops_in_one_sentence_and_saves_no_nan(tmp_path):
    """A learning rate that makes the weights non-finite: the trainers (induction, icml, binding)
    stop with one sentence and write no checkpoint of NaN; one beyond float32 is refused first."""
    import dataclasses

    from mechscope.errors import MechscopeError
    from mechscope.heads.train import train_toy
    from mechscope.icl.binding_config import BindingConfig, BindingDataConfig
    from mechscope.icl.binding_train import train_binding
    from mechscope.icl.meta_config import MetaConfig, MetaDataConfig
    from mechscope.icl.meta_train import train_meta

    with pytest.raises(MechscopeError, match="float32"):
        dataclasses.replace(tiny_cfg(), lr=1e39)
    runs = [(train_toy, dataclasses.replace(tiny_cfg(6), lr=1e30)),
            (train_meta, MetaConfig(d_model=16, steps=6, batch=8, n_checkpoints=3, linear_checkpoints=2, n_eval=32, lr=1e30,
                                    data=MetaDataConfig(tasks=2, n_labels=5, n_classes=12, dim=7, n_context=4))),
            (train_binding, BindingConfig(layers=2, heads=2, d_model=16, steps=6, batch=8, warmup=2, n_checkpoints=3, lr=1e30,
                                          linear_checkpoints=2, n_eval=8, data=BindingDataConfig(lines=3, hops=2, n_vars=4, n_consts=4)))]
    for i, (train, cfg) in enumerate(runs):
        out = tmp_path / f"run{i}"
        with pytest.raises(MechscopeError, match="diverged"):
            train(cfg, out)
        from safetensors.torch import load_file

        for f in out.rglob("*.safetensors"):
            assert all(bool(t.isfinite().all()) for t in load_file(f).values() if t.is_floating_point()), f
