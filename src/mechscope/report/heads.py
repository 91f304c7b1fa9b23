"""The heads page (``heads.html``): the head taxonomy of ``mechscope heads``.

The top heads per category, a layer x head heatmap per score, the top head pairs by K-, Q- and
V-composition, the ICL score and the ablation figures, and the attention pattern of any head on
the example sequence. The pattern heatmap is drawn for the most inductive head; the other
heads' patterns travel as JSON in a ``<script type="application/json">`` block (``toolkit.
json_script``) and ``assets/patterns.js`` recolours the same cells when another head is chosen.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mechscope.graph.names import head_node
from mechscope.report.charts import bar_chart, heatmap
from mechscope.report.toolkit import esc, fmt, json_script, num_or_nan, page, table, write_page

__all__ = ["render_heads", "write_heads"]


def _grid(matrix: list[list[Any]], title: str, diverging: bool = False) -> str:
    L, H = len(matrix), len(matrix[0]) if matrix else 0
    vals = [[float("nan") if v is None else float(v) for v in row] for row in matrix]
    tips = [[f"{head_node(l, h)}: {fmt(vals[l][h])}" for h in range(H)] for l in range(L)]
    return heatmap(vals, [f"L{l}" for l in range(L)], [f"h{h}" for h in range(H)], title=title,
                   diverging=diverging, tips=tips, row_title="layer", col_title="head", cell=16)


def _pattern_viewer(d: dict[str, Any], patterns: list) -> str:
    """A head chooser and the chosen head's attention pattern on the example tokens."""
    L, H = len(patterns), len(patterns[0])
    ind = d["scores"].get("induction")
    best = 0
    if ind:
        def score(i: int) -> float:  # a missing or NaN score never wins
            v = num_or_nan(ind[i // H][i % H])
            return v if math.isfinite(v) else -math.inf

        best = max(range(L * H), key=score)
    opts = "".join(f'<option value="{i}"{" selected" if i == best else ""}>{head_node(i // H, i % H)}</option>'
                   for i in range(L * H))
    tokens = [str(t) for t in d.get("example_tokens", [])]
    flat = [[[round(x, 3) for x in row] for row in patterns[i // H][i % H]] for i in range(L * H)]
    shown = flat[best]
    n = min(len(tokens), len(shown))
    values = [[shown[i][j] if j <= i else None for j in range(n)] for i in range(n)]
    tips = [[f"query {i} {tokens[i]} -> key {j} {tokens[j]}: {shown[i][j]:.3f}" for j in range(n)] for i in range(n)]
    hm = heatmap(values, tokens[:n], tokens[:n], vmin=0.0, vmax=1.0, cell=16, tips=tips, colorbar=False, indexed=True,
                 label="attention pattern")
    return (f"<label>head <select id='head'>{opts}</select></label><div id='pattern'>{hm}</div>"
            + json_script("patterns", {"patterns": flat}))


def _setting(key: str, value: Any, settings: dict[str, Any]) -> str:
    """``key=value`` for the settings line; the example's length as drawn: the example is
    BOS + R + R with |R| = min(example_len, seq_len)."""
    seq = settings.get("seq_len")
    if key == "example_len" and isinstance(value, int) and isinstance(seq, int) and seq < value:
        return f"example_len={seq} ({value} asked, capped at seq_len)"
    return f"{key}={value}"


def render_heads(d: dict[str, Any]) -> str:
    """The page for a ``heads.json`` dict; with ``example_patterns`` ([L][H][pos][pos], from
    ``heads.safetensors``) it also shows the attention patterns on the example."""
    from mechscope.heads.result import SCORE_INFO

    m = d["model"]
    parts = []
    rows = [[cat, ", ".join(f"{x['head']} ({fmt(x['score'])})" for x in heads)] for cat, heads in d.get("top_heads", {}).items()]
    parts.append("<h2>Top heads per category</h2>" + table(["category", "heads (score)"], rows))
    icl, abl = d.get("icl", {}), d.get("ablation", {})
    parts.append(
        "<h2>Model-level figures</h2>"
        + table(["figure", "value"], [
            ["ICL score: loss at token {} minus loss at token {} ({} contexts, {})".format(
                icl.get("late"), icl.get("early"), icl.get("n_contexts"), d.get("text_source", "")), icl.get("icl_score")],
            ["repeated-half loss, clean", abl.get("clean_loss")],
            [f"loss increase, top-{abl.get('k')} induction heads mean-ablated ({', '.join(abl.get('top_heads', []))})", abl.get("top_k_increase")],
            [f"loss increase, {abl.get('k')} random {'other ' if abl.get('random_from') == 'other heads' else ''}heads (mean of {len(abl.get('random_increases', []))} draws)", abl.get("random_mean_increase")],
        ], numeric=[False, True])
    )
    parts.append("<h2>Scores per head (layer x head)</h2><div class='grid'>")
    order = [k for k in SCORE_INFO if k in d["scores"]] + [k for k in d["scores"] if k not in SCORE_INFO]
    for name in order:
        signed = name in ("copying_eigen", "ablation")
        parts.append(f"<figure>{_grid(d['scores'][name], name, diverging=signed)}"
                     f"<figcaption class='small muted'>{esc(SCORE_INFO.get(name, ''))}</figcaption></figure>")
    parts.append("</div>")
    comp = d.get("top_composition_pairs", {})
    if comp:
        parts.append("<h2>Top head pairs by composition</h2><div class='grid'>")
        for kind in ("k", "q", "v"):
            pairs = comp.get(kind, [])[:15]
            if pairs:
                parts.append(bar_chart([f"{p['writer']} -> {p['reader']}" for p in pairs], [p["score"] for p in pairs],
                                       title=f"{kind.upper()}-composition", width=420))
        parts.append("</div><p class='small muted'>Elhage et al. 2021: ||W_OV(writer) W(reader)|| / (||W_OV|| ||W||), "
                     "norms folded into the weights; a previous-token head feeding an induction head shows as a high K-composition pair.</p>")
    patterns = d.get("example_patterns")
    if patterns:
        ex_len, seq = d.get("settings", {}).get("example_len"), d.get("settings", {}).get("seq_len")
        r_len = f", |R| = {min(ex_len, seq)}" if isinstance(ex_len, int) and isinstance(seq, int) else ""
        parts.append(f"<h2>Attention pattern on an example (BOS + R + R{r_len})</h2>" + _pattern_viewer(d, patterns))
    settings = d.get("settings", {})
    sub = f"{m.get('name')} · {m.get('n_layers')} layers × {m.get('n_heads')} heads ({m.get('n_kv_heads')} KV heads) · settings: " + ", ".join(
        _setting(k, v, settings) for k, v in settings.items())
    return page(f"Attention heads of {m.get('name')}", "".join(parts), kind="attention heads", subtitle=sub,
                js=["patterns.js"] if patterns else [])


def write_heads(d: dict[str, Any], path: str | Path) -> Path:
    """Write the heads page (``render_heads``) to ``path``."""
    return write_page(render_heads(d), path)
