"""Head commands: heads (taxonomy), train-toy (a small model on CPU), dynamics (per checkpoint)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from mechscope.cli.common import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    check_out_folder,
    console,
    emit_json,
    given,
    handles_errors,
    hold_out,
    load,
    resumable_out,
)
from mechscope.errors import MechscopeError
from mechscope.heads.config import DataConfig, DynamicsConfig, HeadsConfig, ToyConfig
from mechscope.icl.binding_config import BindingConfig, BindingDataConfig, BindingEvalConfig
from mechscope.icl.meta_config import SETTING as META_SETTING
from mechscope.icl.meta_config import MetaConfig, MetaDataConfig, MetaDynamicsConfig


def register(app: typer.Typer) -> None:
    app.command("heads")(heads)
    app.command("train-toy")(train_toy)
    app.command("dynamics")(dynamics)


@handles_errors
def heads(
    ctx: typer.Context,
    model: Optional[str] = ModelOpt,
    n: int = typer.Option(HeadsConfig.n, "--n", help="Repeated random-token sequences."),
    seq_len: int = typer.Option(HeadsConfig.seq_len, "--seq-len", help="Length of the random segment R (sequences are BOS + R + R)."),
    text: Optional[str] = typer.Option(HeadsConfig.text, "--text", help="Real-text source: embedded (default when installed), pydoc, or a .txt/.jsonl file or folder."),
    n_text: int = typer.Option(HeadsConfig.n_text, "--n-text", help="Real-text windows (pattern scores on text, ICL score)."),
    text_len: Optional[int] = typer.Option(HeadsConfig.text_len, "--text-len", help="Tokens per text window (default min(520, context - 1))."),
    ablate: int = typer.Option(HeadsConfig.ablate, "--ablate", help="Top induction heads mean-ablated one at a time (-1: all heads)."),
    top_k: int = typer.Option(HeadsConfig.top_k, "--top-k", help="k for top-k induction heads ablated together vs k random heads."),
    seed: int = typer.Option(HeadsConfig.seed, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here); a rerun with the "
                                       "same settings resumes in it after a kill."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Score every attention head: previous-token, duplicate, induction, copying, ablation, composition, ICL."""
    from mechscope.heads import head_scores
    from mechscope.partial import clear as clear_partial
    from mechscope.report.heads import write_heads

    cfg = HeadsConfig(n=n, seq_len=seq_len, text=text, n_text=n_text, text_len=text_len, ablate=ablate,
                      top_k=top_k, seed=seed)
    check_out_folder(out, "heads")
    m = load(model, device)
    n_heads = m.summary.n_layers * m.summary.n_heads
    if given(ctx, "top_k") and top_k >= n_heads:  # left at its default it is cut to the heads there are, and says so
        raise MechscopeError(f"--top-k {top_k} leaves none of {m.summary.name}'s {n_heads} heads for the random control "
                             f"(k other heads ablated together); give at most {n_heads - 1}.")
    t0 = time.perf_counter()
    out_dir = resumable_out(out, "heads")
    res = head_scores(m, cfg, progress=not json, checkpoint=out_dir)
    res.save(out_dir)
    report = write_heads({**res.to_dict(), "example_patterns": res.example_patterns.tolist()}, out_dir / "heads.html")
    clear_partial(out_dir, "heads")  # the result is saved: its steps are no longer needed
    summary = {
        "model": m.summary.name, "top_heads": res.top_by_category(), "top_k_composition": res.top_pairs("k", 5) if res.composition else [],
        "icl": res.icl, "ablation": res.ablation, "seconds": time.perf_counter() - t0,
        "heads_json": str(out_dir / "heads.json"), "report": str(report),
        **({"note": res.extra["note"]} if res.extra.get("note") else {}),
    }
    if json:
        return emit_json(summary)
    t = Table(title=f"Top heads of {m.summary.name}")
    t.add_column("category")
    t.add_column("heads (score)")
    for cat, hs in summary["top_heads"].items():
        t.add_row(cat, ", ".join(f"{x['head']} ({x['score']:.3f})" for x in hs))
    if summary["top_k_composition"]:
        t.add_row("K-composition pairs", ", ".join(f"{p['writer']}->{p['reader']} ({p['score']:.3f})" for p in summary["top_k_composition"]))
    console.print(t)
    ic, ab = res.icl, res.ablation
    console.print(f"ICL score: {ic['icl_score']:+.3f} nats (loss at token {ic['late']} minus token {ic['early']}, "
                  f"{ic['n_contexts']} contexts of {res.text_source})")
    console.print(ablation_sentence(ab), highlight=False)
    if summary.get("note"):
        console.print(f"note: {summary['note']}", highlight=False)
    console.print(f"results: {out_dir / 'heads.json'}  report: {report}")


