"""Describing units (MLP neurons, SAE features, transcoder features): exemplars, explainers, scoring, a database.

    from mechscope.explain import UnitRef, UnitDB
    db = UnitDB("units.db")                      # SQLite, WAL, FTS5
    hits = db.search("names of cities")          # ranked by relevance and score
    for ex in db.exemplars(hits[0].unit, split="train"): print(ex.tokens[ex.focus], ex.act)
    res = describe(db, db.units("mlp", layer=5), make_explainer("baseline"), ModelSimulator(None))  # + scores
"""

from mechscope._lazy import lazy_exports
from mechscope.explain.types import Description, Exemplar, SearchHit, UnitRecord, UnitRef, UnitStore

lazy_exports(__name__, {"UnitDB": "db", "settings_key": "db",
                        "DescribeConfig": "describe", "DescribeResult": "describe", "describe": "describe",
                        "make_explainer": "explainers", "ModelSimulator": "scoring", "control_summary": "scoring"})

__all__ = ["DescribeConfig", "DescribeResult", "Description", "Exemplar", "ModelSimulator", "SearchHit", "UnitDB",
           "UnitRecord", "UnitRef", "UnitStore", "control_summary", "describe", "make_explainer", "settings_key"]
