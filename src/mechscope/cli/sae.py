"""`mechscope sae ...`: harvest activations, train, evaluate (and dashboards, from sae_tools)."""

from __future__ import annotations

import math
import re
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from mechscope.cli.common import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    console,
    emit_json,
    fresh_dir,
    handles_errors,
    load,
)

sae_app = typer.Typer(help="Sparse autoencoders and transcoders: harvest, train, eval, dashboard.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    from mechscope.cli import sae_tools

    sae_app.command("harvest")(harvest)
    sae_app.command("train")(train)
    sae_app.command("eval")(eval_)
    sae_tools.register_dashboard(sae_app)
    app.add_typer(sae_app, name="sae")
    sae_tools.register(app)


CorpusOpt = typer.Option(None, "--corpus", help="Text corpus: 'embedded' (default), a .txt/.jsonl file, a folder, or hf:NAME[:split].")



def _mlp_out_of(hook: str) -> str:
    m = re.match(r"blocks\.(\d+)\.", hook)
    if not m:
        from mechscope.errors import MechscopeError

        raise MechscopeError(f"cannot tell which layer {hook!r} belongs to; pass --hook-out blocks.L.hook_mlp_out as well.")
    return f"blocks.{m.group(1)}.hook_mlp_out"


class _Progress:
    """One live line: step, tokens, tokens/s, L0, FVU, dead fraction."""

    def __init__(self, total_steps: int, quiet: bool):
        self.total, self.quiet = total_steps, quiet

    def __call__(self, s: dict) -> None:
        if self.quiet:
            return
        dead = "-" if math.isnan(s.get("dead", float("nan"))) else f"{100 * s['dead']:.1f}%"
        line = (
            f"\rstep {s['step']}/{self.total} | {s['tokens'] / 1e6:.2f}M tok | {s['tok_per_s']:,.0f} tok/s | "
            f"L0 {s['l0']:.1f} | FVU {s['fvu']:.3f} | dead {dead}   "
        )
        sys.stderr.write(line)
        sys.stderr.flush()


@handles_errors
def harvest(
    hook: List[str] = typer.Option(..., "--hook", help="Hook name(s) to harvest (repeat for several, rows stay aligned)."),
    tokens: int = typer.Option(1_000_000, "--tokens", help="Rows (tokens) per hook to write."),
    out: Path = typer.Option(..., "--out", help="Folder for the shards (a killed harvest resumes there)."),
    corpus: Optional[str] = CorpusOpt,
    model: Optional[str] = ModelOpt,
    context_len: int = typer.Option(128, "--context-len"),
    batch_size: int = typer.Option(8, "--batch-size", help="Contexts per forward pass."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16 on disk."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Run the model over a corpus once and save activations as safetensors shards."""
    from mechscope.activations import StoreConfig, get_corpus
    from mechscope.activations import harvest as do_harvest
    from mechscope.models.hooks import check_hook_name

    m = load(model, device)
    for h in hook:
        check_hook_name(m, h)
    cfg = StoreConfig(hooks=list(hook), context_len=context_len, batch_size=batch_size, dtype=dtype)
    manifest = do_harvest(m, get_corpus(corpus, split="train"), cfg, out, tokens, corpus_spec=corpus or "embedded", progress=not json)
    if json:
        return emit_json(manifest)
    console.print(f"harvested {manifest.get('n_tokens', tokens):,} tokens of {', '.join(hook)} into {out}")


@handles_errors
def train(
    hook: str = typer.Option(..., "--hook", help="TransformerLens hook, e.g. blocks.15.hook_resid_post (transcoder: the MLP input, e.g. blocks.6.ln2.hook_normalized)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the SAE (cfg.json + sae_weights.safetensors) and checkpoints."),
    arch: str = typer.Option("topk", "--arch", help="relu, topk, batchtopk or jumprelu."),
    d_sae: Optional[int] = typer.Option(None, "--d-sae", help="Number of features (default: expansion x d_model)."),
    expansion: int = typer.Option(8, "--expansion"),
    k: int = typer.Option(32, "--k", help="Active features per token (topk, batchtopk)."),
    l1: float = typer.Option(5.0, "--l1", help="L1 coefficient (relu)."),
    l0: float = typer.Option(0.02, "--l0", help="L0 coefficient (jumprelu)."),
    tokens: int = typer.Option(2_000_000, "--tokens", help="Training tokens."),
    batch_tokens: int = typer.Option(4096, "--batch-tokens"),
    lr: float = typer.Option(4e-4, "--lr"),
    corpus: Optional[str] = CorpusOpt,
    shards: Optional[Path] = typer.Option(None, "--from-shards", help="Train from shards written by `mechscope sae harvest` instead of running the model."),
    transcoder: bool = typer.Option(False, "--transcoder", help="Train a transcoder: --hook (MLP input) -> --hook-out (default: that layer's hook_mlp_out)."),
    hook_out: Optional[str] = typer.Option(None, "--hook-out"),
    context_len: int = typer.Option(128, "--context-len"),
    checkpoint_every: int = typer.Option(250_000, "--checkpoint-every", help="Tokens between checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run checkpointed in --out."),
    seed: int = typer.Option(0, "--seed"),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Train an SAE (or transcoder) on a hook's activations; checkpoints, resumable."""
    from mechscope.activations import (
        ActivationStore,
        ShardStore,
        StoreConfig,
        get_corpus,
    )
    from mechscope.errors import MechscopeError
    from mechscope.models.hooks import check_hook_name
    from mechscope.sae.sources import StoreSource
    from mechscope.sae.train import TrainConfig, Trainer

    out = out or fresh_dir("sae")
    if resume and not out.exists():
        raise MechscopeError(f"--resume: {out} does not exist; pass the --out of the run to continue.")
    tout = (hook_out or _mlp_out_of(hook)) if transcoder else None
    hooks = [hook] + ([tout] if tout else [])
    m = load(model, device)
    for h in hooks:
        check_hook_name(m, h)
    tcfg = TrainConfig(
        architecture=arch, d_sae=d_sae, expansion=expansion, k=k, l1=l1, l0=l0, tokens=tokens,
        batch_tokens=batch_tokens, lr=lr, checkpoint_every=checkpoint_every, seed=seed, device=str(m.device),
    )
    if shards is not None:
        store = ShardStore(shards, hooks=hooks, seed=seed, device=str(m.device))
        where = f"shards {shards}"
    else:
        scfg = StoreConfig(hooks=hooks, context_len=context_len, seed=seed)
        store = ActivationStore(m, get_corpus(corpus, split="train"), scfg)
        where = f"corpus {corpus or 'embedded'} (train split)"
    dims = store.dims
    source = StoreSource(store, hook, tout)
    trainer = Trainer(
        source, tcfg, out, d_in=dims[hook], d_out=dims[tout] if tout else None, hook_name=hook, hook_name_out=tout,
        model_name=m.summary.name, metadata={"model_path": model or m.summary.name, "context_size": context_len, "dataset_path": corpus or "embedded"},
        progress=_Progress(tcfg.steps, json),
    )
    if not json:
        console.print(f"training a {arch} {'transcoder' if tout else 'SAE'} with {trainer.sae_cfg.d_sae} features on {hook} from {where}; {tokens:,} tokens -> {out}")
    t0 = time.perf_counter()
    trainer.run(resume=resume)
    secs = time.perf_counter() - t0
    last = trainer.log.rows[-1] if trainer.log.rows else {}
    summary = {"out": str(out), "seconds": round(secs, 1), "tokens": trainer.tokens, "final": last, "sae": trainer.sae_cfg.to_dict()}
    if json:
        return emit_json(summary)
    sys.stderr.write("\n")
    console.print(
        f"done in {secs:.0f} s: L0 {last.get('l0', float('nan')):.1f}, FVU {last.get('fvu', float('nan')):.3f} (training batches). "
        f"Saved to {out}; evaluate with: mechscope sae eval {out}"
    )


@handles_errors
def eval_(
    sae_dir: Path = typer.Argument(..., help="SAE folder (mechscope or SAELens layout)."),
    tokens: int = typer.Option(32_768, "--tokens", help="Held-out tokens to evaluate on."),
    corpus: Optional[str] = CorpusOpt,
    context_len: int = typer.Option(128, "--context-len"),
    model: Optional[str] = ModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for eval.json and eval.html (default: the SAE folder)."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """L0, MSE, FVU, cosine, CE loss recovered, KL, dead/dense features on held-out text."""
    import itertools

    import torch

    from mechscope.activations import get_corpus, pack_contexts
    from mechscope.errors import MechscopeError
    from mechscope.report.sae_eval import write_sae_eval
    from mechscope.sae import load_sae
    from mechscope.sae.evaluate import evaluate_sae

    sae = load_sae(sae_dir)
    spec = model or sae.cfg.metadata.get("model_path") or sae.cfg.model_name or None
    m = load(spec, device)
    n_ctx = max(1, tokens // context_len)
    ctx = list(itertools.islice(pack_contexts(m.tokenizer, get_corpus(corpus, split="heldout"), context_len), n_ctx))
    if not ctx:
        raise MechscopeError("the held-out corpus yields no full context; use a larger corpus or a smaller --context-len.")
    r = evaluate_sae(m, sae, torch.tensor(ctx), batch_size=8)
    r.settings["corpus"] = (corpus or "embedded") + " (held-out split)"
    dest = out or sae_dir
    r.save(Path(dest) / "eval.json")
    html = write_sae_eval(r.to_dict(), Path(dest) / "eval.html")
    if json:
        return emit_json(r.to_dict())
    from rich.table import Table

    t = Table(title=f"SAE eval on {r.tokens:,} held-out tokens", show_header=False)
    for key in ("l0", "mse", "fvu", "cos", "ce_clean", "ce_sae", "ce_zero", "ce_recovered", "kl", "dead_frac", "dense_frac"):
        t.add_row(key, f"{getattr(r, key):.4g}")
    console.print(t)
    console.print(f"report: {html}")