def _change(x: float, rises: str, falls: str) -> str:
    """``rises``/``falls`` and the size of the change ``x`` by its sign: 'raises ... by 0.012'."""
    x = float(x)
    if not math.isfinite(x):
        return f"{rises} by {x}"
    return f"{rises if x >= 0 else falls} by {abs(x):.3f}"


def ablation_sentence(ab: dict) -> str:
    """The terminal line on the top-k ablation (``HeadResults.ablation``), worded by the sign
    of each change: ablating heads can lower the loss as well as raise it."""
    top = _change(ab["top_k_increase"], "raises the repeated-half loss", "lowers the repeated-half loss")
    rnd = _change(ab["random_mean_increase"], "raise it", "lower it")
    overlap = "" if ab.get("random_from") == "other heads" else \
        f" (drawn from all heads, since fewer than {ab['k']} others exist: the control overlaps the top set)"
    return (f"Mean-ablating the top {ab['k']} induction heads {top} nats; {ab['k']} random {'other ' if not overlap else ''}heads {rnd} "
            f"(mean of {len(ab['random_increases'])}){overlap}.")


_BINDING_SHARED = {"layers": "layers", "d_model": "d_model", "n_heads": "heads", "steps": "steps", "batch": "batch",
                   "lr": "lr", "checkpoints": "n_checkpoints", "linear": "linear_checkpoints", "seed": "seed"}
"""Options of train-toy that --setting binding takes too (option name -> BindingConfig field)."""


