"""The circuit page: a circuit-discovery result (``circuit.json``) as one self-contained HTML page.

``render_circuit(data)`` returns the page, ``write_circuit(data, path)`` writes it. The charts
and tables come from the report toolkit (``toolkit``, ``charts``); the circuit graph is drawn
here as inline SVG. ``assets/circuit.css``, ``tooltip.js`` and ``circuit.js`` are inlined; the
scripts only add a hover tooltip and node/edge highlighting: without them the SVG ``<title>``
children still give native tooltips. Every string taken from the data is escaped, and no data
is embedded inside ``<script>``.

Graph drawing conventions: rows are layers, input at the bottom and logits at the top; a layer's
heads sit left to right and its MLP at the right end, raised a little because it reads the
layer's attention output. Edge colour is the sign of the score (blue positive, red negative),
stroke width grows with ``|score|`` and opacity with its square root. Query edges are solid and end at the head; under
grouped-query attention a key/value input is shared by a group of query heads, so ``<k>``
(dashed) and ``<v>`` (dotted) edges end at a bracket drawn under the heads of that KV group
(k at its left third, v at its right third). Input and logits are bars spanning the row; their edges
run straight up the lane (column gap) right of the node they connect, then turn in.

Labelled circuits (``circuit.json`` ``labels``, from ``circuits.labels.label_heads``): a head with
a role from the head taxonomy is filled in the role's colour and tagged (prev, dup, ind, copy);
its tooltip, the components table and the head-roles table give the sentence "a23.h3: copying
head (0.95), attends to the answer token ' Mary' (0.91)". Every head with an attention heatmap
links to it (``#att-a23.h3``); the heatmaps show all heads the ``example`` holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechscope.errors import MechscopeError
from mechscope.graph.names import INPUT, LOGITS, Node, head_node, kv_group, mlp_node, parse_node
from mechscope.report.charts import Series, heatmap, line_chart
from mechscope.report.toolkit import (
    NEG,
    POS,
    Html,
    bar_cell,
    cards,
    esc,
    finite,
    fmt,
    html_num,
    kv_table,
    num_or_nan,
    page,
    px,
    table,
    token_text,
    write_page,
)
from mechscope.report.toolkit import (
    pct as pct_text,
)

__all__ = ["render_circuit", "write_circuit"]

MAX_CIRCUIT_EDGES = 3000  # draw at most this many in-circuit edges (the strongest)
N_CONTEXT_EDGES = 200  # strongest out-of-circuit edges, drawn faint behind a toggle


def _node(name: str) -> Node | None:
    """The parsed node name, or None for a name that is not one (the data may hold anything)."""
    try:
        return parse_node(name)
    except MechscopeError:
        return None


def _is_head(name: str) -> bool:
    """Whether ``name`` names an attention head (``a{l}.h{h}``, no input port)."""
    n = _node(name)
    return n is not None and n.kind == "head" and n.port is None


# ---- circuit graph --------------------------------------------------------------------------
@dataclass
class _Layout:
    """Pixel positions of nodes and edge attachment points."""

    n_layers: int
    n_heads: int
    n_kv_heads: int

    def __post_init__(self) -> None:
        H = self.n_heads
        self.cw = max(26.0, min(72.0, 640.0 / H))
        self.r = min(11.0, self.cw * 0.3)
        self.m = self.r * 0.9  # MLP square half-size
        self.rh = 66.0 if self.n_layers <= 16 else 56.0
        self.left = 72.0
        self.top = 14.0
        self.mlp_x = self.left + H * self.cw + self.cw * 0.9
        self.width = self.mlp_x + self.cw + 16
        self.height = self.top + (self.n_layers + 2) * self.rh + 8
        self.bus = (self.left - 6, self.mlp_x + self.cw * 0.5 + 8)
        self.group = max(1, H // max(1, self.n_kv_heads))

    def row_y(self, layer: int) -> float:
        return self.top + (self.n_layers - layer) * self.rh + self.rh / 2

    def head(self, layer: int, h: int) -> tuple[float, float]:
        return self.left + (h + 0.5) * self.cw, self.row_y(layer)

    def mlp(self, layer: int) -> tuple[float, float]:
        return self.mlp_x, self.row_y(layer) - 0.36 * self.rh

    def kv_span(self, layer: int, g: int) -> tuple[float, float, float]:
        """(x_left, x_right, y) of KV group g's bracket."""
        xa = self.head(layer, g * self.group)[0] - self.r * 0.9
        xb = self.head(layer, (g + 1) * self.group - 1)[0] + self.r * 0.9
        return xa, xb, self.row_y(layer) + self.r + 7

    def sender(self, name: str) -> tuple[float, float] | None:
        n = _node(name)
        if n is None or n.port is not None:
            raise ValueError(name)
        if n.kind == "input":
            return None  # resolved against the receiver (vertical edges out of the bar)
        if n.kind == "head":
            x, y = self.head(*_at(n))
            return x, y - self.r
        if n.kind == "mlp":
            x, y = self.mlp(_at(n)[0])
            return x, y - self.m
        raise ValueError(name)

    def receiver(self, name: str) -> tuple[float, float] | None:
        n = _node(name)
        if n is None:
            raise ValueError(name)
        if n.kind == "logits":
            return None
        if n.kind == "head" and n.port == "q":
            x, y = self.head(*_at(n))
            return x, y + self.r
        if n.kind == "kv" and n.port is not None:
            xa, xb, y = self.kv_span(*_at(n))
            frac = 1 / 3 if n.port == "k" else 2 / 3
            return xa + (xb - xa) * frac, y
        if n.kind == "mlp":
            x, y = self.mlp(_at(n)[0])
            return x, y + self.m
        raise ValueError(name)

    def lane(self, x: float) -> float:
        """The vertical lane (a gap between columns) that input/logits edges of a node at x use."""
        if x > self.left + self.n_heads * self.cw:  # the MLP column: lane on its right
            return self.mlp_x + self.cw * 0.5
        return self.left + (math.floor((x - self.left) / self.cw) + 1) * self.cw

    def edge_path(self, src: str, dst: str) -> str:
        """SVG path data. Input and logits edges run straight in the lane beside their node and
        turn in at the end, so they do not cross the column of heads they pass."""
        s, d = self.sender(src), self.receiver(dst)
        y_in, y_out = self.row_y(-1) - 9, self.row_y(self.n_layers) + 9
        if s is None and d is None:
            return f"M{px(self.left)} {px(y_in)}V{px(y_out)}"
        if s is None:
            assert d is not None  # both None was handled above
            x = self.lane(d[0])
            return (f"M{px(x)} {px(y_in)}V{px(d[1] + 24)}C{px(x)} {px(d[1] + 12)} {px(d[0])} {px(d[1] + 12)} "
                    f"{px(d[0])} {px(d[1])}")
        if d is None:
            x = self.lane(s[0])
            return (f"M{px(s[0])} {px(s[1])}C{px(s[0])} {px(s[1] - 12)} {px(x)} {px(s[1] - 12)} {px(x)} "
                    f"{px(s[1] - 24)}V{px(y_out)}")
        c = max(14.0, 0.45 * (s[1] - d[1]))
        return (f"M{px(s[0])} {px(s[1])}C{px(s[0])} {px(s[1] - c)} {px(d[0])} {px(d[1] + c)} "
                f"{px(d[0])} {px(d[1])}")


