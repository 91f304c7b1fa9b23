"""Inputs to discover / evaluate that used to pass without a word: a file that is not a
discover folder, more --folds than the scoring pairs allow."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from mechscope.circuits import DiscoverConfig, discover
from mechscope.cli.main import app
from mechscope.progress import Recorder


def test_evaluate_names_a_file_that_is_not_a_circuit(tmp_path, tiny_llama_dir):
    for name, text in (("afile", ""), ("notes.txt", "hello"), ("other.json", json.dumps({"a": 1}))):
        f = tmp_path / name
        f.write_text(text)
        r = CliRunner().invoke(app, ["evaluate", str(f), "--model", tiny_llama_dir])
        assert r.exit_code == 2, r.output
        assert "is not a circuit.json" in r.output and "mechscope discover" in r.output, r.output
        assert "Traceback" not in r.output


def test_more_folds_than_pairs_allow_is_said(tiny_llama):
    rec = Recorder()
    res = discover(tiny_llama, DiscoverConfig(task="induction", n=12, method="eap", folds=100, bootstrap=50, labels=False,
                                                  force=True),
                   progress=rec)
    n_folds = res.metrics["n_folds"]
    notes = [n for n in rec.notes if "--folds 100" in n]
    assert len(notes) == 1 and 1 < n_folds < 100, (rec.notes, n_folds)
    assert f"with {n_folds} folds" in notes[0], (notes, n_folds)
