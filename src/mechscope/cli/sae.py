"""`mechscope sae ...`: harvest activations, train, evaluate, feature dashboards."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import List, Optional

import typer

from mechscope.activations.config import StoreConfig
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
    fresh_dir,
    given,
    handles_errors,
    hold_out,
    load,
    load_sae_and_model,
)
from mechscope.errors import MechscopeError
from mechscope.sae.config import DashboardConfig, TrainConfig

sae_app = typer.Typer(help="Sparse autoencoders and transcoders: harvest, train, eval, dashboard, convert.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    sae_app.command("harvest")(harvest)
    sae_app.command("train")(train)
    sae_app.command("eval")(eval_)
    sae_app.command("dashboard")(dashboard)
    sae_app.command("convert")(convert)
    app.add_typer(sae_app, name="sae")


ContextLenOpt = typer.Option(None, "--context-len", show_default=False,
                             help=f"Tokens per context (default min({StoreConfig.context_len}, the model's context)).")


def check_tokens(tokens: int) -> None:
    """``--tokens`` of harvest and eval, before the model loads."""
    if tokens < 1:
        raise MechscopeError(f"--tokens must be at least 1; got {tokens}.")


def model_path(model: str | None) -> str | None:
    """``--model`` as the trained SAE records it (``metadata.model_path``, which ``sae eval``
    loads): a local folder or file as an absolute path, so the SAE evaluates from any working
    directory; a hub id or an alias as given."""
    from mechscope.models.load import ALIASES

    if model is None or model.lower() in ALIASES:
        return model
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


@handles_errors
def harvest(
    hook: List[str] = typer.Option(..., "--hook", help="Hook name(s) to harvest (repeat for several, rows stay aligned)."),
    tokens: int = typer.Option(1_000_000, "--tokens", help="Rows (tokens) per hook to write."),
    out: Path = typer.Option(..., "--out", help="Folder for the shards (a killed harvest resumes there)."),
    corpus: Optional[str] = CorpusOpt,
    model: Optional[str] = ModelOpt,
    context_len: Optional[int] = ContextLenOpt,
    batch_size: int = typer.Option(StoreConfig.batch_size, "--batch-size", help="Contexts per forward pass (the shuffled rows' order depends on it; compare trainings at one batch size)."),
    dtype: str = typer.Option(StoreConfig.dtype, "--dtype", help="float32, bfloat16 or float16 on disk."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Run the model over a corpus once and save activations as safetensors shards."""
    from mechscope.activations import get_corpus
    from mechscope.activations import harvest as do_harvest
    from mechscope.models.hooks import check_hook_name
    from mechscope.sae.evaluate import check_context_len
    from mechscope.sae.io import check_vector_hook

    def settings(n: int) -> StoreConfig:
        return StoreConfig(hooks=list(hook), context_len=n, batch_size=batch_size, dtype=dtype)  # checked when made

    check_context_len(context_len)  # in the option's words: StoreConfig names its fields
    if batch_size < 1:
        raise MechscopeError(f"--batch-size must be at least 1 (contexts per forward pass); got {batch_size}.")
    check_early(settings, context_len, StoreConfig.context_len)
    check_tokens(tokens)
    check_out_folder(out, "shards", replaces=False)
    m = load(model, device)
    for h in hook:
        check_hook_name(m, h)
        check_vector_hook(m, h)  # shards hold one row per token; SAEs train on them
    cfg = settings(context_len_for(m, context_len, StoreConfig.context_len))
    manifest = do_harvest(m, get_corpus(corpus, split="train"), cfg, out, tokens, corpus_spec=corpus or "embedded", progress=not json)
    if json:
        return emit_json(manifest)
    console.print(f"harvested {manifest.get('n_tokens', tokens):,} tokens of {', '.join(hook)} into {out}")


def refuse_unused_sparsity(ctx: typer.Context, arch: str, options: tuple[str, ...] = ("k", "l1", "l0")) -> None:
    """One sentence when a sparsity option that ``--arch`` does not read was given: --k (topk and
    batchtopk), --l1 (relu), --l0 (jumprelu); a skip variant reads what its plain form reads.
    Left at their defaults they are not an error. An unknown ``--arch`` is refused elsewhere."""
    from mechscope.sae.archs import architecture_names, get_architecture

    if arch not in architecture_names():
        return
    cls = get_architecture(arch)
    plain = arch.removeprefix("skip_")
    reads = {"k": cls.uses_k, "l1": plain == "relu", "l0": plain == "jumprelu"}
    for name in options:
        if given(ctx, name) and not reads[name]:
            users = {"k": "topk and batchtopk", "l1": "relu", "l0": "jumprelu"}[name]
            raise MechscopeError(f"--{name} applies to --arch {users} only; --arch {arch} does not read it, so drop --{name}.")