def _at(n: Node) -> tuple[int, int]:
    """(layer, head or KV group) of a head, kv or mlp node (head is -1 for an MLP)."""
    if n.layer is None:
        raise ValueError(f"{n.kind} node has no layer")
    return n.layer, n.head if n.head is not None else -1


def _receiver_targets(dst: str, group: int) -> tuple[str, list[str]]:
    """(marker key the edge ends at, node names it touches) for a receiver name."""
    n = _node(dst)
    if n is not None and n.kind == "head" and n.port == "q":
        name = head_node(*_at(n))
        return name, [name]
    if n is not None and n.kind == "kv" and n.port is not None:
        layer, g = _at(n)
        return kv_group(layer, g), [head_node(layer, h) for h in range(g * group, (g + 1) * group)]
    return dst, [dst]


def _edge_kind(dst: str) -> str:
    """q, k or v for an attention-input receiver; r (residual reader: MLP or logits) otherwise."""
    n = _node(dst)
    return n.port if n is not None and n.port is not None else "r"


_KIND_TEXT = {"q": "query input", "k": "key input", "v": "value input", "r": "input"}


def _select_edges(edges: list[dict]) -> tuple[list[dict], list[dict], int]:
    """(in-circuit edges to draw, faint context edges, in-circuit edges not drawn)."""
    kept = [ed for ed in edges if ed.get("in_circuit")]
    kept.sort(key=lambda ed: abs(finite(ed.get("score"))), reverse=True)
    dropped = max(0, len(kept) - MAX_CIRCUIT_EDGES)
    kept = kept[:MAX_CIRCUIT_EDGES]
    rest = [ed for ed in edges if not ed.get("in_circuit")]
    rest.sort(key=lambda ed: abs(finite(ed.get("score"))), reverse=True)
    return kept, rest[:N_CONTEXT_EDGES], dropped


