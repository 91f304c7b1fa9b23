"""The page of ``mechscope dynamics`` on a meta-learning run (``train-toy --setting icml``):
accuracy and random-label accuracy against training steps, the three attention metrics, the
mean attention patterns at the metric peaks, and the checkpoint table; plus the two line
charts stacked in one standalone SVG (``dynamics.svg``, for the README)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechscope.report.charts import heatmap, line_chart, stacked_svg
from mechscope.report.toolkit import esc, fmt, html_num, num_or_nan, page, table, write_page

__all__ = ["render_meta_dynamics", "render_meta_dynamics_svg", "write_meta_dynamics"]

_WIDTH, _HEIGHT = 700, 300
_LABELS = {"self": "self", "label": "label", "chunk": "chunk"}


def _marks(d: dict[str, Any]) -> list[tuple]:
    peaks = d.get("phases", {}).get("peaks", {})
    return [(peaks[k], f"{k} peak") for k in ("self", "label", "chunk") if isinstance(peaks.get(k), (int, float)) and peaks[k] > 0]


def _charts(d: dict[str, Any]) -> list[str]:
    rows = [r for r in d["checkpoints"] if r["step"] > 0]
    steps = [r["step"] for r in rows]
    ph = d.get("phases", {})
    acc = {"accuracy": (steps, [num_or_nan(r["accuracy"]) for r in rows]),
           "random labels": (steps, [num_or_nan(r["random_label_accuracy"]) for r in rows])}
    hl = [v for v in (num_or_nan(ph.get("one_over_tasks")), num_or_nan(ph.get("chance"))) if v == v]
    c1 = line_chart(acc, title="Query accuracy (held out; reference lines at 1/T and chance)", xlabel="training step",
                    logx=True, width=_WIDTH, height=_HEIGHT, ylim=(0, 1), hlines=hl, vlines=_marks(d), points=False)
    att = {_LABELS[k]: (steps, [num_or_nan(r[k]) for r in rows]) for k in ("self", "label", "chunk")}
    c2 = line_chart(att, title="Layer-0 attention: self (query->query), label (query->labels), chunk (label->its example)",
                    xlabel="training step", logx=True, width=_WIDTH, height=_HEIGHT,
                    ylim=(0, 1), vlines=_marks(d), points=False)
    charts = [c1, c2]
    n_layers = len(rows[0].get("per_layer", {}).get("self", [])) if rows else 0
    if n_layers > 1:
        last = {f"{k} (layer {n_layers - 1})": (steps, [num_or_nan(r["per_layer"][k][-1]) for r in rows]) for k in ("self", "label")}
        charts.append(line_chart(last, title="Last-layer attention of the query", xlabel="training step", logx=True,
                                 width=_WIDTH, height=_HEIGHT, ylim=(0, 1), vlines=_marks(d), points=False))
    return charts


def render_meta_dynamics_svg(d: dict[str, Any]) -> str:
    """Both line charts stacked in one standalone SVG on a white background."""
    return stacked_svg(_charts(d), _WIDTH, _HEIGHT)


def _token_names(n_pos: int) -> list[str]:
    n = (n_pos - 1) // 2
    return [f"x{i // 2}" if i % 2 == 0 else f"y{i // 2}" for i in range(2 * n)] + ["query"]


def _patterns(d: dict[str, Any]) -> str:
    out = []
    for name, title in (("self_peak", "at the self peak"), ("label_peak", "at the label peak (phase 2)"), ("final", "final")):
        p = d.get("patterns", {}).get(name)
        if not p:
            continue
        for layer, mat in enumerate(p["pattern"]):
            names = _token_names(len(mat))
            cells = [[num_or_nan(v) if k <= q else None for k, v in enumerate(row)] for q, row in enumerate(mat)]
            out.append("<figure>" + heatmap(cells, names, names, title=f"layer {layer}, step {p['step']} ({title})",
                                            vmin=0, vmax=1, cell=14, row_title="query position", col_title="key position")
                       + "</figure>")
    return "<div class='grid'>" + "".join(out) + "</div>" if out else ""


def render_meta_dynamics(d: dict[str, Any]) -> str:
    """The page for a meta-learning ``dynamics.json`` dict (``MetaDynamicsResult.to_dict()``)."""
    ph = d.get("phases", {})
    p2 = ph.get("phase2") or {}
    near = ph.get("plateau_nearest_one_over_tasks") or {}
    summary = [
        ("tasks T / 1 over T", f"{fmt(ph.get('tasks'))} / {fmt(ph.get('one_over_tasks'))}"),
        ("plateau nearest 1/T", f"{fmt(near.get('mean'))} (steps {fmt(near.get('start'))}-{fmt(near.get('end'))})" if near else "none"),
        ("middle plateaus", fmt(len(ph.get("middle_plateaus", [])))),
        ("metric peaks (self, label, chunk)", ", ".join(fmt(ph.get("peaks", {}).get(k)) for k in ("self", "label", "chunk"))),
        ("peaks in order self -> label -> chunk", fmt(ph.get("peaks_in_order"))),
        ("phase-2 checkpoint (label peak)", f"step {fmt(p2.get('step'))}: accuracy {fmt(p2.get('accuracy'))}, "
                                            f"random labels {fmt(p2.get('random_label_accuracy'))}" if p2 else "none"),
        ("final accuracy", fmt(ph.get("final_accuracy"))),
    ]
    plats = [[p["start"], p["end"], p["n"], p["mean"]] for p in ph.get("plateaus", [])]
    rows = [[r["step"], r["accuracy"], r["random_label_accuracy"], r["loss"], r["self"], r["label"], r["chunk"]]
            for r in d["checkpoints"]]
    note = "".join(f"<p><strong>{esc(ph[k])}</strong></p>" for k in ("note", "unfinished") if ph.get(k))
    body = (
        "<div class='grid'>" + "".join(f"<figure>{c}</figure>" for c in _charts(d)) + "</div>"
        + "<h2>Phases</h2>" + note + table(["", "value"], [list(x) for x in summary], numeric=[False, False])
        + "<h2>Mean attention patterns</h2>" + _patterns(d)
        + "<h2>Accuracy plateaus</h2>" + table(["first step", "last step", "checkpoints", "mean accuracy"], plats,
                                                numeric=[True] * 4)
        + f"<p class='small muted'>A plateau: consecutive checkpoints whose accuracy stays within "
          f"{html_num(d.get('config', {}).get('band'))} over at least a factor {html_num(d.get('config', {}).get('min_span'))} "
          "of steps. Random-label accuracy: the same query with uniformly random context labels.</p>"
        + "<h2>Checkpoints</h2>"
        + table(["step", "accuracy", "random-label acc.", "loss", "self", "label", "chunk"], rows, numeric=[True] * 7)
    )
    return page("Training dynamics: in-context meta-learning", body, kind="training dynamics", subtitle=f"run: {d.get('run')}")


def write_meta_dynamics(d: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """Write the page to ``path`` and the standalone charts next to it (suffix ``.svg``)."""
    html = write_page(render_meta_dynamics(d), path)
    return html, write_page(render_meta_dynamics_svg(d), html.with_suffix(".svg"))
