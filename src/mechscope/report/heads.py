"""Self-contained HTML for the head taxonomy (``heads.html``) and the training dynamics
(``dynamics.html`` + a standalone ``dynamics.svg``).

heads.html: the top heads per category, a layer x head heatmap per score, the top head pairs
by K-, Q- and V-composition, the ICL score and the ablation figures, and the attention pattern
of any head on an example sequence: the patterns are embedded as JSON in a
``<script type="application/json">`` block (``<``, ``>`` and ``&`` written as \\u escapes, so no
token can close the tag) and a few lines of inline JS draw the chosen head; model tokens are
put into the page with ``textContent``, never as markup.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mechscope.graph.names import head_node
from mechscope.report.svg import bar_chart, esc, fmt, heatmap, line_chart, page, table

__all__ = ["render_heads_report", "write_heads_report", "render_dynamics_report", "write_dynamics_report", "dynamics_svg"]

_JS = """
(function(){
var D=JSON.parse(document.getElementById('patterns').textContent);
var sel=document.getElementById('head'), box=document.getElementById('pattern');
var NS='http://www.w3.org/2000/svg';
function draw(){
  var v=sel.value.split('.'), l=+v[0], h=+v[1], P=D.patterns[l][h], T=D.tokens, n=T.length, c=16, left=90, top=90;
  var s=document.createElementNS(NS,'svg'); s.setAttribute('width',left+n*c+20); s.setAttribute('height',top+n*c+20);
  function txt(x,y,t,rot,anchor){var e=document.createElementNS(NS,'text'); e.setAttribute('x',x); e.setAttribute('y',y);
    e.setAttribute('font-size','10'); if(anchor) e.setAttribute('text-anchor',anchor);
    if(rot) e.setAttribute('transform','rotate(-60 '+x+' '+y+')'); e.textContent=t; s.appendChild(e);}
  for(var i=0;i<n;i++){ txt(left-4,top+i*c+c*0.7,T[i],false,'end'); txt(left+i*c+c/2,top-4,T[i],true,null);
    for(var j=0;j<=i;j++){ var a=P[i][j], r=document.createElementNS(NS,'rect');
      r.setAttribute('x',left+j*c); r.setAttribute('y',top+i*c); r.setAttribute('width',c-1); r.setAttribute('height',c-1);
      var k=Math.round(255-218*a), g=Math.round(255-156*a), b=Math.round(255-20*a);
      r.setAttribute('fill','rgb('+k+','+g+','+b+')');
      var t=document.createElementNS(NS,'title'); t.textContent='query '+i+' '+T[i]+' -> key '+j+' '+T[j]+': '+a.toFixed(3);
      r.appendChild(t); s.appendChild(r);}}
  box.replaceChildren(s);
}
sel.addEventListener('change',draw); draw();
})();
"""


def _safe_json(obj: Any) -> str:
    """JSON that cannot end a <script> element or open markup."""
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _grid(matrix: list[list[Any]], title: str, diverging: bool = False) -> str:
    L, H = len(matrix), len(matrix[0]) if matrix else 0
    vals = [[float("nan") if v is None else float(v) for v in row] for row in matrix]
    tips = [[f"{head_node(l, h)}: {fmt(vals[l][h])}" for h in range(H)] for l in range(L)]
    return heatmap(vals, [f"L{l}" for l in range(L)], [f"h{h}" for h in range(H)], title=title,
                   diverging=diverging, tips=tips, row_title="layer", col_title="head", cell=16)


def render_heads_report(d: dict[str, Any], patterns: list | None = None) -> str:
    """HTML for a ``heads.json`` dict; ``patterns`` [L][H][pos][pos] for the example viewer."""
    from mechscope.heads.result import SCORE_INFO

    m = d["model"]
    parts = []
    # top heads table
    rows = []
    for cat, heads in d.get("top_heads", {}).items():
        rows.append([cat, ", ".join(f"{x['head']} ({fmt(x['score'])})" for x in heads)])
    parts.append("<h2>Top heads per category</h2>" + table(["category", "heads (score)"], rows))
    icl, abl = d.get("icl", {}), d.get("ablation", {})
    parts.append(
        "<h2>Model-level figures</h2>"
        + table(["figure", "value"], [
            ["ICL score: loss at token {} minus loss at token {} ({} contexts, {})".format(
                icl.get("late"), icl.get("early"), icl.get("n_contexts"), d.get("text_source", "")), icl.get("icl_score")],
            ["repeated-half loss, clean", abl.get("clean_loss")],
            [f"loss increase, top-{abl.get('k')} induction heads mean-ablated ({', '.join(abl.get('top_heads', []))})", abl.get("top_k_increase")],
            [f"loss increase, {abl.get('k')} random heads (mean of {len(abl.get('random_increases', []))} draws)", abl.get("random_mean_increase")],
        ], numeric=[False, True])
    )
    parts.append("<h2>Scores per head (layer x head)</h2><div class='grid'>")
    order = [k for k in SCORE_INFO if k in d["scores"]] + [k for k in d["scores"] if k not in SCORE_INFO]
    for name in order:
        matrix = d["scores"][name]
        signed = name in ("copying_eigen", "ablation")
        parts.append(f"<figure>{_grid(matrix, name, diverging=signed)}<figcaption class='small muted'>{esc(SCORE_INFO.get(name, ''))}</figcaption></figure>")
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
    if patterns is not None:
        L, H = len(patterns), len(patterns[0])
        ind = d["scores"].get("induction")
        best = (0, 0)
        if ind:
            best = max(((l, h) for l in range(L) for h in range(H)), key=lambda x: ind[x[0]][x[1]] or 0)
        opts = "".join(
            f'<option value="{l}.{h}"{" selected" if (l, h) == best else ""}>{head_node(l, h)}</option>'
            for l in range(L) for h in range(H)
        )
        data = {"tokens": d.get("example_tokens", []), "patterns": [[[[round(x, 3) for x in row] for row in hp] for hp in lp] for lp in patterns]}
        parts.append(
            "<h2>Attention pattern on an example (BOS + R + R)</h2>"
            f"<label>head <select id='head'>{opts}</select></label><div id='pattern'></div>"
            f"<script type='application/json' id='patterns'>{_safe_json(data)}</script><script>{_JS}</script>"
        )
    sub = f"{m.get('name')} · {m.get('n_layers')} layers × {m.get('n_heads')} heads ({m.get('n_kv_heads')} KV heads) · settings: " + ", ".join(
        f"{k}={v}" for k, v in d.get("settings", {}).items())
    return page(f"Attention heads of {m.get('name')}", "".join(parts), subtitle=sub)


def write_heads_report(result: Any, path: str | Path) -> Path:
    """Write ``heads.html`` for a ``HeadsResult``."""
    p = Path(path)
    p.write_text(render_heads_report(result.to_dict(), result.example_patterns.tolist()), encoding="utf-8")
    return p


def _finite(xs: list[Any]) -> list[float]:
    return [float("nan") if x is None or not math.isfinite(float(x)) else float(x) for x in xs]


def dynamics_charts(d: dict[str, Any]) -> list[str]:
    """Two line charts over training steps: losses; head scores and ICL score; a marker at the
    induction head's formation step."""
    rows = [r for r in d["checkpoints"] if r["step"] > 0]
    steps = [r["step"] for r in rows]
    f = d.get("formation", {})
    marks = [(f["induction_step"], "induction head forms")] if f.get("induction_step") else []
    series1 = {"held-out loss": (steps, _finite([r["loss"] for r in rows])),
               "loss on repeated half": (steps, _finite([r["repeated_loss"] for r in rows]))}
    tl = [x for x in d.get("train_loss", []) if x[0] > 0]
    if tl:
        series1 = {"train loss": ([x[0] for x in tl], [x[1] for x in tl]), **series1}
    c1 = line_chart(series1, title="Loss (nats)", xlabel="training step", width=700, vlines=marks, points=False)
    series2 = {
        "induction (max)": (steps, _finite([r["max_induction"] for r in rows])),
        "prev-token (max)": (steps, _finite([r["max_previous_token"] for r in rows])),
        "ICL score": (steps, _finite([r["icl_score"] for r in rows])),
        "K-comp. prev->ind": (steps, _finite([r.get("k_composition_prev_to_induction", float("nan")) for r in rows])),
    }
    c2 = line_chart(series2, title="Head scores and ICL score (nats)", xlabel="training step", width=700, vlines=marks)
    return [c1, c2]


