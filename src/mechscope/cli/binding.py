"""Variable binding: ``train-toy --setting binding`` and ``dynamics`` on a binding run (called
from ``cli/heads.py``), and the ``interchange`` command on a binding checkpoint."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table

from mechscope.cli.common import (
    JsonOpt,
    check_out_folder,
    console,
    emit_json,
    err_console,
    fresh_dir,
    handles_errors,
    hold_out,
)
from mechscope.errors import MechscopeError
from mechscope.icl.binding_config import BindingConfig, BindingDataConfig, BindingEvalConfig, BindingInterchangeConfig


def register(app: typer.Typer) -> None:
    app.command("interchange")(interchange)


def train(overrides: dict[str, Any], lines: int | None, hops: int | None, json: bool, out: Path) -> None:
    """``train-toy --setting binding``: ``overrides`` are the shared options the user gave
    (layers, heads, d_model, steps, batch, lr, n_checkpoints, linear_checkpoints, seed)."""
    from mechscope.icl.binding_train import train_binding

    data = {k: v for k, v in (("lines", lines), ("hops", hops), ("seed", overrides.get("seed"))) if v is not None}
    cfg = BindingConfig(**overrides, data=BindingDataConfig(**data))
    t0 = time.perf_counter()
    train_binding(cfg, out, progress=not json)
    import json as _json

    log = _json.loads((Path(out) / "train.json").read_text())
    last = log["checkpoints"][-1]
    summary = {"out": str(out), "setting": "binding", "checkpoints": len(log["checkpoints"]),
               "final_eval_loss": last["eval_loss"], "final_eval_accuracy": last["eval_accuracy"],
               "seconds": time.perf_counter() - t0, "settings": log["settings"]}
    if json:
        return emit_json(summary)
    console.print(f"{summary['checkpoints']} checkpoints in {out} ({summary['seconds']:.0f} s); final held-out answer "
                  f"accuracy {last['eval_accuracy']:.3f}. Next: mechscope dynamics {out}")


def dynamics(run_dir: Path, n: int | None, out: Path | None, json: bool) -> None:
    """``dynamics`` on a binding run: accuracy by depth and heuristic agreement per checkpoint."""
    from mechscope.heads.dynamics import find_checkpoints
    from mechscope.icl.binding_eval import binding_dynamics
    from mechscope.report.binding import write_binding_dynamics

    cfg = BindingEvalConfig() if n is None else BindingEvalConfig(n_per_hop=n)
    check_out_folder(out, "binding-dynamics", beside=("train-toy",))
    hold_out(Path(out or run_dir))  # written into the run by default: not while train-toy writes it
    find_checkpoints(run_dir)  # fail fast on an empty folder
    res = binding_dynamics(run_dir, cfg, progress=not json)
    out_dir = Path(out or run_dir)
    res.save(out_dir)
    html, svg = write_binding_dynamics(res.to_dict(), out_dir / "binding_dynamics.html")
    last = res.rows[-1]
    summary = {"run": str(run_dir), "setting": "binding", "checkpoints": len(res.rows), "phases": res.phases,
               "final": {k: last[k] for k in ("step", "accuracy_by_depth", "heuristic_agreement",
                                              "heuristic_agreement_discordant")},
               "dynamics_json": str(out_dir / "binding_dynamics.json"), "report": str(html), "plot": str(svg)}
    if json:
        return emit_json(summary)
    depths = list(last["accuracy_by_depth"])
    t = Table(title=f"Variable-binding dynamics of {run_dir}")
    for c in ["step", *[f"acc depth {h}" for h in depths], "heuristic agreement", "(discordant)"]:
        t.add_column(c, justify="right")
    for r in res.rows:
        t.add_row(str(r["step"]), *[f"{r['accuracy_by_depth'][h]:.3f}" for h in depths], f"{r['heuristic_agreement']:.3f}",
                  f"{r['heuristic_agreement_discordant']:.3f}")
    console.print(t)
    p = res.phases
    when = f"from step {p['systematic_step']}" if p["systematic_step"] is not None else "not reached in this run"
    console.print(f"systematic (accuracy >= 0.95 at every depth): {when}; heuristic agreement on "
                  f"discordant programs peaks at {p['heuristic_peak_agreement']:.3f} (step {p['heuristic_peak_step']}).")
    console.print(f"report: {html}  plot: {svg}")


@handles_errors
def interchange(
    model: Path = typer.Option(..., "--model", "-m", help="A checkpoint folder of `mechscope train-toy --setting binding`."),
    n: int = typer.Option(BindingInterchangeConfig.n, "--n", help="Program pairs (base, counterfactual)."),
    depth: Optional[int] = typer.Option(BindingInterchangeConfig.depth, "--depth", help="Hop depth of the query chain (default: the run's --hops)."),
    site: str = typer.Option(BindingInterchangeConfig.site, "--site", help="resid (residual stream entering each layer) or head (one head's output)."),
    head: Optional[int] = typer.Option(BindingInterchangeConfig.head, "--head", help="With --site head: only this head (default: every head)."),
    all_pairs: bool = typer.Option(not BindingInterchangeConfig.correct_only, "--all-pairs", help="Keep pairs the model gets wrong too."),
    seed: int = typer.Option(BindingInterchangeConfig.seed, "--seed"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here)."),
    json: bool = JsonOpt,
) -> None:
    """Interchange interventions on a variable-binding checkpoint: where does the query chain's constant travel?"""
    from mechscope.icl.binding_eval import binding_interchange, data_config
    from mechscope.models import load_model
    from mechscope.patching.interchange import sites_for
    from mechscope.progress import quiet
    from mechscope.report.binding import write_binding_interchange

    cfg = BindingInterchangeConfig(n=n, depth=depth, site=site, head=head, correct_only=not all_pairs, seed=seed)
    check_out_folder(out, "interchange")
    data = data_config(model)
    if not (Path(model) / "config.json").is_file():
        ckpts = sorted(Path(model).glob("ckpt_*"))
        raise MechscopeError(f"{model} is a training run, not one of its checkpoints; pass a checkpoint folder such as "
                             f"{ckpts[-1] if ckpts else Path(model) / 'ckpt_006000'}.")
    m = load_model(str(model), device="cpu")
    sites_for(m, cfg.site, cfg.head)  # a --head the model lacks fails before the status line and the work
    t0 = time.perf_counter()
    if not json and not quiet():
        err_console.print("[dim]patching every (site, position)...[/dim]", markup=True)
    res = binding_interchange(m, data, cfg, name=str(model))
    out_dir = Path(out or fresh_dir("interchange"))
    res.save(out_dir)
    report = write_binding_interchange(res.to_dict(), out_dir / "interchange.html")
    s = res.summary
    summary = {"model": str(model), "pairs": s["pairs"], "pairs_used": s["pairs_used"],
               "base_accuracy": res.grid["base_accuracy"], "min_chain_accuracy": s["min_chain_accuracy"],
               "chain": s["chain"], "trace": s["trace"], "trace_moves_forward": s["trace_moves_forward"],
               "seconds": time.perf_counter() - t0, "interchange_json": str(out_dir / "interchange.json"), "report": str(report)}
    if json:
        return emit_json(summary)
    t = Table(title=f"Interchange accuracy along the query chain ({s['pairs_used']} of {s['pairs']} pairs)")
    for c in ("position", "role", "best site", "accuracy"):
        t.add_column(c)
    for x in s["chain"]:
        t.add_row(str(x["position"]), x["role"], x["best_site"], f"{x['accuracy']:.3f}")
    console.print(t)
    console.print("trace (per site, the chain position with the highest accuracy): " + ", ".join(
        f"{x['site']}: {x['position']} ({x['accuracy']:.2f})" for x in s["trace"]))
    console.print(f"results: {out_dir / 'interchange.json'}  report: {report}")
