"""Generic, dependency-free plotting primitives for mechscope's self-contained HTML reports.

Every function returns an HTML/SVG string. Every label, title and token passed in is escaped
here (model tokens can contain markup), so callers pass raw strings. Colours: sequential
(white -> blue) for non-negative values, diverging (red <- white -> blue) for signed ones.
Hover text is a native SVG ``<title>``, so the pages need no JavaScript.
"""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"]

BASE_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;color:#1f2937;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px} .muted{color:#6b7280} .small{font-size:12px}
table.data{border-collapse:collapse;font-size:13px} table.data th,table.data td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
table.data td.num{text-align:right;font-variant-numeric:tabular-nums}
.tok{white-space:pre;font-family:ui-monospace,Menlo,monospace;font-size:12px;border-radius:2px;padding:0 1px}
.ctx{margin:2px 0;line-height:1.9} figure{margin:8px 0} svg text{font-family:system-ui,sans-serif}
.grid{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
"""


def esc(value: Any) -> str:
    """HTML-escape anything (quotes included), so it is safe in text and attributes."""
    return html.escape(str(value), quote=True)


def show_token(tok: str, limit: int = 16) -> str:
    """A visible, escaped rendering of a model token: spaces as a dot, newlines as a return
    sign, long tokens cut."""
    t = str(tok).replace("\n", "\u23ce").replace("\t", "\u21e5")
    t = t.replace(" ", "\u00b7") if t.strip() == "" else t
    if len(t) > limit:
        t = t[: limit - 1] + "\u2026"
    return esc(t)


def fmt(x: Any, digits: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return esc(x)
    if math.isnan(v):
        return "nan"
    if v == int(v) and 1 <= abs(v) < 1e7:
        return f"{int(v):,}"  # whole numbers (steps, counts) in full: 3,000 rather than 3e+03
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** (-digits)):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}" if abs(v) >= 1 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"


def color(value: float, vmin: float, vmax: float, diverging: bool = False) -> str:
    """Hex colour for value on a sequential or diverging scale (NaN -> light grey)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "#e5e7eb"
    if diverging:
        m = max(abs(vmin), abs(vmax)) or 1.0
        t = max(-1.0, min(1.0, value / m))
        base = (37, 99, 235) if t >= 0 else (220, 38, 38)
        a = abs(t)
    else:
        span = (vmax - vmin) or 1.0
        a = max(0.0, min(1.0, (value - vmin) / span))
        base = (37, 99, 235)
    r, g, b = (round(255 + (c - 255) * a) for c in base)
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(
    matrix: Sequence[Sequence[float]],
    row_labels: Sequence[Any],
    col_labels: Sequence[Any],
    *,
    title: str = "",
    diverging: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
    cell: int = 18,
    tips: Sequence[Sequence[str]] | None = None,
    row_title: str = "",
    col_title: str = "",
    label_limit: int = 12,
) -> str:
    """An SVG heatmap: matrix[r][c] coloured, rows labelled on the left, columns rotated on
    top; each cell's hover text is ``row, col: value`` (or ``tips[r][c]``)."""
    rows, cols = len(matrix), (len(matrix[0]) if matrix else 0)
    flat = [float(v) for r in matrix for v in r if v is not None and not (isinstance(v, float) and math.isnan(v))]
    lo = vmin if vmin is not None else (min(flat) if flat else 0.0)
    hi = vmax if vmax is not None else (max(flat) if flat else 1.0)
    left = 8 + 7 * min(label_limit, max((len(str(x)) for x in row_labels), default=1))
    top = 8 + 6 * min(label_limit, max((len(str(x)) for x in col_labels), default=1)) + (16 if title else 0)
    w, h = left + cols * cell + 70, top + rows * cell + (22 if row_title or col_title else 8)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" class="heatmap">']
    if title:
        out.append(f'<text x="{left}" y="13" font-size="13" font-weight="600">{esc(title)}</text>')
    for c, lab in enumerate(col_labels):
        x = left + c * cell + cell / 2 + 4
        out.append(f'<text transform="translate({x:.1f},{top - 4}) rotate(-60)" font-size="10">{show_token(lab, label_limit)}</text>')
    for r, lab in enumerate(row_labels):
        out.append(f'<text x="{left - 4}" y="{top + r * cell + cell * 0.7:.1f}" font-size="10" text-anchor="end">{show_token(lab, label_limit)}</text>')
        for c in range(cols):
            v = matrix[r][c]
            fv = float("nan") if v is None else float(v)
            tip = tips[r][c] if tips is not None else f"{row_labels[r]}, {col_labels[c]}: {fmt(fv)}"
            out.append(
                f'<rect x="{left + c * cell}" y="{top + r * cell}" width="{cell - 1}" height="{cell - 1}" '
                f'fill="{color(fv, lo, hi, diverging)}"><title>{esc(tip)}</title></rect>'
            )
    # colour bar
    bx = left + cols * cell + 12
    for i in range(20):
        t = 1 - i / 19
        v = (-max(abs(lo), abs(hi)) + 2 * max(abs(lo), abs(hi)) * t) if diverging else lo + (hi - lo) * t
        out.append(f'<rect x="{bx}" y="{top + i * 6}" width="10" height="6" fill="{color(v, lo, hi, diverging)}"/>')
    top_v = max(abs(lo), abs(hi)) if diverging else hi
    bot_v = -max(abs(lo), abs(hi)) if diverging else lo
    out.append(f'<text x="{bx + 13}" y="{top + 8}" font-size="10">{fmt(top_v)}</text>')
    out.append(f'<text x="{bx + 13}" y="{top + 120}" font-size="10">{fmt(bot_v)}</text>')
    if row_title or col_title:
        out.append(f'<text x="{left}" y="{h - 6}" font-size="11" fill="#6b7280">{esc(" rows: " + row_title if row_title else "")}{esc("  columns: " + col_title if col_title else "")}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart(
    labels: Sequence[Any],
    values: Sequence[float],
    *,
    title: str = "",
    width: int = 520,
    bar: int = 16,
    value_label: str = "",
    tips: Sequence[str] | None = None,
) -> str:
    """Horizontal bars (one per label, in the given order), signed values drawn from a zero
    line, positive blue and negative red."""
    vals = [float(v) for v in values]
    lo, hi = min([0.0, *vals]), max([0.0, *vals])
    span = (hi - lo) or 1.0
    left = 10 + 7 * min(18, max((len(str(x)) for x in labels), default=1))
    plot_w = width - left - 60
    top = 22 if title else 6
    h = top + len(vals) * (bar + 3) + 22
    x0 = left + (0 - lo) / span * plot_w
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" class="bars">']
    if title:
        out.append(f'<text x="{left}" y="14" font-size="13" font-weight="600">{esc(title)}</text>')
    for i, (lab, v) in enumerate(zip(labels, vals)):
        y = top + i * (bar + 3)
        x1 = left + (v - lo) / span * plot_w
        xa, wa = min(x0, x1), abs(x1 - x0)
        tip = tips[i] if tips is not None else f"{lab}: {fmt(v)}"
        out.append(f'<text x="{left - 4}" y="{y + bar * 0.75:.1f}" font-size="11" text-anchor="end">{show_token(lab, 18)}</text>')
        out.append(
            f'<rect x="{xa:.1f}" y="{y}" width="{max(wa, 0.5):.1f}" height="{bar}" fill="{"#2563eb" if v >= 0 else "#dc2626"}">'
            f"<title>{esc(tip)}</title></rect>"
        )
        tx = max(x0, x1) + 3
        out.append(f'<text x="{tx:.1f}" y="{y + bar * 0.75:.1f}" font-size="10" fill="#374151">{fmt(v)}</text>')
    out.append(f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{top - 2}" y2="{h - 20}" stroke="#9ca3af"/>')
    if value_label:
        out.append(f'<text x="{left}" y="{h - 6}" font-size="11" fill="#6b7280">{esc(value_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def line_chart(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    width: int = 560,
    height: int = 300,
    vlines: Sequence[tuple[float, str]] = (),
    ylim: tuple[float, float] | None = None,
    points: bool = True,
) -> str:
    """Lines (one per named series of (xs, ys)) on shared axes, with a legend, optional log x
    axis and labelled vertical marker lines. NaN y values break a line."""
    xs_all = [float(x) for xs, _ in series.values() for x in xs if not logx or x > 0]
    ys_all = [float(y) for _, ys in series.values() for y in ys if y is not None and not math.isnan(float(y))]
    if not xs_all or not ys_all:
        return f'<p class="muted">{esc(title)}: no data</p>'
    tx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    x_lo, x_hi = tx(min(xs_all)), tx(max(xs_all))
    if x_hi == x_lo:
        x_hi = x_lo + 1
    y_lo, y_hi = ylim if ylim else (min(ys_all), max(ys_all))
    if y_hi == y_lo:
        y_hi = y_lo + 1
    pad = 0.05 * (y_hi - y_lo)
    if not ylim:
        y_lo, y_hi = y_lo - pad, y_hi + pad
    L, R, T, B = 56, 130, 24 if title else 10, 40
    pw, ph = width - L - R, height - T - B

    def X(v: float) -> float:
        return L + (tx(v) - x_lo) / (x_hi - x_lo) * pw

    def Y(v: float) -> float:
        return T + (1 - (v - y_lo) / (y_hi - y_lo)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="lines">']
    if title:
        out.append(f'<text x="{L}" y="15" font-size="13" font-weight="600">{esc(title)}</text>')
    out.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#d1d5db"/>')
    for yt in _ticks(y_lo, y_hi):
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{Y(yt):.1f}" y2="{Y(yt):.1f}" stroke="#f3f4f6"/>')
        out.append(f'<text x="{L - 4}" y="{Y(yt) + 3:.1f}" font-size="10" text-anchor="end">{fmt(yt)}</text>')
    if logx:
        xticks = [10**e for e in range(math.floor(x_lo), math.ceil(x_hi) + 1) if x_lo - 1e-9 <= e <= x_hi + 1e-9]
    else:
        xticks = _ticks(x_lo, x_hi)
    for xt in xticks:
        out.append(f'<text x="{X(xt):.1f}" y="{T + ph + 14}" font-size="10" text-anchor="middle">{fmt(xt)}</text>')
    for xv, lab in vlines:
        if logx and xv <= 0:
            continue
        out.append(f'<line x1="{X(xv):.1f}" x2="{X(xv):.1f}" y1="{T}" y2="{T + ph}" stroke="#9ca3af" stroke-dasharray="4 3"><title>{esc(lab)}</title></line>')
        out.append(f'<text x="{X(xv) + 3:.1f}" y="{T + 10}" font-size="10" fill="#6b7280">{esc(lab)}</text>')
    for i, (name, (xs, ys)) in enumerate(series.items()):
        col = PALETTE[i % len(PALETTE)]
        seg: list[str] = []
        segs: list[list[str]] = [seg]
        for x, y in zip(xs, ys):
            if y is None or math.isnan(float(y)) or (logx and x <= 0):
                seg = []
                segs.append(seg)
                continue
            seg.append(f"{X(float(x)):.1f},{Y(float(y)):.1f}")
            if points:
                out.append(f'<circle cx="{X(float(x)):.1f}" cy="{Y(float(y)):.1f}" r="2.2" fill="{col}"><title>{esc(name)}: x={fmt(x)}, y={fmt(y)}</title></circle>')
        for s in segs:
            if len(s) > 1:
                out.append(f'<polyline fill="none" stroke="{col}" stroke-width="1.8" points="{" ".join(s)}"/>')
        ly = T + 12 + i * 16
        out.append(f'<line x1="{L + pw + 8}" x2="{L + pw + 24}" y1="{ly - 4}" y2="{ly - 4}" stroke="{col}" stroke-width="2"/>')
        out.append(f'<text x="{L + pw + 28}" y="{ly}" font-size="11">{esc(name)}</text>')
    if xlabel:
        out.append(f'<text x="{L + pw / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle" fill="#374151">{esc(xlabel)}</text>')
    if ylabel:
        out.append(f'<text transform="translate(12,{T + ph / 2:.1f}) rotate(-90)" font-size="11" text-anchor="middle" fill="#374151">{esc(ylabel)}</text>')
    out.append("</svg>")
    return "".join(out)


def histogram(edges: Sequence[float], counts: Sequence[float], *, title: str = "", xlabel: str = "", logx: bool = False, width: int = 420, height: int = 160) -> str:
    """Vertical bars for counts[i] over [edges[i], edges[i+1]) (bins drawn with equal width;
    the axis shows the first, middle and last edge)."""
    n = len(counts)
    if n == 0:
        return f'<p class="muted">{esc(title)}: no data</p>'
    top = 20 if title else 6
    L, B = 8, 30
    pw, ph = width - 2 * L, height - top - B
    mx = max(counts) or 1
    bw = pw / n
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="hist">']
    if title:
        out.append(f'<text x="{L}" y="14" font-size="12" font-weight="600">{esc(title)}</text>')
    for i, c in enumerate(counts):
        hh = ph * (c / mx)
        out.append(
            f'<rect x="{L + i * bw:.1f}" y="{top + ph - hh:.1f}" width="{max(bw - 1, 0.5):.1f}" height="{hh:.1f}" fill="#2563eb">'
            f"<title>[{fmt(edges[i])}, {fmt(edges[i + 1])}): {int(c) if float(c).is_integer() else fmt(c)}</title></rect>"
        )
    for j in (0, n // 2, n):
        out.append(f'<text x="{L + j * bw:.1f}" y="{top + ph + 12}" font-size="10" text-anchor="middle">{fmt(edges[j])}</text>')
    if xlabel:
        out.append(f'<text x="{L + pw / 2:.1f}" y="{height - 4}" font-size="11" text-anchor="middle" fill="#374151">{esc(xlabel)}</text>')
    out.append("</svg>")
    return "".join(out)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[bool] | None = None) -> str:
    """An HTML table; every cell escaped, numbers formatted."""
    numeric = numeric or [isinstance(c, (int, float)) for c in (rows[0] if rows else [])]
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for j, c in enumerate(r):
            is_num = j < len(numeric) and numeric[j] and isinstance(c, (int, float))
            cells.append(f'<td class="num">{fmt(c)}</td>' if is_num else f"<td>{esc(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def highlighted_tokens(tokens: Sequence[str], values: Sequence[float], vmax: float | None = None, *, mark: int | None = None) -> str:
    """A line of tokens, each shaded by its value (hover shows it); ``mark`` underlines one."""
    m = vmax if vmax is not None else max([abs(float(v)) for v in values] + [1e-9])
    parts = []
    for i, (t, v) in enumerate(zip(tokens, values)):
        style = f"background:{color(float(v), 0.0, m, diverging=float(v) < 0)}"
        if mark is not None and i == mark:
            style += ";outline:1px solid #111"
        parts.append(f'<span class="tok" style="{style}" title="{esc(fmt(v))}">{show_token(t, 40)}</span>')
    return '<div class="ctx">' + "".join(parts) + "</div>"


def page(title: str, body: str, *, subtitle: str = "", extra_css: str = "") -> str:
    """A complete self-contained HTML document (no external resources)."""
    sub = f'<p class="muted">{esc(subtitle)}</p>' if subtitle else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)}</title><style>{BASE_CSS}{extra_css}</style></head>"
        f"<body><h1>{esc(title)}</h1>{sub}{body}</body></html>"
    )
