"""The unit database: one SQLite file holding units, exemplars and descriptions (``UnitStore``).

    db = UnitDB("units.db", model_id="HuggingFaceTB/SmolLM2-135M-Instruct")
    db.put_units(records); db.put_exemplars(ref, exemplars)       # the exemplars pass
    i = db.put_description(Description(ref, "cities", "baseline"))  # an explainer
    db.update_scores(i, {"simulation": 0.41})                       # a scorer
    db.search("names of cities", layer=5)                           # search / serve

Design, and why:

1. SQLite through the standard ``sqlite3`` module: one file, no server, readable by any tool.
   WAL journal (readers never block the writer), ``busy_timeout`` 60 s, foreign keys on.
2. Several processes may write one file (``describe`` shards). Every write call is ONE
   transaction opened with ``BEGIN IMMEDIATE`` (the write lock is taken at the start, so two
   writers never both read and then fail to upgrade), retried with back-off while SQLite says
   ``database is locked``/``busy``. Nothing written by a committed call is ever lost.
3. Idempotent writes, so a resumed or repeated shard changes nothing: ``put_units`` upserts on
   (kind, source, layer, index) and keeps the unit's row id (its exemplars and descriptions stay
   attached); ``put_exemplars`` replaces all exemplars of the unit; ``put_description`` returns
   the existing row id for the same (unit, explainer, settings_key, polarity, text).
   ``settings_key`` is ``settings_key(description.settings)``: the first 16 hex digits of the
   SHA-256 of the settings as canonical JSON (sorted keys), so ``described(explainer, key)``
   tells a resumed ``describe`` which units it has already done.
4. Full-text search: an FTS5 table over description texts (porter stemming, so "city" finds
   "cities"), kept in step by triggers. The query is reduced to plain word terms (FTS syntax
   such as quotes, ``*``, ``-``, ``NEAR``, parentheses never reaches FTS5, so no query raises),
   joined by OR. Rank of a description::

       rank = relevance * (1 + clamp(score, 0, 1)),   relevance = -bm25(description)

   (SQLite's bm25 is negative, lower is better; ``score`` is ``scores[score_name]``, 0 when
   absent). Relevance decides; among equally relevant descriptions a perfectly scored one
   counts twice a score-0 one. Each unit appears once, with its best-ranked current description
   (a stale one, point 7, only where none of its current ones matches; ``Description.stale`` says so). An
   empty query (after sanitising) ranks by score alone. Where SQLite lacks FTS5 the search
   falls back to LIKE over the terms, relevance = number of terms matched (``db.fts`` says which).
5. Schema versioned in ``PRAGMA user_version``; ``_MIGRATIONS[v]`` upgrades version v to v+1
   inside one transaction, so an old file opens in place without loss. Version 1 (the first
   layout) had no settings_key/polarity/version columns and no FTS index; version 2 had no
   ``exemplars_key`` columns (point 7).
6. Refusals, each one sentence (``MechscopeError``): a file that is not SQLite or is damaged
   (checked read-only first, so the file is not modified), a SQLite file that is not a unit
   database, a database made for another model, a unit whose layer or index is outside the
   unit counts stored by ``set_unit_count``.
7. Descriptions are tied to the exemplars they were made from: ``put_exemplars`` stores in the
   unit's ``exemplars_key`` 16 hex digits of the SHA-256 of the exemplar rows it writes, and
   ``put_description`` copies the unit's key into the description. A description whose key is
   not its unit's (another exemplars pass replaced them) is ``stale``: ``described`` does not
   list it, so ``describe`` makes it again; putting the same text again re-ties it and drops its
   old scores. Rows from before version 3 have key '' on both sides, so they stay current.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sqlite3
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, get_args

from mechscope.errors import MechscopeError
from mechscope.explain.types import (
    Description,
    Exemplar,
    ExemplarKind,
    ExemplarSplit,
    SearchHit,
    UnitKind,
    UnitRecord,
    UnitRef,
)

SCHEMA_VERSION = 3

_DDL_V2 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS unit_counts (
    kind TEXT NOT NULL, source TEXT NOT NULL, layer INTEGER NOT NULL, n_units INTEGER NOT NULL,
    PRIMARY KEY (kind, source, layer));
CREATE TABLE IF NOT EXISTS units (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, source TEXT NOT NULL DEFAULT '',
    layer INTEGER NOT NULL, idx INTEGER NOT NULL,
    max_act REAL, min_act REAL, density REAL, quantiles TEXT, histogram TEXT,
    top_logits TEXT, bottom_logits TEXT, n_tokens INTEGER,
    UNIQUE (kind, source, layer, idx));
CREATE TABLE IF NOT EXISTS exemplars (
    id INTEGER PRIMARY KEY, unit_id INTEGER NOT NULL REFERENCES units(id) ON DELETE CASCADE,
    kind TEXT NOT NULL, split TEXT NOT NULL, quantile INTEGER, context INTEGER, position INTEGER,
    focus INTEGER NOT NULL, tokens TEXT NOT NULL, acts TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS exemplars_unit ON exemplars (unit_id, split, kind);
CREATE TABLE IF NOT EXISTS descriptions (
    id INTEGER PRIMARY KEY, unit_id INTEGER NOT NULL REFERENCES units(id) ON DELETE CASCADE,
    text TEXT NOT NULL, explainer TEXT NOT NULL, explainer_model TEXT NOT NULL DEFAULT '',
    settings TEXT NOT NULL DEFAULT '{}', settings_key TEXT NOT NULL DEFAULT '',
    scores TEXT NOT NULL DEFAULT '{}', provenance TEXT NOT NULL DEFAULT '{}',
    polarity TEXT NOT NULL DEFAULT 'positive', version INTEGER NOT NULL DEFAULT 1,
    created TEXT NOT NULL,
    UNIQUE (unit_id, explainer, settings_key, polarity, text));
CREATE INDEX IF NOT EXISTS descriptions_done ON descriptions (explainer, settings_key);
"""

