"""The page of ``mechscope icl``: few-shot accuracy against chance, and the position-group
knockout curves (effect and random-edge control by layer window) for each sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechscope.report.charts import line_chart
from mechscope.report.toolkit import cards, esc, fmt, kv_table, page, table, write_page

__all__ = ["render_icl", "write_icl"]

SWEEP_TITLE = {
    "within": "within-example: Y_i \u2190 X_i",
    "cross": "cross-example: Y_i \u2190 X_j, Y_j (j < i)",
    "aggregation": "aggregation: final \u2190 Y_i",
}


def _half(v: float | None) -> str:
    return "n/a" if v is None else f"{v:+.3f}"


def render_icl(d: dict[str, Any]) -> str:
    """The page for an ``icl.json`` dict (``FewShotResult.to_dict()``)."""
    t = d["task"]
    parts = [cards([
        ("task", str(t["name"]), f"{t['n_pairs']} pairs, {d['settings'].get('shots')} shots", ""),
        ("accuracy", fmt(d["accuracy"]), f"chance {fmt(d['chance'])}", ""),
        ("knocked out", str(sum(p["knocked_out"] for p in d["prompts"])), f"of {d['n_correct']} correct prompts", ""),
        ("window", str(d["window"]), f"layers, centres every {d['settings'].get('layer_stride')}", ""),
    ])]
    if t.get("ambiguous"):
        parts.append(f"<p>Ambiguous prompts: {esc(t['ambiguous'])}.</p>")
    parts.append(f"<p>Prompt format: <code>{esc(d['prompt_format'])}</code>. Effect: mean relative change of p(target) at the "
                 "final position, (p_knockout - p_clean) / p_clean, when the sweep's edges are blocked in every layer of the "
                 "window; controls: as many random edges anywhere in the prompt, and as many random edges from the sweep's "
                 "own query positions to their other keys (never into position 0).</p>")
    h = d.get("headline", {})
    if h:
        rows = [[SWEEP_TITLE.get(s, s), _half(v["lower_half"]), _half(v["control_lower_half"]), _half(v.get("matched_lower_half")),
                 _half(v["upper_half"]), _half(v["control_upper_half"]), _half(v.get("matched_upper_half")), v["peak_layer"],
                 _half(v["peak_effect"])] for s, v in h.items() if isinstance(v, dict) and "peak_layer" in v]
        parts.append("<h2>Summary by half of the model (mean over the windows centred there)</h2>"
                     + table(["sweep", "lower half", "random", "same queries", "upper half", "random", "same queries",
                              "peak window", "peak effect"], rows, numeric=[False] * 7 + [True, False])
                     + table(["check", "met"], [[k, "yes" if v else "no"] for k, v in h.get("checks", {}).items()]))
    if d["curves"]:
        parts.append("<h2>Knockout by layer window</h2><div class='grid'>")
    for s, c in d["curves"].items():
        series = {"sweep": (d["layers"], c["effect"]), "random edges": (d["layers"], c["control"])}
        if c.get("matched") is not None:
            series["random edges, same queries"] = (d["layers"], c["matched"])
        n_edges = c.get("n_edges") or [0]
        parts.append(line_chart(series, title=SWEEP_TITLE.get(s, s), xlabel="window centre (layer)",
                                ylabel="(p_ko - p) / p", hlines=[0.0], legend="top",
                                label=f"{s}: {min(n_edges)}-{max(n_edges)} edges per prompt"))
    if d["curves"]:
        parts.append("</div>")
    rows = [[p["text"].strip().replace("\n", " | "), p["answer"], p.get("alternative_answer", ""), p["prob"],
             "yes" if p["correct"] else "no", "yes" if p["knocked_out"] else ""] for p in d["prompts"]]
    parts.append("<h2>Prompts</h2>" + table(["prompt (lines joined by |)", "answer", "alternative", "p(answer)", "top-1", "knocked out"],
                                            rows, numeric=[False, False, False, True, False, False]))
    parts.append(kv_table("settings", d["settings"].items()) + kv_table("model", d["model"].items()))
    return page(f"In-context learning: {t['name']}", "".join(parts), kind="in-context learning",
                subtitle=f"mechscope icl, {d['model'].get('name', '')}, {fmt(d.get('seconds', 0))} s")


def write_icl(d: dict[str, Any], path: str | Path) -> Path:
    """Write the icl page (``render_icl``) to ``path``."""
    return write_page(render_icl(d), path)
