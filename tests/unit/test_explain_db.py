"""The unit database: round trips, idempotent writes, concurrent writers, search, migrations, refusals."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3

import pytest

from mechscope.errors import MechscopeError
from mechscope.explain.db import SCHEMA_VERSION, UnitDB, _terms, settings_key
from mechscope.explain.types import Description, Exemplar, UnitRecord, UnitRef


def _record(ref: UnitRef, scale: float = 1.0) -> UnitRecord:
    return UnitRecord(unit=ref, max_act=3.5 * scale, min_act=-0.25, density=0.125,
                      quantiles=[(0.5, 0.0), (0.99, 1.5)], histogram=([0.0, 1.0, 2.0], [7, 3]),
                      top_logits=[(" Paris", 2.0)], bottom_logits=[(" the", -1.0)], n_tokens=1000)


def _exemplars(n: int, tag: str = "a") -> list[Exemplar]:
    return [Exemplar(tokens=[f"{tag}{i}", "<script>", " x"], acts=[0.0, 1.0 + i, 0.5], focus=1,
                     kind="top" if i % 2 else "quantile", split=("train", "valid", "test")[i % 3],
                     quantile=None if i % 2 else i, context=i, position=5 + i) for i in range(n)]


def test_round_trip_and_idempotent_writes(tmp_path):
    db = UnitDB(tmp_path / "u.db", model_id="m")
    ref = UnitRef("mlp", 3, 17)
    db.put_units([_record(ref)])
    db.put_exemplars(ref, _exemplars(6))
    assert db.unit(ref) == _record(ref)
    got = db.exemplars(ref)
    assert got == _exemplars(6)
    assert [e.split for e in db.exemplars(ref, split="valid")] == ["valid", "valid"]
    assert {e.kind for e in db.exemplars(ref, kind="top")} == {"top"}

    # Putting again replaces (record values change, exemplars are not duplicated).
    d = db.put_description(Description(ref, "capital cities", "baseline", settings={"k": 5}))
    db.put_units([_record(ref, scale=2.0)])
    db.put_exemplars(ref, _exemplars(4, tag="b"))
    assert db.unit(ref).max_act == 7.0
    assert db.exemplars(ref) == _exemplars(4, tag="b")
    assert db.units() == [ref]
    # The unit's description survived the record's replacement (the row id is kept).
    assert [x.id for x in db.descriptions(ref)] == [d]

    # Same description again -> same id; a different explainer/settings/text coexists.
    assert db.put_description(Description(ref, "capital cities", "baseline", settings={"k": 5})) == d
    d2 = db.put_description(Description(ref, "capital cities", "baseline", settings={"k": 6}))
    d3 = db.put_description(Description(ref, "French words", "server", explainer_model="llm"))
    d4 = db.put_description(Description(ref, "capital cities", "baseline", settings={"k": 5}, polarity="negative"))
    assert len({d, d2, d3, d4}) == 4
    assert len(db.descriptions(ref)) == 4
    assert [x.text for x in db.descriptions(ref, explainer="server")] == ["French words"]
    assert db.described("baseline", settings_key({"k": 5})) == {ref}
    assert db.described("baseline", settings_key({"k": 7})) == set()

    db.update_scores(d, {"simulation": 0.5})
    db.update_scores(d, {"detection": 0.7})
    assert next(x for x in db.descriptions(ref) if x.id == d).scores == {"simulation": 0.5, "detection": 0.7}
    db.close()
    # Reopened: everything is there, model id kept.
    db = UnitDB(tmp_path / "u.db")
    assert db.model_id == "m" and len(db.descriptions(ref)) == 4 and db.meta["schema_version"] == str(SCHEMA_VERSION)


def test_settings_key_is_canonical():
    assert settings_key({"a": 1, "b": [1, 2]}) == settings_key({"b": [1, 2], "a": 1})
    assert settings_key({"a": 1}) != settings_key({"a": 2})


def _writer(path: str, worker: int, n: int) -> None:
    db = UnitDB(path, model_id="m", timeout_s=120)
    for i in range(n):
        ref = UnitRef("mlp", worker, i % 50)
        db.put_description(Description(ref, f"worker {worker} text {i}", "baseline", settings={"w": worker}))
    db.close()


def test_concurrent_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "c.db")
    UnitDB(path, model_id="m").close()
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, 200)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs)
    con = sqlite3.connect(path)
    texts = {r[0] for r in con.execute("SELECT text FROM descriptions")}
    assert texts == {f"worker {w} text {i}" for w in range(4) for i in range(200)}
    assert con.execute("SELECT count(*) FROM units").fetchone()[0] == 4 * 50
    # The FTS index saw every insert.
    assert con.execute("SELECT count(*) FROM descriptions_fts WHERE descriptions_fts MATCH 'worker'").fetchone()[0] == 800


def test_search_ranks_by_relevance_and_score_and_filters(tmp_path):
    db = UnitDB(tmp_path / "s.db", model_id="m")
    a, b, c, e = UnitRef("mlp", 1, 0), UnitRef("mlp", 1, 1), UnitRef("mlp", 2, 0), UnitRef("sae", 2, 5, "x")
    db.put_description(Description(a, "names of cities", "baseline", scores={"simulation": 0.1}))
    db.put_description(Description(b, "names of cities", "baseline", scores={"simulation": 0.9}))
    db.put_description(Description(c, "the city of Paris and other cities", "baseline"))
    db.put_description(Description(e, "numbers in code", "baseline", scores={"simulation": 0.8}))
    db.put_description(Description(a, "punctuation", "server", scores={"simulation": 0.99}))

    hits = db.search("cities")
    units = [h.unit for h in hits]
    assert set(units) == {a, b, c} and len(units) == 3  # one hit per unit; stemming finds "city"
    # Same text, better score ranks first; relevance follows the documented formula.
    assert units.index(b) < units.index(a)
    ha, hb = hits[units.index(a)], hits[units.index(b)]
    assert hb.relevance / ha.relevance == pytest.approx(1.9 / 1.1)
    assert ha.description.text == "names of cities"  # a's best matching description, not its best-scored one
    assert [h.unit for h in db.search("cities", layer=2)] == [c]
    assert [h.unit for h in db.search("cities", min_score=0.5)] == [b]
    assert [h.unit for h in db.search("numbers", kind="sae")] == [e]
    assert db.search("numbers", kind="mlp") == []
    assert db.search("cities", limit=1)[0].unit == b
    # Empty query: ranked by score alone.
    assert db.search("")[0].unit == a and db.search("")[0].description.text == "punctuation"
    # FTS syntax never raises, and is read as plain terms.
    for q in ['"cities', "cit*", "-cities", "cities NEAR names", "(cities", "cities)", "AND", "OR cities",
              "names: cities", "^cities", "a'b", "{x}", "NEAR(", "  "]:
        db.search(q)
    assert {h.unit for h in db.search('"cities (NEAR')} == {a, b, c}
    assert _terms('Cities "NEAR" -x*') == ["cities", "near", "x"]


_V1_DDL = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE units (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, source TEXT NOT NULL DEFAULT '',
    layer INTEGER NOT NULL, idx INTEGER NOT NULL,
    max_act REAL, min_act REAL, density REAL, quantiles TEXT, histogram TEXT,
    top_logits TEXT, bottom_logits TEXT, n_tokens INTEGER, UNIQUE (kind, source, layer, idx));
CREATE TABLE exemplars (
    id INTEGER PRIMARY KEY, unit_id INTEGER NOT NULL REFERENCES units(id) ON DELETE CASCADE,
    kind TEXT NOT NULL, split TEXT NOT NULL, quantile INTEGER, context INTEGER, position INTEGER,
    focus INTEGER NOT NULL, tokens TEXT NOT NULL, acts TEXT NOT NULL);
CREATE TABLE descriptions (
    id INTEGER PRIMARY KEY, unit_id INTEGER NOT NULL REFERENCES units(id) ON DELETE CASCADE,
    text TEXT NOT NULL, explainer TEXT NOT NULL, explainer_model TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}', scores TEXT NOT NULL DEFAULT '{}',
    provenance TEXT NOT NULL DEFAULT '{}', created TEXT NOT NULL);
PRAGMA user_version = 1;
"""