@handles_errors
def train_toy(
    ctx: typer.Context,
    setting: str = typer.Option("induction", "--setting", help="induction (Markov data with repeats, a GPT-2), icml "
                                "(in-context meta-learning, Minegishi et al. 2025) or binding (variable-binding programs, Wu et al. 2025)."),
    tasks: Optional[int] = typer.Option(None, "--tasks", help=f"icml: hidden tasks T (default {MetaDataConfig.tasks})."),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help=f"icml: adam or sgd (default {MetaConfig.optimizer})."),
    labels: Optional[int] = typer.Option(None, "--labels", help=f"icml: labels N (default {MetaDataConfig.n_labels})."),
    classes: Optional[int] = typer.Option(None, "--classes", help=f"icml: classes (default {MetaDataConfig.n_classes})."),
    context: Optional[int] = typer.Option(None, "--context", help=f"icml: (example, label) pairs before the query (default {MetaDataConfig.n_context})."),
    layers: int = typer.Option(ToyConfig.layers, "--layers"),
    attn_only: bool = typer.Option(ToyConfig.attn_only, "--attn-only/--with-mlp", help="Attention-only (MLPs zeroed and frozen)."),
    d_model: int = typer.Option(ToyConfig.d_model, "--d-model"),
    n_heads: int = typer.Option(ToyConfig.heads, "--heads"),
    steps: int = typer.Option(ToyConfig.steps, "--steps", help=f"Training steps (--setting icml: {MetaConfig.steps:,} when not given)."),
    batch: int = typer.Option(ToyConfig.batch, "--batch"),
    lr: float = typer.Option(ToyConfig.lr, "--lr"),
    vocab: int = typer.Option(DataConfig.vocab, "--vocab", help="Content tokens."),
    seq_len: int = typer.Option(DataConfig.seq_len, "--seq-len", help="Tokens per training sequence (after BOS)."),
    checkpoints: int = typer.Option(ToyConfig.n_checkpoints, "--checkpoints", help="Checkpoints on a log-spaced schedule."),
    linear: int = typer.Option(ToyConfig.linear_checkpoints, "--linear-checkpoints", help="Extra, evenly spaced checkpoints."),
    seed: int = typer.Option(ToyConfig.seed, "--seed"),
    out: Path = typer.Option(..., "--out", help="Folder for checkpoints (re-running resumes an unfinished run)."),
    lines: Optional[int] = typer.Option(None, "--lines", help=f"--setting binding: assignment lines per program (default {BindingDataConfig.lines})."),
    hops: Optional[int] = typer.Option(None, "--hops", help=f"--setting binding: longest chain of references (default {BindingDataConfig.hops}). With binding, the shared "
                                                           f"options default to BindingConfig's ({BindingConfig.layers} layers, d_model "
                                                           f"{BindingConfig.d_model}, {BindingConfig.steps} steps, batch {BindingConfig.batch}, "
                                                           f"lr {BindingConfig.lr})."),
    json: bool = JsonOpt,
) -> None:
    """Train a small transformer on CPU on data where induction pays off (or on variable-binding programs), saving log-spaced checkpoints."""
    from mechscope.heads.train import train_toy as run

    check_out_folder(out, "train-toy", replaces=False)  # a re-run resumes an unfinished run
    icml = {"tasks": tasks, "optimizer": optimizer, "labels": labels, "classes": classes, "context": context}
    icml_given = [f"--{k}" for k, v in icml.items() if v is not None]
    binding_given = [f"--{k}" for k, v in (("lines", lines), ("hops", hops)) if v is not None]
    if setting == META_SETTING:
        if binding_given:
            raise MechscopeError(f"{', '.join(binding_given)} belong to --setting binding; drop them with --setting {META_SETTING}.")
        return _train_meta(ctx, icml, out, json)
    if icml_given:
        raise MechscopeError(f"{', '.join(icml_given)} only apply to --setting {META_SETTING}; drop them or pass --setting {META_SETTING}.")
    if setting == "binding":
        from mechscope.cli import binding

        bad = [o for o in ("attn_only", "vocab", "seq_len") if given(ctx, o)]
        if bad:
            raise MechscopeError(f"--{bad[0].replace('_', '-')} does not apply to --setting binding (programs have their own "
                                 "vocabulary and length, and the model has MLPs); drop it.")
        vals = {"layers": layers, "d_model": d_model, "n_heads": n_heads, "steps": steps, "batch": batch, "lr": lr,
                "checkpoints": checkpoints, "linear": linear, "seed": seed}
        shared = {_BINDING_SHARED[o]: v for o, v in vals.items() if given(ctx, o)}
        return binding.train(shared, lines, hops, json, out)
    if setting != "induction":
        raise MechscopeError(f"Unknown --setting '{setting}'; use induction, {META_SETTING} or binding.")
    if binding_given:
        raise MechscopeError(f"{', '.join(binding_given)} belong to --setting binding; drop them or add --setting binding.")

    cfg = ToyConfig(layers=layers, heads=n_heads, d_model=d_model, attn_only=attn_only, steps=steps, batch=batch,
                    lr=lr, n_checkpoints=checkpoints, linear_checkpoints=linear, seed=seed,
                    data=DataConfig(vocab=vocab, seq_len=seq_len, seed=seed))
    t0 = time.perf_counter()
    run(cfg, out, progress=not json)
    import json as _json

    log = _json.loads((Path(out) / "train.json").read_text())
    summary = {"out": str(out), "checkpoints": len(log["checkpoints"]), "final_eval_loss": log["checkpoints"][-1]["eval_loss"],
               "seconds": time.perf_counter() - t0, "settings": log["settings"]}
    if json:
        return emit_json(summary)
    console.print(f"{summary['checkpoints']} checkpoints in {out} ({summary['seconds']:.0f} s); final held-out loss "
                  f"{summary['final_eval_loss']:.3f}. Next: mechscope dynamics {out}")


