"""`mechscope attribute`: the attribution graph of one prompt through a transcoder set;
`mechscope transcoders train | eval`: train a transcoder set (one per layer, one forward pass
per batch for all layers), evaluate one."""

from __future__ import annotations

import json as _json
import math
import time
from pathlib import Path
from typing import Optional

import typer

from mechscope.activations.config import check_sink_ratio
from mechscope.cli.common import (
    CorpusOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    RecordedModelOpt,
    check_early,
    check_out_folder,
    console,
    context_len_for,
    emit_json,
    err_console,
    fail,
    handles_errors,
    hold_out,
    load,
    parse_layers,
)
from mechscope.features.config import EVAL_TOKENS, SINK_RATIO, TranscoderTrainConfig
from mechscope.progress import quiet as progress_quiet

CARD_TOKENS = 4096
"""Default held-out tokens searched for the graph page's feature contexts (about 10 s here)."""


def _model_set_prompt(model: str | None, device: str | None, transcoders: Path, prompt: str):
    """The model, its transcoder set (checked against it) and the prompt's token ids with the
    model's BOS token in front when it has one."""
    from mechscope.features.transcoder_set import load_transcoders

    m = load(model, device)
    tset = load_transcoders(transcoders, m.device, m)
    tset.check_fits(m)
    ids = m.to_tokens(prompt)
    bos = getattr(m.tokenizer, "bos_token_id", None)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    if len(ids) < 2:
        fail("the prompt is empty; give some text.")
    return m, tset, ids


