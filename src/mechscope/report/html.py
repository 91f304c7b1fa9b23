"""Render a circuit-discovery result (``circuit.json``) as one self-contained HTML page.

Everything is drawn here, in Python, as inline SVG; ``assets/report.css`` and
``assets/report.js`` are read at render time and inlined, so the page needs no network. The JS
only adds a hover tooltip and node/edge highlighting: without it the SVG ``<title>`` children
still give native tooltips. Every string taken from the data goes through ``html.escape``, and no
data is embedded inside ``<script>``.

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

import html
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from mechscope.errors import MechscopeError
from mechscope.graph.names import INPUT, LOGITS, Node, head_node, kv_group, mlp_node, parse_node

__all__ = ["render_circuit_report", "write_circuit_report"]

MAX_CIRCUIT_EDGES = 3000  # draw at most this many in-circuit edges (the strongest)
N_CONTEXT_EDGES = 200  # strongest out-of-circuit edges, drawn faint behind a toggle
POS, NEG = "#2563eb", "#dc2626"


def e(value: Any) -> str:
    """HTML-escape anything (quotes included, so the result is safe in attributes too)."""
    return html.escape(str(value), quote=True)


def _num(x: Any) -> float:
    """A finite float for geometry (missing or non-finite values count as 0)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


def fmt(x: Any, digits: int = 3) -> str:
    """A short human-readable number; '—' for missing values."""
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e4 else f"{x:.{digits}f}".rstrip("0").rstrip(".") or "0"


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