def _graph_svg(data: dict, lay: _Layout, node_info: dict[str, dict], labels: dict[str, dict] | None = None,
               attention: set[str] | None = None) -> tuple[str, int]:
    """The circuit as inline SVG and the number of in-circuit edges left out of the drawing."""
    kept, context, dropped = _select_edges(list(data.get("edges") or []))
    scale = max([abs(finite(ed.get("score"))) for ed in kept + context] + [1e-12])
    stable = _stable_edges(data)
    touched: set[str] = set()
    edge_svg: list[str] = []
    for cls, group in (("edge ctx", context), ("edge", kept)):
        for ed in sorted(group, key=lambda ed: abs(finite(ed.get("score")))):  # strongest on top
            src, dst = str(ed.get("src")), str(ed.get("dst"))
            try:
                d = lay.edge_path(src, dst)
            except ValueError:
                continue
            marker, names = _receiver_targets(dst, lay.group)
            if cls == "edge":
                touched.update((src, marker))
            score = finite(ed.get("score"))
            kind = _edge_kind(dst)
            rel = abs(score) / scale
            width, opacity = 0.6 + 4.4 * rel, 0.3 + 0.6 * math.sqrt(rel)
            tip = f"{src} → {dst}\n{_KIND_TEXT[kind]} · score {fmt(ed.get('score'), 4)}"
            if kind in "kv":
                tip += f"\nshared by heads {', '.join(names)}"
            if cls != "edge":
                tip += "\n(not in circuit)"
            freq = stable.get((src, dst))
            if freq is not None:
                tip += f"\nstable: in {freq:.0%} of the circuits over the seeds"
            st = " stable" if freq is not None and cls == "edge" else ""
            edge_svg.append(
                f'<g class="{cls}{st} k-{kind} tip" data-n="{esc(" ".join([src, marker, *names]))}">'
                f"<title>{esc(tip)}</title>"
                f'<path class="hit" d="{d}"/>'
                f'<path class="vis" d="{d}" stroke="{POS if score >= 0 else NEG}" '
                f'stroke-width="{px(width)}" stroke-opacity="{opacity:.2f}"/></g>'
            )
    if not kept:  # nothing kept: fall back on the nodes' own flags
        touched = {n for n, info in node_info.items() if info.get("in_circuit")}

    out = [
        f'<svg id="circuit-graph" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {px(lay.width)} '
        f'{px(lay.height)}" width="{px(max(lay.width, 560.0))}" role="img" aria-label="circuit graph">'
    ]
    out.append(_graph_background(lay))
    out.append('<g class="edges">' + "".join(edge_svg) + "</g>")
    out.append(_graph_nodes(lay, node_info, touched, labels, attention))
    out.append("</svg>")
    return "".join(out), dropped


def _stable_edges(data: dict) -> dict[tuple[str, str], float]:
    """(src, dst) -> frequency of the edges stable across seeds (``stability.stable_edges``)."""
    st = data.get("stability")
    rows = st.get("stable_edges") if isinstance(st, dict) else None
    out: dict[tuple[str, str], float] = {}
    for row in rows or []:
        if isinstance(row, (list, tuple)) and len(row) == 3:
            out[(str(row[0]), str(row[1]))] = finite(row[2])
    return out


def _stability_section(data: dict) -> str:
    """Across-seed figures and the stable edges, when the run has them."""
    st = data.get("stability")
    if not isinstance(st, dict):
        return ""
    rows = [[str(p.get("seed")), fmt(p.get("n_edges_kept")), fmt(p.get("faithfulness")),
             " – ".join(fmt(x, 2) for x in (p.get("faithfulness_ci") or [])), fmt(p.get("faithfulness_scoring")),
             fmt(p.get("clean"))] for p in st.get("per_seed") or [] if isinstance(p, dict)]
    seeds = table(["seed", "edges", "held-out faithfulness", "interval", "scoring pairs", "clean metric"], rows,
                  col_classes=["", "num", "num", "", "num", "num"])
    stable = _stable_edges(data)
    listed = "".join(f"<li><code>{esc(a)} → {esc(b)}</code> {f:.0%}</li>" for (a, b), f in list(stable.items())[:60])
    more = f"<p class='note'>… and {len(stable) - 60:,} more.</p>" if len(stable) > 60 else ""
    # a task file's pairs do not change with the seed: only their split into scoring and held-out pairs does
    what = "held-out splits of the same pairs" if st.get("same_pairs") else "draws of pairs"
    return f"""<section id="stability"><h2>Stability across {what}</h2>
<p class="note">The same discovery on {esc(st.get("n_seeds"))} {what} (seeds {esc(", ".join(str(x) for x in st.get("seeds") or []))}).
Held-out faithfulness {html_num(st.get("faithfulness_min"))}–{html_num(st.get("faithfulness_max"))} (mean {html_num(st.get("faithfulness_mean"))});
Jaccard overlap of the chosen circuits {html_num(st.get("jaccard_circuit_mean"))} (lowest pair {html_num(st.get("jaccard_circuit_min"))}),
of their top-{esc(st.get("top"))} edges {html_num(st.get("jaccard_top100_mean"))}. Edges in at least
{esc(f"{finite(st.get('stable_threshold')):.0%}")} of the circuits are <b>stable</b>: drawn with a dark outline above.</p>
{seeds}
<h3>{len(stable):,} stable edges</h3><ul class="stable-list">{listed}</ul>{more}</section>"""