_FTS_DDL = """
CREATE VIRTUAL TABLE IF NOT EXISTS descriptions_fts USING fts5(
    text, content='descriptions', content_rowid='id', tokenize='porter unicode61');
CREATE TRIGGER IF NOT EXISTS descriptions_ai AFTER INSERT ON descriptions BEGIN
    INSERT INTO descriptions_fts (rowid, text) VALUES (new.id, new.text); END;
CREATE TRIGGER IF NOT EXISTS descriptions_ad AFTER DELETE ON descriptions BEGIN
    INSERT INTO descriptions_fts (descriptions_fts, rowid, text) VALUES ('delete', old.id, old.text); END;
CREATE TRIGGER IF NOT EXISTS descriptions_au AFTER UPDATE OF text ON descriptions BEGIN
    INSERT INTO descriptions_fts (descriptions_fts, rowid, text) VALUES ('delete', old.id, old.text);
    INSERT INTO descriptions_fts (rowid, text) VALUES (new.id, new.text); END;
"""


def settings_key(settings: dict[str, Any]) -> str:
    """Stable key of an explainer's settings: 16 hex digits of SHA-256 of canonical JSON."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fts5_available() -> bool:
    """Whether this Python's SQLite has the FTS5 extension compiled in."""
    con = sqlite3.connect(":memory:")
    try:
        con.execute("CREATE VIRTUAL TABLE t USING fts5(x)")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        con.close()


def _migrate_1_to_2(con: sqlite3.Connection, fts: bool) -> None:
    """v1 -> v2: settings_key/polarity/version columns, their unique key, unit counts, FTS index."""
    con.execute("ALTER TABLE descriptions RENAME TO descriptions_v1")
    # statement by statement: executescript would commit the open transaction
    for stmt in _split(_DDL_V2):
        con.execute(stmt)
    if fts:
        for stmt in _split_triggers(_FTS_DDL):
            con.execute(stmt)
    rows = con.execute(
        "SELECT id, unit_id, text, explainer, explainer_model, settings, scores, provenance, created"
        " FROM descriptions_v1 ORDER BY id").fetchall()
    for row in rows:
        settings = json.loads(row[5] or "{}")
        con.execute(
            "INSERT OR IGNORE INTO descriptions (id, unit_id, text, explainer, explainer_model, settings,"
            " settings_key, scores, provenance, polarity, version, created) VALUES (?,?,?,?,?,?,?,?,?,'positive',1,?)",
            (row[0], row[1], row[2], row[3], row[4] or "", row[5] or "{}", settings_key(settings),
             row[6] or "{}", row[7] or "{}", row[8]))
    con.execute("DROP TABLE descriptions_v1")


def _migrate_2_to_3(con: sqlite3.Connection, fts: bool) -> None:
    """v2 -> v3: ``exemplars_key`` of units and descriptions (module docstring, point 7)."""
    con.execute("ALTER TABLE units ADD COLUMN exemplars_key TEXT NOT NULL DEFAULT ''")
    con.execute("ALTER TABLE descriptions ADD COLUMN exemplars_key TEXT NOT NULL DEFAULT ''")


_MIGRATIONS = {1: _migrate_1_to_2, 2: _migrate_2_to_3}


