"""`mechscope tuned-lens train | eval | convert`: train a tuned lens (one affine translator per
layer), evaluate it against the logit lens on held-out text, convert the tuned-lens package's
``params.pt`` into safetensors."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from mechscope.cli.common import (
    CorpusOpt,
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    RecordedModelOpt,
    check_out_folder,
    console,
    emit_json,
    err_console,
    handles_errors,
    hold_out,
    load,
)
from mechscope.lens.config import HELDOUT_TOKENS, TunedLensTrainConfig

tuned_app = typer.Typer(help="Tuned lens: train translators per layer, evaluate them against the logit lens, convert.",
                        no_args_is_help=True)


def register(app: typer.Typer) -> None:
    tuned_app.command("train")(train)
    tuned_app.command("eval")(evaluate)
    tuned_app.command("convert")(convert)
    app.add_typer(tuned_app, name="tuned-lens")


def check_train_options(*, reads: str, matmul_dtype: str, tokens: int, kl_steps: int, kl_batch: int, kl_tokens: int | None,
                        checkpoint_every: int, context_len: int | None) -> None:
    """One sentence naming the option the user typed and its bad value (``TunedLensTrainConfig``
    checks the same settings, in its fields' names, for Python callers)."""
    from mechscope.errors import MechscopeError

    if reads not in ("resid_post", "resid_pre"):
        raise MechscopeError(f"--reads {reads!r} is not a translator input; use resid_post or resid_pre.")
    if matmul_dtype not in ("auto", "bfloat16", "float32"):
        raise MechscopeError(f"--matmul-dtype {matmul_dtype!r} is not one; use auto, bfloat16 or float32.")
    for option, value, least in (("--tokens", tokens, 1), ("--kl-steps", kl_steps, 0), ("--kl-batch", kl_batch, 1),
                                 ("--kl-tokens", kl_tokens, 1), ("--checkpoint-every", checkpoint_every, 1),
                                 ("--context-len", context_len, 2)):
        if value is not None and value < least:
            raise MechscopeError(f"{option} must be at least {least}; got {value}.")


def recorded_model(info: dict) -> str | None:
    """The model a tuned lens records: the folder it was loaded from where that still exists
    (a local model's name alone is not loadable: session 39), else its name (an alias, a hub id)."""
    source = info.get("source")
    if isinstance(source, str) and source and Path(source).exists():
        return source
    name = info.get("name")
    return name if isinstance(name, str) else None


@handles_errors
def train(
    out: Path = typer.Option(..., "--out", help="Folder for the translators (tuned_lens.json + .safetensors) and checkpoints."),
    tokens: int = typer.Option(TunedLensTrainConfig.tokens, "--tokens", help="Train-split positions read for the closed-form start."),
    corpus: Optional[str] = CorpusOpt,
    kl_steps: int = typer.Option(TunedLensTrainConfig.kl_steps, "--kl-steps", help="Adam steps of the KL fine-tune (0: closed form only)."),
    kl_batch: int = typer.Option(TunedLensTrainConfig.kl_batch, "--kl-batch", help="Positions per KL step."),
    kl_tokens: Optional[int] = typer.Option(None, "--kl-tokens", show_default=False,
                                            help=f"Positions cached for the KL fine-tune (default min({TunedLensTrainConfig.kl_tokens}, --tokens))."),
    lr: float = typer.Option(TunedLensTrainConfig.lr, "--lr"),
    reads: str = typer.Option(TunedLensTrainConfig.reads, "--reads", help="resid_post (after each block) or resid_pre (entering it)."),
    matmul_dtype: str = typer.Option(TunedLensTrainConfig.matmul_dtype, "--matmul-dtype", help="auto, bfloat16 or float32 unembedding matmuls in the KL stage (auto: bfloat16 on a GPU or a CPU with bfloat16 instructions)."),
    checkpoint_every: int = typer.Option(TunedLensTrainConfig.checkpoint_every, "--checkpoint-every", help="KL steps between checkpoints."),
    seed: int = typer.Option(TunedLensTrainConfig.seed, "--seed"),
    context_len: Optional[int] = typer.Option(None, "--context-len", show_default=False,
                                              help=f"Tokens per context (default min({TunedLensTrainConfig.context_len}, the model's context))."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run checkpointed in --out (or extend a finished one to a larger --kl-steps)."),
    keep_checkpoint: bool = typer.Option(TunedLensTrainConfig.keep_checkpoint, "--keep-checkpoint/--drop-checkpoint",
                                         help="Keep --out/checkpoint after the run so --resume can extend it (about 310 MB for the embedded model)."),
    model: Optional[str] = ModelOpt,
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Train a tuned lens: a closed-form start streamed over the corpus, then a KL fine-tune; resumable."""
    from mechscope.cli.common import check_early, context_len_for
    from mechscope.lens.tuned_train import train_tuned_lens

    def settings(n: int) -> TunedLensTrainConfig:
        return TunedLensTrainConfig(tokens=tokens, corpus=corpus, kl_steps=kl_steps, kl_batch=kl_batch, lr=lr,
                                    kl_tokens=min(TunedLensTrainConfig.kl_tokens, tokens) if kl_tokens is None else kl_tokens,
                                    reads=reads, matmul_dtype=matmul_dtype,
                                    cache_dtype="float32" if matmul_dtype == "float32" else "bfloat16",
                                    checkpoint_every=checkpoint_every, keep_checkpoint=keep_checkpoint, seed=seed, context_len=n)

    check_train_options(reads=reads, matmul_dtype=matmul_dtype, tokens=tokens, kl_steps=kl_steps, kl_batch=kl_batch,
                        kl_tokens=kl_tokens, checkpoint_every=checkpoint_every, context_len=context_len)
    # the settings are checked before the model loads, the context length against the model's after
    check_early(settings, context_len, TunedLensTrainConfig.context_len)
    # a lens's own evaluation (`tuned-lens eval` writes into the lens folder by default) does not
    # block extending that lens with --resume; it describes the lens this run replaces, so it goes
    own_eval = [out / f for f in ("eval.json", "eval.html")] if (out / "tuned_lens.json").is_file() else []
    check_out_folder(out, "tuned-lens", beside=("eval",) if own_eval else (), replaces=False)
    m = load(model, device)
    cfg = settings(context_len_for(m, context_len, TunedLensTrainConfig.context_len))
    if not json:
        console.print(f"tuned lens for {m.summary.name}: {m.summary.n_layers} translators reading {reads}, closed form on "
                      f"{tokens:,} tokens of {corpus or 'embedded'} (train split), {kl_steps} KL steps -> {out}", highlight=False)
    t0 = time.perf_counter()
    lens = train_tuned_lens(m, corpus, cfg, out, resume=resume, progress=not json)
    secs = time.perf_counter() - t0
    stale = [p for p in own_eval if p.is_file()]
    for p in stale:
        p.unlink()
    if stale:
        err_console.print(f"note: removed {', '.join(p.name for p in stale)} from {out}: it evaluated the lens this run "
                          f"extended; run `mechscope tuned-lens eval {out}` again.", highlight=False, markup=False)
    tr = lens.info["training"]
    last = tr["kl_log"][-1]["kl_mean"] if tr["kl_log"] else None
    summary = {"out": str(out), "seconds": round(secs, 1), "stage_seconds": tr["seconds"], "final_train_kl_mean": last,
               "n_layers": lens.n_layers, "reads": lens.reads}
    if json:
        return emit_json(summary)
    took = train_timing(secs, tr["seconds"]["closed_form"], tr["seconds"]["kl"], resume)
    console.print(f"done in {took}. Saved to {out}; evaluate with: mechscope tuned-lens eval {out}", highlight=False)


def train_timing(total: float, closed_form: float, kl: float, resume: bool = False) -> str:
    """'1.3 s (closed form 0.6 s, KL 0.7 s)': the total and the stage times, all rounded alike
    (one decimal under 100 s, whole seconds above), so a stage never reads longer than the whole
    it is part of. The stage times add up every run of a resumed lens; the total is this process's."""
    digits = 1 if max(total, closed_form, kl) < 99.95 else 0

    def s(x: float) -> str:
        return f"{x:.{digits}f} s"

    stages = f"closed form {s(closed_form)}, KL {s(kl)}"
    return f"{s(total)} this session ({stages} over all runs)" if resume else f"{s(total)} ({stages})"


@handles_errors
def evaluate(
    lens_dir: Path = typer.Argument(..., help="Tuned lens folder (mechscope tuned-lens train or convert)."),
    tokens: int = typer.Option(HELDOUT_TOKENS, "--tokens", help="Held-out positions scored."),
    corpus: Optional[str] = CorpusOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for eval.json and eval.html (default: LENS_DIR)."),
    model: Optional[str] = RecordedModelOpt,
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Held-out KL to the final distribution per layer, tuned lens vs logit lens (JSON + HTML report)."""
    from mechscope.cli.common import context_len_for
    from mechscope.errors import MechscopeError
    from mechscope.lens.tuned import TunedLens
    from mechscope.lens.tuned_eval import evaluate_tuned_lens
    from mechscope.report.tuned_lens import write_tuned_lens_eval
    from mechscope.results import write_result_json

    if tokens < 1:
        raise MechscopeError(f"--tokens {tokens} must be at least 1.")
    check_out_folder(out, "eval", beside=("tuned-lens",))
    hold_out(Path(out or lens_dir))  # written into the lens's folder by default
    lens = TunedLens.load(lens_dir)  # before the model: a bad folder fails fast
    m = load(model or recorded_model(lens.model_info), device)
    res = evaluate_tuned_lens(m, lens, corpus, tokens, context_len=context_len_for(m, None, TunedLensTrainConfig.context_len),
                              progress=not json)
    out_dir = Path(out or lens_dir)
    write_result_json(out_dir, "eval.json", res)
    report = write_tuned_lens_eval(res, out_dir / "eval.html")
    if json:
        return emit_json({**res, "report": str(report)})
    for r in res["layers"]:
        ratio = "    n/a" if r["ratio"] is None else f"{r['ratio']:7.2f}"  # n/a: both KLs are 0 (the final residual)
        console.print(f"layer {r['layer']:>3}  KL logit {r['kl_logit']:8.4f}  tuned {r['kl_tuned']:8.4f}  ratio {ratio}",
                      highlight=False)
    s = res["summary"]
    mid = s["min_ratio_layers_10_20"]  # None where the model has no layers 10-20
    mid_text = f"smallest ratio at layers 10-20: {mid:.2f}; " if mid is not None else ""
    console.print(f"tuned below the logit lens at every layer: {s['tuned_below_logit_every_layer']}; {mid_text}"
                  f"{res['seconds']:.0f} s. report: {report}", highlight=False)


@handles_errors
def convert(
    params: Path = typer.Argument(..., help="params.pt saved by the tuned-lens package (TunedLens.save)."),
    out: Path = typer.Option(..., "--out", help="Folder for tuned_lens.json + tuned_lens.safetensors."),
    config: Optional[Path] = typer.Option(None, "--config", help="The package's config.json (default: beside PARAMS)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model the lens is for (default: the config's base_model_name_or_path)."),
    json: bool = JsonOpt,
) -> None:
    """Convert tuned-lens package translators to safetensors, reading the pickle with torch.load(weights_only=True) only."""
    from mechscope.lens.tuned import convert_tuned_lens

    check_out_folder(out, "tuned-lens")
    lens = convert_tuned_lens(params, out, config, model_name)
    summary = {"out": str(out), "n_layers": lens.n_layers, "d_model": lens.d_model, "reads": lens.reads,
               "model": lens.model_info.get("name")}
    if json:
        return emit_json(summary)
    console.print(f"{lens.n_layers} translators of width {lens.d_model} (reading resid_pre, the package's layout) for "
                  f"{lens.model_info.get('name')}, read with torch.load(weights_only=True) -> {out}", highlight=False)
