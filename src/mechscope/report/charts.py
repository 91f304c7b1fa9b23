"""The SVG charts of the report pages: heatmap, line chart, horizontal bars, histogram, and
their axis ticks. Dependency-free; every function returns an SVG string.

Every label, title, token and hover text passed in is escaped here, so callers pass raw
strings. Colours come from ``toolkit.color``: sequential (white -> blue) for non-negative
values, diverging (red <- white -> blue) for signed ones. Hover text is an SVG ``<title>``:
a native tooltip without script, and the text ``tooltip.js`` shows where a page includes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, TypeGuard

from mechscope.report.toolkit import NEG, PALETTE, POS, color, esc, fmt, html_num, px, show_token, token_text

_SVG = 'xmlns="http://www.w3.org/2000/svg"'


def _open(width: float, height: float, cls: str, element_id: str = "", label: str = "") -> str:
    ident = f' id="{esc(element_id)}"' if element_id else ""
    aria = f' role="img" aria-label="{esc(label)}"' if label else ""
    return (f'<svg {_SVG}{ident} class="{cls}" width="{px(width)}" height="{px(height)}" '
            f'viewBox="0 0 {px(width)} {px(height)}"{aria}>')


def _finite(v: Any) -> TypeGuard[float]:
    return v is not None and math.isfinite(float(v))


# ---- axes -----------------------------------------------------------------------------------
def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) in [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw * (1 - 1e-9))
    start = math.ceil(lo / step - 1e-9) * step
    return [round(start + i * step, 12) for i in range(int((hi - start) / step + 1e-9) + 1)]


def tick_labels(values: Sequence[float], digits: int = 3) -> list[str]:
    """``fmt`` of each tick with the fewest digits (from ``digits``, up to 12) that tell them all
    apart, so close ticks (0.00514, 0.00515) do not all read the same (0.005)."""
    out = [fmt(v, digits) for v in values]
    while len(set(out)) < len(out) and digits < 12:
        digits += 1
        out = [fmt(v, digits) for v in values]
    return out


def value_range(values: Sequence[float], rel: float = 0.01, floor: float = 1e-12) -> tuple[float, float]:
    """(lo, hi) of ``values`` for an axis, widened about its middle to at least ``rel`` of the
    largest magnitude (or ``floor``), so values that differ only in their last digits (0.0051547
    and 0.0051546) draw as the flat line they are, not as a drop across the whole plot. A range
    that wide already is kept as it is, and so are all-equal values (the caller's rule)."""
    lo, hi = min(values), max(values)
    need = max(floor, rel * max(abs(lo), abs(hi)))
    if 0 < hi - lo < need:
        mid = (lo + hi) / 2
        lo, hi = mid - need / 2, mid + need / 2
    return lo, hi


def log_ticks(lo: float, hi: float) -> tuple[list[float], list[float]]:
    """(labelled, unlabelled) ticks of a log axis over [lo, hi] (both > 0): the powers of ten,
    plus 2x and 5x when the axis spans under 2.5 decades; every other m x 10^k unlabelled."""
    a, b = math.log10(lo), math.log10(hi)
    few = b - a < 2.5
    major: list[float] = []
    minor: list[float] = []
    for k in range(math.floor(a), math.ceil(b) + 1):
        for m in range(1, 10):
            v = m * 10.0**k
            if a - 1e-9 <= math.log10(v) <= b + 1e-9:
                (major if m == 1 or (few and m in (2, 5)) else minor).append(v)
    if len(major) < 2:  # inside one decade: label them all
        major, minor = sorted(major + minor), []
    return major, minor


def si(n: float) -> str:
    """A count with k / M suffix (1k, 2.5M), for log axes."""
    for div, suf in ((1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:g}{suf}"
    return f"{n:g}"


# ---- heatmap --------------------------------------------------------------------------------
def heatmap(
    matrix: Sequence[Sequence[float | None]],
    row_labels: Sequence[Any],
    col_labels: Sequence[Any],
    *,
    title: str = "",
    diverging: bool = False,
    vmin: float | None = None,
    vmax: float | None = None,
    cell: float | None = 18,
    tips: Sequence[Sequence[str]] | None = None,
    row_title: str = "",
    col_title: str = "",
    label_limit: int = 12,
    dots: bool = False,
    colorbar: bool = True,
    label: str = "",
    indexed: bool = False,
) -> str:
    """matrix[r][c] as coloured cells, rows labelled on the left, columns rotated on top, hover
    text ``row, col: value`` (or ``tips[r][c]``) and a colour bar. A None value draws no cell
    (e.g. causally masked), NaN a grey one. ``cell=None`` sizes cells to the matrix (labels
    are left out below 8 px); ``dots`` shows every space of a label token; ``indexed`` gives
    each cell ``data-rc="r,c"`` for a script that recolours it."""
    rows, cols = len(matrix), max((len(r) for r in matrix), default=0)
    flat = [float(v) for r in matrix for v in r if _finite(v)]
    lo = vmin if vmin is not None else (min(flat) if flat else 0.0)
    hi = vmax if vmax is not None else (max(flat) if flat else 1.0)
    if lo >= hi:  # one value everywhere: a bound the caller gave keeps its end of the scale; else 0 is the light end
        if vmax is not None and vmin is None:
            lo = hi - 1.0
        elif vmin is None:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
        if lo >= hi:
            hi = lo + 1.0
    if cell is None:
        cell = max(5.0, min(18.0, 300.0 / max(1, rows, cols)))
    show = cell >= 8
    rlab = [token_text(x, label_limit, dots=dots) for x in row_labels]
    clab = [token_text(x, label_limit, dots=dots) for x in col_labels]
    left = 8 + 7 * max((len(x) for x in rlab), default=1) if show else 6
    top = (8 + 6 * max((len(x) for x in clab), default=1) if show else 6) + (16 if title else 0)
    w = left + cols * cell + (70 if colorbar else 8)
    h = max(top + rows * cell, top + 124 if colorbar else 0) + (22 if row_title or col_title else 8)
    out = [_open(w, h, "heatmap", label=label)]
    if title:
        out.append(f'<text x="{px(left)}" y="13" font-size="13" font-weight="600">{esc(title)}</text>')
    if any(v is None for r in matrix for v in r) or any(len(r) < cols for r in matrix):
        out.append(f'<rect x="{px(left)}" y="{px(top)}" width="{px(cols * cell)}" height="{px(rows * cell)}" class="hm-bg" fill="#f5f6f8"/>')
    if show:
        for c, lab in enumerate(clab):
            x = left + c * cell + cell / 2 + 4
            out.append(f'<text transform="translate({px(x)},{px(top - 4)}) rotate(-60)" font-size="10">{esc(lab)}</text>')
        for r, lab in enumerate(rlab):
            out.append(f'<text x="{px(left - 4)}" y="{px(top + r * cell + cell * 0.7)}" font-size="10" '
                       f'text-anchor="end">{esc(lab)}</text>')
    for r in range(rows):
        for c, v in enumerate(matrix[r]):
            if v is None:
                continue
            fv = float(v)
            tip = tips[r][c] if tips is not None else f"{row_labels[r]}, {col_labels[c]}: {fmt(fv)}"
            rc = f' data-rc="{r},{c}"' if indexed else ""
            out.append(f'<rect x="{px(left + c * cell)}" y="{px(top + r * cell)}" width="{px(cell - 1)}" '
                       f'height="{px(cell - 1)}" fill="{color(fv, lo, hi, diverging)}"{rc}><title>{esc(tip)}</title></rect>')
    if colorbar:
        bx = left + cols * cell + 12
        m = max(abs(lo), abs(hi))
        for i in range(20):
            t = 1 - i / 19
            v = (-m + 2 * m * t) if diverging else lo + (hi - lo) * t
            out.append(f'<rect x="{px(bx)}" y="{px(top + i * 6)}" width="10" height="6" fill="{color(v, lo, hi, diverging)}"/>')
        out.append(f'<text x="{px(bx + 13)}" y="{px(top + 8)}" font-size="10">{html_num(m if diverging else hi)}</text>')
        out.append(f'<text x="{px(bx + 13)}" y="{px(top + 120)}" font-size="10">{html_num(-m if diverging else lo)}</text>')
    if row_title or col_title:
        text = (f" rows: {row_title}" if row_title else "") + (f"  columns: {col_title}" if col_title else "")
        out.append(f'<text x="{px(left)}" y="{px(h - 6)}" font-size="11" fill="#6b7280">{esc(text)}</text>')
    out.append("</svg>")
    return "".join(out)


# ---- bars -----------------------------------------------------------------------------------
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
    """Horizontal bars (one per label, in the given order) from a zero line, positive blue and
    negative red, each with its value."""
    vals = [float(v) for v in values]
    lo, hi = min([0.0, *vals]), max([0.0, *vals])
    span = (hi - lo) or 1.0
    left = 10 + 7 * min(18, max((len(str(x)) for x in labels), default=1))
    plot_w = width - left - 60
    top = 22 if title else 6
    h = top + len(vals) * (bar + 3) + 22
    x0 = left + (0 - lo) / span * plot_w
    out = [_open(width, h, "bars")]
    if title:
        out.append(f'<text x="{left}" y="14" font-size="13" font-weight="600">{esc(title)}</text>')
    for i, (lab, v) in enumerate(zip(labels, vals)):
        y = top + i * (bar + 3)
        x1 = left + (v - lo) / span * plot_w
        tip = tips[i] if tips is not None else f"{lab}: {fmt(v)}"
        out.append(f'<text x="{left - 4}" y="{px(y + bar * 0.75)}" font-size="11" text-anchor="end">{show_token(lab, 18)}</text>')
        out.append(f'<rect x="{px(min(x0, x1))}" y="{y}" width="{px(max(abs(x1 - x0), 0.5))}" height="{bar}" '
                   f'fill="{POS if v >= 0 else NEG}"><title>{esc(tip)}</title></rect>')
        out.append(f'<text x="{px(max(x0, x1) + 3)}" y="{px(y + bar * 0.75)}" font-size="10" fill="#374151">{html_num(v)}</text>')
    out.append(f'<line x1="{px(x0)}" x2="{px(x0)}" y1="{top - 2}" y2="{h - 20}" stroke="#9ca3af"/>')
    if value_label:
        out.append(f'<text x="{left}" y="{h - 6}" font-size="11" fill="#6b7280">{esc(value_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def histogram(edges: Sequence[float], counts: Sequence[float], *, title: str = "", xlabel: str = "",
              width: int = 420, height: int = 160) -> str:
    """Vertical bars for counts[i] over [edges[i], edges[i+1]), drawn with equal widths; the
    axis labels the first, middle and last edge."""
    n = len(counts)
    if n == 0:
        return f'<p class="muted">{esc(title)}: no data</p>'
    top = 20 if title else 6
    L, B = 8, 30
    pw, ph = width - 2 * L, height - top - B
    mx = max(counts) or 1
    bw = pw / n
    out = [_open(width, height, "hist")]
    if title:
        out.append(f'<text x="{L}" y="14" font-size="12" font-weight="600">{esc(title)}</text>')
    for i, c in enumerate(counts):
        hh = ph * (c / mx)
        tip = f"[{fmt(edges[i])}, {fmt(edges[i + 1])}): {fmt(c)}"
        out.append(f'<rect x="{px(L + i * bw)}" y="{px(top + ph - hh)}" width="{px(max(bw - 1, 0.5))}" height="{px(hh)}" '
                   f'fill="{POS}"><title>{esc(tip)}</title></rect>')
    for j, anchor in ((0, "start"), (n // 2, "middle"), (n, "end")):
        out.append(f'<text x="{px(L + j * bw)}" y="{top + ph + 12}" font-size="10" text-anchor="{anchor}">{html_num(edges[j])}</text>')
    if xlabel:
        out.append(f'<text x="{px(L + pw / 2)}" y="{height - 4}" font-size="11" text-anchor="middle" fill="#374151">{esc(xlabel)}</text>')
    out.append("</svg>")
    return "".join(out)


# ---- lines ----------------------------------------------------------------------------------
@dataclass
class Series:
    """One line of a ``line_chart``: y values (None or NaN break the line) at x values, with
    optional colour (default: the palette), dash pattern, stroke width, point markers, a CSS
    class for the line and its points, and hover text per point."""

    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str = ""
    dash: str = ""
    width: float = 1.8
    points: bool = True
    cls: str = ""
    tips: Sequence[str] | None = None


def line_chart(
    series: Mapping[str, tuple[Sequence[float], Sequence[float | None]]] | Sequence[Series],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    width: int = 560,
    height: int = 300,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    vlines: Sequence[tuple] = (),
    hlines: Sequence[float] = (),
    points: bool = True,
    legend: str = "right",
    element_id: str = "",
    label: str = "",
) -> str:
    """Lines on shared axes: ``series`` as ``{name: (xs, ys)}`` (palette colours, ``points``)
    or ``Series``. Optional log x axis, fixed axis ranges, reference lines at the y values
    ``hlines``, dashed vertical markers ``vlines`` as (x, label) or (x, label, colour), and a
    legend on the right or on top (naming only the series that draw something)."""
    items = list(series) if not isinstance(series, Mapping) else [
        Series(str(k), xs, ys, points=points) for k, (xs, ys) in series.items()]
    ok = [[(float(x), float(y)) for x, y in zip(s.xs, s.ys) if _finite(y) and (not logx or float(x) > 0)] for s in items]
    if not any(ok):
        return f'<p class="muted">{esc(title or label)}: no data</p>'
    tx = math.log10 if logx else float
    xs_all, ys_all = [x for p in ok for x, _ in p], [y for p in ok for _, y in p]
    x_lo, x_hi = (tx(xlim[0]), tx(xlim[1])) if xlim else (tx(min(xs_all)), tx(max(xs_all)))
    x_hi = x_hi if x_hi > x_lo else x_lo + 1
    y_lo, y_hi = ylim if ylim else value_range(ys_all)
    y_hi = y_hi if y_hi > y_lo else y_lo + 1
    if not ylim:
        pad = 0.05 * (y_hi - y_lo)
        y_lo, y_hi = y_lo - pad, y_hi + pad
    top_legend = legend == "top"
    L, R, B = 56, 24 if top_legend else 130, 40
    T = (24 if title else 10) + (24 if top_legend else 0)
    pw, ph = width - L - R, height - T - B

    def X(v: float) -> float:
        return L + (tx(v) - x_lo) / (x_hi - x_lo) * pw

    def Y(v: float) -> float:
        return T + (1 - (v - y_lo) / (y_hi - y_lo)) * ph

    out = [_open(width, height, "lines", element_id, label)]
    if title:
        out.append(f'<text x="{L}" y="15" font-size="13" font-weight="600">{esc(title)}</text>')
    out.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#d1d5db"/>')
    y_ticks = ticks(y_lo, y_hi)
    for yt, text in zip(y_ticks, tick_labels(y_ticks)):
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{px(Y(yt))}" y2="{px(Y(yt))}" stroke="#f3f4f6"/>'
                   f'<text x="{L - 4}" y="{px(Y(yt) + 3)}" font-size="10" text-anchor="end">{esc(text)}</text>')
    for yr in hlines:
        if y_lo <= yr <= y_hi:
            out.append(f'<line class="ref" x1="{L}" x2="{L + pw}" y1="{px(Y(yr))}" y2="{px(Y(yr))}" stroke="#cbd5e1"/>')
    if logx:
        major, minor = log_ticks(10**x_lo, 10**x_hi)
        for xt in minor:
            out.append(f'<line x1="{px(X(xt))}" x2="{px(X(xt))}" y1="{T + ph}" y2="{T + ph + 4}" stroke="#cbd5e1"/>')
    else:
        major = ticks(x_lo, x_hi)
    for xt, text in zip(major, [si(v) for v in major] if logx else tick_labels(major)):
        out.append(f'<line x1="{px(X(xt))}" x2="{px(X(xt))}" y1="{T}" y2="{T + ph}" stroke="#f3f4f6"/>'
                   f'<text x="{px(X(xt))}" y="{T + ph + 14}" font-size="10" text-anchor="middle">'
                   f"{esc(text)}</text>")
    for xv, text, *col in vlines:
        if (logx and xv <= 0) or not x_lo <= tx(xv) <= x_hi:
            continue
        stroke = col[0] if col else "#9ca3af"
        out.append(f'<line x1="{px(X(xv))}" x2="{px(X(xv))}" y1="{T}" y2="{T + ph}" stroke="{stroke}" stroke-width="1.5" '
                   f'stroke-dasharray="4 3">{f"<title>{esc(text)}</title>" if text else ""}</line>')
        if text:
            out.append(f'<text x="{px(X(xv) + 3)}" y="{T + 10}" font-size="10" fill="#6b7280">{esc(text)}</text>')
    legend_x: float = L
    shown = 0  # legend entries so far: a series with nothing to draw has none
    for i, (s, pts) in enumerate(zip(items, ok)):
        colour = s.color or PALETTE[i % len(PALETTE)]
        dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
        cls = f" {esc(s.cls)}" if s.cls else ""
        segs: list[list[str]] = [[]]
        for j, (x, y) in enumerate(zip(s.xs, s.ys)):
            if not _finite(y) or (logx and float(x) <= 0):
                segs.append([])
                continue
            cx, cy = px(X(float(x))), px(Y(float(y)))
            segs[-1].append(f"{cx},{cy}")
            if s.points:
                tip = s.tips[j] if s.tips is not None else f"{s.name}: x={fmt(x)}, y={fmt(y)}"
                out.append(f'<circle class="pt{cls}" cx="{cx}" cy="{cy}" r="2.6" fill="{colour}"><title>{esc(tip)}</title></circle>')
        for seg in segs:
            if len(seg) > 1:
                out.append(f'<polyline class="line{cls}" fill="none" stroke="{colour}" stroke-width="{s.width}"{dash} '
                           f'points="{" ".join(seg)}"/>')
        if not pts:
            continue
        if top_legend:
            x0, y0 = legend_x, (24 if title else 10) + 8
            legend_x += 46 + 6.4 * len(s.name)
        else:
            x0, y0 = L + pw + 8, T + 8 + shown * 16
        shown += 1
        out.append(f'<line x1="{px(x0)}" x2="{px(x0 + 16)}" y1="{y0}" y2="{y0}" stroke="{colour}" stroke-width="2"{dash}/>'
                   f'<text x="{px(x0 + 20)}" y="{y0 + 4}" font-size="11">{esc(s.name)}</text>')
    if xlabel:
        out.append(f'<text x="{px(L + pw / 2)}" y="{height - 6}" font-size="11" text-anchor="middle" fill="#374151">{esc(xlabel)}</text>')
    if ylabel:
        out.append(f'<text transform="translate(12,{px(T + ph / 2)}) rotate(-90)" font-size="11" text-anchor="middle" '
                   f'fill="#374151">{esc(ylabel)}</text>')
    out.append("</svg>")
    return "".join(out)


def stacked_svg(charts: Sequence[str], width: float, height: float, gap: float = 10) -> str:
    """Charts of one size (each an ``<svg>`` from this module) stacked top to bottom in one
    standalone SVG on a white background, for the figures the README embeds."""
    inner = [c.replace("<svg ", f'<svg y="{px(i * (height + gap))}" ', 1) for i, c in enumerate(charts)]
    h = px(len(inner) * (height + gap))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{px(width)}" height="{h}" style="background:#fff">'
            f'<rect width="100%" height="100%" fill="#fff"/>{"".join(inner)}</svg>')