def dynamics_svg(d: dict[str, Any]) -> str:
    """One standalone SVG stacking both charts (for the README)."""
    charts = dynamics_charts(d)
    h = 0
    inner = []
    for c in charts:
        height = int(c.split('height="', 1)[1].split('"', 1)[0])
        inner.append(c.replace("<svg ", f'<svg y="{h}" ', 1))
        h += height + 10
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="700" height="{h}" style="background:#fff"><rect width="100%" height="100%" fill="#fff"/>{"".join(inner)}</svg>'


def render_dynamics_report(d: dict[str, Any]) -> str:
    f = d.get("formation", {})
    rows = [[k, "" if v is None else v] for k, v in f.items()]
    tab_rows = [[r["step"], r["loss"], r["repeated_loss"], r["icl_score"], r["max_previous_token"], r["max_induction"], r["max_k_composition"]]
                for r in d["checkpoints"]]
    body = (
        "<div class='grid'>" + "".join(f"<figure>{c}</figure>" for c in dynamics_charts(d)) + "</div>"
        + "<h2>Formation</h2>" + table(["", "value"], rows)
        + "<p class='small muted'>Formation step: first checkpoint where a score covers half the way from its first to its highest value.</p>"
        + "<h2>Checkpoints</h2>"
        + table(["step", "loss", "repeated-half loss", "ICL score", "max prev-token", "max induction", "max K-comp"], tab_rows,
                numeric=[True] * 7)
    )
    return page("Training dynamics: induction heads", body, subtitle=f"run: {d.get('run')}")


def write_dynamics_report(result: Any, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``dynamics.html`` and ``dynamics.svg`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = result.to_dict()
    (out / "dynamics.html").write_text(render_dynamics_report(d), encoding="utf-8")
    (out / "dynamics.svg").write_text(dynamics_svg(d), encoding="utf-8")
    return out / "dynamics.html", out / "dynamics.svg"