def _split(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _split_triggers(script: str) -> list[str]:
    """Split the FTS script into statements (trigger bodies hold ';', so split on 'END;')."""
    out, buf = [], []
    for line in script.strip().splitlines():
        buf.append(line)
        text = "\n".join(buf).strip()
        if text.startswith("CREATE TRIGGER"):
            if text.endswith("END;"):
                out.append(text[:-1])
                buf = []
        elif text.endswith(";"):
            out.append(text[:-1])
            buf = []
    return out


def _terms(query: str) -> list[str]:
    """Plain word terms of a search query (FTS5 syntax dropped), deduplicated, in order."""
    seen: list[str] = []
    for t in re.findall(r"\w+", query.lower()):
        if t not in seen:
            seen.append(t)
    return seen


def _finite_scores(scores: dict[str, Any]) -> dict[str, float]:
    """``scores`` as floats, or one sentence naming a score that is not a finite number: a NaN
    stored in the JSON column would make every later search of the file fail (SQLite's JSON
    functions before 3.42 reject it) and the export invalid JSON."""
    out: dict[str, float] = {}
    for k, v in scores.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            f = math.nan
        if isinstance(v, bool) or not math.isfinite(f):
            raise MechscopeError(f"score {k!r} is {v!r}, not a finite number; leave a score out where it is undefined "
                                 "(e.g. a unit that never fires) instead of storing NaN or infinity.")
        out[str(k)] = f
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class UnitDB:
    """A unit database file (created when missing); implements ``UnitStore``. See the module docstring."""

    def __init__(self, path: str | os.PathLike, model_id: str | None = None, timeout_s: float = 60.0,
                 fingerprint: str | None = None):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._counts: dict[tuple[str, str], dict[int, int]] | None = None
        if self.path.is_dir():
            raise MechscopeError(f"{self.path} is a folder, not a unit database file; give the database file's path "
                                 f"(e.g. {self.path / 'units.db'}, created when missing).")
        if not self.path.exists() and not self.path.parent.is_dir():
            raise MechscopeError(f"the folder of {self.path} does not exist; create {self.path.parent} first or give a "
                                 "path in an existing folder.")
        if self.path.exists() and self.path.stat().st_size > 0:
            self._check_readable()
        try:
            self.con = sqlite3.connect(str(self.path), timeout=timeout_s, isolation_level=None,
                                       check_same_thread=False)
            self.con.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            self.con.execute("PRAGMA foreign_keys = ON")
            self._retry(lambda: self.con.execute("PRAGMA journal_mode = WAL"))
            self.con.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as e:
            raise MechscopeError(f"{self.path} cannot be opened as a SQLite database ({e}); give a new file name or a unit database made by mechscope.") from None
        self.fts = fts5_available()
        self._setup()
        stored = self.meta.get("model_id", "")
        other = (model_id and stored and stored != model_id) or (
            fingerprint and self.meta.get("model_fingerprint", fingerprint) != fingerprint)
        if other and self.is_empty():  # a run that stored nothing tagged it
            self._write(lambda c: c.execute("DELETE FROM meta WHERE key IN ('model_id', 'model_fingerprint', 'model_summary')"))
            stored = ""
        if model_id and stored and stored != model_id:
            raise MechscopeError(
                f"{self.path} holds units of model {stored!r}, not {model_id!r}; pass --model "
                f"{self.model_summary.get('source') or stored} or use another --db file.")
        if model_id and not stored:
            self._write(lambda c: c.execute("INSERT OR REPLACE INTO meta VALUES ('model_id', ?)", (model_id,)))
        # The weights' fingerprint (``Model.fingerprint``) tells apart two models that share a name.
        stored_fp = self.meta.get("model_fingerprint", "")
        if fingerprint and stored_fp and stored_fp != fingerprint:
            source = self.model_summary.get("source", "")
            raise MechscopeError(f"{self.path} holds units of another model also called {self.meta.get('model_id', '')!r} (its weights differ)"
                                 + (f"; pass --model {source}" if source else "") + " or use another --db file.")
        if fingerprint and not stored_fp:
            self._write(lambda c: c.execute("INSERT OR REPLACE INTO meta VALUES ('model_fingerprint', ?)", (fingerprint,)))
        self.model_id: str = model_id or stored

    def is_empty(self) -> bool:
        """No units and no descriptions stored."""
        with self._read() as c:
            return not c.execute("SELECT 1 FROM units LIMIT 1").fetchone() and not c.execute("SELECT 1 FROM descriptions LIMIT 1").fetchone()

    # -- opening, schema ---------------------------------------------------------------------

    def _check_readable(self) -> None:
        """Read-only look at an existing file: SQLite at all, and a unit database (or empty)."""
        try:
            ro = sqlite3.connect(Path(self.path).resolve().as_uri() + "?mode=ro", uri=True, timeout=self.timeout_s)
            try:
                tables = {r[0] for r in ro.execute("SELECT name FROM sqlite_master WHERE type='table'")}
                if tables:
                    ro.execute("SELECT count(*) FROM meta").fetchone()
                    ro.execute("SELECT max(id) FROM units").fetchone()
            finally:
                ro.close()
        except sqlite3.DatabaseError as e:
            if "no such table" in str(e):
                raise MechscopeError(f"{self.path} is a SQLite database but not a mechscope unit database; give another --db file.") from None
            raise MechscopeError(f"{self.path} is not a readable SQLite database ({e}); it was left untouched, give another --db file or restore it from a copy.") from None

    def _setup(self) -> None:
        version = self.con.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise MechscopeError(f"{self.path} has schema version {version}, newer than this mechscope's {SCHEMA_VERSION}; upgrade mechscope.")

        def create(c: sqlite3.Connection) -> None:
            v = c.execute("PRAGMA user_version").fetchone()[0]
            if v == 0:
                for stmt in _split(_DDL_V2):
                    c.execute(stmt)
                if self.fts:
                    for stmt in _split_triggers(_FTS_DDL):
                        c.execute(stmt)
                _migrate_2_to_3(c, self.fts)
                c.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (_now(),))
            else:
                while v < SCHEMA_VERSION:
                    _MIGRATIONS[v](c, self.fts)
                    v += 1
            c.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

        if version < SCHEMA_VERSION:
            self._write(create)
        if self.fts:
            has = self.con.execute("SELECT 1 FROM sqlite_master WHERE name='descriptions_fts'").fetchone()
            self.fts = has is not None

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> "UnitDB":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transactions --------------------------------------------------------------------------

    def _retry(self, fn):
        delay, deadline = 0.01, time.monotonic() + self.timeout_s
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() > deadline:
                    raise
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.5)

    def _write(self, fn):
        """Run ``fn(connection)`` in one ``BEGIN IMMEDIATE`` transaction, retried while locked."""
        def attempt():
            self.con.execute("BEGIN IMMEDIATE")
            try:
                out = fn(self.con)
                self.con.execute("COMMIT")
                return out
            except BaseException:
                self.con.execute("ROLLBACK")
                raise
        try:
            return self._retry(attempt)
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e)):
                raise MechscopeError(f"{self.path} stayed locked by another writer for {self.timeout_s:.0f} s; retry when the other run has finished.") from None
            if isinstance(e, sqlite3.IntegrityError) or isinstance(e, sqlite3.OperationalError):
                raise
            raise MechscopeError(f"{self.path} is damaged ({e}); restore it from a copy or rebuild it.") from None

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        try:
            yield self.con
        except sqlite3.DatabaseError as e:
            if isinstance(e, (sqlite3.OperationalError, sqlite3.IntegrityError)):
                raise
            raise MechscopeError(f"{self.path} is damaged ({e}); restore it from a copy or rebuild it.") from None

    # -- meta ------------------------------------------------------------------------------------

    @property
    def meta(self) -> dict[str, str]:
        with self._read() as c:
            return dict(c.execute("SELECT key, value FROM meta").fetchall())

    @property
    def schema_version(self) -> int:
        return self.con.execute("PRAGMA user_version").fetchone()[0]

    def set_model_summary(self, summary: dict[str, Any]) -> None:
        """Store a JSON summary of the model (n_layers, d_mlp, d_model, ...)."""
        self._write(lambda c: c.execute("INSERT OR REPLACE INTO meta VALUES ('model_summary', ?)", (json.dumps(summary),)))

    def check_source_weights(self, kind: str, source: str, layer: int, fingerprint: str, record: bool = False) -> None:
        """One sentence when this database holds ``kind`` units named ``source`` at ``layer`` from a
        dictionary whose weights had another ``fingerprint`` (``UnitSource.weights_fingerprint``):
        two SAE folders of one name must not mix into one set of units. ``record``: store it."""
        if not fingerprint:
            return
        key = f"weights:{kind}:{source}:{layer}"
        stored = self.meta.get(key)  # None also for units written before mechscope recorded it: nothing to compare
        if stored is not None and stored != fingerprint:
            raise MechscopeError(
                f"{self.path} already holds {kind} units named '{source}' at layer {layer} from a dictionary with other weights "
                f"(a folder of the same name holding another {kind}); write these into another --db, or give the folder another name.")
        if record and stored is None:
            self._write(lambda c: c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, fingerprint)))

    def set_exemplars_settings(self, kind: str, source: str, layer: int, settings: dict[str, Any]) -> None:
        """Record the exemplars pass that wrote this layer's units (its ``ExemplarsConfig`` with the
        seed that drew the samples and splits, the corpus digest, the tokens seen); replaces the
        previous pass's entry, as the pass replaces its units."""
        text = json.dumps(settings, sort_keys=True, default=str)
        self._write(lambda c: c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"exemplars:{kind}:{source}:{layer}", text)))

    def exemplars_settings(self, kind: str, source: str, layer: int) -> dict[str, Any] | None:
        """What ``set_exemplars_settings`` recorded for this layer's units (None before it was recorded)."""
        text = self.meta.get(f"exemplars:{kind}:{source}:{layer}")
        return None if text is None else json.loads(text)

    @property
    def model_summary(self) -> dict[str, Any]:
        return json.loads(self.meta.get("model_summary", "{}"))

    def set_unit_count(self, kind: UnitKind, source: str, layer: int, n_units: int) -> None:
        """Record that ``layer`` has ``n_units`` units of this kind/source (enables the range check)."""
        self._write(lambda c: c.execute("INSERT OR REPLACE INTO unit_counts VALUES (?,?,?,?)", (kind, source, layer, n_units)))
        self._counts = None

    def unit_counts(self) -> dict[tuple[str, str], dict[int, int]]:
        """(kind, source) -> {layer: number of units}, as recorded by ``set_unit_count``.

        Cached until another connection commits (SQLite's ``PRAGMA data_version`` changes), so a
        long-lived reader (``mechscope serve``) sees the layers an exemplars pass adds later."""
        version = self.con.execute("PRAGMA data_version").fetchone()[0]
        if self._counts is None or getattr(self, "_counts_version", None) != version:
            counts: dict[tuple[str, str], dict[int, int]] = {}
            for kind, source, layer, n in self.con.execute("SELECT kind, source, layer, n_units FROM unit_counts"):
                counts.setdefault((kind, source), {})[layer] = n
            self._counts, self._counts_version = counts, version
        return self._counts

    def check_unit(self, unit: UnitRef) -> None:
        """Raise ``MechscopeError`` when ``unit`` is not a ``UnitRef`` or lies outside the stored
        unit counts (when known)."""
        if not isinstance(unit, UnitRef):
            hint = f" (UnitRef.parse({unit!r}) reads a key)" if isinstance(unit, str) else ""
            raise MechscopeError(f"a unit is a UnitRef such as UnitRef('mlp', 5, 3), not {type(unit).__name__}{hint}.")
        layers = self.unit_counts().get((unit.kind, unit.source))
        if not layers:
            return
        if unit.layer not in layers:
            raise MechscopeError(f"{unit.key}: layer {unit.layer} has no {unit.kind} units in {self.path} (layers {min(layers)}-{max(layers)}).")
        n = layers[unit.layer]
        if not 0 <= unit.index < n:
            raise MechscopeError(f"{unit.key}: index {unit.index} is out of range, layer {unit.layer} has {n} {unit.kind} units (0-{n - 1}).")

    # -- units -------------------------------------------------------------------------------------

    @staticmethod
    def _unit_id(c: sqlite3.Connection, unit: UnitRef, create: bool) -> int | None:
        row = c.execute("SELECT id FROM units WHERE kind=? AND source=? AND layer=? AND idx=?",
                        (unit.kind, unit.source, unit.layer, unit.index)).fetchone()
        if row is not None:
            return row[0]
        if not create:
            return None
        return c.execute("INSERT INTO units (kind, source, layer, idx) VALUES (?,?,?,?)",
                         (unit.kind, unit.source, unit.layer, unit.index)).lastrowid

    def put_units(self, records: Iterable[UnitRecord]) -> None:
        records = list(records)
        for r in records:
            self.check_unit(r.unit)

        def write(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT INTO units (kind, source, layer, idx, max_act, min_act, density, quantiles, histogram,"
                " top_logits, bottom_logits, n_tokens) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (kind, source, layer, idx) DO UPDATE SET max_act=excluded.max_act,"
                " min_act=excluded.min_act, density=excluded.density, quantiles=excluded.quantiles,"
                " histogram=excluded.histogram, top_logits=excluded.top_logits,"
                " bottom_logits=excluded.bottom_logits, n_tokens=excluded.n_tokens",
                [(r.unit.kind, r.unit.source, r.unit.layer, r.unit.index, float(r.max_act), float(r.min_act),
                  float(r.density), json.dumps(r.quantiles),
                  json.dumps(r.histogram) if r.histogram is not None else None,
                  json.dumps(r.top_logits), json.dumps(r.bottom_logits), int(r.n_tokens)) for r in records])

        self._write(write)

    def unit(self, unit: UnitRef) -> UnitRecord | None:
        self.check_unit(unit)
        with self._read() as c:
            row = c.execute(
                "SELECT max_act, min_act, density, quantiles, histogram, top_logits, bottom_logits, n_tokens"
                " FROM units WHERE kind=? AND source=? AND layer=? AND idx=?",
                (unit.kind, unit.source, unit.layer, unit.index)).fetchone()
        if row is None or row[0] is None:
            return None
        hist = json.loads(row[4]) if row[4] else None
        return UnitRecord(
            unit=unit, max_act=row[0], min_act=row[1], density=row[2],
            quantiles=[tuple(q) for q in json.loads(row[3] or "[]")],
            histogram=(hist[0], hist[1]) if hist else None,
            top_logits=[tuple(t) for t in json.loads(row[5] or "[]")],
            bottom_logits=[tuple(t) for t in json.loads(row[6] or "[]")],
            n_tokens=row[7] or 0)

    def units(self, kind: UnitKind | None = None, layer: int | None = None, source: str | None = None) -> list[UnitRef]:
        if kind is not None and kind not in get_args(UnitKind):
            raise MechscopeError(f"unit kind {kind!r} is not one of {', '.join(get_args(UnitKind))}.")
        where, args = [], []
        for col, val in (("kind", kind), ("layer", layer), ("source", source)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        sql = "SELECT kind, layer, idx, source FROM units" + (" WHERE " + " AND ".join(where) if where else "")
        with self._read() as c:
            rows = c.execute(sql + " ORDER BY kind, source, layer, idx", args).fetchall()
        return [UnitRef(k, l, i, s) for k, l, i, s in rows]

    # -- exemplars -------------------------------------------------------------------------------

    def put_exemplars(self, unit: UnitRef, exemplars: list[Exemplar]) -> None:
        self.put_exemplars_many([(unit, exemplars)])

    def put_exemplars_many(self, items: Iterable[tuple[UnitRef, list[Exemplar]]]) -> None:
        """``put_exemplars`` for many units in one transaction (the exemplars pass writes a layer at once)."""
        items = list(items)
        for unit, _ in items:
            self.check_unit(unit)

        def write(c: sqlite3.Connection) -> None:
            for unit, exemplars in items:
                uid = self._unit_id(c, unit, create=True)
                c.execute("DELETE FROM exemplars WHERE unit_id=?", (uid,))
                rows = [(uid, e.kind, e.split, e.quantile, e.context, e.position, e.focus,
                         json.dumps(e.tokens, ensure_ascii=False), json.dumps([round(float(a), 5) for a in e.acts]))
                        for e in exemplars]
                c.executemany(
                    "INSERT INTO exemplars (unit_id, kind, split, quantile, context, position, focus, tokens, acts)"
                    " VALUES (?,?,?,?,?,?,?,?,?)", rows)
                key = hashlib.sha256(json.dumps([r[1:] for r in rows]).encode()).hexdigest()[:16]
                c.execute("UPDATE units SET exemplars_key=? WHERE id=?", (key, uid))

        self._write(write)

    def exemplars(self, unit: UnitRef, split: ExemplarSplit | None = None, kind: ExemplarKind | None = None) -> list[Exemplar]:
        self.check_unit(unit)
        with self._read() as c:
            uid = self._unit_id(c, unit, create=False)
            if uid is None:
                return []
            sql = "SELECT kind, split, quantile, context, position, focus, tokens, acts FROM exemplars WHERE unit_id=?"
            args: list[Any] = [uid]
            if split is not None:
                sql, args = sql + " AND split=?", args + [split]
            if kind is not None:
                sql, args = sql + " AND kind=?", args + [kind]
            rows = c.execute(sql + " ORDER BY id", args).fetchall()
        return [Exemplar(tokens=json.loads(r[6]), acts=json.loads(r[7]), focus=r[5], kind=r[0], split=r[1],
                         quantile=r[2], context=r[3], position=r[4]) for r in rows]

    # -- descriptions ----------------------------------------------------------------------------

    def put_description(self, description: Description) -> int:
        """Store a description; the same (unit, explainer, settings, polarity, text) returns the existing id.

        ``version`` counts the descriptions of that unit by that explainer and settings (1, 2, ...).
        Scores given here are merged into an existing row's scores.
        """
        d = description
        self.check_unit(d.unit)
        key = settings_key(d.settings)
        scores = _finite_scores(d.scores)

        def write(c: sqlite3.Connection) -> int:
            uid = self._unit_id(c, d.unit, create=True)
            ekey = c.execute("SELECT exemplars_key FROM units WHERE id=?", (uid,)).fetchone()[0]
            row = c.execute(
                "SELECT id, scores, exemplars_key FROM descriptions"
                " WHERE unit_id=? AND explainer=? AND settings_key=? AND polarity=? AND text=?",
                (uid, d.explainer, key, d.polarity, d.text)).fetchone()
            if row is not None:
                old = json.loads(row[1]) if row[2] == ekey else {}  # scores of other exemplars are dropped
                if scores or row[2] != ekey:
                    merged = {**old, **scores}
                    c.execute("UPDATE descriptions SET scores=?, exemplars_key=? WHERE id=?", (json.dumps(merged), ekey, row[0]))
                return row[0]
            version = 1 + c.execute(
                "SELECT count(*) FROM descriptions WHERE unit_id=? AND explainer=? AND settings_key=? AND polarity=?",
                (uid, d.explainer, key, d.polarity)).fetchone()[0]
            cur = c.execute(
                "INSERT INTO descriptions (unit_id, text, explainer, explainer_model, settings, settings_key, scores,"
                " provenance, polarity, version, created, exemplars_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (uid, d.text, d.explainer, d.explainer_model, json.dumps(d.settings, sort_keys=True, default=str), key,
                 json.dumps(scores), json.dumps(d.provenance, default=str),
                 d.polarity, version, _now(), ekey))
            assert cur.lastrowid is not None  # an INSERT always sets it
            return cur.lastrowid

        d.id = self._write(write)
        return d.id

    def update_scores(self, description_id: int, scores: dict[str, float]) -> None:
        """Merge ``scores`` into the stored scores of one description (other names are kept)."""
        checked = _finite_scores(scores)

        def write(c: sqlite3.Connection) -> None:
            row = c.execute("SELECT scores FROM descriptions WHERE id=?", (description_id,)).fetchone()
            if row is None:
                raise MechscopeError(f"no description with id {description_id} in {self.path}; list them with db.descriptions(unit).")
            merged = {**json.loads(row[0]), **checked}
            c.execute("UPDATE descriptions SET scores=? WHERE id=?", (json.dumps(merged), description_id))

        self._write(write)

    _DESC_COLS = ("d.id, d.text, d.explainer, d.explainer_model, d.settings, d.scores, d.provenance, d.polarity,"
                  " u.kind, u.layer, u.idx, u.source, d.exemplars_key != u.exemplars_key")

    @staticmethod
    def _description(row) -> Description:
        return Description(
            unit=UnitRef(row[8], row[9], row[10], row[11]), text=row[1], explainer=row[2], explainer_model=row[3],
            settings=json.loads(row[4]), scores=json.loads(row[5]), provenance=json.loads(row[6]),
            polarity=row[7], id=row[0], stale=bool(row[12]))

    def descriptions(self, unit: UnitRef, explainer: str | None = None) -> list[Description]:
        self.check_unit(unit)
        sql = (f"SELECT {self._DESC_COLS} FROM descriptions d JOIN units u ON u.id=d.unit_id"
               " WHERE u.kind=? AND u.source=? AND u.layer=? AND u.idx=?")
        args: list[Any] = [unit.kind, unit.source, unit.layer, unit.index]
        if explainer is not None:
            sql, args = sql + " AND d.explainer=?", args + [explainer]
        with self._read() as c:
            return [self._description(r) for r in c.execute(sql + " ORDER BY d.id", args)]

    def described(self, explainer: str, settings_key: str) -> set[UnitRef]:
        with self._read() as c:
            rows = c.execute(
                "SELECT DISTINCT u.kind, u.layer, u.idx, u.source FROM descriptions d JOIN units u ON u.id=d.unit_id"
                " WHERE d.explainer=? AND d.settings_key=? AND d.exemplars_key = u.exemplars_key",
                (explainer, settings_key)).fetchall()
        return {UnitRef(k, l, i, s) for k, l, i, s in rows}

    def stale_units(self) -> int:
        """How many units have a description made from other exemplars than they now hold (point 7)."""
        with self._read() as c:
            return c.execute("SELECT count(DISTINCT u.id) FROM descriptions d JOIN units u ON u.id=d.unit_id"
                             " WHERE d.exemplars_key != u.exemplars_key").fetchone()[0]

    def description_version(self, description_id: int) -> int:
        """The stored version number of one description."""
        row = self.con.execute("SELECT version FROM descriptions WHERE id=?", (description_id,)).fetchone()
        return row[0] if row else 0

    # -- search ------------------------------------------------------------------------------------

    def search(self, query: str, layer: int | None = None, kind: UnitKind | None = None,
               min_score: float | None = None, score_name: str = "simulation", limit: int = 20) -> list[SearchHit]:
        """Descriptions matching ``query``, one hit per unit, best first (formula in the module docstring)."""
        terms = _terms(query)
        score_path = '$."' + score_name.replace('"', "") + '"'
        score = "coalesce(json_extract(d.scores, :path), 0.0)"
        clamped = f"max(0.0, min(1.0, {score}))"
        where, args = [], {"path": score_path, "limit": int(limit)}
        if layer is not None:
            where.append("u.layer = :layer")
            args["layer"] = layer
        if kind is not None:
            where.append("u.kind = :kind")
            args["kind"] = kind
        if min_score is not None:
            where.append("json_extract(d.scores, :path) >= :min_score")
            args["min_score"] = float(min_score)
        if not terms:
            relevance, src = "1.0", "descriptions d"
        elif self.fts:
            args["match"] = " OR ".join('"' + t + '"' for t in terms)
            relevance = "(-bm25(descriptions_fts))"
            src = "descriptions_fts JOIN descriptions d ON d.id = descriptions_fts.rowid"
            where.append("descriptions_fts MATCH :match")
        else:
            likes = []
            for i, t in enumerate(terms):
                args[f"t{i}"] = f"%{t}%"
                likes.append(f"(d.text LIKE :t{i})")
            relevance = "(" + " + ".join(likes) + ")"
            src = "descriptions d"
            where.append("(" + " OR ".join(likes) + ")")
        rank = f"rel * (1.0 + {clamped})" if terms else clamped
        # bm25() cannot appear inside a window function: the inner query computes it first.
        matches = (f"SELECT d.*, {relevance} AS rel FROM {src} JOIN units u ON u.id = d.unit_id"
                   + (" WHERE " + " AND ".join(where) if where else ""))
        sql = (
            f"SELECT * FROM (SELECT {self._DESC_COLS}, {rank} AS rank,"
            f" row_number() OVER (PARTITION BY d.unit_id ORDER BY d.exemplars_key != u.exemplars_key, {rank} DESC, d.id) AS rn"
            f" FROM ({matches}) d JOIN units u ON u.id = d.unit_id"
            ") WHERE rn = 1 ORDER BY rank DESC, id LIMIT :limit")
        with self._read() as c:
            rows = c.execute(sql, args).fetchall()
        return [SearchHit(unit=UnitRef(r[8], r[9], r[10], r[11]), description=self._description(r), relevance=float(r[13]))
                for r in rows]

    # -- export ------------------------------------------------------------------------------------

    def export_jsonl(self, path: str | os.PathLike, units: Iterable[UnitRef] | None = None) -> int:
        """Write one JSON line per unit: ``{"unit", "model_id", "record", "exemplars", "descriptions"}``.

        Every description also carries ``"neuronpedia"``, its fields named as Neuronpedia's
        explanation records name them, where they map:

        - ``modelId``: the database's model id;
        - ``layer``: Neuronpedia's source id; written ``"{layer}-{source or kind}"`` (e.g.
          ``"5-mlp"``, ``"6-l6-topk"``), rename it to the source id of the release you upload to;
        - ``index``: the unit index as a string;
        - ``description``: the text; ``explanationModelName``: the explainer's model (or the
          explainer's name when it has no model); ``typeName``: ``"mechscope-{explainer}"``;
        - ``scores``: ``[{"explanationScoreTypeName": name, "value": v}, ...]``, the real scores
          only: the ``*_shuffled`` controls and ``*_n`` counts stay in ``descriptions[].scores``.

        Returns the number of lines written. ``units=None`` exports every unit.
        """
        refs = list(units) if units is not None else self.units()
        n = 0
        with open(path, "w", encoding="utf-8") as f:
            for ref in refs:
                rec = self.unit(ref)
                descs = self.descriptions(ref)
                line = {
                    "unit": ref.key, "model_id": self.model_id,
                    "kind": ref.kind, "source": ref.source, "layer": ref.layer, "index": ref.index,
                    "record": None if rec is None else {
                        "max_act": rec.max_act, "min_act": rec.min_act, "density": rec.density,
                        "quantiles": rec.quantiles, "histogram": rec.histogram, "top_logits": rec.top_logits,
                        "bottom_logits": rec.bottom_logits, "n_tokens": rec.n_tokens},
                    "exemplars": [{"kind": e.kind, "split": e.split, "quantile": e.quantile, "context": e.context,
                                   "position": e.position, "focus": e.focus, "tokens": e.tokens, "acts": e.acts}
                                  for e in self.exemplars(ref)],
                    "descriptions": [{
                        "id": d.id, "text": d.text, "explainer": d.explainer, "explainer_model": d.explainer_model,
                        "settings": d.settings, "settings_key": settings_key(d.settings), "scores": d.scores,
                        "provenance": d.provenance, "polarity": d.polarity,
                        "version": self.description_version(d.id or 0),
                        "neuronpedia": {
                            "modelId": self.model_id, "layer": f"{ref.layer}-{ref.source or ref.kind}",
                            "index": str(ref.index), "description": d.text,
                            "explanationModelName": d.explainer_model or d.explainer,
                            "typeName": f"mechscope-{d.explainer}",
                            "scores": [{"explanationScoreTypeName": k, "value": v} for k, v in d.scores.items()
                                       if not k.endswith(("_shuffled", "_n"))]},
                    } for d in descs],
                }
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                n += 1
        return n