def _graph_background(lay: _Layout) -> str:
    parts = []
    for layer in range(-1, lay.n_layers + 1):
        y = lay.row_y(layer)
        if layer % 2 == 0 and 0 <= layer < lay.n_layers:
            parts.append(f'<rect class="band" x="0" y="{px(y - lay.rh / 2)}" width="{px(lay.width)}" '
                         f'height="{px(lay.rh)}"/>')
        label = "input" if layer < 0 else "logits" if layer == lay.n_layers else f"L{layer}"
        parts.append(f'<text class="row-label" x="{px(lay.left - 12)}" y="{px(y + 4)}">{label}</text>')
    return "".join(parts)


def _node_tip(name: str, desc: str, node_info: dict[str, dict], labels: dict[str, dict] | None = None,
              linked: bool = False) -> str:
    info = node_info.get(name, {})
    tip = f"{name} · {desc}"
    if "score" in info:
        tip += f"\nscore {fmt(info.get('score'), 4)}"
    if info.get("in_circuit"):
        tip += " · in circuit"
    lab = (labels or {}).get(name)
    if lab:
        tip += "\n" + _label_text(lab)
    if linked:
        tip += "\n(click: attention pattern)"
    return tip


# ---- head labels ----------------------------------------------------------------------------
ROLE_TAGS = {"previous-token": "prev", "duplicate-token": "dup", "induction": "ind", "copying": "copy"}


def _labels(data: dict) -> dict[str, dict]:
    """Head name -> label, from ``circuit.json``'s ``labels`` (the ``_meta`` entry left out)."""
    raw = data.get("labels")
    if not isinstance(raw, dict):
        return {}
    return {str(k): v for k, v in raw.items() if isinstance(v, dict) and _is_head(str(k))}


def _label_text(lab: dict) -> str:
    """The label sentence ("a23.h3: copying head (0.95), attends to ..."), control characters of
    tokens made visible."""
    return token_text(lab.get("text") or "")


def _role_class(lab: dict | None) -> str:
    role = (lab or {}).get("role")
    return f" role-{ROLE_TAGS[role]}" if role in ROLE_TAGS else ""


def _att_id(name: str) -> str:
    return f"att-{name}"


def _head_link(name: str, attention: set[str], inner: str) -> str:
    """``inner`` wrapped in a link to the head's heatmap when the page has one."""
    if name in attention:
        return f'<a class="att-link" href="#{esc(_att_id(name))}">{inner}</a>'
    return inner


def _graph_nodes(lay: _Layout, node_info: dict[str, dict], touched: set[str], labels: dict[str, dict] | None = None,
                 attention: set[str] | None = None) -> str:
    labels, attention = labels or {}, attention or set()
    show_tag = lay.cw - 2 * lay.r >= 22  # room for a role tag beside the node

    def state(name: str) -> str:
        return "on" if name in touched else "off"

    parts = ['<g class="nodes">']
    lo, hi = lay.bus
    for name, layer in ((INPUT, -1), (LOGITS, lay.n_layers)):
        y = lay.row_y(layer)
        desc = "token + position embeddings" if name == INPUT else "final residual stream → unembedding"
        parts.append(
            f'<g class="node bus {state(name)} tip" data-n="{name}"><title>{esc(_node_tip(name, desc, node_info))}'
            f'</title><rect x="{px(lo)}" y="{px(y - 9)}" width="{px(hi - lo)}" height="18" rx="9"/>'
            f'<text x="{px((lo + hi) / 2)}" y="{px(y + 4)}">{name}</text></g>'
        )
    for layer in range(lay.n_layers):
        for g in range(max(1, lay.n_kv_heads)):
            xa, xb, y = lay.kv_span(layer, g)
            name = kv_group(layer, g)
            heads = f"heads {g * lay.group}–{(g + 1) * lay.group - 1}" if lay.group > 1 else f"head {g}"
            parts.append(
                f'<g class="kv {state(name)} tip" data-n="{name}"><title>{name} · key/value inputs of KV head '
                f"{g}, shared by {heads}</title>"
                f'<path d="M{px(xa)} {px(y - 4)}V{px(y)}H{px(xb)}V{px(y - 4)}"/></g>'
            )
        for h in range(lay.n_heads):
            x, y = lay.head(layer, h)
            name = head_node(layer, h)
            label = f'<text x="{px(x)}" y="{px(y + 3.2)}">{h}</text>' if lay.r >= 7 else ""
            lab = labels.get(name)
            role = (lab or {}).get("role")
            if show_tag and role in ROLE_TAGS:
                label += f'<text class="role-tag" x="{px(x + lay.r + 2)}" y="{px(y - lay.r + 5)}">{ROLE_TAGS[role]}</text>'
            tip = _node_tip(name, f"attention head {h} of layer {layer}", node_info, labels, name in attention)
            parts.append(_head_link(name, attention,
                f'<g class="node head {state(name)}{_role_class(lab)} tip" data-n="{name}">'
                f"<title>{esc(tip)}</title>"
                f'<circle cx="{px(x)}" cy="{px(y)}" r="{px(lay.r)}"/>{label}</g>'
            ))
        x, y = lay.mlp(layer)
        name = mlp_node(layer)
        parts.append(
            f'<g class="node mlp {state(name)} tip" data-n="{name}">'
            f"<title>{esc(_node_tip(name, f'MLP of layer {layer}', node_info))}</title>"
            f'<rect x="{px(x - lay.m)}" y="{px(y - lay.m)}" width="{px(2 * lay.m)}" height="{px(2 * lay.m)}" '
            f'rx="3"/><text x="{px(x)}" y="{px(y + 3.2)}">M</text></g>'
        )
    parts.append("</g>")
    return "".join(parts)


