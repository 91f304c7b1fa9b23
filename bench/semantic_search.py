"""Semantic search's cost per query at the embedded model's scale (46,080 MLP neurons, one
description each, 384-dim vectors), against its floor: the brute-force cosine and ranking over
the same cached matrix, without re-reading the current scores from the database.

    PYTHONPATH=src python bench/semantic_search.py [--units 46080] [--repeats 7]

Builds a throwaway database in a temporary folder (random unit vectors: the cost does not
depend on what they are), warms the cache with one query, then times ``semantic_search`` (which
re-reads every description's score and staleness so that a running ``serve`` ranks by current
scores) and the floor in the same process, and prints the medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mechscope.explain.db import UnitDB
from mechscope.explain.semantic import _matrix, embed_descriptions, semantic_search
from mechscope.explain.types import UnitRecord, UnitRef


class RandomEmbedder:
    name = "random384"
    center = False

    def encode(self, texts: list[str]) -> np.ndarray:
        v = np.random.default_rng(len(texts)).standard_normal((len(texts), 384)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def build(path: Path, n: int) -> UnitDB:
    db = UnitDB(path, model_id="bench")
    refs = [UnitRef("mlp", i // 1536, i % 1536) for i in range(n)]
    db.put_units(UnitRecord(unit=r, max_act=1.0, min_act=0.0, density=0.1) for r in refs)

    def write(c):  # one transaction: put_description would commit per row
        for i, r in enumerate(refs):
            uid = db._unit_id(c, r, create=True)
            c.execute("INSERT INTO descriptions (unit_id, text, explainer, explainer_model, settings, settings_key, scores,"
                      " provenance, polarity, version, created, exemplars_key) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                      (uid, f"word{i % 977} thing{i % 13}", "baseline", "", "{}", "k",
                       '{"simulation": %f}' % ((i % 100) / 100), "{}", "positive", 1, "", ""))

    db._write(write)
    return db


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=46_080)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = build(Path(tmp) / "units.db", args.units)
        emb = RandomEmbedder()
        embed_descriptions(Path(tmp) / "units.db", emb, progress=False)
        semantic_search(db, "query", emb)  # builds the cached matrix
        mat = _matrix(db.con, str(db.path), emb, "simulation")
        q = emb.encode(["query"])[0]

        def floor() -> None:  # cosine, rank and top-20 over the cached matrix only
            cos = mat.normed @ q
            rank = np.maximum(cos, 0.0) * (1.0 + np.clip(np.nan_to_num(mat.scores, nan=0.0), 0.0, 1.0))
            np.argsort(-rank)[:20]

        def timed(fn) -> float:
            out = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
            return statistics.median(out)

        full = timed(lambda: semantic_search(db, "query", emb, limit=20))
        base = timed(floor)
        def reread() -> None:  # forced: a search skips it while nothing was committed
            mat._seen = None
            mat.refresh_scores(db.con, "simulation")

        reread_s = timed(reread)
        db.close()
    print(f"{args.units:,} descriptions: semantic_search {1000 * full:.1f} ms per query (median of {args.repeats}), "
          f"of which re-reading scores {1000 * reread_s:.1f} ms; floor (cosine + rank over the cached matrix) "
          f"{1000 * base:.1f} ms; ratio {full / base:.1f}x")


if __name__ == "__main__":
    main()