def _train_meta(ctx: typer.Context, icml: dict, out: Path, json: bool) -> None:
    """``train-toy --setting icml``: the shared options default to ``MetaConfig``'s values
    when not given; the induction data options do not apply."""
    from mechscope.icl.meta_train import train_meta

    def was_given(name: str) -> bool:
        return given(ctx, name)

    wrong = [f"--{n.replace('_', '-')}" for n in ("vocab", "seq_len", "attn_only") if was_given(n)]
    if wrong:
        raise MechscopeError(f"{', '.join(wrong)} {'do' if len(wrong) > 1 else 'does'} not apply to --setting {META_SETTING}; "
                             f"drop {'them' if len(wrong) > 1 else 'it'}.")
    p = ctx.params
    shared = {"attn_layers": "layers", "heads": "n_heads", "d_model": "d_model", "steps": "steps", "batch": "batch",
              "lr": "lr", "n_checkpoints": "checkpoints", "linear_checkpoints": "linear", "seed": "seed"}
    kw = {field: p[name] for field, name in shared.items() if was_given(name)}
    if icml["optimizer"] is not None:
        kw["optimizer"] = icml["optimizer"]
    data = {f: icml[k] for f, k in (("tasks", "tasks"), ("n_labels", "labels"), ("n_classes", "classes"),
                                    ("n_context", "context")) if icml[k] is not None}
    if was_given("seed"):
        data["seed"] = p["seed"]
    cfg = MetaConfig(**kw, data=MetaDataConfig(**data))
    t0 = time.perf_counter()
    train_meta(cfg, out, progress=not json)
    import json as _json

    log = _json.loads((Path(out) / "train.json").read_text())
    final = log["checkpoints"][-1]
    summary = {"out": str(out), "setting": META_SETTING, "checkpoints": len(log["checkpoints"]),
               "final_accuracy": final["accuracy"], "final_random_label_accuracy": final["random_label_accuracy"],
               "seconds": time.perf_counter() - t0, "settings": log["settings"]}
    if json:
        return emit_json(summary)
    console.print(f"{summary['checkpoints']} checkpoints in {out} ({summary['seconds']:.0f} s); final held-out accuracy "
                  f"{summary['final_accuracy']:.3f} (random context labels: {summary['final_random_label_accuracy']:.3f}). "
                  f"Next: mechscope dynamics {out}")


@handles_errors
def dynamics(
    ctx: typer.Context,
    run_dir: Path = typer.Argument(..., help="Folder of checkpoints (the --out of train-toy)."),
    n: int = typer.Option(DynamicsConfig.n, "--n", help=f"Repeated random-token sequences per checkpoint (binding runs: held-out programs per hop depth, default {BindingEvalConfig.n_per_hop}; icml runs: evaluation sequences, default {MetaDynamicsConfig.n_eval})."),
    seq_len: int = typer.Option(DynamicsConfig.seq_len, "--seq-len", help="Length of the random segment R."),
    text: Optional[str] = typer.Option(DynamicsConfig.text, "--text", help="Text source when the run has no train.json."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: the run folder)."),
    json: bool = JsonOpt,
) -> None:
    """Head scores, ICL score and loss of every checkpoint, and the phase-change plot."""
    from mechscope.heads.dynamics import MIN_RISE, find_checkpoints
    from mechscope.heads.dynamics import dynamics as run
    from mechscope.icl.binding_eval import is_binding_run
    from mechscope.icl.meta_dynamics import is_meta_run
    from mechscope.report.dynamics import write_dynamics

    if is_meta_run(run_dir):
        return _meta_dynamics(ctx, run_dir, out, json)
    if is_binding_run(run_dir):  # accuracy by hop depth and heuristic agreement; --n: programs per depth
        from mechscope.cli import binding

        _refuse_unused(ctx, "binding")

        return binding.dynamics(run_dir, n if given(ctx, "n") else None, out, json)
    find_checkpoints(run_dir)  # fail fast on an empty folder
    check_out_folder(out, "dynamics", beside=("train-toy",))
    hold_out(Path(out or run_dir))  # written into the run by default: not while train-toy writes it
    cfg = DynamicsConfig(n=n, seq_len=seq_len, text=text)
    res = run(run_dir, cfg, progress=not json)
    saved = _save_dynamics(res, Path(out or run_dir), write_dynamics,
                           ("step", "loss", "repeated_loss", "icl_score", "max_previous_token", "max_induction"))
    f = res.formation
    summary = {"run": str(run_dir), "checkpoints": len(res.rows), "formation": f, **saved}
    if json:
        return emit_json(summary)
    console.print(_right_table(f"Training dynamics of {run_dir}",
                               ("step", "loss", "repeated-half loss", "ICL score", "max prev-token", "max induction"),
                               ((str(r["step"]), f"{r['loss']:.3f}", f"{r['repeated_loss']:.3f}", f"{r['icl_score']:+.3f}",
                                 f"{r['max_previous_token']:.3f}", f"{r['max_induction']:.3f}") for r in res.rows)))
    def at(step: int | None) -> str:
        return "not formed" if step is None else f"formed at step {step}"

    if not f.get("too_few_checkpoints"):
        console.print(f"previous-token head {at(f['previous_token_step'])}, induction head {at(f['induction_step'])}, "
                      f"ICL score {at(f['icl_step'])} (a rise under {MIN_RISE} is not formation; final heads: "
                      f"{f.get('final_top_previous_token_head')}, {f.get('final_top_induction_head')}).")
    if f.get("note"):
        console.print(f"note: {f['note']}", highlight=False)
    console.print(f"report: {saved['report']}  plot: {saved['plot']}")