def test_migration_from_version_1_keeps_everything(tmp_path):
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript(_V1_DDL)
    con.execute("INSERT INTO meta VALUES ('model_id', 'm'), ('schema_version', '1')")
    con.execute("INSERT INTO units VALUES (1, 'mlp', '', 4, 9, 2.0, -1.0, 0.25, '[[0.5, 0.1]]', NULL, '[]', '[]', 100)")
    con.execute("INSERT INTO exemplars VALUES (1, 1, 'top', 'train', NULL, 3, 7, 1, ?, ?)",
                (json.dumps(["a", "b"]), json.dumps([0.0, 2.0])))
    con.execute("INSERT INTO descriptions VALUES (5, 1, 'dog names', 'baseline', '', '{\"k\": 3}',"
                " '{\"simulation\": 0.4}', '{\"seed\": 1}', '2026-01-01')")
    con.execute("INSERT INTO descriptions VALUES (6, 1, 'cat names', 'server', 'gpt', '{}', '{}', '{}', '2026-01-02')")
    con.commit()
    con.close()

    db = UnitDB(path, model_id="m")
    ref = UnitRef("mlp", 4, 9)
    assert db.schema_version == SCHEMA_VERSION
    assert db.unit(ref).max_act == 2.0 and db.unit(ref).quantiles == [(0.5, 0.1)]
    assert db.exemplars(ref)[0].tokens == ["a", "b"] and db.exemplars(ref)[0].position == 7
    ds = db.descriptions(ref)
    assert [(d.id, d.text, d.settings, d.scores, d.provenance) for d in ds] == [
        (5, "dog names", {"k": 3}, {"simulation": 0.4}, {"seed": 1}), (6, "cat names", {}, {}, {})]
    assert db.described("baseline", settings_key({"k": 3})) == {ref}
    # The FTS index covers the migrated rows and the new ones.
    assert [h.unit for h in db.search("dog")] == [ref]
    assert db.put_description(Description(ref, "dog names", "baseline", settings={"k": 3})) == 5


