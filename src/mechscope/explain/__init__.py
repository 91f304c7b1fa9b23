"""Describing units (MLP neurons, SAE features, transcoder features): exemplars, explainers, scoring, a database.

    from mechscope.explain import UnitRef, UnitDB
    db = UnitDB("units.db")                      # SQLite, WAL, FTS5
    hits = db.search("names of cities")          # ranked by relevance and score
    for ex in db.exemplars(hits[0].unit, split="train"): print(ex.tokens[ex.focus], ex.act)
"""

from mechscope._lazy import lazy_exports
from mechscope.explain.types import Description, Exemplar, SearchHit, UnitRecord, UnitRef, UnitStore

lazy_exports(__name__, {"UnitDB": "db", "settings_key": "db"})

__all__ = ["Description", "Exemplar", "SearchHit", "UnitDB", "UnitRecord", "UnitRef", "UnitStore", "settings_key"]