# ---- faithfulness curve ---------------------------------------------------------------------
def _curve_svg(curve: list[dict], kept: Any, faith: Any) -> str:
    """Faithfulness of the top-n circuits and of random ones against n (log scale), with the
    chosen circuit marked."""
    pts = sorted(
        (finite(p.get("n_edges")), p) for p in curve if finite(p.get("n_edges")) > 0 and p.get("faithfulness") is not None
    )
    if not pts:
        return '<p class="muted">no curve recorded</p>'
    x_lo, x_hi = math.log10(pts[0][0]), math.log10(pts[-1][0])
    pad = max(0.5 - (x_hi - x_lo) / 2, 0.03 * (x_hi - x_lo))
    # NaN (a pair set whose clean and corrupt metrics tie) is a gap, never a point drawn at 0
    ys = [num_or_nan(p["faithfulness"]) for _, p in pts]
    rand = [None if p.get("random") is None else num_or_nan(p["random"]) for _, p in pts]
    vals = [v for v in ys + rand if v is not None and math.isfinite(v)]
    y_lo, y_hi = min(0.0, *vals), max(1.0, *vals)
    pad_y = 0.05 * (y_hi - y_lo)
    ns = [n for n, _ in pts]
    tips = [f"{fmt(int(n))} edges ({fmt(p.get('fraction'), 3)} of all)\nfaithfulness {fmt(p.get('faithfulness'), 4)}\n"
            f"random {fmt(p.get('random'), 4)}" for n, p in pts]
    series = [Series("circuit (top edges by score)", ns, ys, color=POS, width=2.4, cls="faith", tips=tips),
              Series("random edges", ns, rand, color="#9ca3af", dash="6 4", width=2, points=False, cls="random")]
    vlines = []
    if kept is not None and finite(kept) > 0:
        k = min(max(finite(kept), 10 ** (x_lo - pad)), 10 ** (x_hi + pad))
        vlines.append((k, "", "#f59e0b"))
        if faith is not None and math.isfinite(num_or_nan(faith)):
            series.append(Series("chosen circuit", [k], [finite(faith)], color="#f59e0b", dash="3 3", cls="kept",
                                 tips=[f"circuit: {fmt(kept)} edges, faithfulness {fmt(faith, 4)}"]))
    return line_chart(series, xlabel="edges kept (log scale)", ylabel="faithfulness", logx=True, width=820, height=380,
                      xlim=(10 ** (x_lo - pad), 10 ** (x_hi + pad)), ylim=(y_lo - pad_y, y_hi + pad_y), hlines=(0.0, 1.0),
                      vlines=vlines, legend="top", element_id="faithfulness-plot", label="faithfulness curve")


# ---- attention heatmaps ---------------------------------------------------------------------
def _attention_heatmap(name: str, matrix: list, tokens: list[str]) -> str:
    """Head ``name``'s attention pattern on the example (query rows, key columns); causally
    masked cells are left out."""
    n = min(len(tokens), len(matrix))
    if n == 0:
        return ""
    values: list[list[float | None]] = []
    tips: list[list[str]] = []
    for i in range(n):
        row = matrix[i] if isinstance(matrix[i], list) else []
        vals = [min(1.0, max(0.0, finite(row[j]))) if j < len(row) else None for j in range(n)]
        values.append([None if v is None or (j > i and v < 1e-3) else v for j, v in enumerate(vals)])
        tips.append([f"{tokens[i]!s} → {tokens[j]!s}\nquery {i}, key {j}: {finite(v):.3f}" for j, v in enumerate(vals)])
    return heatmap(values, tokens[:n], tokens[:n], vmin=0.0, vmax=1.0, cell=None, tips=tips, dots=True,
                   colorbar=False, label=f"attention pattern of {name}")


# ---- page -----------------------------------------------------------------------------------
def _component_type(name: str) -> tuple[str, str]:
    """(type, layer) of a component name, for the table."""
    n = _node(name)
    if n is None:
        return "—", ""
    if n.kind == "head" and n.port is None:
        return "head", str(n.layer)
    if n.kind == "mlp":
        return "MLP", str(n.layer)
    if n.port is not None:
        return "attn input", str(n.layer)
    return (name, "") if n.kind in ("input", "logits") else ("—", "")