def test_refusals_are_one_sentence_and_leave_files_untouched(tmp_path):
    db = UnitDB(tmp_path / "a.db", model_id="model-a")
    db.set_unit_count("mlp", "", 0, 8)
    db.set_unit_count("mlp", "", 1, 8)
    with pytest.raises(MechscopeError, match="index 8 is out of range"):
        db.put_units([_record(UnitRef("mlp", 1, 8))])
    with pytest.raises(MechscopeError, match="layer 5"):
        db.exemplars(UnitRef("mlp", 5, 0))
    db.put_units([_record(UnitRef("mlp", 1, 7))])  # in range
    db.put_units([_record(UnitRef("sae", 9, 99, "s"))])  # no counts stored for that source: not checked
    db.close()
    with pytest.raises(MechscopeError, match="model-a") as e:
        UnitDB(tmp_path / "a.db", model_id="model-b")
    assert "\n" not in str(e.value)

    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    before = junk.read_bytes()
    with pytest.raises(MechscopeError, match="not a readable SQLite database"):
        UnitDB(junk)
    assert junk.read_bytes() == before and not (tmp_path / "junk.db-wal").exists()

    # A real SQLite file whose header is damaged.
    good = tmp_path / "b.db"
    UnitDB(good, model_id="m").close()
    raw = bytearray(good.read_bytes())
    raw[0:16] = b"garbage garbage!"
    good.write_bytes(bytes(raw))
    with pytest.raises(MechscopeError):
        UnitDB(good)
    assert good.read_bytes() == bytes(raw)

    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(MechscopeError, match="not a mechscope unit database"):
        UnitDB(other)


def test_export_jsonl_with_neuronpedia_fields(tmp_path):
    db = UnitDB(tmp_path / "e.db", model_id="org/model")
    ref, ref2 = UnitRef("mlp", 2, 3), UnitRef("sae", 6, 1, "l6")
    db.put_units([_record(ref), _record(ref2)])
    db.put_exemplars(ref, _exemplars(3))
    db.put_description(Description(ref, "dates", "server", explainer_model="llm-x", scores={"simulation": 0.3}))
    out = tmp_path / "x.jsonl"
    assert db.export_jsonl(out) == 2
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["unit"] for x in lines] == [ref.key, ref2.key] or [x["unit"] for x in lines] == [ref2.key, ref.key]
    line = next(x for x in lines if x["unit"] == ref.key)
    assert line["record"]["max_act"] == 3.5 and len(line["exemplars"]) == 3
    assert line["exemplars"][1]["tokens"] == ["a1", "<script>", " x"]
    np_ = line["descriptions"][0]["neuronpedia"]
    assert np_ == {"modelId": "org/model", "layer": "2-mlp", "index": "3", "description": "dates",
                   "explanationModelName": "llm-x", "typeName": "mechscope-server",
                   "scores": [{"explanationScoreTypeName": "simulation", "value": 0.3}]}
    assert db.export_jsonl(tmp_path / "one.jsonl", units=[ref2]) == 1


def test_paths_with_uri_characters_open_twice(tmp_path):
    """The read-only check opens the file by URI: '?' and '#' in the path must not cut it short."""
    from mechscope.explain.db import UnitDB

    p = tmp_path / "odd?name#1.db"
    UnitDB(p, model_id="m")
    again = UnitDB(p, model_id="m")
    assert again.model_id == "m" and p.is_file()
    assert not (tmp_path / "odd").exists()