def _save_dynamics(res: Any, out_dir: Path, write: Callable[[dict[str, Any], Path], tuple[Path, Path]],
                   final: Sequence[str]) -> dict[str, Any]:
    """Save ``res`` in ``out_dir`` and write its page and plot with ``write``; the summary's tail:
    the last checkpoint's ``final`` figures and the paths of dynamics.json, the page and the plot."""
    res.save(out_dir)
    html, svg = write(res.to_dict(), out_dir / "dynamics.html")
    last = res.rows[-1]
    return {"final": {k: last[k] for k in final}, "dynamics_json": str(out_dir / "dynamics.json"),
            "report": str(html), "plot": str(svg)}


def _right_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> Table:
    """A table of right-aligned ``columns`` holding ``rows``."""
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(*r)
    return t


def _refuse_unused(ctx: typer.Context, setting: str) -> None:
    """Refuse ``dynamics``' induction-only options (--seq-len, --text) on a run of another ``setting``."""
    wrong = [f"--{n.replace('_', '-')}" for n in ("seq_len", "text") if given(ctx, n)]
    if wrong:
        raise MechscopeError(f"{' and '.join(wrong)} {'do' if len(wrong) > 1 else 'does'} not apply to a --setting {setting} "
                             f"run; drop {'them' if len(wrong) > 1 else 'it'}.")


def _meta_dynamics(ctx: typer.Context, run_dir: Path, out: Optional[Path], json: bool) -> None:
    """``dynamics`` on a ``train-toy --setting icml`` run: accuracy, random-label accuracy and the
    three attention metrics per checkpoint, the phases, the page and the SVG."""
    from mechscope.icl.meta_dynamics import meta_checkpoints, meta_dynamics
    from mechscope.report.meta_dynamics import write_meta_dynamics

    p = ctx.params
    _refuse_unused(ctx, META_SETTING)
    cfg = MetaDynamicsConfig(**({"n_eval": p["n"]} if given(ctx, "n") else {}))
    meta_checkpoints(run_dir)  # fail fast on an empty folder
    check_out_folder(out, "dynamics", beside=("train-toy",))
    hold_out(Path(out or run_dir))  # written into the run by default: not while train-toy writes it
    res = meta_dynamics(run_dir, cfg, progress=not json)
    saved = _save_dynamics(res, Path(out or run_dir), write_meta_dynamics,
                           ("step", "accuracy", "random_label_accuracy", "loss", "self", "label", "chunk"))
    ph = res.phases
    summary = {"run": str(run_dir), "setting": META_SETTING, "checkpoints": len(res.rows), "phases": ph, **saved}
    if json:
        return emit_json(summary)
    console.print(_right_table(f"Training dynamics of {run_dir} (in-context meta-learning, T = {ph['tasks']})",
                               ("step", "accuracy", "random-label acc.", "self", "label", "chunk"),
                               ((str(r["step"]), f"{r['accuracy']:.3f}", f"{r['random_label_accuracy']:.3f}",
                                 f"{r['self']:.3f}", f"{r['label']:.3f}", f"{r['chunk']:.3f}") for r in res.rows)))
    pk, p2 = ph["peaks"], ph["phase2"] or {}
    plats = f"{len(ph['plateaus'])} accuracy plateaus, {len(ph['middle_plateaus'])} in the middle"
    if ph.get("note") or not p2:
        console.print(f"{plats}. {ph.get('note') or 'The label metric has no peak, so there is no phase 2.'}", highlight=False)
    else:
        console.print(f"peaks: self at step {pk['self']}, label at {pk['label']}, chunk at {pk['chunk']} "
                      f"(in order: {ph['peaks_in_order']}); {plats}; phase 2 (label peak, step {p2['step']}): accuracy "
                      f"{p2['accuracy']:.3f}, random labels {p2['random_label_accuracy']:.3f}.")
    if ph.get("unfinished"):
        console.print(ph["unfinished"], highlight=False)
    console.print(f"report: {saved['report']}  plot: {saved['plot']}")
