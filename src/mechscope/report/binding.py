"""Pages of the variable-binding setting: the training dynamics (``binding_dynamics.html``,
accuracy by hop depth and early-line heuristic agreement per checkpoint, with the charts also
as a standalone ``.svg``) and the interchange-intervention grid (``interchange.html``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechscope.report.charts import heatmap, line_chart, stacked_svg
from mechscope.report.toolkit import esc, kv_table, num_or_nan, page, table, write_page

__all__ = ["render_binding_dynamics", "render_binding_dynamics_svg", "render_binding_interchange",
           "write_binding_dynamics", "write_binding_interchange"]

_WIDTH, _HEIGHT = 700, 300


def _charts(d: dict[str, Any]) -> list[str]:
    rows = [r for r in d["checkpoints"] if r["step"] > 0]
    steps = [r["step"] for r in rows]
    p = d.get("phases", {})
    marks = [(p["systematic_step"], "systematic")] if p.get("systematic_step") else []
    depths = list(rows[0]["accuracy_by_depth"]) if rows else []
    acc = {f"depth {h}": (steps, [num_or_nan(r["accuracy_by_depth"][h]) for r in rows]) for h in depths}
    acc["heuristic agreement (discordant)"] = (steps, [num_or_nan(r["heuristic_agreement_discordant"]) for r in rows])
    acc["heuristic agreement (all)"] = (steps, [num_or_nan(r["heuristic_agreement"]) for r in rows])
    c1 = line_chart(acc, title="Accuracy by hop depth; agreement with the early-line heuristic", xlabel="training step",
                    logx=True, width=_WIDTH, height=_HEIGHT, ylim=(0, 1), vlines=marks,
                    hlines=[p["chance"]] if p.get("chance") else [])
    tl = [x for x in d.get("train_loss", []) if x[0] > 0]
    charts = [c1]
    if tl:
        charts.append(line_chart({"train loss (answer)": ([x[0] for x in tl], [x[1] for x in tl])}, title="Training loss (nats)",
                                 xlabel="training step", logx=True, width=_WIDTH, height=_HEIGHT, vlines=marks, points=False))
    return charts


def render_binding_dynamics_svg(d: dict[str, Any]) -> str:
    """The charts stacked in one standalone SVG on a white background."""
    return stacked_svg(_charts(d), _WIDTH, _HEIGHT)


def render_binding_dynamics(d: dict[str, Any]) -> str:
    """The page for a ``binding_dynamics.json`` dict."""
    p = d.get("phases", {})
    rows = d["checkpoints"]
    depths = list(rows[0]["accuracy_by_depth"]) if rows else []
    tab = [[r["step"], *[r["accuracy_by_depth"][h] for h in depths], r["heuristic_agreement"],
            r["heuristic_agreement_discordant"]] for r in rows]
    body = (
        "<div class='grid'>" + "".join(f"<figure>{c}</figure>" for c in _charts(d)) + "</div>"
        + kv_table("Phases", list(p.items()))  # a phase not reached is a dash
        + "<p class='small muted'>Heuristic: answer the constant on the first line. 'Discordant': programs where that "
          "constant is not the answer. Systematic: accuracy at least 0.95 at every hop depth.</p>"
        + "<h2>Checkpoints</h2>"
        + table(["step", *[f"accuracy, depth {h}" for h in depths], "heuristic agreement", "agreement (discordant)"], tab,
                numeric=[True] * (3 + len(depths)))
    )
    return page("Training dynamics: variable binding", body, kind="training dynamics", subtitle=f"run: {d.get('run')}")


def write_binding_dynamics(d: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    html = write_page(render_binding_dynamics(d), path)
    return html, write_page(render_binding_dynamics_svg(d), html.with_suffix(".svg"))


def render_binding_interchange(d: dict[str, Any]) -> str:
    """The page for an ``interchange.json`` dict: the accuracy grid (sites x positions, the
    example program's tokens and roles as column labels) and the chain summary."""
    g, s = d["interchange"], d["summary"]
    roles, example = d["roles"], d["example"]
    chain = set(d["chain_positions"])
    cols = [f"{p}:{example[p]}{'*' if p in chain else ''}" for p in g["positions"]]
    tips = [[f"{site} | position {p} ({roles[p]}), token {example[p]}: {a:.3f}" for p, a in zip(g["positions"], row)]
            for site, row in zip(g["sites"], g["accuracy"])]
    grid = heatmap(g["accuracy"], g["sites"], cols, title="Interchange-intervention accuracy", vmin=0.0, vmax=1.0,
                   tips=tips, row_title="site", label_limit=28)
    chain_rows = [[x["position"], x["role"], x["best_site"], x["accuracy"]] for x in s["chain"]]
    trace_rows = [[x["site"], x["position"], x["role"], x["accuracy"]] for x in s["trace"]]
    body = (
        f"<p>Example base program: <code>{esc(' '.join(example))}</code> (the counterfactual changes the constant of the "
        "query's chain; * marks the chain's positions).</p>"
        + kv_table("Pairs", [("pairs", s["pairs"]), ("pairs used", s["pairs_used"]), ("site kind", d["settings"].get("site")),
                             ("depth", d["settings"].get("depth")), ("unpatched accuracy on the counterfactual answer",
                                                                     g["base_accuracy"]),
                             ("lowest best accuracy along the chain", s["min_chain_accuracy"]),
                             ("trace moves forward", s["trace_moves_forward"])])
        + f"<figure>{grid}</figure>"
        + "<h2>Along the chain</h2>" + table(["position", "role", "best site", "accuracy"], chain_rows,
                                              numeric=[True, False, False, True])
        + "<h2>Trace</h2>" + table(["site", "chain position", "role", "accuracy"], trace_rows, numeric=[False, True, False, True])
    )
    return page("Interchange interventions: variable binding", body, kind="interchange", subtitle=f"model: {d.get('model')}",
                js=["tooltip.js"])


def write_binding_interchange(d: dict[str, Any], path: str | Path) -> Path:
    return write_page(render_binding_interchange(d), path)
