"""Findings of a new user's sweep of exemplars / describe / search / export / serve: stale
descriptions after a new exemplars pass, schema advice, the WAL left by semantic search, messages,
and export details."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.errors import MechscopeError
from mechscope.explain.db import _DDL_V2, SCHEMA_VERSION, UnitDB, _split, settings_key
from mechscope.explain.describe import DescribeConfig, describe
from mechscope.explain.explainers import BaselineExplainer
from mechscope.explain.types import Description, UnitRef
from mechscope.server.store import ReadOnlyUnitDB


def _helper(name: str):
    spec = importlib.util.spec_from_file_location(f"_sweep_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


serve_tests = _helper("test_serve")
describe_tests = _helper("test_explain_describe")


def _run(*args: str):
    r = CliRunner().invoke(app, list(args))
    return r, (r.stderr if hasattr(r, "stderr") else r.output)


# ------------------------------------------------------------------ 1. stale descriptions


def test_new_exemplars_make_descriptions_stale_and_describe_redoes_them(tmp_path):
    db = describe_tests._db(tmp_path / "u.db", n_units=3)
    ex = BaselineExplainer()
    res = describe(db, db.units(), ex, describe_tests.Oracle(), DescribeConfig())
    assert res.described == 3 and db.stale_units() == 0
    u = UnitRef("mlp", 0, 1)
    before = db.descriptions(u)[0]
    assert "simulation" in before.scores and not before.stale
    # The same exemplars written again (an idempotent rerun) keep the descriptions current.
    db.put_exemplars(u, describe_tests._unit_exemplars(1))
    assert db.described("baseline", ex.settings_key) == set(db.units())
    # Other exemplars (another pass): the description is stale and describe redoes the unit only.
    db.put_exemplars(u, describe_tests._unit_exemplars(4))
    assert db.descriptions(u)[0].stale and db.stale_units() == 1
    assert db.described("baseline", ex.settings_key) == set(db.units()) - {u}
    again = describe(db, db.units(), ex, describe_tests.Oracle(), DescribeConfig())
    assert (again.described, again.already_described) == (1, 2)
    now = [d for d in db.descriptions(u) if not d.stale]
    assert len(now) == 1 and '"dog"' in now[0].text and now[0].scores["simulation"] == pytest.approx(1.0)


def test_same_text_on_new_exemplars_is_retied_and_loses_old_scores(tmp_path):
    db = describe_tests._db(tmp_path / "u.db", n_units=2)
    u = UnitRef("mlp", 0, 0)
    d = db.put_description(Description(u, "cities", "baseline", scores={"simulation": 0.9}))
    db.put_exemplars(u, describe_tests._unit_exemplars(1))
    assert db.put_description(Description(u, "cities", "baseline")) == d
    (got,) = db.descriptions(u)
    assert not got.stale and got.scores == {}
    assert u in db.described("baseline", settings_key({}))


def test_migration_from_version_2_keeps_descriptions_current(tmp_path):
    path = tmp_path / "v2.db"
    con = sqlite3.connect(path)
    for stmt in _split(_DDL_V2):
        con.execute(stmt)
    con.execute("INSERT INTO meta VALUES ('model_id', 'm')")
    con.execute("INSERT INTO units (id, kind, source, layer, idx) VALUES (1, 'mlp', '', 0, 3)")
    con.execute("INSERT INTO exemplars VALUES (1, 1, 'top', 'train', NULL, 0, 1, 1, '[\"a\", \"b\"]', '[0.0, 1.0]')")
    con.execute("INSERT INTO descriptions (id, unit_id, text, explainer, settings_key, created)"
                " VALUES (4, 1, 'dogs', 'baseline', 'k', '2026-01-01')")
    con.execute("PRAGMA user_version = 2")
    con.commit()
    con.close()
    with pytest.raises(MechscopeError, match="schema version 2 and this mechscope reads"):
        ReadOnlyUnitDB(path)
    db = UnitDB(path, model_id="m")
    assert db.schema_version == SCHEMA_VERSION == 3
    assert db.described("baseline", "k") == {UnitRef("mlp", 0, 3)} and not db.descriptions(UnitRef("mlp", 0, 3))[0].stale
    db.close()
    ReadOnlyUnitDB(path).close()  # now readable by search, export and serve


# ------------------------------------------------------------------ 2. schema advice


def test_a_newer_schema_says_upgrade_and_an_older_does_not_name_serve(tmp_path):
    path = tmp_path / "u.db"
    UnitDB(path, model_id="m").close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    for args in (["search", "x", "--db", str(path)], ["export", "--db", str(path), "--out", str(tmp_path / "o.jsonl")]):
        r, err = _run(*args)
        assert r.exit_code == 2 and "upgrade mechscope" in err and "migrate" not in err and err.count("\n") == 1, err
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    con.close()
    r, err = _run("search", "x", "--db", str(path))
    assert r.exit_code == 2 and "migrate" in err and "serve" not in err, err


# ------------------------------------------------------------------ 3. semantic search's WAL


def test_semantic_embedding_leaves_no_wal_behind_a_reader(tmp_path):
    from mechscope.explain.semantic import embed_descriptions

    sem = _helper("test_semantic")
    p = tmp_path / "units.db"
    serve_tests.synthetic_db(p).close()
    reader = ReadOnlyUnitDB(p)  # as `mechscope search --semantic`: the store is open while embedding
    reader.con.execute("SELECT count(*) FROM units").fetchone()
    assert embed_descriptions(p, sem.HashEmbedder()) > 0
    wal = Path(f"{p}-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    reader.close()
    assert UnitDB(p).con.execute("SELECT count(*) FROM description_embeddings").fetchone()[0] > 0


# ------------------------------------------------------------------ 4. messages


def test_one_unit_notes_that_the_control_needs_two(tmp_path):
    db = describe_tests._db(tmp_path / "u.db", n_units=2)
    res = describe(db, db.units()[:1], BaselineExplainer(), describe_tests.Oracle(), DescribeConfig())
    assert res.scored == 1 and res.summary["simulation"]["n"] == 0 and "at least 2" in res.note
    assert "note" in res.to_dict()
    res = describe(db, db.units(), BaselineExplainer(), describe_tests.Oracle(), DescribeConfig())
    assert res.note == "" and res.summary["simulation"]["n"] == 2


def test_samples_message_names_only_the_option():
    with pytest.raises(MechscopeError) as e:
        DescribeConfig(n_samples=0)
    assert "--samples must be at least 1" in str(e.value) and "chunk" not in str(e.value)


def test_describe_with_a_moved_model_names_the_options(tmp_path):
    db = describe_tests._db(tmp_path / "u.db", n_units=2)
    db.set_model_summary({"source": str(tmp_path / "moved-model")})
    db.close()
    r, err = _run("describe", "--db", str(tmp_path / "u.db"))
    assert r.exit_code == 2 and "--simulator" in err and "--scorer none" in err and err.count("\n") == 1, err
    r, err = _run("describe", "--db", str(tmp_path / "u.db"), "--explainer", "local", "--scorer", "none")
    assert r.exit_code == 2 and "--simulator" in err and "--scorer none" not in err, err


def test_search_refuses_nan_and_names_an_empty_layer(tmp_path):
    p = tmp_path / "units.db"
    serve_tests.synthetic_db(p).close()
    r, err = _run("search", "Alice", "--db", str(p), "--min-score", "nan")
    assert r.exit_code == 2 and "--min-score must be a finite number" in err and err.count("\n") == 1, err
    r, err = _run("search", "Alice", "--db", str(p), "--layer", "5")
    assert r.exit_code == 2 and "no units in layer 5; it holds layers 0, 1, 2." in err and err.count("\n") == 1, err
    r, _ = _run("search", "cities", "--db", str(p), "--layer", "2", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["hits"]


def test_checkpoint_of_other_settings_names_them(tmp_path):
    from mechscope.explain.config import ExemplarsConfig
    from mechscope.explain.exemplars import HarvestState

    torch = pytest.importorskip("torch")
    cfg = ExemplarsConfig(n_tokens=1024, context_len=16, batch_size=2, k=2)
    HarvestState(cfg, {}, torch.zeros(0, 16, dtype=torch.int32), 0, 0, 0).save(tmp_path / "ck")
    other = ExemplarsConfig(n_tokens=2048, context_len=16, batch_size=2, k=2)
    with pytest.raises(MechscopeError, match=r"other settings \(n_tokens differ\)"):
        HarvestState.load(tmp_path / "ck", other, "cpu")


@pytest.mark.slow
def test_cli_exemplars_notes_a_short_corpus_cleans_up_a_bad_one_and_warns_on_shards(tiny_llama_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("The Eiffel Tower is in Paris. When Mary and John went to the store, John gave a drink to Mary.\n\n" * 20)
    common = ["exemplars", "--model", tiny_llama_dir, "--corpus", str(corpus), "--context-len", "32", "--batch-size", "4",
              "--k", "4", "--k-bottom", "2", "--layers", "1", "--unit-range", "0:8"]
    db = tmp_path / "u.db"
    r = CliRunner().invoke(app, [*common, "--tokens", "100000", "--db", str(db)])
    assert r.exit_code == 0, r.output
    out = " ".join(r.stdout.split())  # rich wraps long lines
    assert "the corpus ran out after 16 contexts" in out and "100,000 tokens asked for" in out
    # A description, then a pass with other settings: the note says it is stale.
    store = UnitDB(db)
    store.put_description(Description(UnitRef("mlp", 1, 0), "x", "baseline"))
    store.close()
    r = CliRunner().invoke(app, [*common, "--tokens", "256", "--db", str(db), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["stale_described_units"] == 1
    # A token shard into a database holding these units: a warning pointing to exemplars-merge.
    r = CliRunner().invoke(app, [*common, "--token-range", "0:256", "--db", str(db), "--json"])
    err = " ".join(r.stderr.split())
    assert r.exit_code == 0 and "warning:" in err and "combine token shards with mechscope exemplars-merge" in err, r.output
    # A corpus that is not there: no database file and no checkpoint folder are left behind.
    bad = tmp_path / "bad.db"
    r = CliRunner().invoke(app, [*common[:3], str(tmp_path / "nowhere.txt"), *common[4:], "--tokens", "256", "--db", str(bad)])
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert not bad.exists() and not Path(f"{bad}.exemplars").exists() and not Path(f"{bad}-wal").exists()


# ------------------------------------------------------------------ 5. export, the search API


def test_export_keeps_controls_out_of_neuronpedia_scores_and_writes_a_unit_once(tmp_path):
    p = tmp_path / "units.db"
    serve_tests.synthetic_db(p).close()
    out = tmp_path / "o.jsonl"
    unit = serve_tests.CITY.key
    r, _ = _run("export", "--db", str(p), "--out", str(out), "--unit", unit, "--unit", unit)
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["unit"] for x in lines] == [unit]
    server = next(d for d in lines[0]["descriptions"] if d["explainer"] == "server")
    assert "simulation_shuffled" in server["scores"]
    assert [s["explanationScoreTypeName"] for s in server["neuronpedia"]["scores"]] == ["simulation"]


def test_api_search_with_an_empty_query_ranks_by_score_as_the_cli_does(tmp_path):
    from starlette.testclient import TestClient

    from mechscope.server.app import create_app

    p = tmp_path / "units.db"
    serve_tests.synthetic_db(p).close()
    r, _ = _run("search", "", "--db", str(p), "--json")
    want = [h["unit"] for h in json.loads(r.stdout)["hits"]]
    assert len(want) > 1
    with TestClient(create_app(tmp_path, p)) as client:
        got = [h["key"] for h in client.get("/api/search", params={"q": ""}).json()["hits"]]
    assert got == want
