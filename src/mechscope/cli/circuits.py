"""Circuit commands: discover (the main job) and evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from mechscope.circuits.config import DiscoverConfig
from mechscope.cli.common import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    RecordedModelOpt,
    check_out_folder,
    console,
    emit_json,
    handles_errors,
    load,
    print_pair_notes,
    resumable_out,
)


def register(app: typer.Typer) -> None:
    app.command("discover")(discover)
    app.command("evaluate")(evaluate)


@handles_errors
def discover(
    task: str = typer.Option(DiscoverConfig.task, "--task", "-t", help="Task name or .jsonl file of pairs."),
    method: str = typer.Option(DiscoverConfig.method, "--method", help="eap, eap-ig (IG on inputs), eap-ig-act (IG on each layer's activations; slower) or acdc."),
    model: Optional[str] = ModelOpt,
    n: Optional[int] = typer.Option(DiscoverConfig.n, "--n", help="Pairs in all (default: 200; ACDC 50)."),
    held_out: Optional[float] = typer.Option(DiscoverConfig.held_out, "--held-out", help="Share of the pairs held out for the "
                                             "reported figures (default: 0.25; ACDC 0.5)."),
    ablation: str = typer.Option(DiscoverConfig.ablation, "--ablation", help="patching (from corrupt), mean or zero."),
    level: str = typer.Option(DiscoverConfig.level, "--level", help="edge or node (heads and MLPs as units)."),
    edges: Optional[int] = typer.Option(DiscoverConfig.edges, "--edges", help="Keep this many edges (nodes at node level)."),
    threshold: Optional[float] = typer.Option(DiscoverConfig.threshold, "--threshold", help="Keep edges whose importance under --rank (signed: how much patching them lowers the metric; abs: |score|) is >= TAU (ACDC: tau)."),
    target: float = typer.Option(DiscoverConfig.target, "--target", help="Faithfulness the smallest circuit must reach."),
    rank: str = typer.Option(DiscoverConfig.rank, "--rank", help="Edge order: signed (edges that carry the behaviour first), abs, or "
                             "auto (whichever cross-validates better inside the scoring pairs)."),
    pool: str = typer.Option(DiscoverConfig.pool, "--pool", help="Pool the scoring pairs' attribution by their sum (mean) or, "
                             "per edge, their median (robust to a few extreme pairs)."),
    ig_steps: int = typer.Option(DiscoverConfig.ig_steps, "--ig-steps"),
    metric: str = typer.Option(DiscoverConfig.acdc_metric, "--metric", help="ACDC's pruning metric: kl (KL from the full model) or task "
                               "(distance of the task metric from its full-model value)."),
    seed: int = typer.Option(DiscoverConfig.seed, "--seed"),
    seeds: int = typer.Option(1, "--seeds", help="Repeat with this many draws of pairs (seed, seed+1, ...): "
                              "overlap of the circuits, spread of faithfulness, edges stable across draws. "
                              "A .jsonl task has the same pairs for every seed: only the held-out split changes."),
    folds: int = typer.Option(DiscoverConfig.folds, "--folds", help="Cross-validation folds inside the scoring pairs that choose the size."),
    qk: str = typer.Option(DiscoverConfig.qk, "--qk", help="Query/key edges: exact (through the attention softmax) or linear (gradient)."),
    labels: bool = typer.Option(DiscoverConfig.labels, "--labels/--no-labels", help="Label heads with their roles (mechscope heads; cached per model)."),
    force: bool = typer.Option(False, "--force", help="Run even where the model does the task at chance (the figures then mean nothing)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here)."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Find the circuit for a task; writes circuit.json and report.html."""
    from mechscope.circuits import discover as run
    from mechscope.circuits.config import check_seeds
    from mechscope.circuits.stability import discover_seeds
    from mechscope.partial import clear as clear_partial
    from mechscope.report.circuit import ci_dropped_sentence, write_circuit
    from mechscope.tasks import get_task

    cfg = DiscoverConfig(task=task, method=method, n=n, held_out=held_out, ablation=ablation, level=level, edges=edges,
                         threshold=threshold, target=target, ig_steps=ig_steps, seed=seed, rank=rank,
                         acdc_metric=metric, folds=folds, qk=qk, labels=labels, pool=pool, force=force)  # checks the settings
    check_seeds(cfg, seeds)
    get_task(task)  # fail fast on an unknown task, before loading the model
    check_out_folder(out, "circuit")
    out_dir = resumable_out(out, f"{Path(task).stem}-{method}")
    made = not out_dir.exists()
    if method == "acdc":  # a long job: re-running with the same --out resumes it
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.checkpoint = str(out_dir / "acdc_checkpoint.safetensors")
    try:
        m = load(model, device)
        res = (discover_seeds(m, cfg, seeds, progress=not json, checkpoint=out_dir) if seeds > 1
               else run(m, cfg, progress=not json, checkpoint=out_dir))
    except BaseException:  # a refusal or an interruption before any checkpoint: leave no empty folder behind
        if made and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    res.save(out_dir)
    report = write_circuit(res.to_dict(), Path(out_dir) / "report.html")
    if cfg.checkpoint is not None:  # the result is saved: the ACDC state has done its job
        Path(cfg.checkpoint).unlink(missing_ok=True)
    for stages in out_dir.glob("discover-s*-partial"):  # and so have the finished stages of each draw
        clear_partial(out_dir, stages.name[:-len("-partial")])
    mt = res.metrics
    summary = {
        "task": res.task, "method": res.method, "model": m.summary.name,
        "edges_kept": mt["n_edges_kept"], "edges_total": mt["n_edges"],
        "faithfulness_held_out": mt["faithfulness"], "faithfulness_ci": mt["faithfulness_ci"],
        "faithfulness_scoring": mt["faithfulness_scoring"], "faithfulness_cv": mt["faithfulness_cv"],
        "selection": mt["selection"], "size_rule": mt.get("size_rule"), "random_same_size": mt["random_same_size"],
        "cpr": res.cpr, "cmd": res.cmd, "seconds": mt["seconds"], "at_chance": bool(mt.get("at_chance")),
        "empty": mt["n_edges_kept"] == 0, "qk_fallback_layers": mt.get("qk_fallback_layers", []),
        **({"edges_selected": mt["n_edges_selected"]} if "n_edges_selected" in mt else {}),
        "dropped_pairs": mt.get("dropped_pairs", {}), "task_notes": mt.get("task_notes", []),
        "circuit_json": str(Path(out_dir) / "circuit.json"), "report": str(report),
    }
    if res.stability:
        summary["stability"] = {k: v for k, v in res.stability.items() if k not in ("edge_frequency", "stable_edges")}
        summary["stability"]["n_stable_edges"] = len(res.stability["stable_edges"])
    if json:
        return emit_json(summary)
    lo, hi = mt["faithfulness_ci"]
    hi_note = f" ({ci_dropped_sentence(mt).rstrip('.')})" if (mt.get("faithfulness_ci_dropped") or 0) > 0.01 else ""
    cv = f", cross-validated {mt['faithfulness_cv']:.2f}" if mt.get("faithfulness_cv") is not None else ""
    console.print(
        f"[bold]{escape(res.task)}[/] circuit on {escape(m.summary.name)} by {res.method}: "
        f"{mt['n_edges_kept']:,} of {mt['n_edges']:,} edges ({mt['fraction_kept']:.2%}), "
        f"faithfulness {mt['faithfulness']:.2f} on {mt['n_held_out_pairs']} held-out pairs "
        f"({mt['faithfulness_ci_level']:.0%} interval {lo:.2f} to {hi:.2f}; {mt['faithfulness_scoring']:.2f} on the "
        f"{mt['n_scoring_pairs']} scoring pairs{cv}; random circuits of that size: {mt['random_same_size']:.2f}); "
        f"CPR {res.cpr:.2f}, CMD {res.cmd:.2f}; {mt['seconds']:.0f} s.{hi_note}",
        highlight=False, markup=True,
    )
    print_pair_notes(mt.get("dropped_pairs"), mt.get("task_notes"))
    if (sel := mt.get("n_edges_selected")) is not None and sel > mt["n_edges_kept"]:
        by = f"--edges {cfg.edges}" if cfg.edges is not None else f"--threshold {cfg.threshold:g}"
        console.print(f"note: {by} selected {sel:,} edges; {sel - mt['n_edges_kept']:,} of them lie on no path from the input "
                      "to the logits and were pruned.", highlight=False)
    if mt.get("at_chance"):
        console.print("[yellow]--force: the model does this task at chance[/], so these figures describe no behaviour.",
                      highlight=False, markup=True)
    if mt["n_edges_kept"] == 0:
        more = ("a larger --edges" if cfg.edges is not None else
                "a smaller --threshold" if res.method == "acdc" or cfg.threshold is not None else "a higher --target")
        console.print(f"[yellow]the circuit is empty[/]: none of the kept edges lies on a path from the input to the logits, "
                      f"so pruning the dangling ones removed them all; ask for more ({more}).", highlight=False, markup=True)
    if mt.get("size_rule") == "plateau":
        console.print(
            f"[yellow]no circuit below the full model reached faithfulness {mt['target']:.2f} in cross-validation"
            f"[/]: this is the smallest circuit holding at least {mt.get('plateau') or 0.9:.0%} of the best partial circuit's "
            f"cross-validated faithfulness (the knee of the curve in the report).",
            highlight=False, markup=True,
        )
    if res.stability:
        console.print(stability_line(res.stability), highlight=False)
    top = ", ".join(c["name"] for c in res.top_components(8))
    console.print(f"top components: {top}", highlight=False)
    console.print(f"circuit: {summary['circuit_json']}", highlight=False)
    console.print(f"report: {report}", highlight=False)