@handles_errors
def attribute(
    prompt: str = typer.Argument(..., help="The prompt (the model's BOS token is prepended when it has one)."),
    transcoders: Path = typer.Option(..., "--transcoders", help="Transcoder set folder (mechscope transcoders train, or circuit-tracer's layout)."),
    target: Optional[list[str]] = typer.Option(None, "--target", help="Logit node token text, e.g. ' Paris' (one token; repeatable). Default: the top logits up to 95% probability."),
    target_feature: Optional[str] = typer.Option(None, "--target-feature", help="LAYER:FEATURE:POS: attribute that active feature instead of the logits (a local circuit)."),
    max_features: int = typer.Option(4096, "--max-features", help="Features that get rows; beyond it, the most influential are visited first and the rest fold into the error nodes."),
    node_threshold: float = typer.Option(0.8, "--node-threshold", help="Cumulative influence kept by node pruning."),
    edge_threshold: float = typer.Option(0.98, "--edge-threshold", help="Cumulative influence kept by edge pruning."),
    batch_size: int = typer.Option(32, "--batch-size", help="Targets per backward pass. Where more features are active than --max-features, it is also how many are visited between re-estimates of influence, so the kept features can differ slightly with it."),
    max_links: int = typer.Option(50_000, "--max-links", help="Cap on links written to graph.json (strongest kept)."),
    qk: Optional[list[str]] = typer.Option(None, "--qk", help="LAYER:HEAD:QUERY_POS:KEY_POS: split that attention score into query-side x key-side node pairs (repeatable; qk.json and the report)."),
    contexts: int = typer.Option(CARD_TOKENS, "--contexts", help="Held-out corpus tokens searched for each kept feature's top-activating contexts, shown on the report (0: none)."),
    corpus: Optional[str] = CorpusOpt,
    out: Path = typer.Option(..., "--out", help="Output folder (written complete or not at all)."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Attribution graph of a prompt: features, errors, tokens and logits with exact linear edges."""
    from mechscope.features.attribute import attribute as run_attribute
    from mechscope.features.graph_files import graph_json, save_graph_folder
    from mechscope.features.prune import prune

    for name, count, least in (("--max-features", max_features, 0), ("--contexts", contexts, 0),
                               ("--batch-size", batch_size, 1), ("--max-links", max_links, 1)):
        if count < least:
            fail(f"{name} must be at least {least}; got {count}.")
    for name, v in (("--node-threshold", node_threshold), ("--edge-threshold", edge_threshold)):
        if not 0.0 <= v <= 1.0:
            fail(f"{name} must lie between 0 and 1, got {v}.")
    if contexts == 0 and corpus is not None:  # before the model loads
        _card_corpus(contexts, corpus)
    check_out_folder(out, "graph")
    m, tset, ids = _model_set_prompt(model, device, transcoders, prompt)
    card_corpus, cards_note = _card_corpus(contexts, corpus)  # before the graph: a bad --corpus fails at once
    from mechscope.features.cards import MAX_CELLS

    if contexts * max(1, max_features) > MAX_CELLS:
        fail(f"--contexts {contexts} with --max-features {max_features} could need a {contexts * max_features:,}-cell "
             f"activation table (limit {MAX_CELLS:,}); lower --contexts.")
    from mechscope.errors import MechscopeError
    from mechscope.models.unembed import final_norm

    try:
        final_norm(m)
        card_logits = True
    except MechscopeError as exc:  # the graph does not need it; only the cards' output tokens do
        card_logits, cards_note = False, (cards_note + " " if cards_note else "") + f"feature output tokens left out: {exc}"
    bos = getattr(m.tokenizer, "bos_token_id", None)
    targets = None
    if target:
        targets = []
        from mechscope.models.prompt import single_token

        for t in target:
            tid = m.to_tokens(t)
            if bos is not None and tid and tid[0] == bos:
                tid = tid[1:]
            # text that is one token as given keeps it; else one token alone or after the prompt
            # (a SentencePiece "▁" tokenizer encodes " Paris" alone as '▁', '▁Paris')
            targets.append(tid[0] if len(tid) == 1 else single_token(m, t, "--target", prompt=prompt))
    tf = None
    if target_feature is not None:
        try:
            tf = tuple(int(x) for x in target_feature.split(":"))
        except ValueError:
            tf = ()
        if len(tf) != 3 or min(tf) < 0:
            fail(f"--target-feature {target_feature!r} is not LAYER:FEATURE:POS (three non-negative integers, e.g. 12:345:7).")
        if target:
            fail("give either --target (logits) or --target-feature (a local circuit), not both.")
    from mechscope.features.qk import check_edge, parse_qk_spec, qk_attribution

    qk_edges = [parse_qk_spec(s) for s in qk or []]
    for edge in qk_edges:
        check_edge(m, len(ids), *edge)
    g = run_attribute(m, tset, ids, targets=targets, max_features=max_features, batch_size=batch_size, target_feature=tf,
                      progress=not json)
    qk_docs = []
    if qk_edges:
        from mechscope.features.replacement import capture

        run = capture(m, tset, ids)  # one clean pass for every edge
        qk_docs = [qk_attribution(m, tset, ids, *edge, run=run).to_dict() for edge in qk_edges]
    pr = prune(g, node_threshold, edge_threshold)
    doc = graph_json(g, pr, m.tokenizer, slug=out.name, prompt=prompt, scan=str(transcoders), node_threshold=node_threshold,
                     max_links=max_links)
    from mechscope.report.attribution import render_attribution

    cards, more = _feature_cards(m, tset, doc, contexts, card_corpus, json, card_logits)
    cards_note = cards_note or more
    html = render_attribution(doc, qk=qk_docs, cards=cards)
    extra = {"report.html": html} | ({"qk.json": _json.dumps(qk_docs, indent=1)} if qk_docs else {})
    save_graph_folder(g, doc, out, extra)
    gen = doc["metadata"]["generator"]
    from mechscope.models.tokens import token_texts

    summary = {
        "out": str(out), "n_tokens": len(ids), "n_active_features": g.n_active, "n_features_with_rows": g.n_features,
        "nodes_kept": len(doc["nodes"]), "links_written": gen["links_written"], "links_total": gen["links_total"],
        "replacement_score": gen["replacement_score"], "completeness_score": gen["completeness_score"],
        "pruned_replacement_score": gen["pruned_replacement_score"],
        "pruned_completeness_score": gen["pruned_completeness_score"], "seconds": g.settings["seconds"],
        "logits": [{"token": s, "prob": float(p)} for s, p in zip(token_texts(m.tokenizer, [int(t) for t in g.logit_tokens]), g.logit_probs)],
        "qk": qk_docs, "feature_cards": len(cards), "feature_cards_note": cards_note,
    }
    if json:
        return emit_json(summary)
    console.print(
        f"attribution graph of {len(ids)} tokens: {g.n_active:,} active features ({g.n_features:,} with rows), "
        f"{len(doc['nodes']):,} nodes and {gen['links_written']:,} links kept; replacement score "
        f"{gen['replacement_score']:.2f} (pruned {gen['pruned_replacement_score']:.2f}), completeness "
        f"{gen['completeness_score']:.2f} (pruned {gen['pruned_completeness_score']:.2f}); {g.settings['seconds']:.0f} s.",
        highlight=False,
    )
    if gen["links_written"] < gen["links_total"]:
        console.print(f"graph.json holds the {gen['links_written']:,} strongest of {gen['links_total']:,} links (--max-links).", highlight=False)
    for d in qk_docs:
        top = d["top_pairs"][0] if d["top_pairs"] else None
        lead = f"; largest pair {top['query_label']} x {top['key_label']} {top['value']:+.3f}" if top else ""
        console.print(f"QK L{d['layer']}.H{d['head']} {d['query_pos']}->{d['key_pos']}: score {d['score']:+.3f} "
                      f"(weight {d['weight']:.3f}){lead}", highlight=False, markup=False)
    if cards_note:
        console.print(cards_note, highlight=False)
    console.print(f"report: {out / 'report.html'}", highlight=False)


CARD_CONTEXT_LEN = 128


def _card_corpus(n_tokens: int, corpus: str | None):
    """The held-out corpus for the feature contexts (None when off): a named corpus that cannot
    be read is an error; a missing default corpus only leaves the contexts out, with a note."""
    from mechscope.activations.corpus import get_corpus
    from mechscope.errors import MechscopeError

    if n_tokens <= 0:
        if corpus is not None:
            raise MechscopeError("--corpus is where the feature cards' contexts come from; --contexts 0 leaves them out, so "
                                 "drop --corpus (or give --contexts).")
        return None, ""
    try:
        return get_corpus(corpus, split="heldout"), ""
    except MechscopeError as exc:
        if corpus is not None:
            raise
        return None, f"feature contexts left out: {exc}"


def _feature_cards(m, tset, doc: dict, n_tokens: int, corpus, quiet: bool, logits: bool = True) -> tuple[dict, str]:
    """Cards of the kept feature nodes (``features.cards``): output tokens always, the top
    contexts from ``n_tokens`` tokens of ``corpus`` (an opened corpus, or None: no contexts)."""
    import itertools

    import torch

    from mechscope.activations.store import pack_contexts
    from mechscope.features.cards import feature_cards
    from mechscope.models.load import default_length

    feats = sorted({(int(n["layer"]), int(n["feature"])) for n in doc["nodes"] if n["feature_type"] == "cross layer transcoder"})
    ctx, note = None, ""
    if feats and corpus is not None and n_tokens > 0:
        T = default_length(m, CARD_CONTEXT_LEN)  # a short-context model reads shorter contexts
        ids = list(itertools.islice(pack_contexts(m.tokenizer, corpus, T), max(1, n_tokens // T)))
        if ids:
            ctx = torch.tensor(ids)
        else:
            note = f"feature contexts left out: the corpus gave no full context of {T} tokens."
    if not quiet and feats and not progress_quiet():  # a status line: stderr, and silent under --quiet
        err_console.print(f"feature cards for {len(feats):,} kept features"
                      + (f" (top contexts in {ctx.numel():,} held-out tokens)" if ctx is not None else ""), highlight=False)
    return (feature_cards(m, tset, feats, ctx, logits=logits, progress=not quiet) if feats else {}), note


transcoders_app = typer.Typer(help="Transcoder sets: train one transcoder per layer, evaluate a set.", no_args_is_help=True)


@handles_errors
def transcoders_train(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Folder for the set (both layouts), its training log and checkpoints."),
    layers: str = typer.Option("all", "--layers", help="all, or layers and ranges such as 0,3,5-7."),
    arch: str = typer.Option(TranscoderTrainConfig.architecture, "--arch", help="relu, topk, batchtopk or jumprelu."),
    k: int = typer.Option(TranscoderTrainConfig.k, "--k", help="Active features per token (topk, batchtopk)."),
    expansion: int = typer.Option(TranscoderTrainConfig.expansion, "--expansion", help="Features per model dimension."),
    d_sae: Optional[int] = typer.Option(None, "--d-sae", help="Features per layer (overrides --expansion)."),
    skip: bool = typer.Option(TranscoderTrainConfig.skip, "--skip/--no-skip", help="A linear skip from MLP input to output (circuit-tracer's W_skip); on by default."),
    tokens: int = typer.Option(TranscoderTrainConfig.tokens, "--tokens", help="Training tokens per layer (all layers share them)."),
    corpus: Optional[str] = CorpusOpt,
    lr: float = typer.Option(TranscoderTrainConfig.lr, "--lr"),
    context_len: Optional[int] = typer.Option(None, "--context-len", show_default=False,
                                              help=f"Tokens per context (default min({TranscoderTrainConfig.context_len}, the model's context))."),
    batch_contexts: int = typer.Option(TranscoderTrainConfig.batch_contexts, "--batch-contexts", help="Contexts whose tokens make one training batch."),
    shuffle_contexts: Optional[int] = typer.Option(None, "--shuffle-contexts", help="Contexts per shuffled chunk of activations, held in memory for all layers (default: the multiple of --batch-contexts nearest 256)."),
    checkpoint_every: int = typer.Option(TranscoderTrainConfig.checkpoint_every, "--checkpoint-every", help="Tokens between checkpoints."),
    seed: int = typer.Option(TranscoderTrainConfig.seed, "--seed"),
    include_special: bool = typer.Option(False, "--include-special", help="Train on special tokens' rows too (BOS, chat markers, document separators; left out by default). Separators are attention sinks too, so they stay out unless --sink-ratio 0 as well."),
    sink_ratio: float = typer.Option(SINK_RATIO, "--sink-ratio", help="Leave out the rows of attention sinks: positions whose residual norm after a trained layer is more than this many times the layer's median (massive activations); 0 keeps them."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run checkpointed in --out."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Train one transcoder per layer (MLP input -> MLP output) from one forward pass per batch; resumable."""
    from dataclasses import replace

    from mechscope.errors import MechscopeError
    from mechscope.features.train import check_start, train_transcoders
    from mechscope.features.transcoder_set import TranscoderSet

    def settings(n: int) -> TranscoderTrainConfig:
        return TranscoderTrainConfig(architecture=arch, skip=skip, k=k, expansion=expansion, d_sae=d_sae, tokens=tokens,
                                     corpus=corpus, lr=lr, context_len=n, batch_contexts=batch_contexts,
                                     shuffle_contexts=shuffle_contexts if shuffle_contexts is not None else TranscoderTrainConfig.chunk_for(batch_contexts, TranscoderTrainConfig.forward_contexts),
                                     checkpoint_every=checkpoint_every, seed=seed, exclude_special=not include_special,
                                     sink_ratio=sink_ratio or None)  # checked when made

    _check_arch(arch, skip)
    from mechscope.cli.sae import refuse_unused_sparsity

    refuse_unused_sparsity(ctx, arch, ("k",))
    if not layers.strip():
        fail("--layers is empty; give 'all' or layers and ranges such as 0,3,5-7.")
    later = _check_early_or_later(settings, context_len)
    check_out_folder(out, "transcoders", replaces=False)
    m = load(model, device)
    # every setting is checked before the work is announced: the context against the model's, the layers against its depth
    n_ctx = context_len_for(m, context_len, TranscoderTrainConfig.context_len)
    if later is not None:  # a refusal that a shorter --context-len lifts comes after the check of the length itself
        raise later
    cfg = replace(settings(n_ctx), layers=parse_layers(layers, m.summary.n_layers))
    check_start(m, cfg, out, resume)
    if not json:
        console.print(f"training {len(cfg.layers)} {cfg.arch_name} transcoders of {m.summary.name} on {tokens:,} tokens of "
                      f"{corpus or 'embedded'} (train split), one forward pass per batch for all layers -> {out}", highlight=False)
    t0 = time.perf_counter()
    from mechscope.cli.sae import model_path

    # a local model folder recorded as its absolute path, so `transcoders eval` runs from any folder
    try:
        res = train_transcoders(m, cfg, out, resume=resume, model_path=model_path(model) or m.summary.name, progress=not json)
    except KeyboardInterrupt:  # as `sae train`: a Ctrl-C that leaves a checkpoint says how to continue from it
        if not _has_checkpoint(out):
            raise
        again = "rerun the same command" if resume else f"rerun the same command with --resume (and --out {out})"
        raise MechscopeError(f"interrupted; {again} to continue from the last checkpoint.") from None
    secs = time.perf_counter() - t0
    import json as _json

    log = _json.loads((out / "training_log.json").read_text())
    final = {layer: rows[-1] for layer, rows in log["training_log"].items() if rows}
    summary = {"out": str(out), "seconds": round(secs, 1), "layers": cfg.layers, "complete_set": log["complete_set"],
               "architecture": cfg.arch_name, "d_sae": [tc.cfg.d_sae for tc in (res.layers if isinstance(res, TranscoderSet) else res.values())],
               "tokens": log["harvest"]["tokens_trained_per_layer"], "harvest": log["harvest"], "final": final}
    if json:
        return emit_json(summary)
    fvu = [r["fvu"] for r in final.values()]
    console.print(f"done in {secs:.0f} s: training-batch FVU mean {sum(fvu) / max(1, len(fvu)):.3f}, max {max(fvu, default=float('nan')):.3f}. "
                  f"Saved to {out}; evaluate with: mechscope transcoders eval {out}", highlight=False)


def _has_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a transcoder-set checkpoint ``transcoders train --resume`` can continue."""
    from mechscope.features.train import LATEST
    from mechscope.sae.train import CKPT_DIR

    return (out / CKPT_DIR / LATEST).is_file()


def _check_arch(arch: str, skip: bool) -> None:
    """``--arch`` against the names --help gives (the plain architectures; ``--skip/--no-skip``
    chooses the skip), in one sentence; a ``skip_`` name still works, but not with ``--no-skip``."""
    from mechscope.sae.archs.skip import SKIP_VARIANTS

    plain = [c.plain.name for c in SKIP_VARIANTS]
    skips = {c.name: c.plain.name for c in SKIP_VARIANTS}
    if arch in skips and not skip:
        fail(f"--arch {arch} has a linear skip but --no-skip asks for none; give --arch {skips[arch]} with --no-skip, "
             "or drop --no-skip.")
    if arch not in plain and arch not in skips:
        fail(f"unknown --arch {arch!r}; choose one of {', '.join(plain)} (--skip/--no-skip sets the linear skip).")


def _check_early_or_later(settings, context_len: int | None):
    """``check_early`` of the settings; a refusal under a given ``--context-len`` that the shortest
    context lifts (such as --tokens less than one batch) is returned, to be raised once the
    length itself has been checked against the model's, which may be the real fault."""
    from mechscope.errors import MechscopeError

    try:
        check_early(settings, context_len, TranscoderTrainConfig.context_len)
    except MechscopeError as exc:
        if context_len is None or context_len <= 2:
            raise
        try:
            settings(2)
        except MechscopeError:
            raise exc from None
        return exc
    return None


@handles_errors
def transcoders_eval(
    set_dir: Path = typer.Argument(..., help="Transcoder set folder (mechscope transcoders train, or circuit-tracer's layout)."),
    tokens: int = typer.Option(EVAL_TOKENS, "--tokens", help="Held-out tokens to evaluate on (CE loss recovered comes with a 95% interval)."),
    corpus: Optional[str] = CorpusOpt,
    context_len: Optional[int] = typer.Option(None, "--context-len", show_default=False,
                                              help=f"Tokens per context (default min({TranscoderTrainConfig.context_len}, the model's context))."),
    batch_size: int = typer.Option(8, "--batch-size", help="Contexts per forward pass."),
    include_special: bool = typer.Option(False, "--include-special", help="Splice and score special tokens' positions too (left out by default, like position 0; separators are sinks too, see --sink-ratio; FVU over all positions is reported either way)."),
    sink_ratio: float = typer.Option(SINK_RATIO, "--sink-ratio", help="Leave out attention sinks as training does (residual norm after a layer of the set more than this many times its median); 0 splices and scores them."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for eval.json and eval.html (default: the set's folder)."),
    model: Optional[str] = RecordedModelOpt,
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Per layer FVU, L0, dead features and CE loss recovered; CE loss recovered with all layers spliced at once."""
    import os

    from mechscope.features.evaluate import evaluate_transcoders_on_corpus, save_eval
    from mechscope.features.transcoder_set import TranscoderSet, load_transcoder_layers
    from mechscope.report.transcoders import render_transcoders_eval

    if sink_ratio and not sink_ratio > 1:  # before the model loads, in the option's words
        fail(f"--sink-ratio {sink_ratio}: sink_ratio must be above 1, or 0 to splice and score the sinks.")
    check_sink_ratio(sink_ratio or None)
    for name, v, least in (("--tokens", tokens, 1), ("--batch-size", batch_size, 1), ("--context-len", context_len, 2)):
        if v is not None and v < least:
            fail(f"{name} must be at least {least}; got {v}.")
    check_out_folder(out, "eval", beside=("transcoders",))
    hold_out(Path(out or set_dir))  # written into the set's folder by default
    given = load(model, device) if model else None  # a circuit-tracer set reading mlp.hook_in needs it to load
    found = load_transcoder_layers(set_dir, "cpu", given)
    first = next(iter(found.values())).cfg
    m = given or load(first.metadata.get("model_path") or first.model_name or None, device)
    n = m.summary.n_layers
    tset = TranscoderSet([found[i] for i in range(n)], first.model_name) if sorted(found) == list(range(n)) else found
    if isinstance(tset, TranscoderSet):
        tset.check_fits(m)
    elif max(found) >= n:
        fail(f"{set_dir} has a transcoder for layer {max(found)} but {m.summary.name} has layers 0-{n - 1}; use the model the set was trained on.")
    context_len = context_len_for(m, context_len, TranscoderTrainConfig.context_len)
    r = evaluate_transcoders_on_corpus(m, tset, corpus, n_tokens=tokens, context_len=context_len, batch_size=batch_size,
                                       exclude_special=not include_special, sink_ratio=sink_ratio or None, progress=not json)
    dest = Path(out or set_dir)
    dest.mkdir(parents=True, exist_ok=True)
    html = render_transcoders_eval(r)
    page = dest / "eval.html"
    tmp = dest / f".eval.html.tmp{os.getpid()}"
    tmp.write_text(html, encoding="utf-8")
    save_eval(r, dest / "eval.json")
    os.replace(tmp, page)
    if json:
        return emit_json(r)
    from rich.table import Table

    left, sinks = r["settings"].get("special_positions", 0), r["settings"].get("sink_positions", 0)
    parts = [f"{left:,} special-token"] * bool(left) + [f"{sinks:,} sink"] * bool(sinks)
    ratio = r["settings"].get("sink_ratio")
    t = Table(title=f"transcoder set eval on {r['tokens']:,} held-out tokens per layer"
                    + (f" ({' and '.join(parts)} positions left out)" if parts else "")
                    + (f"; sinks: residual norm > {ratio:g}x the median" if ratio else "; sink positions kept"))
    for col in ("layer", "FVU", "FVU all positions", "L0", "dead", "CE spliced", "CE zeroed", "CE recovered", "± 95%"):
        t.add_column(col, justify="right")
    for row in r["layers"]:
        t.add_row(str(row["layer"]), *(f"{row[key]:.4g}" for key in ("fvu", "fvu_with_special", "l0", "dead_frac", "ce_spliced", "ce_zero",
                                                                      "ce_recovered", "ce_recovered_ci95")))
    console.print(t)
    a = r["all_layers"]
    console.print(f"all {len(a['layers'])} layers spliced at once: CE {a['ce_spliced']:.4g} (clean {r['ce_clean']:.4g}, all MLPs "
                  f"zeroed {a['ce_zero']:.4g}), CE loss recovered {a['ce_recovered']:.4g} ± {a['ce_recovered_ci95']:.2g} (95%)",
                  highlight=False)
    console.print(f"report: {page}", highlight=False)


def _layer_feature(spec: str, flag: str, parts: int) -> tuple[int, ...]:
    """``L:F`` or ``L:F:POS`` as non-negative integers, or one sentence saying what is wrong."""
    try:
        vals = tuple(int(x) for x in spec.split(":"))
    except ValueError:
        vals = ()
    if len(vals) != parts or min(vals) < 0:
        form = "LAYER:FEATURE" if parts == 2 else "LAYER:FEATURE:POS"
        fail(f"{flag} {spec!r} is not {form} (non-negative integers, e.g. {'12:345' if parts == 2 else '12:345:7'}).")
    return vals


@handles_errors
def transcoders_weights(
    folder: Path = typer.Argument(..., help="Transcoder set folder."),
    feature: str = typer.Option(..., "--feature", help="LAYER:FEATURE whose strongest input-independent inputs and outputs to list."),
    top: int = typer.Option(20, "--top", help="How many inputs and outputs."),
    model: Optional[str] = RecordedModelOpt,
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Global virtual weights of a feature: its strongest inputs from earlier layers' features and
    outputs to later ones along the residual stream (through the second norm's centring, at scale 1)."""
    from mechscope.features.transcoder_set import load_transcoders
    from mechscope.features.weights import centred_norms, virtual_weights

    layer, f = _layer_feature(feature, "--feature", 2)
    if top < 1:
        fail(f"--top must be at least 1, got {top}.")
    from mechscope.features.transcoder_set import load_transcoder_layers

    given = load(model, device) if model else None  # as transcoders eval: the model the set records by default
    if given is None:
        first = next(iter(load_transcoder_layers(folder, "cpu", None).values())).cfg
        given = load(first.metadata.get("model_path") or first.model_name or None, device)
    m = given
    tset = load_transcoders(folder, "cpu", m)
    tset.check_fits(m)
    vw = virtual_weights(tset, layer, f, top, centred=centred_norms(m))
    if json:
        return emit_json({"layer": layer, "feature": f, **vw})
    for title, rows in (("inputs", vw["inputs"]), ("outputs", vw["outputs"])):
        console.print(f"[bold]{title}[/] of L{layer}:{f}: " + (", ".join(f"L{r['layer']}:{r['feature']} {r['weight']:+.3f}" for r in rows) or "none"),
                      highlight=False, markup=True)


@handles_errors
def intervene(
    prompt: str = typer.Argument(..., help="The prompt (BOS prepended when the model has one)."),
    transcoders: Path = typer.Option(..., "--transcoders", help="Transcoder set folder."),
    set_: list[str] = typer.Option(..., "--set", help="LAYER:FEATURE:POS=VALUE (repeatable): set that feature's activation."),
    frozen: bool = typer.Option(False, "--frozen", help="Keep attention patterns, norm scales and all other features at their clean values (the graph's linear model)."),
    generate: int = typer.Option(0, "--generate", help="Greedy tokens to generate with the change held (in the replacement "
                                 "model, even with --frozen: new positions need their own attention)."),
    top: int = typer.Option(10, "--top", help="Logits to list, at most (largest changes; the whole vocabulary when it is smaller)."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Set feature activations in the replacement model (errors kept) and show the logit changes."""
    from mechscope.features.intervene import check_clamp_values
    from mechscope.features.intervene import intervene as run_intervene

    clamps = []
    for spec in set_:
        where, _, value = spec.partition("=")
        layer, f, pos = _layer_feature(where, "--set", 3)
        try:
            v = float(value)
        except ValueError:
            fail(f"--set {spec!r} needs =VALUE, a number (e.g. 12:345:7=0 to turn the feature off).")
        if not math.isfinite(v):
            fail(f"--set {spec!r}: the value must be a finite number.")
        clamps.append((layer, f, pos, v))
    check_clamp_values(clamps)  # before the model loads
    if generate < 0:
        fail(f"--generate must be at least 0 (greedy tokens to generate); got {generate}.")
    if top < 1:
        fail(f"--top must be at least 1 (logits to list); got {top}.")
    m, tset, ids = _model_set_prompt(model, device, transcoders, prompt)
    res = run_intervene(m, tset, ids, clamps, frozen=frozen, generate=generate)
    from mechscope.models.tokens import token_texts

    dm = lambda x: x - x.mean()  # noqa: E731
    delta = dm(res["changed"]) - dm(res["base"])
    idx = delta.abs().topk(min(top, delta.numel())).indices.tolist()  # --top is at most: a vocabulary smaller than it lists all
    rows = [{"token": token_texts(m.tokenizer, [i])[0], "id": i, "base": float(res["base"][i]), "changed": float(res["changed"][i]),
             "delta_demeaned": float(delta[i])} for i in idx]
    out = {"frozen": frozen, "set": [list(c) for c in clamps], "logits": rows}
    if generate:
        out.update(base_text=res["base_text"], changed_text=res["changed_text"], generated_tokens=res["generated_tokens"],
                   generate_note=res.get("generate_note"), generate_mode=res.get("generate_mode", "replacement model"))
    if json:
        return emit_json(out)
    for r in rows:
        console.print(f"{r['token']!r:>16} {r['base']:8.3f} -> {r['changed']:8.3f} ({r['delta_demeaned']:+.3f})", highlight=False, markup=False)
    if generate:
        if frozen:
            console.print("generated in the replacement model (the clamps held; --frozen applies to the logits above only)",
                          highlight=False, markup=False)
        console.print(f"without: {res['base_text']!r}", highlight=False, markup=False)
        console.print(f"with:    {res['changed_text']!r}", highlight=False, markup=False)
        if res.get("generate_note"):
            console.print(f"note: {res['generate_note']}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.command("attribute")(attribute)
    transcoders_app.command("train")(transcoders_train)
    transcoders_app.command("eval")(transcoders_eval)
    transcoders_app.command("weights")(transcoders_weights)
    app.command("intervene")(intervene)
    app.add_typer(transcoders_app, name="transcoders")
