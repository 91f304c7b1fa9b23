"""Circuit commands: discover (the main job) and evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

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


def register(app: typer.Typer) -> None:
    app.command("discover")(discover)
    app.command("evaluate")(evaluate)



@handles_errors
def discover(
    task: str = typer.Option("ioi", "--task", "-t", help="Task name or .jsonl file of pairs."),
    method: str = typer.Option("eap-ig", "--method", help="eap, eap-ig (IG on inputs), eap-ig-act (IG on each layer's activations; slower) or acdc."),
    model: Optional[str] = ModelOpt,
    n: int = typer.Option(50, "--n", help="Pairs in all; half score, half are held out."),
    ablation: str = typer.Option("patching", "--ablation", help="patching (from corrupt), mean or zero."),
    level: str = typer.Option("edge", "--level", help="edge or node (heads and MLPs as units)."),
    edges: Optional[int] = typer.Option(None, "--edges", help="Keep this many edges (nodes at node level)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Keep edges with |score| >= TAU (ACDC: tau)."),
    target: float = typer.Option(0.8, "--target", help="Faithfulness the smallest circuit must reach."),
    rank: str = typer.Option("auto", "--rank", help="Edge order: signed (edges that carry the behaviour first), abs, or "
                             "auto (whichever cross-validates better inside the scoring pairs)."),
    ig_steps: int = typer.Option(5, "--ig-steps"),
    metric: str = typer.Option("kl", "--metric", help="ACDC's pruning metric: kl (KL from the full model) or task "
                               "(distance of the task metric from its full-model value)."),
    seed: int = typer.Option(0, "--seed"),
    seeds: int = typer.Option(1, "--seeds", help="Repeat with this many draws of pairs (seed, seed+1, ...): "
                              "overlap of the circuits, spread of faithfulness, edges stable across draws."),
    folds: int = typer.Option(5, "--folds", help="Cross-validation folds inside the scoring pairs that choose the size."),
    qk: str = typer.Option("exact", "--qk", help="Query/key edges: exact (through the attention softmax) or linear (gradient)."),
    labels: bool = typer.Option(True, "--labels/--no-labels", help="Label heads with their roles (mechscope heads; cached per model)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: a fresh one here)."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Find the circuit for a task; writes circuit.json and report.html."""
    from mechscope.circuits import DiscoverConfig
    from mechscope.circuits import discover as run
    from mechscope.circuits.discover import METHODS
    from mechscope.errors import MechscopeError
    from mechscope.report.circuit import write_circuit
    from mechscope.tasks import get_task

    if method not in METHODS:
        raise MechscopeError(f"Unknown method '{method}'; choose {', '.join(METHODS)}.")
    if ablation not in ("patching", "mean", "zero"):
        raise MechscopeError(f"Unknown ablation '{ablation}'; choose patching, mean or zero.")
    if level not in ("edge", "node"):
        raise MechscopeError(f"Unknown level '{level}'; choose edge or node.")
    if rank not in ("auto", "signed", "abs"):
        raise MechscopeError(f"Unknown ranking '{rank}'; choose auto, signed or abs.")
    if metric not in ("kl", "task"):
        raise MechscopeError(f"Unknown ACDC metric '{metric}'; choose kl or task.")
    if metric != "kl" and method != "acdc":
        raise MechscopeError(f"--metric applies to ACDC only; {method} always attributes the task's own metric.")
    if n < 4:
        raise MechscopeError(f"--n {n} is too small: at least 4 pairs are needed (half are held out).")
    if qk not in ("exact", "linear"):
        raise MechscopeError(f"Unknown --qk '{qk}'; choose exact or linear.")
    if not 1 <= seeds <= 50:
        raise MechscopeError(f"--seeds {seeds} is out of range: choose 1 to 50 draws.")
    if folds < 1:
        raise MechscopeError(f"--folds must be at least 1, got {folds}.")
    if seeds > 1 and method == "acdc":
        raise MechscopeError("--seeds is for the attribution methods; ACDC runs are too long to repeat (run them one seed at a time).")
    get_task(task)  # fail fast on an unknown task, before loading the model
    cfg = DiscoverConfig(task=task, method=method, n=n, ablation=ablation, level=level, edges=edges,
                         threshold=threshold, target=target, ig_steps=ig_steps, seed=seed, rank=rank,
                         acdc_metric=metric, folds=folds, qk=qk, labels=labels)
    out_dir = Path(out or fresh_dir(f"{Path(task).stem}-{method}"))
    if method == "acdc":  # a long job: re-running with the same --out resumes it
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.checkpoint = str(out_dir / "acdc_checkpoint.safetensors")
    m = load(model, device)
    if seeds > 1:
        from mechscope.circuits.stability import discover_seeds

        res = discover_seeds(m, cfg, seeds, progress=not json)
    else:
        res = run(m, cfg, progress=not json)
    res.save(out_dir)
    report = write_circuit(res.to_dict(), Path(out_dir) / "report.html")
    mt = res.metrics
    summary = {
        "task": res.task, "method": res.method, "model": m.summary.name,
        "edges_kept": mt["n_edges_kept"], "edges_total": mt["n_edges"],
        "faithfulness_held_out": mt["faithfulness"], "faithfulness_ci": mt["faithfulness_ci"],
        "faithfulness_scoring": mt["faithfulness_scoring"], "faithfulness_cv": mt["faithfulness_cv"],
        "selection": mt["selection"], "size_rule": mt.get("size_rule"), "random_same_size": mt["random_same_size"],
        "cpr": res.cpr, "cmd": res.cmd, "seconds": mt["seconds"],
        "circuit_json": str(Path(out_dir) / "circuit.json"), "report": str(report),
    }
    if res.stability:
        summary["stability"] = {k: v for k, v in res.stability.items() if k not in ("edge_frequency", "stable_edges")}
        summary["stability"]["n_stable_edges"] = len(res.stability["stable_edges"])
    if json:
        return emit_json(summary)
    lo, hi = mt["faithfulness_ci"]
    cv = f", cross-validated {mt['faithfulness_cv']:.2f}" if mt.get("faithfulness_cv") is not None else ""
    console.print(
        f"[bold]{res.task}[/] circuit on {m.summary.name} by {res.method}: "
        f"{mt['n_edges_kept']:,} of {mt['n_edges']:,} edges ({mt['fraction_kept']:.2%}), "
        f"faithfulness {mt['faithfulness']:.2f} on {mt['n_held_out_pairs']} held-out pairs "
        f"({mt['faithfulness_ci_level']:.0%} interval {lo:.2f}-{hi:.2f}; {mt['faithfulness_scoring']:.2f} on the "
        f"{mt['n_scoring_pairs']} scoring pairs{cv}; random circuits of that size: {mt['random_same_size']:.2f}); "
        f"CPR {res.cpr:.2f}, CMD {res.cmd:.2f}; {mt['seconds']:.0f} s.",
        highlight=False,
    )
    if mt.get("size_rule") == "plateau":
        console.print(
            f"[yellow]no circuit below the full model reached faithfulness {mt['target']:.2f} in cross-validation"
            f"[/]: this is the smallest circuit holding at least {mt.get('plateau') or 0.9:.0%} of the best partial circuit's "
            f"cross-validated faithfulness (the knee of the curve in the report).",
            highlight=False,
        )
    if res.stability:
        st = res.stability
        console.print(
            f"across {st['n_seeds']} draws of pairs: held-out faithfulness {st['faithfulness_min']:.2f}-"
            f"{st['faithfulness_max']:.2f} (mean {st['faithfulness_mean']:.2f}), circuit Jaccard "
            f"{st['jaccard_circuit_mean']:.2f}, top-100 Jaccard {st['jaccard_top100_mean']:.2f}; "
            f"{len(st['stable_edges'])} edges in >= {st['stable_threshold']:.0%} of the circuits (marked in the report).",
            highlight=False,
        )
    top = ", ".join(c["name"] for c in res.top_components(8))
    console.print(f"top components: {top}", highlight=False)
    console.print(f"report: {report}", highlight=False)