def stability_line(st: dict) -> str:
    """The one-line summary of ``discover --seeds`` (``circuits.stability.stability_summary``)."""
    what = (f"{st['n_seeds']} held-out splits of the same pairs (a task file's pairs do not change with the seed)"
            if st.get("same_pairs") else f"{st['n_seeds']} draws of pairs")
    return (f"across {what}: held-out faithfulness {st['faithfulness_min']:.2f}-"
            f"{st['faithfulness_max']:.2f} (mean {st['faithfulness_mean']:.2f}), circuit Jaccard "
            f"{st['jaccard_circuit_mean']:.2f}, top-100 Jaccard {st['jaccard_top100_mean']:.2f}; "
            f"{len(st['stable_edges'])} edges in >= {st['stable_threshold']:.0%} of the circuits (marked in the report).")


@handles_errors
def evaluate(
    run_dir: Path = typer.Argument(..., help="Folder written by `mechscope discover`."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Evaluate on another task's pairs."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Reference circuit: a JSON file, another run's folder, or gpt2-ioi, gpt2-greater-than."),
    model: Optional[str] = RecordedModelOpt,
    n: Optional[int] = typer.Option(None, "--n", help="Pairs drawn with --task (default: the run's count); on the run's own "
                                    "task its pairs are used, so another count is refused."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Re-evaluate a saved circuit: held-out faithfulness, curve, random baseline, ROC AUC."""
    from mechscope.circuits import CircuitResult, compare_with_reference, evaluate_saved

    res = CircuitResult.load(run_dir)
    out: dict = {"run": str(run_dir), "task": task or res.task, "method": res.method}
    if reference:  # before loading any model, so a wrong reference fails fast
        out["reference"] = compare_with_reference(res, reference)
    m = load(model or res.model.get("source"), device)
    figures = evaluate_saved(m, res, task=task, n=n, progress=not json)
    n_held_out = figures["n_held_out"]
    out.update(figures)
    curve, cpr, cmd = out["curve"], out["cpr"], out["cmd"]
    if json:
        return emit_json(out)
    t = Table(title=f"{out['task']} circuit ({res.method}), {n_held_out} held-out pairs")
    t.add_column("top k edges", justify="right")
    t.add_column("kept after pruning", justify="right")  # the top k less edges on no path from input to logits
    t.add_column("fraction", justify="right")
    t.add_column("faithfulness", justify="right")
    t.add_column("random", justify="right")
    for c in curve:
        kept = c.get("n_edges_after_pruning")
        t.add_row(f"{c['n_edges']:,}", "" if kept is None else f"{kept:,}", f"{c['fraction']:.3%}", f"{c['faithfulness']:.3f}",
                  f"{c['random']:.3f}")
    console.print(t)
    console.print(f"chosen circuit: {out['edges_kept']:,} edges, faithfulness {out['faithfulness']:.3f}; CPR {cpr:.3f}, CMD {cmd:.3f}")
    print_pair_notes(out.get("dropped_pairs"), out.get("task_notes"))
    if "reference" in out:
        r = out["reference"]
        for line in reference_lines(r, res.settings.get("rank") or "signed"):
            console.print(line)


def reference_lines(r: dict, rank: str) -> list[str]:
    """What ``evaluate --reference`` prints of ``compare_with_reference``'s figures ``r``: they rank
    by this run's circuits (its circuit, then the order edges join its pruned top-k), not by raw
    scores, so a circuit compared with itself reads 1.0 throughout."""
    def auc(v: Any, what: str) -> str:  # None (JSON) or NaN: one class only, e.g. a reference holding every node
        if v is None or v != v:
            return f"undefined (the reference holds every {what} or none, so there is nothing to rank against)"
        return f"{v:.3f}"

    lines = [f"reference ({r['n_nodes']} nodes): node ROC AUC {auc(r['node_roc_auc'], 'node')}"
             + (f", edge ROC AUC {auc(r['edge_roc_auc'], 'edge')}" if "edge_roc_auc" in r else "")
             + f" (this run's ranking: its circuit, then edges in the order they join its pruned top-k circuits "
               f"by {rank} importance)"]
    if r.get("note"):
        lines.append(f"note: {r['note']}")
    if "edge_overlap" in r:
        lines.append(f"reference edges: {r['n_edges']:,}; of them {r['edge_overlap']:.1%} are among the first "
                     f"{r['n_edges']:,} of this run's ranking (chance {r['chance_overlap']:.1%}), {r['in_this_circuit']:.1%} "
                     f"are in this run's circuit; Jaccard of the two circuits {r['jaccard']:.3f}")
    return lines