def _f(x: float) -> str:
    """Compact coordinate for SVG output."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


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
            x, y = self.head(n.layer, n.head)
            return x, y - self.r
        if n.kind == "mlp":
            x, y = self.mlp(n.layer)
            return x, y - self.m
        raise ValueError(name)

    def receiver(self, name: str) -> tuple[float, float] | None:
        n = _node(name)
        if n is None:
            raise ValueError(name)
        if n.kind == "logits":
            return None
        if n.kind == "head" and n.port == "q":
            x, y = self.head(n.layer, n.head)
            return x, y + self.r
        if n.kind == "kv" and n.port is not None:
            xa, xb, y = self.kv_span(n.layer, n.head)
            frac = 1 / 3 if n.port == "k" else 2 / 3
            return xa + (xb - xa) * frac, y
        if n.kind == "mlp":
            x, y = self.mlp(n.layer)
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
            return f"M{_f(self.left)} {_f(y_in)}V{_f(y_out)}"
        if s is None:
            x = self.lane(d[0])
            return (f"M{_f(x)} {_f(y_in)}V{_f(d[1] + 24)}C{_f(x)} {_f(d[1] + 12)} {_f(d[0])} {_f(d[1] + 12)} "
                    f"{_f(d[0])} {_f(d[1])}")
        if d is None:
            x = self.lane(s[0])
            return (f"M{_f(s[0])} {_f(s[1])}C{_f(s[0])} {_f(s[1] - 12)} {_f(x)} {_f(s[1] - 12)} {_f(x)} "
                    f"{_f(s[1] - 24)}V{_f(y_out)}")
        c = max(14.0, 0.45 * (s[1] - d[1]))
        return (f"M{_f(s[0])} {_f(s[1])}C{_f(s[0])} {_f(s[1] - c)} {_f(d[0])} {_f(d[1] + c)} "
                f"{_f(d[0])} {_f(d[1])}")


def _receiver_targets(dst: str, group: int) -> tuple[str, list[str]]:
    """(marker key the edge ends at, node names it touches) for a receiver name."""
    n = _node(dst)
    if n is not None and n.kind == "head" and n.port == "q":
        name = head_node(n.layer, n.head)
        return name, [name]
    if n is not None and n.kind == "kv" and n.port is not None:
        g = n.head
        return kv_group(n.layer, g), [head_node(n.layer, h) for h in range(g * group, (g + 1) * group)]
    return dst, [dst]


def _edge_kind(dst: str) -> str:
    """q, k or v for an attention-input receiver; r (residual reader: MLP or logits) otherwise."""
    n = _node(dst)
    return n.port if n is not None and n.port is not None else "r"


_KIND_TEXT = {"q": "query input", "k": "key input", "v": "value input", "r": "input"}


def _select_edges(edges: list[dict]) -> tuple[list[dict], list[dict], int]:
    """(in-circuit edges to draw, faint context edges, in-circuit edges not drawn)."""
    kept = [ed for ed in edges if ed.get("in_circuit")]
    kept.sort(key=lambda ed: abs(_num(ed.get("score"))), reverse=True)
    dropped = max(0, len(kept) - MAX_CIRCUIT_EDGES)
    kept = kept[:MAX_CIRCUIT_EDGES]
    rest = [ed for ed in edges if not ed.get("in_circuit")]
    rest.sort(key=lambda ed: abs(_num(ed.get("score"))), reverse=True)
    return kept, rest[:N_CONTEXT_EDGES], dropped


def _graph_svg(data: dict, lay: _Layout, node_info: dict[str, dict], labels: dict[str, dict] | None = None,
               attention: set[str] | None = None) -> tuple[str, int]:
    """The circuit as inline SVG and the number of in-circuit edges left out of the drawing."""
    kept, context, dropped = _select_edges(list(data.get("edges") or []))
    scale = max([abs(_num(ed.get("score"))) for ed in kept + context] + [1e-12])
    stable = _stable_edges(data)
    touched: set[str] = set()
    edge_svg: list[str] = []
    for cls, group in (("edge ctx", context), ("edge", kept)):
        for ed in sorted(group, key=lambda ed: abs(_num(ed.get("score")))):  # strongest on top
            src, dst = str(ed.get("src")), str(ed.get("dst"))
            try:
                d = lay.edge_path(src, dst)
            except ValueError:
                continue
            marker, names = _receiver_targets(dst, lay.group)
            if cls == "edge":
                touched.update((src, marker))
            score = _num(ed.get("score"))
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
                f'<g class="{cls}{st} k-{kind} tip" data-n="{e(" ".join([src, marker, *names]))}">'
                f"<title>{e(tip)}</title>"
                f'<path class="hit" d="{d}"/>'
                f'<path class="vis" d="{d}" stroke="{POS if score >= 0 else NEG}" '
                f'stroke-width="{_f(width)}" stroke-opacity="{opacity:.2f}"/></g>'
            )
    if not kept:  # nothing kept: fall back on the nodes' own flags
        touched = {n for n, info in node_info.items() if info.get("in_circuit")}

    out = [
        f'<svg id="circuit-graph" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_f(lay.width)} '
        f'{_f(lay.height)}" width="{_f(max(lay.width, 560.0))}" role="img" aria-label="circuit graph">'
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
            out[(str(row[0]), str(row[1]))] = _num(row[2])
    return out


def _stability_section(data: dict) -> str:
    """Across-seed figures and the stable edges, when the run has them."""
    st = data.get("stability")
    if not isinstance(st, dict):
        return ""
    rows = "".join(
        f"<tr><td>{e(p.get('seed'))}</td><td>{e(fmt(p.get('n_edges_kept')))}</td><td>{e(fmt(p.get('faithfulness')))}</td>"
        f"<td>{e(' – '.join(fmt(x, 2) for x in (p.get('faithfulness_ci') or [])))}</td>"
        f"<td>{e(fmt(p.get('faithfulness_scoring')))}</td><td>{e(fmt(p.get('clean')))}</td></tr>"
        for p in st.get("per_seed") or [] if isinstance(p, dict))
    stable = _stable_edges(data)
    listed = "".join(f"<li><code>{e(a)} → {e(b)}</code> {f:.0%}</li>" for (a, b), f in list(stable.items())[:60])
    more = f"<p class='note'>… and {len(stable) - 60:,} more.</p>" if len(stable) > 60 else ""
    return f"""<section id="stability"><h2>Stability across draws of pairs</h2>
