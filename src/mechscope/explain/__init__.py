"""Describing units (MLP neurons, SAE features, transcoder features): exemplars, explainers, scoring, a database.

    from mechscope.explain import UnitRef, UnitDB
    db = UnitDB("units.db")                      # SQLite, WAL, FTS5
    hits = db.search("names of cities")          # ranked by relevance and score
    for ex in db.exemplars(hits[0].unit, split="train"): print(ex.tokens[ex.focus], ex.act)
    res = describe(db, db.units("mlp", layer=5), make_explainer("baseline"), ModelSimulator(None))  # + scores
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports
from mechscope.explain.types import Description, Exemplar, SearchHit, UnitRecord, UnitRef, UnitStore

if TYPE_CHECKING:  # static checkers and IDEs see the lazy exports (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.explain.db import UnitDB, settings_key
    from mechscope.explain.describe import DescribeConfig, DescribeResult, describe
    from mechscope.explain.explainers import make_explainer
    from mechscope.explain.scoring import ModelSimulator, control_summary

lazy_exports(__name__, {"UnitDB": "db", "settings_key": "db",
                        "DescribeConfig": "describe", "DescribeResult": "describe", "describe": "describe",
                        "make_explainer": "explainers", "ModelSimulator": "scoring", "control_summary": "scoring"})

__all__ = ["DescribeConfig", "DescribeResult", "Description", "Exemplar", "ModelSimulator", "SearchHit", "UnitDB",
           "UnitRecord", "UnitRef", "UnitStore", "control_summary", "describe", "make_explainer", "settings_key"]
