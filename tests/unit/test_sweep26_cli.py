"""Sweep 26 of bad CLI input: --out folders that hold another command's artefacts or cannot be
made, bad --device, a reference file of the wrong shape, a huge --layers range, messages that
named internal fields, and a local folder named like a TransformerLens alias."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechscope.cli import common
from mechscope.cli.common import check_out_folder, parse_layers
from mechscope.cli.main import app
from mechscope.errors import MechscopeError

RUN = CliRunner().invoke


def _refused(r, needle: str) -> None:
    assert r.exit_code == 2 and needle in " ".join(r.stderr.split()) and "Traceback" not in r.output, r.output


def _sae_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps({"model_name": "some-model"}))
    (path / "sae_weights.safetensors").write_bytes(b"weights")
    return path


# 1. --out holding another command's artefacts

@pytest.mark.parametrize("args", [
    ["discover", "--task", "ioi"],
    ["heads"],
    ["lens", "The cat sat", "--target", " mat"],
    ["probe", "--labels", "capitalised"],
    ["icl", "--task", "antonyms"],
    ["confusion"],
])
def test_result_commands_refuse_an_sae_folder_as_out(tmp_path, args):
    sae = _sae_folder(tmp_path / "sae")
    r = RUN(app, [*args, "--model", str(tmp_path / "no-model"), "--out", str(sae)])
    _refused(r, f"--out {sae} holds an SAE (cfg.json, sae_weights.safetensors); choose another folder.")
    assert sorted(p.name for p in sae.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_discover_refuses_another_commands_folder_and_notes_a_replaced_circuit(tmp_path):
    lens = tmp_path / "lens"
    lens.mkdir()
    (lens / "tuned_lens.json").write_text("{}")
    _refused(RUN(app, ["discover", "--model", str(tmp_path / "no-model"), "--out", str(lens)]),
             f"--out {lens} holds a tuned lens (tuned_lens.json); choose another folder.")
    run = tmp_path / "run"
    run.mkdir()
    (run / "circuit.json").write_text(json.dumps({"schema_version": 1, "model": {"name": "other-model"}}))
    before = (run / "circuit.json").read_bytes()
    r = RUN(app, ["discover", "--model", str(tmp_path / "no-model"), "--out", str(run)])
    # refused before it wrote: the earlier circuit is kept, and no note says it was replaced (session 28);
    # the note a run that does replace it prints is tested in test_sweep28_cli.py
    assert r.exit_code == 2 and "No model file or directory" in r.stderr and "earlier result" not in r.stderr, r.stderr
    assert (run / "circuit.json").read_bytes() == before


def test_train_toy_refuses_a_circuit_folder(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "circuit.json").write_text(json.dumps({"schema_version": 1}))
    _refused(RUN(app, ["train-toy", "--steps", "1", "--out", str(run)]), f"--out {run} holds a circuit (circuit.json)")


def test_check_out_folder_kinds(tmp_path, capsys):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    (plain / "manifest.json").write_text(json.dumps({"files": []}))  # not a harvest's manifest
    check_out_folder(plain, "circuit")
    new = tmp_path / "new" / "deeper"
    check_out_folder(new, "circuit")
    assert not (tmp_path / "new").exists()  # checked, then left as it was
    vis = tmp_path / "vis"
    vis.mkdir()
    (vis / "circuit.json").write_text(json.dumps({"kind": "vision-circuit"}))
    with pytest.raises(MechscopeError, match="holds a vision circuit"):
        check_out_folder(vis, "circuit")
    check_out_folder(vis, "vision-circuit")
    sae = _sae_folder(tmp_path / "sae")
    check_out_folder(sae, "eval", beside=("sae",))  # an evaluation beside its SAE
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"hooks": ["h"], "shards": []}))
    with pytest.raises(MechscopeError, match="holds harvested activation shards"):
        check_out_folder(shards, "graph")
    tl = tmp_path / "tl" / "checkpoint"  # an unfinished tuned lens: its state.json is not an SAE training's
    tl.mkdir(parents=True)
    (tl / "stage1.safetensors").write_bytes(b"x")
    (tl / "state.json").write_text(json.dumps({"step": 3, "settings": {}}))
    check_out_folder(tl.parent, "tuned-lens", replaces=False)
    with pytest.raises(MechscopeError, match="holds an unfinished tuned-lens training run"):
        check_out_folder(tl.parent, "sae", replaces=False)
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.json").write_text("{}")
    capsys.readouterr()
    check_out_folder(run, "train-toy", replaces=False)
    assert "replaces" not in capsys.readouterr().err
    with pytest.raises(ValueError):
        check_out_folder(run, "no-such-kind")


# 2. --out that cannot be made

def test_out_that_cannot_be_made_names_out_and_the_reason(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _refused(RUN(app, ["discover", "--model", str(tmp_path / "no-model"), "--out", str(blocker / "sub")]),
             f"{blocker / 'sub'} lies under {blocker}, which is a file; --out must name a folder")
    r = RUN(app, ["export", "--db", str(tmp_path / "u.db"), "--out", "/proc/x/units.jsonl"])
    _refused(r, "--out /proc/x/units.jsonl cannot be written (No such file or directory")
    assert ".tmp" not in r.stderr


# 3. --device

def test_bad_device_is_one_sentence(tiny_gpt2_dir, monkeypatch):
    for bad in ("tpu", "meta", "no such"):
        _refused(RUN(app, ["info", "--model", tiny_gpt2_dir, "--device", bad]),
                 f"--device '{bad}' is not a device mechscope runs on (cpu, cuda, cuda:N or mps); this machine has cpu")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(RUN(app, ["info", "--model", tiny_gpt2_dir, "--device", "cuda"]), "this machine's torch has no CUDA device; use one of cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    _refused(RUN(app, ["info", "--model", tiny_gpt2_dir, "--device", "cuda:7"]), "there is no CUDA device 7; use one of cpu, cuda:0")


# 4. reference files

@pytest.mark.parametrize("doc", [[{"a": 1}], "text", {"nodes": "a0.h1"}, {"nodes": ["a0.h1"], "edges": ["ab"]}])
def test_reference_of_the_wrong_shape_is_one_sentence(tmp_path, doc):
    from mechscope.circuits.reference import load_reference

    f = tmp_path / "ref.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(MechscopeError, match="a reference circuit file is a JSON object with a \"nodes\" list"):
        load_reference(str(f))


# 5. --layers bounds before the range is expanded

def test_parse_layers_checks_bounds_before_expanding(monkeypatch):
    real = range

    def small_range(*args):
        assert real(*args).__len__() < 10**6, "a huge --layers range was expanded"
        return real(*args)

    monkeypatch.setattr(common, "range", small_range, raising=False)
    with pytest.raises(MechscopeError, match="layer 99999999999 does not exist; the model has layers 0-11"):
        parse_layers("0-99999999999", 12)
    with pytest.raises(MechscopeError, match="layer 99999999999 does not exist"):
        parse_layers("0-99999999999")
    assert parse_layers("0,3-5", 12) == [0, 3, 4, 5]


# 6. messages in the options' words

def test_messages_name_options(tmp_path, tiny_gpt2_dir):
    db = tmp_path / "u.db"
    _refused(RUN(app, ["exemplars", "--model", tiny_gpt2_dir, "--db", str(db), "--batch-size", "0"]),
             "--batch-size must be at least 1 (contexts per forward pass); got 0.")
    _refused(RUN(app, ["probe", "--labels", "capitalised", "--model", tiny_gpt2_dir, "--max-items", "5"]),
             "--max-items must be at least 20 (got 5)")
    small = tmp_path / "small.jsonl"
    small.write_text(json.dumps({"text": "one"}) + "\n")
    r = RUN(app, ["corpus", "--corpus", str(small), "--split", "heldout"])
    _refused(r, "too few to hold 1 in")
    assert "Python" not in r.stderr and "split=" not in r.stderr
    cfg = str(Path(tiny_gpt2_dir) / "config.json")
    _refused(RUN(app, ["info", "--model", cfg]), f"'{cfg}' is a file; give the folder that holds config.json, '{tiny_gpt2_dir}'")


def test_store_config_names_options():
    from mechscope.activations.config import StoreConfig

    with pytest.raises(MechscopeError, match="--context-len must be at least 2 .*got 1"):
        StoreConfig(hooks=["blocks.0.hook_resid_post"], context_len=1)


# 7. a local folder named like a TransformerLens alias

def test_local_folder_named_like_an_alias_loads_without_the_alias(tiny_gpt2_dir, tmp_path, monkeypatch, caplog):
    from mechscope.models import load_model

    shutil.copytree(tiny_gpt2_dir, tmp_path / "neox")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        m = load_model("neox", device="cpu")
    assert not [r for r in caplog.records if "alias" in r.getMessage()]
    assert "gpt-neox-20b" not in str(getattr(m.bridge.cfg, "model_name", ""))
    assert m.summary.architecture == "GPT2LMHeadModel" and m.summary.source == str((tmp_path / "neox").resolve())