<p class="note">The same discovery on {e(st.get("n_seeds"))} draws of pairs (seeds {e(", ".join(str(x) for x in st.get("seeds") or []))}).
Held-out faithfulness {e(fmt(st.get("faithfulness_min")))}–{e(fmt(st.get("faithfulness_max")))} (mean {e(fmt(st.get("faithfulness_mean")))});
Jaccard overlap of the chosen circuits {e(fmt(st.get("jaccard_circuit_mean")))} (lowest pair {e(fmt(st.get("jaccard_circuit_min")))}),
of their top-{e(st.get("top"))} edges {e(fmt(st.get("jaccard_top100_mean")))}. Edges in at least
{e(f"{_num(st.get('stable_threshold')):.0%}")} of the circuits are <b>stable</b>: drawn with a dark outline above.</p>
<table class="data"><thead><tr><th>seed</th><th>edges</th><th>held-out faithfulness</th><th>interval</th>
<th>scoring pairs</th><th>clean metric</th></tr></thead><tbody>{rows}</tbody></table>
<h3>{len(stable):,} stable edges</h3><ul class="stable-list">{listed}</ul>{more}</section>"""


def _graph_background(lay: _Layout) -> str:
    parts = []
    for layer in range(-1, lay.n_layers + 1):
        y = lay.row_y(layer)
        if layer % 2 == 0 and 0 <= layer < lay.n_layers:
            parts.append(f'<rect class="band" x="0" y="{_f(y - lay.rh / 2)}" width="{_f(lay.width)}" '
                         f'height="{_f(lay.rh)}"/>')
        label = "input" if layer < 0 else "logits" if layer == lay.n_layers else f"L{layer}"
        parts.append(f'<text class="row-label" x="{_f(lay.left - 12)}" y="{_f(y + 4)}">{label}</text>')
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


def _shown_text(s: Any) -> str:
    return str(s).replace("\n", "↵").replace("\t", "⇥")


def _label_text(lab: dict) -> str:
    """The label sentence ("a23.h3: copying head (0.95), attends to ..."), control characters of
    tokens made visible."""
    return _shown_text(lab.get("text") or "")


def _role_class(lab: dict | None) -> str:
    role = (lab or {}).get("role")
    return f" role-{ROLE_TAGS[role]}" if role in ROLE_TAGS else ""


def _att_id(name: str) -> str:
    return f"att-{name}"


def _head_link(name: str, attention: set[str], inner: str) -> str:
    """``inner`` wrapped in a link to the head's heatmap when the page has one."""
    if name in attention:
        return f'<a class="att-link" href="#{e(_att_id(name))}">{inner}</a>'
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
            f'<g class="node bus {state(name)} tip" data-n="{name}"><title>{e(_node_tip(name, desc, node_info))}'
            f'</title><rect x="{_f(lo)}" y="{_f(y - 9)}" width="{_f(hi - lo)}" height="18" rx="9"/>'
            f'<text x="{_f((lo + hi) / 2)}" y="{_f(y + 4)}">{name}</text></g>'
        )
    for layer in range(lay.n_layers):
        for g in range(max(1, lay.n_kv_heads)):
            xa, xb, y = lay.kv_span(layer, g)
            name = kv_group(layer, g)
            heads = f"heads {g * lay.group}–{(g + 1) * lay.group - 1}" if lay.group > 1 else f"head {g}"
            parts.append(
                f'<g class="kv {state(name)} tip" data-n="{name}"><title>{name} · key/value inputs of KV head '
                f"{g}, shared by {heads}</title>"
                f'<path d="M{_f(xa)} {_f(y - 4)}V{_f(y)}H{_f(xb)}V{_f(y - 4)}"/></g>'
            )
        for h in range(lay.n_heads):
            x, y = lay.head(layer, h)
            name = head_node(layer, h)
            label = f'<text x="{_f(x)}" y="{_f(y + 3.2)}">{h}</text>' if lay.r >= 7 else ""
            lab = labels.get(name)
            role = (lab or {}).get("role")
            if show_tag and role in ROLE_TAGS:
                label += f'<text class="role-tag" x="{_f(x + lay.r + 2)}" y="{_f(y - lay.r + 5)}">{ROLE_TAGS[role]}</text>'
            tip = _node_tip(name, f"attention head {h} of layer {layer}", node_info, labels, name in attention)
            parts.append(_head_link(name, attention,
                f'<g class="node head {state(name)}{_role_class(lab)} tip" data-n="{name}">'
                f"<title>{e(tip)}</title>"
                f'<circle cx="{_f(x)}" cy="{_f(y)}" r="{_f(lay.r)}"/>{label}</g>'
            ))
        x, y = lay.mlp(layer)
        name = mlp_node(layer)
        parts.append(
            f'<g class="node mlp {state(name)} tip" data-n="{name}">'
            f"<title>{e(_node_tip(name, f'MLP of layer {layer}', node_info))}</title>"
            f'<rect x="{_f(x - lay.m)}" y="{_f(y - lay.m)}" width="{_f(2 * lay.m)}" height="{_f(2 * lay.m)}" '
            f'rx="3"/><text x="{_f(x)}" y="{_f(y + 3.2)}">M</text></g>'
        )
    parts.append("</g>")
    return "".join(parts)


