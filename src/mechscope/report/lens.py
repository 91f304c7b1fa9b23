"""The lens page of ``mechscope lens``: target-rank heatmap (site x position), the logit lens's
top tokens at the last position, and the top direct-logit contributors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mechscope.report.charts import bar_chart, heatmap
from mechscope.report.toolkit import esc, fmt, page, table, write_page

__all__ = ["render_lens", "write_lens"]


def render_lens(d: dict[str, Any]) -> str:
    """The page for a ``lens.json`` dict (``LensResult.to_dict()``)."""
    lens, dla = d["lens"], d["dla"]
    sites, toks = lens["sites"], d["tokens"]
    score = [[-math.log10(1 + r) for r in row] for row in lens["target_rank"]]  # 0 = top-1
    tips = [[f"{s}, position {p} {toks[p]!r}: rank {r}, p = {fmt(pr)}; top: {', '.join(map(repr, lens['top_tokens'][i][p][:3]))}"
             for p, (r, pr) in enumerate(zip(lens["target_rank"][i], lens["target_prob"][i]))] for i, s in enumerate(sites)]
    hm = heatmap(score, sites, [f"{p}:{t}" for p, t in enumerate(toks)], title="target rank", tips=tips, vmax=0.0,
                 vmin=min([-1.0] + [v for row in score for v in row]),  # at least ranks 1-10: all top-1 is dark, not blank
                 row_title="site", col_title="position", cell=16)
    last_rows = [[s, lens["target_rank"][i][-1], lens["target_prob"][i][-1], "  ".join(repr(t) for t in lens["top_tokens"][i][-1])]
                 for i, s in enumerate(sites)]
    top = dla["top"]
    bars = bar_chart([c["name"] for c in top], [c["value"] for c in top], width=620,
                     title=f"Direct contribution to logit({d['target']!r}) - logit({d['distractor']!r})",
                     value_label="frozen final-norm scale; contributions sum to the logit difference")
    # escaped once, then wrapped in markup: the note is text (the model soft-caps its logits ...)
    check = esc(f"Sum of all contributions {fmt(dla['total'], 6)} vs the model's logit difference {fmt(dla['actual'], 6)} "
                f"(|error| {fmt(dla['error'], 2)}).") + (f" <strong>{esc(dla['note'])}</strong>" if dla.get("note") else "")
    body = (
        f"<p>Prompt: <code>{esc(d['prompt'])}</code> &rarr; target <code>{esc(d['target'])}</code>, "
        f"distractor <code>{esc(d['distractor'])}</code>. Model {esc(d['model'].get('name', ''))}.</p>"
        f"<h2>Logit lens: rank of the target</h2><p class='muted small'>Colour: -log10(1 + rank) of the target at each "
        f"residual-stream site (rows) and position (columns); darkest = top-1. Hover a cell for the rank, probability and "
        f"top tokens.</p><figure>{hm}</figure>"
        f"<p class='muted small'>First site where the target is top-1 at the last position: "
        f"{esc(lens['first_top1_site_last_position'] or 'none (not top-1 at any site)')}.</p>"
        f"<h2>Direct logit attribution (last position)</h2><figure>{bars}</figure><p>{check}</p>"
        f"<h2>Logit lens at the last position</h2>"
        + table(["site", "target rank", "target p", "top tokens"], last_rows, numeric=[False, True, True, False])
    )
    if (d.get("settings") or {}).get("lens") == "tuned":
        body = body.replace("<h2>Logit lens: rank", "<h2>Tuned lens: rank").replace("<h2>Logit lens at", "<h2>Tuned lens at")
        return page(f"Tuned lens: {d['prompt']}", body, kind="tuned lens")
    return page(f"Logit lens: {d['prompt']}", body, kind="logit lens")


def write_lens(d: dict[str, Any], path: str | Path) -> Path:
    """Write the lens page (``render_lens``) to ``path``."""
    return write_page(render_lens(d), path)