@handles_errors
def train(
    ctx: typer.Context,
    hook: str = typer.Option(..., "--hook", help="TransformerLens hook, e.g. blocks.15.hook_resid_post (transcoder: the MLP input, e.g. blocks.6.ln2.hook_normalized)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the SAE (cfg.json + sae_weights.safetensors) and checkpoints."),
    arch: str = typer.Option(TrainConfig.architecture, "--arch", help="relu, topk, batchtopk or jumprelu."),
    d_sae: Optional[int] = typer.Option(TrainConfig.d_sae, "--d-sae", help="Number of features (default: expansion x d_model)."),
    expansion: int = typer.Option(TrainConfig.expansion, "--expansion"),
    k: int = typer.Option(TrainConfig.k, "--k", help="Active features per token (topk, batchtopk)."),
    l1: float = typer.Option(TrainConfig.l1, "--l1", help="L1 coefficient (relu)."),
    l0: float = typer.Option(TrainConfig.l0, "--l0", help="L0 coefficient (jumprelu)."),
    tokens: int = typer.Option(TrainConfig.tokens, "--tokens", help="Training tokens."),
    batch_tokens: int = typer.Option(TrainConfig.batch_tokens, "--batch-tokens"),
    lr: float = typer.Option(TrainConfig.lr, "--lr"),
    corpus: Optional[str] = CorpusOpt,
    shards: Optional[Path] = typer.Option(None, "--from-shards", help="Train from shards written by `mechscope sae harvest` instead of running the model."),
    transcoder: bool = typer.Option(False, "--transcoder", help="Train a transcoder: --hook (MLP input) -> --hook-out (default: that layer's hook_mlp_out)."),
    hook_out: Optional[str] = typer.Option(None, "--hook-out"),
    context_len: Optional[int] = ContextLenOpt,
    checkpoint_every: int = typer.Option(TrainConfig.checkpoint_every, "--checkpoint-every", help="Tokens between checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run checkpointed in --out."),
    seed: int = typer.Option(TrainConfig.seed, "--seed"),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Train an SAE (or transcoder) on a hook's activations; checkpoints, resumable."""
    from mechscope.sae.evaluate import check_context_len
    from mechscope.sae.train import check_out, sae_trainer, transcoder_output_hook

    refuse_unused_sparsity(ctx, arch)
    if hook_out is not None and not transcoder:
        raise MechscopeError("--hook-out names a transcoder's output; add --transcoder to train one, or drop --hook-out for an SAE.")
    out = out or fresh_dir("sae")
    tout = (hook_out or transcoder_output_hook(hook)) if transcoder else None
    cfg = TrainConfig(architecture=arch, d_sae=d_sae, expansion=expansion, k=k, l1=l1, l0=l0, tokens=tokens,
                      batch_tokens=batch_tokens, lr=lr, checkpoint_every=checkpoint_every, seed=seed)  # checked when made
    check_out_folder(out, "sae", replaces=False)  # before the model loads: no other command's folder is written into
    check_out(out, resume)  # nor a finished SAE overwritten
    check_context_len(context_len)
    m = load(model, device)
    if shards is None:  # shards have their own contexts: a --context-len given beside them must be theirs (sae_trainer)
        context_len = context_len_for(m, context_len, StoreConfig.context_len)
    trainer = sae_trainer(m, hook, cfg, out, hook_out=tout, corpus=corpus, shards=shards, context_len=context_len,
                          metadata={"model_path": model_path(model) or m.summary.name}, progress=not json)
    where = f"shards {shards}" if shards is not None else f"corpus {corpus or 'embedded'} (train split)"
    if not json:
        console.print(f"training a {arch} {'transcoder' if tout else 'SAE'} with {trainer.sae_cfg.d_sae} features on {hook} from {where}; {tokens:,} tokens -> {out}")
    t0 = time.perf_counter()
    run_or_explain_interrupt(trainer, out, resume)
    secs = time.perf_counter() - t0
    last = trainer.log.rows[-1] if trainer.log.rows else {}
    summary = {"out": str(out), "seconds": round(secs, 1), "tokens": trainer.tokens, "final": last, "sae": trainer.sae_cfg.to_dict()}
    if json:
        return emit_json(summary)
    console.print(
        f"done in {secs:.0f} s: L0 {last.get('l0', float('nan')):.1f}, FVU {last.get('fvu', float('nan')):.3f} (training batches). "
        f"Saved to {out}; evaluate with: mechscope sae eval {out}"
    )


def run_or_explain_interrupt(trainer, out: Path, resume: bool) -> None:  # noqa: ANN001 - a sae.train.Trainer
    """``trainer.run``; a Ctrl-C that leaves a checkpoint says how to continue from it (the
    work up to that checkpoint is kept), rather than only that the run was interrupted."""
    from mechscope.sae.train import has_checkpoint

    try:
        trainer.run(resume=resume)
    except KeyboardInterrupt:
        if not has_checkpoint(out):
            raise
        again = "rerun the same command" if resume else f"rerun the same command with --resume (and --out {out})"
        raise MechscopeError(f"interrupted; {again} to continue from the last checkpoint.") from None


@handles_errors
def eval_(
    sae_dir: Path = typer.Argument(..., help="SAE folder (mechscope or SAELens layout)."),
    tokens: int = typer.Option(32_768, "--tokens", help="Held-out tokens to evaluate on."),
    corpus: Optional[str] = CorpusOpt,
    context_len: Optional[int] = ContextLenOpt,
    model: Optional[str] = RecordedModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for eval.json and eval.html (default: the SAE folder)."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """L0, MSE, FVU, cosine, CE loss recovered, KL, dead/dense features on held-out text."""
    from mechscope.report.sae_eval import write_sae_eval
    from mechscope.sae import evaluate_on_corpus
    from mechscope.sae.evaluate import check_context_len

    check_tokens(tokens)
    check_context_len(context_len)  # before the model loads
    check_out_folder(out, "eval", beside=("sae",))
    hold_out(Path(out or sae_dir))  # written into the SAE's folder by default
    sae, m = load_sae_and_model(sae_dir, model, device)
    context_len = context_len_for(m, context_len, StoreConfig.context_len)
    r = evaluate_on_corpus(m, sae, corpus, n_tokens=tokens, context_len=context_len, progress=not json)
    dest = out or sae_dir
    r.save(Path(dest) / "eval.json")
    html = write_sae_eval(r.to_dict(), Path(dest) / "eval.html")
    if json:
        return emit_json(r.to_dict())
    from rich.table import Table

    t = Table(title=f"SAE eval on {r.tokens:,} held-out tokens", show_header=False)
    for key in ("l0", "mse", "fvu", "cos", "ce_clean", "ce_sae", "ce_zero", "ce_recovered", "kl", "dead_frac", "dense_frac"):
        v = getattr(r, key)
        t.add_row(key, f"{v:.4g}" if math.isfinite(v) else "undefined")
    console.print(t)
    if not math.isfinite(r.ce_recovered):
        console.print(undefined_recovered_note(r.ce_clean, r.ce_sae, r.ce_zero, r.sae.get("hook_name", "the hook")), highlight=False)
    console.print(f"report: {html}")


def undefined_recovered_note(ce_clean: float, ce_sae: float, ce_zero: float, hook: str) -> str:
    """Why CE loss recovered, ``(ce_zero - ce_sae) / (ce_zero - ce_clean)``, is undefined, from
    the three losses: a loss that is itself undefined (NaN or infinite) is named; only where all
    three are numbers and the zeroed loss equals the clean one does it say zeroing changes nothing."""
    losses = {"ce_clean (the model alone)": ce_clean, "ce_sae (reconstruction spliced in)": ce_sae,
              "ce_zero (hook zeroed)": ce_zero}
    bad = [name for name, v in losses.items() if not math.isfinite(v)]
    if bad:
        return (f"CE loss recovered is undefined because {' and '.join(bad)} {'is' if len(bad) == 1 else 'are'} not a number "
                "(NaN or infinite); check the SAE's weights and the model's outputs on this text.")
    if abs(ce_zero - ce_clean) > 1e-9 * max(1.0, abs(ce_clean)):  # not the case evaluate.recovered leaves undefined
        return (f"CE loss recovered is undefined ({ce_zero:.4g} zeroed, {ce_sae:.4g} spliced, {ce_clean:.4g} clean); FVU and "
                "KL still measure the reconstruction.")
    return (f"CE loss recovered is undefined: zeroing {hook} leaves the loss where it was ({ce_zero:.4g} zeroed vs "
            f"{ce_clean:.4g} clean), so there is nothing to recover; FVU and KL still measure the reconstruction.")


@handles_errors
def dashboard(
    sae_dir: Path = typer.Argument(..., help="SAE folder (cfg.json + sae_weights.safetensors)."),
    features: Optional[str] = typer.Option(None, "--features", "-f", help="Features: ranges and lists, e.g. 0-99 or 3,17,40-45 "
                                           "(default: the first 100, or all of a smaller SAE)."),
    tokens: int = typer.Option(DashboardConfig.n_tokens, "--tokens", help="Corpus tokens to read (one pass serves all features)."),
    ctx_len: Optional[int] = typer.Option(None, "--ctx-len", show_default=False,
                                          help=f"Tokens per context (default min({DashboardConfig.ctx_len}, the model's context))."),
    n_top: int = typer.Option(DashboardConfig.n_top, "--top", help="Top activating contexts per feature."),
    batch_size: int = typer.Option(DashboardConfig.batch_size, "--batch-size"),
    corpus: str = typer.Option(DashboardConfig.corpus, "--corpus", help="embedded, a .txt/.jsonl file, a folder of them, or hf:NAME[:SPLIT]."),
    seed: int = typer.Option(DashboardConfig.seed, "--seed"),
    model: Optional[str] = RecordedModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here)."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Feature dashboards: top contexts, quantile samples, histogram, output logits, density."""
    from mechscope.report.dashboard import write_dashboard
    from mechscope.sae.dashboard import feature_dashboards, parse_features

    def settings(n: int) -> DashboardConfig:
        return DashboardConfig(n_tokens=tokens, ctx_len=n, batch_size=batch_size, n_top=n_top, seed=seed, corpus=corpus)  # checked when made

    check_early(settings, ctx_len, DashboardConfig.ctx_len)
    check_out_folder(out, "dashboard")
    sae, m = load_sae_and_model(sae_dir, model, device)
    cfg = settings(context_len_for(m, ctx_len, DashboardConfig.ctx_len, "--ctx-len"))
    cfg.features = feats = parse_features(features or f"0-{min(100, sae.cfg.d_sae) - 1}", sae.cfg.d_sae)
    res = feature_dashboards(m, sae, cfg, progress=not json)
    res.settings["sae_dir"] = str(Path(sae_dir).resolve())  # mechscope serve links the features to their unit pages by it
    out_dir = Path(out or fresh_dir("dashboard"))
    data_path = res.save(out_dir)
    page = write_dashboard(res.to_dict(), out_dir / "dashboard.html")
    summary = {
        "model": m.summary.name, "sae": str(sae_dir), "hook": sae.cfg.hook_name, "features": len(feats),
        "tokens": res.n_tokens, "seconds": res.seconds,
        "dead": sum(1 for f in res.features if f.n_firing == 0),
        "dashboard_json": str(data_path), "report": str(page),
    }
    if json:
        return emit_json(summary)
    console.print(f"{len(feats)} features of {sae.cfg.hook_name} on {res.n_tokens:,} tokens in {res.seconds:.1f} s "
                  f"({summary['dead']} never fired)")
    console.print(f"report: {page}\ndata:   {data_path}")


@handles_errors
def convert(
    npz: Path = typer.Argument(..., help="A Gemma Scope SAE's params.npz (e.g. .../gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for cfg.json + sae_weights.safetensors."),
    hook: Optional[str] = typer.Option(None, "--hook", help="The hook it reads (default: from the path: layer_N in a -res or -mlp repository folder)."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Convert a Gemma Scope SAE (params.npz) into an SAE folder (SAELens layout, safetensors); with
    --model, check it fits that model and record the model for `sae eval` and `sae dashboard`."""
    from mechscope.sae.gemma_scope import check_npz_file, gemma_scope_sae, infer_hook
    from mechscope.sae.io import check_sae_fits, save_sae

    check_npz_file(npz)  # what is wrong with the file first, before the model loads
    out = out or fresh_dir("sae-gemma-scope")
    if out.exists() and any(out.iterdir()):
        raise MechscopeError(f"{out} is not empty; choose a new --out folder for the converted SAE.")
    m = load(model, device) if model else None
    sae = gemma_scope_sae(npz, hook=hook, model_name=m.summary.name if m else "",
                          metadata={"model_path": model_path(model)} if m else None)
    if m is not None:
        check_sae_fits(sae, m)
    save_sae(sae, out)
    cfg = sae.cfg
    summary = {"out": str(out), "hook": cfg.hook_name, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "architecture": cfg.architecture,
               "checked_against": m.summary.name if m else None}
    try:
        from_path = infer_hook(npz) if hook else None
    except MechscopeError:  # an attention or transcoder path: --hook overrode it on purpose
        from_path = None
    if from_path and from_path != hook:
        summary["note"] = (f"--hook {hook} is not the hook the file's path names ({from_path}); the SAE was saved for --hook "
                           "as given.")
    if json:
        return emit_json(summary)
    fits = f"; it fits {m.summary.name}" if m else " (pass --model to check it fits a model)"
    console.print(f"Gemma Scope SAE with {cfg.d_sae:,} features on {cfg.hook_name} (d_in {cfg.d_in}) -> {out}{fits}.", highlight=False)
    if "note" in summary:
        console.print(f"note: {summary['note']}", highlight=False)