# ---- faithfulness curve ---------------------------------------------------------------------
def _nice_step(span: float, target: int = 6) -> float:
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _count_label(n: float) -> str:
    for div, suf in ((1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:g}{suf}"
    return f"{n:g}"


def _curve_svg(curve: list[dict], kept: Any, faith: Any) -> str:
    pts = sorted(
        (_num(p.get("n_edges")), p) for p in curve if _num(p.get("n_edges")) > 0 and p.get("faithfulness") is not None
    )
    W, H, ml, mr, mt, mb = 820.0, 380.0, 60.0, 24.0, 44.0, 52.0
    head = (f'<svg id="faithfulness-plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_f(W)} {_f(H)}" '
            f'width="{_f(W)}" role="img" aria-label="faithfulness curve">')
    if not pts:
        return head + f'<text class="empty" x="{_f(W / 2)}" y="{_f(H / 2)}">no curve recorded</text></svg>'
    x_lo, x_hi = math.log10(pts[0][0]), math.log10(pts[-1][0])
    pad = max(0.5 - (x_hi - x_lo) / 2, 0.03 * (x_hi - x_lo))
    x_lo, x_hi = x_lo - pad, x_hi + pad
    vals = [_num(p["faithfulness"]) for _, p in pts] + [_num(p["random"]) for _, p in pts if p.get("random") is not None]
    y_lo, y_hi = min(0.0, *vals), max(1.0, *vals)
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def X(n: float) -> float:
        return ml + (math.log10(n) - x_lo) / (x_hi - x_lo) * (W - ml - mr)

    def Y(v: float) -> float:
        return H - mb - (v - y_lo) / (y_hi - y_lo) * (H - mt - mb)

    out = [head, '<g class="grid">']
    few = x_hi - x_lo < 2.5  # few decades: label 2x and 5x too
    for k in range(math.floor(x_lo), math.ceil(x_hi) + 1):
        for m in range(1, 10):
            n = m * 10**k
            if not x_lo <= math.log10(n) <= x_hi:
                continue
            x = _f(X(n))
            if m == 1 or (few and m in (2, 5)):
                out.append(f'<line x1="{x}" x2="{x}" y1="{_f(mt)}" y2="{_f(H - mb)}"/>'
                           f'<text class="tick" x="{x}" y="{_f(H - mb + 16)}">{_count_label(n)}</text>')
            out.append(f'<line class="minor" x1="{x}" x2="{x}" y1="{_f(H - mb)}" y2="{_f(H - mb + 4)}"/>')
    step = _nice_step(y_hi - y_lo)
    v = math.ceil(y_lo / step) * step
    while v <= y_hi + 1e-9:
        cls = ' class="ref"' if abs(v) < 1e-9 or abs(v - 1) < 1e-9 else ""
        out.append(f'<line{cls} x1="{_f(ml)}" x2="{_f(W - mr)}" y1="{_f(Y(v))}" y2="{_f(Y(v))}"/>')
        out.append(f'<text class="tick y" x="{_f(ml - 8)}" y="{_f(Y(v) + 4)}">{v:g}</text>')
        v += step
    out.append("</g>")
    out.append(f'<text class="axis" x="{_f((ml + W - mr) / 2)}" y="{_f(H - 10)}">edges kept (log scale)</text>')
    out.append(f'<text class="axis" transform="rotate(-90)" x="{_f(-(mt + H - mb) / 2)}" y="16">faithfulness</text>')
    if kept is not None and _num(kept) > 0:
        x = X(min(max(_num(kept), 10**x_lo), 10**x_hi))
        out.append(f'<line class="kept" x1="{_f(x)}" x2="{_f(x)}" y1="{_f(mt)}" y2="{_f(H - mb)}"/>')
        if faith is not None:
            out.append(f'<circle class="kept-dot tip" cx="{_f(x)}" cy="{_f(Y(_num(faith)))}" r="5.5"><title>'
                       f'circuit: {e(fmt(kept))} edges, faithfulness {e(fmt(faith, 4))}</title></circle>')
    # random baseline: broken wherever a point has no value
    segs: list[list[str]] = [[]]
    for n, p in pts:
        if p.get("random") is None:
            segs.append([])
        else:
            segs[-1].append(f"{_f(X(n))},{_f(Y(_num(p['random'])))}")
    for seg in segs:
        if len(seg) > 1:
            out.append(f'<polyline class="line random" points="{" ".join(seg)}"/>')
    line = " ".join(f"{_f(X(n))},{_f(Y(_num(p['faithfulness'])))}" for n, p in pts)
    out.append(f'<polyline class="line faith" points="{line}"/>')
    for n, p in pts:
        tip = (f"{fmt(int(n))} edges ({fmt(p.get('fraction'), 3)} of all)\nfaithfulness "
               f"{fmt(p.get('faithfulness'), 4)}\nrandom {fmt(p.get('random'), 4)}")
        out.append(f'<circle class="pt tip" cx="{_f(X(n))}" cy="{_f(Y(_num(p["faithfulness"])))}" r="3">'
                   f"<title>{e(tip)}</title></circle>")
    legend = [("faith", "circuit (top edges by score)"), ("random", "random edges"), ("kept", "chosen circuit")]
    x = ml
    for cls, text in legend:
        out.append(f'<line class="line {cls}" x1="{_f(x)}" x2="{_f(x + 26)}" y1="18" y2="18"/>'
                   f'<text class="legend" x="{_f(x + 32)}" y="22">{text}</text>')
        x += 46 + 6.4 * len(text)
    out.append("</svg>")
    return "".join(out)


# ---- attention heatmaps ---------------------------------------------------------------------
def _token_label(tok: Any, limit: int = 12) -> str:
    s = str(tok).replace("\n", "↵").replace("\t", "⇥").replace(" ", "·")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _heatmap_svg(name: str, matrix: list, tokens: list[str]) -> str:
    n = min(len(tokens), len(matrix))
    if n == 0:
        return ""
    cell = max(5.0, min(18.0, 300.0 / n))
    labels = [_token_label(t) for t in tokens[:n]]
    show = cell >= 8
    lab_w = min(84.0, 6.0 * max(len(s) for s in labels)) + 8 if show else 6.0
    left, top = lab_w, 6.0
    size = n * cell
    bottom = lab_w * 0.8 + 6 if show else 6.0
    W, H = left + size + 6, top + size + bottom
    out = [f'<svg class="heatmap" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_f(W)} {_f(H)}" '
           f'width="{_f(W)}" role="img" aria-label="attention pattern of {e(name)}">',
           f'<rect class="hm-bg" x="{_f(left)}" y="{_f(top)}" width="{_f(size)}" height="{_f(size)}"/>']
    for i in range(n):
        row = matrix[i] if isinstance(matrix[i], list) else []
        for j in range(min(n, len(row))):
            v = min(1.0, max(0.0, _num(row[j])))
            if j > i and v < 1e-3:
                continue  # causally masked
            tip = f"{tokens[i]!s} → {tokens[j]!s}\nquery {i}, key {j}: {v:.3f}"
            out.append(f'<rect class="tip" x="{_f(left + j * cell)}" y="{_f(top + i * cell)}" width="{_f(cell)}" '
                       f'height="{_f(cell)}" fill-opacity="{v:.3f}"><title>{e(tip)}</title></rect>')
    if show:
        for i, s in enumerate(labels):
            c = top + (i + 0.5) * cell
            out.append(f'<text class="tok q" x="{_f(left - 4)}" y="{_f(c + 3.5)}">{e(s)}</text>')
            x, y = left + (i + 0.5) * cell + 3.5, top + size + 6
            out.append(f'<text class="tok k" transform="rotate(-55 {_f(x)} {_f(y)})" x="{_f(x)}" y="{_f(y)}">'
                       f"{e(s)}</text>")
    out.append("</svg>")
    return "".join(out)


# ---- page -----------------------------------------------------------------------------------
def _asset(name: str) -> str:
    return resources.files("mechscope.report").joinpath("assets", name).read_text(encoding="utf-8")


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
        pct = f"{100 * kept / total:.2g}% of {fmt(total)}"
    ci = m.get("faithfulness_ci")
    held = f"on {fmt(m.get('n_held_out_pairs'))} held-out pairs"
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        held += f", {_num(m.get('faithfulness_ci_level') or 0.95):.0%} interval {fmt(ci[0], 2)}–{fmt(ci[1], 2)}"
    cards = [
        ("faithfulness", fmt(m.get("faithfulness")), held, "primary"),
        ("on scoring pairs", fmt(m.get("faithfulness_scoring")),
         "in sample" + (f"; cross-validated {fmt(m.get('faithfulness_cv'))}" if m.get("faithfulness_cv") is not None else ""), ""),
        ("edges kept", fmt(kept), pct or f"of {fmt(total)}", ""),
        ("CPR", fmt(data.get("cpr")), "area under faithfulness curve", ""),
        ("CMD", fmt(data.get("cmd")), "area between curve and 1 (lower is better)", ""),
        ("metric", f"{fmt(m.get('clean'))} / {fmt(m.get('corrupt'))}", "clean / corrupted", ""),
        ("circuit metric", fmt(m.get("circuit")), "with only the circuit's edges", ""),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card {cls}"><div class="label">{e(lab)}</div><div class="value">{e(val)}</div>'
        f'<div class="sub">{e(sub)}</div></div>'
        for lab, val, sub, cls in cards
    ) + "</div>"


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


def _kv_table(title: str, items: Iterable[tuple[Any, Any]]) -> str:
    rows = "".join(
        f"<tr><th>{e(k)}</th><td>{e(fmt(v, 4) if isinstance(v, (int, float)) else json.dumps(v, default=str))}</td></tr>"
        for k, v in items
    )
    return f"<details><summary>{e(title)}</summary><table class=\"kv\">{rows}</table></details>" if rows else ""


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
            return f'<span class="role-name{_role_class(lab)}">{e(text[:cut + 1])}</span>{e(text[cut + 1:])}'
    return e(text)


def _components_table(data: dict, node_info: dict[str, dict], labels: dict[str, dict] | None = None,
                      attention: set[str] | None = None) -> str:
    labels, attention = labels or {}, attention or set()
    comps = [c for c in (data.get("top_components") or []) if isinstance(c, dict)]
    if not comps:
        return '<p class="muted">No component scores recorded.</p>'
    top = max(abs(_num(c.get("score"))) for c in comps) or 1.0
    with_roles = bool(labels)
    rows = []
    for i, c in enumerate(comps, 1):
        name, score = str(c.get("name")), _num(c.get("score"))
        kind, layer = _component_type(name)
        mark = "✓" if node_info.get(name, {}).get("in_circuit") else ""
        bar = (f'<span class="bar {"neg" if score < 0 else "pos"}" '
               f'style="width:{100 * abs(score) / top:.1f}%"></span>')
        role = f'<td class="role">{_role_cell(name, labels.get(name))}</td>' if with_roles else ""
        rows.append(f"<tr><td class=\"num\">{i}</td><td>{_head_link(name, attention, f'<code>{e(name)}</code>')}</td>"
                    f"<td>{e(kind)}</td>"
                    f"<td class=\"num\">{e(layer)}</td><td class=\"num\">{e(fmt(c.get('score'), 4))}</td>"
                    f"<td class=\"barcell\">{bar}</td><td class=\"c\">{mark}</td>{role}</tr>")
    role_th = "<th>role, attention on the example</th>" if with_roles else ""
    cls = "components with-roles" if with_roles else "components"
    return (f'<table class="{cls}"><thead><tr><th>#</th><th>component</th><th>type</th><th>layer</th>'
            f'<th>score</th><th></th><th>circuit</th>{role_th}</tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def _roles_section(data: dict, labels: dict[str, dict], attention: set[str]) -> str:
    """Every labelled head: role, where it attends on the example, node score."""
    if not labels:
        return ""
    meta = (data.get("labels") or {}).get("_meta") or {}
    heads = sorted(labels, key=lambda n: -abs(_num(labels[n].get("node_score"))))
    counts: dict[str, int] = {}
    for n in heads:
        role = labels[n].get("role") or "no role"
        counts[role] = counts.get(role, 0) + 1
    summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    rows = []
    for n in heads:
        lab = labels[n]
        sc = lab.get("scores") or {}
        cells = "".join(f'<td class="num">{e(fmt(sc.get(c), 2))}</td>' for c in ROLE_TAGS)
        rows.append(f"<tr><td>{_head_link(n, attention, f'<code>{e(n)}</code>')}</td>"
                    f'<td class="num">{e(fmt(lab.get("node_score"), 3))}</td><td class="c">{"✓" if lab.get("in_circuit") else ""}</td>'
                    f'<td class="role">{_role_cell(n, lab)}</td>{cells}</tr>')
    th = meta.get("thresholds") or {}
    thr = ", ".join(f"{k} ≥ {v:g}" for k, v in th.items() if isinstance(v, (int, float)))
    q_tok, ans, dis = meta.get("query_token"), meta.get("answer"), meta.get("distractor")
    where = ""
    if q_tok is not None:
        where = (f" Attention is read on the example prompt below, from the final scored position "
                 f"(token {e(repr(_shown_text(q_tok)))}, position {e(meta.get('query_position'))}); the answer token is "
                 f"{e(repr(_shown_text(ans)))}" + (f", the distractor {e(repr(_shown_text(dis)))}" if dis else "") + ".")
    note = (f'<p class="note">{len(heads)} heads ({e(summary)}). Roles from the head taxonomy of '
            f"<code>mechscope heads</code> (scores on repeated random tokens; copying: OV-circuit eigenvalues); "
            f"a category counts at {e(thr)}, and the role is the category exceeded by the largest factor.{where}"
            f' Scores from <code>{e(meta.get("heads_source", "?"))}</code>.</p>')
    head_cells = "".join(f"<th>{e(t)}</th>" for t in ROLE_TAGS)
    return (f"<section><h2>Head roles</h2>{note}"
            '<table class="components roles"><thead><tr><th>head</th><th>score</th><th>circuit</th>'
            f"<th>role, attention on the example</th>{head_cells}</tr></thead><tbody>" + "".join(rows)
            + "</tbody></table></section>")


def _attention_section(data: dict, node_info: dict[str, dict], labels: dict[str, dict] | None = None) -> str:
    labels = labels or {}
    ex = data.get("example")
    if not isinstance(ex, dict):
        return '<p class="muted">No example prompt recorded.</p>'
    tokens = [str(t) for t in (ex.get("tokens") or [])]
    chips = "".join(f'<span class="tok-chip" title="{e(repr(t))}">{e(_token_label(t, 40))}</span>' for t in tokens)
    out = [f'<div class="prompt"><div class="label">prompt</div><pre>{e(ex.get("prompt", ""))}</pre>'
           f'<div class="chips">{chips}</div></div><div class="heatmaps">']
    for name, matrix in (ex.get("attention") or {}).items():
        if not isinstance(matrix, list):
            continue
        score = node_info.get(str(name), {}).get("score")
        lab = labels.get(str(name))
        role = f'<div class="hm-label">{_role_cell(str(name), lab)}</div>' if lab else ""
        out.append(f'<figure id="{e(_att_id(str(name)))}"><figcaption><code>{e(name)}</code><span class="muted"> score '
                   f"{e(fmt(score, 3))}</span>{role}</figcaption>{_heatmap_svg(str(name), matrix, tokens)}</figure>")
    n_all, n_shown = ex.get("n_heads"), len(ex.get("attention") or {})
    more = (f" {n_shown} of the {n_all} heads, the largest |score| first." if isinstance(n_all, int) and n_all > n_shown
            else "")
    out.append('</div><p class="note">Rows are query positions, columns key positions; darker = more attention.'
               f"{e(more)}</p>")
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
        f"{e(tag)}: {e(role)} head</span>" for role, tag in ROLE_TAGS.items() if role in roles)
    return f'<div class="legend roles-legend">{items}<span>click a head: its attention pattern</span></div>' if items else ""


def render_circuit_report(data: dict) -> str:
    """The report page for a parsed ``circuit.json`` as an HTML string."""
    model = data.get("model") or {}
    node_info = {str(n.get("name")): n for n in (data.get("nodes") or []) if isinstance(n, dict)}
    layers = [int(_num(n.get("layer"))) for n in node_info.values() if n.get("type") in ("head", "mlp")]
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
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{e(title)}</title>
<style>{_asset("report.css")}</style>
</head><body>
<header>
<div class="eyebrow">mechscope · circuit discovery</div>
<h1>{e(data.get("task", "circuit"))} <span class="muted">circuit in</span> {e(model.get("name", "model"))}</h1>
<p class="meta">method <b>{e(data.get("method", "?"))}</b> · {n_layers} layers, {n_heads} heads{e(gqa)}
 · schema v{e(data.get("schema_version", "?"))}</p>
{_stats(data)}
<div class="details">{_kv_table("settings", (data.get("settings") or {}).items())}
{_kv_table("model", model.items())}
{_kv_table("other metrics", ((k, v) for k, v in m.items() if k not in main_keys))}</div>
</header>
<main>
<section><h2>Circuit</h2>
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
was chosen {e(_selection_text(m))}; the held-out pairs played no part in it.</p>
<div class="plot-wrap">{_curve_svg(list(data.get("curve") or []), m.get("n_edges_kept"), m.get("faithfulness"))}</div>
</section>
<section><h2>Top components</h2>{_components_table(data, node_info, labels, attention)}</section>
{_stability_section(data)}
{_roles_section(data, labels, attention)}
<section><h2>Attention of the circuit's heads</h2>{_attention_section(data, node_info, labels)}</section>
</main>
<footer>Generated by mechscope. Self-contained: no network access needed.</footer>
<div id="tooltip" role="tooltip" hidden></div>
<script>{_asset("report.js")}</script>
</body></html>
"""


def write_circuit_report(data: dict, path: str | Path) -> Path:
    """Write the HTML report for a parsed ``circuit.json`` to ``path`` (a directory gets
    ``report.html``); returns the file's path."""
    out = Path(path)
    if out.is_dir():
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_circuit_report(data), encoding="utf-8")
    return out