def _stats(data: dict) -> str:
    m = data.get("metrics") or {}
    kept, total = m.get("n_edges_kept"), m.get("n_edges")
    pct = ""
    if isinstance(kept, (int, float)) and isinstance(total, (int, float)) and total:
        pct = f"{pct_text(kept / total)} of {fmt(total)}"
    ci = m.get("faithfulness_ci")
    held = f"on {fmt(m.get('n_held_out_pairs'))} held-out pairs"
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        held += f", {finite(m.get('faithfulness_ci_level') or 0.95):.0%} interval {fmt(ci[0], 2)} to {fmt(ci[1], 2)}"
    dropped = ci_dropped_sentence(m)
    if dropped:
        held += "; the interval is unreliable (see below)"
    return cards([
        ("faithfulness", fmt(m.get("faithfulness")), held, "primary"),
        ("on scoring pairs", fmt(m.get("faithfulness_scoring")),
         "in sample" + (f"; cross-validated {fmt(m.get('faithfulness_cv'))}" if m.get("faithfulness_cv") is not None else ""), ""),
        ("edges kept", fmt(kept), pct or f"of {fmt(total)}", ""),
        ("CPR", fmt(data.get("cpr")), "area under faithfulness curve", ""),
        ("CMD", fmt(data.get("cmd")), "area between curve and 1 (lower is better)", ""),
        ("metric", f"{fmt(m.get('clean'))} / {fmt(m.get('corrupt'))}", "clean / corrupted", ""),
        ("circuit metric", fmt(m.get("circuit")), "with only the circuit's edges", ""),
    ]) + (f'<p class="note warn">Held-out faithfulness interval: {esc(dropped)}</p>' if dropped else "")


def ci_dropped_sentence(m: dict) -> str:
    """The sentence on the held-out bootstrap's left-out resamples (``faithfulness_ci_dropped``, a
    share), as plain text, for the page and for ``discover``'s terminal line; empty when none were
    left out."""
    share = m.get("faithfulness_ci_dropped")
    if not isinstance(share, (int, float)) or isinstance(share, bool) or not share > 0:
        return ""
    how = f"{share:.0%}" if share >= 0.01 else f"{100 * share:.2g}%"
    return (f"{how} of the bootstrap resamples had a clean-corrupt gap under a tenth of the full sample's, or of the "
            "other sign, and were left out: the held-out pairs are too few or too varied for a reliable interval.")


def _selection_text(m: dict) -> str:
    sel = m.get("selection")
    if sel == "cross-validation":
        how = {
            "point-estimate": "the smallest size whose cross-validated faithfulness reaches the target (no size "
                              "reached it at the lower bound of its bootstrap interval)",
            "plateau": (f"no size below the full model reached the target {fmt(m.get('target'))}: the smallest size "
                        f"holding {m.get('plateau') or 0.9:.0%} of the best cross-validated faithfulness of any partial circuit, the knee of "
                        "the curve"),
            "all-edges": "no partial circuit carried the behaviour: every edge",
        }.get(str(m.get("size_rule")), "the smallest size whose cross-validated faithfulness reaches the target at "
                                       "the lower bound of its bootstrap interval")
        return (f"by {fmt(m.get('n_folds'))}-fold cross-validation inside the scoring pairs ({how}; "
                f"estimate {fmt(m.get('faithfulness_cv'))})")
    return {"acdc": "by ACDC's own pruning", "edges": "by the requested edge count",
            "threshold": "by the score threshold"}.get(str(sel), "on the scoring pairs")


def _role_cell(name: str, lab: dict | None) -> str:
    """The label sentence without the leading head name, the role in its colour."""
    if not lab:
        return ""
    text = _label_text(lab)
    if text.startswith(f"{name}: "):
        text = text[len(name) + 2:]
    role = lab.get("role")
    if role in ROLE_TAGS:
        cut = text.find(")")
        if cut > 0 and text.startswith(role):
            return f'<span class="role-name{_role_class(lab)}">{esc(text[:cut + 1])}</span>{esc(text[cut + 1:])}'
    return esc(text)


def _components_table(data: dict, node_info: dict[str, dict], labels: dict[str, dict] | None = None,
                      attention: set[str] | None = None) -> str:
    labels, attention = labels or {}, attention or set()
    comps = [c for c in (data.get("top_components") or []) if isinstance(c, dict)]
    if not comps:
        return '<p class="muted">No component scores recorded.</p>'
    top = max(abs(finite(c.get("score"))) for c in comps) or 1.0
    with_roles = bool(labels)
    rows = []
    for i, c in enumerate(comps, 1):
        name, score = str(c.get("name")), finite(c.get("score"))
        kind, layer = _component_type(name)
        row = [str(i), Html(_head_link(name, attention, f"<code>{esc(name)}</code>")), kind, layer,
               fmt(c.get("score"), 4), bar_cell(score, top), "✓" if node_info.get(name, {}).get("in_circuit") else ""]
        rows.append(row + [Html(_role_cell(name, labels.get(name)))] if with_roles else row)
    headers = ["#", "component", "type", "layer", "score", "", "circuit"] + (["role, attention on the example"] if with_roles else [])
    return table(headers, rows, cls="components with-roles" if with_roles else "components",
                 col_classes=["num", "", "", "num", "num", "barcell", "c", "role"])