@handles_errors
def evaluate(
    run_dir: Path = typer.Argument(..., help="Folder written by `mechscope discover`."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Evaluate on another task's pairs."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Reference circuit JSON (or gpt2-ioi, gpt2-greater-than)."),
    model: Optional[str] = ModelOpt,
    n: Optional[int] = typer.Option(None, "--n"),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Re-evaluate a saved circuit: held-out faithfulness, curve, random baseline, ROC AUC."""
    import torch

    from mechscope.circuits import CircuitResult, Evaluator, load_reference, roc_auc
    from mechscope.circuits.evaluate import cpr_cmd, curve_sizes, faithfulness_curve
    from mechscope.errors import MechscopeError
    from mechscope.graph import build_graph
    from mechscope.tasks import get_task

    res = CircuitResult.load(run_dir)
    out: dict = {"run": str(run_dir), "task": task or res.task, "method": res.method}
    if reference:  # before loading any model, so a wrong reference fails fast
        ref = load_reference(reference)
        nodes = ref.node_mask(res.graph)
        ns = (res.scores * res.graph.allowed).sum(1)
        sel = torch.ones(res.graph.n_senders, dtype=torch.bool)
        sel[0] = False  # the input is in every circuit: not ranked
        out["reference"] = {"source": ref.source, "n_nodes": int(nodes.sum()),
                            "node_roc_auc": roc_auc(ns, nodes, sel)}
        em = ref.edge_mask(res.graph)
        if em is not None:
            from mechscope.circuits.reference import edge_overlap
            from mechscope.circuits.select import importance

            rk = importance(res.scores, res.method, res.settings.get("rank", "signed"))
            kept = res.circuit.bool()
            out["reference"].update({
                "n_edges": int(em.sum()),
                "edge_roc_auc": roc_auc(rk, em, res.graph.allowed),
                "edge_overlap": edge_overlap(rk, em, res.graph.allowed),
                "chance_overlap": int(em.sum()) / res.graph.n_edges,
                "in_this_circuit": float((kept & em).sum()) / max(1, int(em.sum())),
                "jaccard": float((kept & em).sum()) / max(1, int((kept | em).sum())),
            })
    m = load(model or res.model.get("source"), device)
    g = build_graph(m)
    if g.summary() != res.graph.summary():
        raise MechscopeError(f"The model {m.summary.name} has a different graph than the one the circuit was found on ({res.model.get('name')}).")
    st = res.settings
    batch = get_task(task or st.get("task", res.task)).build(m.tokenizer, n=n or st.get("n", 50), seed=st.get("seed", 0))
    _, test = batch.split(st.get("held_out", 0.5), seed=st.get("seed", 0))
    ev = Evaluator(m, g, test, st.get("ablation", "patching"))
    from mechscope.circuits.select import importance

    curve = faithfulness_curve(ev, importance(res.scores, res.method, st.get("rank", "signed")), curve_sizes(g))
    cpr, cmd = cpr_cmd(curve)
    out.update({"faithfulness": float(ev.faithfulness(res.circuit[None])[0]), "edges_kept": int(res.circuit.sum()),
                "clean": float(ev.clean), "corrupt": float(ev.corrupt), "cpr": cpr, "cmd": cmd, "curve": curve})
    if json:
        return emit_json(out)
    t = Table(title=f"{out['task']} circuit ({res.method}), {len(test)} held-out pairs")
    t.add_column("edges kept", justify="right")
    t.add_column("fraction", justify="right")
    t.add_column("faithfulness", justify="right")
    t.add_column("random", justify="right")
    for c in curve:
        t.add_row(f"{c['n_edges']:,}", f"{c['fraction']:.3%}", f"{c['faithfulness']:.3f}", f"{c['random']:.3f}")
    console.print(t)
    console.print(f"chosen circuit: {out['edges_kept']:,} edges, faithfulness {out['faithfulness']:.3f}; CPR {cpr:.3f}, CMD {cmd:.3f}")
    if "reference" in out:
        r = out["reference"]
        console.print(f"reference ({r['n_nodes']} nodes): node ROC AUC {r['node_roc_auc']:.3f}"
                      + (f", edge ROC AUC {r['edge_roc_auc']:.3f}" if "edge_roc_auc" in r else ""))
        if "edge_overlap" in r:
            console.print(f"reference edges: {r['n_edges']:,}; of them {r['edge_overlap']:.1%} are among this run's top "
                          f"{r['n_edges']:,} (chance {r['chance_overlap']:.1%}), {r['in_this_circuit']:.1%} are in this run's "
                          f"circuit; Jaccard of the two circuits {r['jaccard']:.3f}")
