"""The unit database opened read-only, for the web server.

``ReadOnlyUnitDB`` is a ``UnitDB`` (so every read, ``search`` included, is the database's own
code and ranks exactly as ``mechscope search`` does) whose connection is opened with SQLite's
``file:...?mode=ro`` URI: the server cannot change the file, whatever a request asks, and never
creates, migrates or locks it for writing (a ``describe`` run may keep writing beside it; WAL lets
the reader see each committed transaction). It skips ``UnitDB.__init__`` (which creates and
migrates) and sets the attributes that ``UnitDB``'s read methods use (``path``, ``timeout_s``,
``con``, ``fts``, ``model_id``, ``_counts``); a test checks that every route works through it.

Refusals, one sentence each (``MechscopeError``): a missing file, a file that is not SQLite or
is damaged, a SQLite file that is not a unit database, a schema other than this mechscope's.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mechscope.errors import MechscopeError
from mechscope.explain.db import SCHEMA_VERSION, UnitDB


class ReadOnlyUnitDB(UnitDB):
    """A unit database file opened read-only (module docstring); writes raise ``MechscopeError``."""

    def __init__(self, path: str | Path, timeout_s: float = 10.0):  # noqa: D107 - no super().__init__ on purpose
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._counts = None
        if not self.path.is_file():
            raise MechscopeError(f"no database file at {self.path}; give the --db file that mechscope exemplars wrote.")
        if self.path.stat().st_size == 0:
            raise MechscopeError(f"{self.path} is empty, not a mechscope unit database; give the --db file that mechscope exemplars wrote.")
        try:
            self.con = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=timeout_s,
                                       isolation_level=None, check_same_thread=False)
            self.con.execute(f"PRAGMA busy_timeout = {int(timeout_s * 1000)}")
            tables = {r[0] for r in self.con.execute("SELECT name FROM sqlite_master")}
            version = self.con.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise MechscopeError(f"{self.path} is not a readable SQLite database ({e}); give the --db file that mechscope exemplars wrote.") from None
        if not {"meta", "units", "descriptions", "exemplars"} <= tables:
            self.con.close()
            raise MechscopeError(f"{self.path} is a SQLite database but not a mechscope unit database; give the --db file that mechscope exemplars wrote.")
        if version > SCHEMA_VERSION:
            self.con.close()
            raise MechscopeError(f"{self.path} has schema version {version}, newer than this mechscope's {SCHEMA_VERSION}; upgrade mechscope.")
        if version != SCHEMA_VERSION:
            self.con.close()
            raise MechscopeError(f"{self.path} has schema version {version} and this mechscope reads {SCHEMA_VERSION}; "
                                 "open it once with mechscope exemplars or describe (which migrate it), then read it again.")
        try:
            self.con.execute("SELECT count(*) FROM units").fetchone()
            self.fts = "descriptions_fts" in tables
            self.model_id = dict(self.con.execute("SELECT key, value FROM meta").fetchall()).get("model_id", "")
        except sqlite3.DatabaseError as e:
            self.con.close()
            raise MechscopeError(f"{self.path} is damaged ({e}); restore it from a copy or rebuild it.") from None

    def _write(self, fn):
        raise MechscopeError(f"{self.path} is open read-only here; write to it with mechscope exemplars or describe.")

    def layer_counts(self, kind: str, source: str | None = None) -> dict[int, int]:
        """Layer -> number of stored units of ``kind`` (and ``source``)."""
        sql, args = "SELECT layer, count(*) FROM units WHERE kind=?", [kind]
        if source is not None:
            sql, args = sql + " AND source=?", args + [source]
        with self._read() as c:
            return dict(c.execute(sql + " GROUP BY layer", args).fetchall())

    def sources(self, kind: str) -> list[str]:
        """The distinct sources (SAE / transcoder set names) of the stored units of ``kind``."""
        with self._read() as c:
            return [r[0] for r in c.execute("SELECT DISTINCT source FROM units WHERE kind=? ORDER BY source", (kind,))]

    def count(self, kind: str | None = None, layer: int | None = None, source: str | None = None) -> int:
        """How many units match (``units()`` without building the list)."""
        where, args = [], []
        for col, val in (("kind", kind), ("layer", layer), ("source", source)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        with self._read() as c:
            return c.execute("SELECT count(*) FROM units" + (" WHERE " + " AND ".join(where) if where else ""), args).fetchone()[0]

    def units_page(self, kind: str | None, layer: int | None, source: str | None, offset: int, limit: int):
        """One page of ``units()`` in the same order, with LIMIT/OFFSET in SQL."""
        from mechscope.explain.types import UnitRef

        where, args = [], []
        for col, val in (("kind", kind), ("layer", layer), ("source", source)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        sql = ("SELECT kind, layer, idx, source FROM units" + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY kind, source, layer, idx LIMIT ? OFFSET ?")
        with self._read() as c:
            return [UnitRef(k, l, i, s) for k, l, i, s in c.execute(sql, [*args, int(limit), int(offset)])]