def _roles_section(data: dict, labels: dict[str, dict], attention: set[str]) -> str:
    """Every labelled head: role, where it attends on the example, node score."""
    if not labels:
        return ""
    meta = (data.get("labels") or {}).get("_meta") or {}
    heads = sorted(labels, key=lambda n: -abs(finite(labels[n].get("node_score"))))
    counts: dict[str, int] = {}
    for n in heads:
        role = labels[n].get("role") or "no role"
        counts[role] = counts.get(role, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    rows = [[Html(_head_link(n, attention, f"<code>{esc(n)}</code>")), fmt(labels[n].get("node_score"), 3),
             "✓" if labels[n].get("in_circuit") else "", Html(_role_cell(n, labels[n])),
             *(fmt((labels[n].get("scores") or {}).get(c), 2) for c in ROLE_TAGS)] for n in heads]
    th = meta.get("thresholds") or {}
    thr = ", ".join(f"{k} ≥ {v:g}" for k, v in th.items() if isinstance(v, (int, float)))
    q_tok, ans, dis = meta.get("query_token"), meta.get("answer"), meta.get("distractor")
    where = ""
    if q_tok is not None:
        where = (f" Attention is read on the example prompt below, from the final scored position "
                 f"(token {esc(repr(token_text(q_tok)))}, position {esc(meta.get('query_position'))}); the answer token is "
                 f"{esc(repr(token_text(ans)))}" + (f", the distractor {esc(repr(token_text(dis)))}" if dis else "") + ".")
    note = (f'<p class="note">{len(heads)} heads ({esc(summary)}). Roles from the head taxonomy of '
            f"<code>mechscope heads</code> (scores on repeated random tokens; copying: OV-circuit eigenvalues); "
            f"a category counts at {esc(thr)}, and the role is the category exceeded by the largest factor.{where}"
            f' Scores from <code>{esc(meta.get("heads_source", "?"))}</code>.</p>')
    roles = table(["head", "score", "circuit", "role, attention on the example", *ROLE_TAGS], rows, cls="components roles",
                  col_classes=["", "num", "c", "role", *["num"] * len(ROLE_TAGS)])
    return f"<section><h2>Head roles</h2>{note}{roles}</section>"


def _attention_section(data: dict, node_info: dict[str, dict], labels: dict[str, dict] | None = None) -> str:
    labels = labels or {}
    ex = data.get("example")
    if not isinstance(ex, dict):
        return '<p class="muted">No example prompt recorded.</p>'
    tokens = [str(t) for t in (ex.get("tokens") or [])]
    chips = "".join(f'<span class="tok-chip" title="{esc(repr(t))}">{esc(token_text(t, 40, dots=True))}</span>' for t in tokens)
    out = [f'<div class="prompt"><div class="label">prompt</div><pre>{esc(ex.get("prompt", ""))}</pre>'
           f'<div class="chips">{chips}</div></div><div class="heatmaps">']
    for name, matrix in (ex.get("attention") or {}).items():
        if not isinstance(matrix, list):
            continue
        score = node_info.get(str(name), {}).get("score")
        lab = labels.get(str(name))
        role = f'<div class="hm-label">{_role_cell(str(name), lab)}</div>' if lab else ""
        out.append(f'<figure id="{esc(_att_id(str(name)))}"><figcaption><code>{esc(name)}</code><span class="muted"> score '
                   f"{html_num(score, 3)}</span>{role}</figcaption>{_attention_heatmap(str(name), matrix, tokens)}</figure>")
    n_all, n_shown = ex.get("n_heads"), len(ex.get("attention") or {})
    more = (f" {n_shown} of the {n_all} heads, the largest |score| first." if isinstance(n_all, int) and n_all > n_shown
            else "")
    out.append('</div><p class="note">Rows are query positions, columns key positions; darker = more attention.'
               f"{esc(more)}</p>")
    return "".join(out)


_LEGEND = (
    '<div class="legend"><span><svg width="28" height="10"><line class="lk-pos" x1="1" y1="5" x2="27" y2="5"/></svg>'
    'positive</span><span><svg width="28" height="10"><line class="lk-neg" x1="1" y1="5" x2="27" y2="5"/></svg>'
    'negative</span>'
    '<span><svg width="28" height="10"><line class="lk-q" x1="1" y1="5" x2="27" y2="5"/></svg>query / MLP / logits</span>'
    '<span><svg width="28" height="10"><line class="lk-k" x1="1" y1="5" x2="27" y2="5"/></svg>key</span>'
    '<span><svg width="28" height="10"><line class="lk-v" x1="1" y1="5" x2="27" y2="5"/></svg>value</span>'
    '<span><svg width="30" height="12"><path class="lk-kv" d="M2 3V9H28V3"/></svg>KV group (k/v edges end here)</span>'
    '<span><svg width="14" height="14"><circle class="lk-on" cx="7" cy="7" r="6"/></svg>in circuit</span>'
    '<span><svg width="14" height="14"><circle class="lk-off" cx="7" cy="7" r="6"/></svg>not touched</span></div>'
)


def _role_legend(labels: dict[str, dict]) -> str:
    roles = {lab.get("role") for lab in labels.values()}
    items = "".join(
        f'<span><svg width="14" height="14"><circle class="lk-role role-{tag}" cx="7" cy="7" r="6"/></svg>'
        f"{esc(tag)}: {esc(role)} head</span>" for role, tag in ROLE_TAGS.items() if role in roles)
    return f'<div class="legend roles-legend">{items}<span>click a head: its attention pattern</span></div>' if items else ""


def render_circuit(data: dict) -> str:
    """The circuit page for a parsed ``circuit.json`` (schema version 1) as an HTML string."""
    model = data.get("model") or {}
    node_info = {str(n.get("name")): n for n in (data.get("nodes") or []) if isinstance(n, dict)}
    layers = [int(finite(n.get("layer"))) for n in node_info.values() if n.get("type") in ("head", "mlp")]
    n_layers = int(model.get("n_layers") or (max(layers) + 1 if layers else 1))
    n_heads = int(model.get("n_heads") or 1)
    n_kv = int(model.get("n_kv_heads") or n_heads)
    lay = _Layout(n_layers, n_heads, n_kv if n_kv and n_heads % n_kv == 0 else n_heads)
    labels = _labels(data)
    ex = data.get("example")
    att = ex.get("attention") if isinstance(ex, dict) else None
    attention = {str(k) for k, v in att.items() if isinstance(v, list)} if isinstance(att, dict) else set()
    graph, dropped = _graph_svg(data, lay, node_info, labels, attention)
    m = data.get("metrics") or {}
    n_drawn = sum(1 for ed in (data.get("edges") or []) if ed.get("in_circuit")) - dropped
    title = f"{data.get('task', 'circuit')} circuit · {model.get('name', 'model')}"
    note = f" The {dropped:,} weakest circuit edges are not drawn." if dropped else ""
    gqa = f", {n_kv} KV heads" if n_kv != n_heads else ""
    main_keys = {"clean", "corrupt", "circuit", "faithfulness", "n_edges", "n_edges_kept"}
    header = (f'<p class="meta">method <b>{esc(data.get("method", "?"))}</b> · {n_layers} layers, {n_heads} heads{esc(gqa)}'
              f' · schema v{esc(data.get("schema_version", "?"))}</p>\n{_stats(data)}\n'
              f'<div class="details">{kv_table("settings", (data.get("settings") or {}).items())}\n'
              f'{kv_table("model", model.items())}\n'
              f'{kv_table("other metrics", ((k, v) for k, v in m.items() if k not in main_keys))}</div>\n')
    heading = (f'{esc(data.get("task", "circuit"))} <span class="muted">circuit in</span> '
               f'{esc(model.get("name", "model"))}')
    body = f"""<section><h2>Circuit</h2>
<p class="note">{max(0, n_drawn):,} circuit edges drawn; hover an edge or node for its score, hover a node to
highlight its edges.{note}</p>
{_LEGEND}
{_role_legend(labels)}
<label class="toggle"><input type="checkbox" id="show-context"> also show the {N_CONTEXT_EDGES} strongest
edges outside the circuit (faint)</label>
<div class="graph-wrap">{graph}</div></section>
<section><h2>Faithfulness curve</h2>
<p class="note">Faithfulness on the held-out pairs of circuits made of the top-<i>n</i> edges by score, against
circuits of <i>n</i> random edges. 1 = the full model's behaviour, 0 = the corrupted run's. The circuit's size
was chosen {esc(_selection_text(m))}; the held-out pairs played no part in it.</p>
<div class="plot-wrap">{_curve_svg(list(data.get("curve") or []), m.get("n_edges_kept"), m.get("faithfulness"))}</div>
</section>
<section><h2>Top components</h2>{_components_table(data, node_info, labels, attention)}</section>
{_stability_section(data)}
{_roles_section(data, labels, attention)}
<section><h2>Attention of the circuit's heads</h2>{_attention_section(data, node_info, labels)}</section>"""
    return page(title, body, kind="circuit discovery", heading=heading, header=header, css=["circuit.css"],
                js=["tooltip.js", "circuit.js"])


def write_circuit(data: dict, path: str | Path) -> Path:
    """Write the circuit page for a parsed ``circuit.json`` to ``path`` (a directory gets
    ``report.html``); returns the file's path."""
    out = Path(path)
    return write_page(render_circuit(data), out / "report.html" if out.is_dir() else out)
