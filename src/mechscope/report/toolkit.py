"""The page toolkit every report page is built from: escaping, token and number formatting,
colours, tables, data blocks, the assets and the page shell. The charts are in
``mechscope.report.charts``.

Escaping rule: a function that puts text into markup escapes it, so callers pass raw strings
(model tokens can contain markup). The one exception is ``Html``: a string marked as markup
that is already safe (the output of another primitive), which ``table`` inserts as it is.
``fmt`` and ``token_text`` return plain text, to be escaped where they are inserted.
"""

from __future__ import annotations

import html
import json
import math
import numbers
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

POS, NEG = "#2563eb", "#dc2626"  # positive and negative values; the end colours of the scales
PALETTE = [POS, NEG, "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563"]


class Html(str):
    """Markup that is already safe (escaped where needed); inserted without escaping again."""


# ---- text -----------------------------------------------------------------------------------
VISIBLE_CONTROLS = {c: 0x2400 + c for c in (*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20))} | {
    0x7F: 0x2421, 0x2028: 0x2424, 0x2029: 0x00B6}
"""``str.translate`` table: control characters (a token may hold NUL) as their Unicode control
pictures (U+2400 ...), the line and paragraph separators as a newline sign and a pilcrow; a
browser drops or reflows the raw characters, so the token would not read as it is. Tab, newline
and carriage return are left to the layout (``token_text`` shows them as arrows in tokens)."""


def esc(value: Any) -> str:
    """HTML-escape anything (quotes included), so it is safe in text and in attributes; control
    characters shown as their pictures (``VISIBLE_CONTROLS``)."""
    return html.escape(str(value).translate(VISIBLE_CONTROLS), quote=True)


def token_text(tok: Any, limit: int | None = None, *, dots: bool = False) -> str:
    """A model token made visible, as plain text: newline and tab as arrows, a token of spaces
    as dots (every space with ``dots``), cut to ``limit`` characters with an ellipsis."""
    t = str(tok).replace("\n", "\u21b5").replace("\t", "\u21e5")
    if dots or t.strip() == "":
        t = t.replace(" ", "\u00b7")
    if limit is not None and len(t) > limit:
        t = t[: limit - 1] + "\u2026"
    return t


def show_token(tok: Any, limit: int = 16, *, dots: bool = False) -> str:
    """``token_text``, escaped for markup."""
    return esc(token_text(tok, limit, dots=dots))


def fmt(x: Any, digits: int = 3) -> str:
    """A short number as plain text: integers (and whole floats below 1e7) in full with
    thousands separators (3,000), other values with ``digits`` decimals, trailing zeros cut
    (0.928), more decimals where those would round a fraction to a whole number (0.996 at 2
    digits, not 1), and in exponent notation below 1e-3 or from 1e4 (1.23e-05). None is a
    dash, anything else its ``str``."""
    if x is None:
        return "\u2014"
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return str(x)
    if isinstance(x, numbers.Integral):
        return f"{int(x):,}"
    v = float(x)
    if not math.isfinite(v):
        return str(v)
    if v == 0:
        return "0"
    if v.is_integer() and abs(v) < 1e7:
        return f"{int(v):,}"
    if abs(v) < 1e-3 or abs(v) >= 1e4:
        return f"{v:.{digits}g}"
    for more in range(7):  # a value that is not whole never reads as one (0.996 at 2 digits is 0.996, not 1)
        text = f"{v:.{digits + more}f}".rstrip("0").rstrip(".")
        if "." in text:
            break
    return text


def html_num(x: Any, digits: int = 3) -> str:
    """``fmt``, escaped for markup (for a number that goes straight into a page)."""
    return esc(fmt(x, digits))


def pct(x: float) -> str:
    """A fraction as a percentage (3 significant digits; 1 is 100%), below 0.01% in exponent
    form (9.0e-03%), always with the sign."""
    x = float(x)
    if x == 0:
        return "0%"
    return f"{100 * x:.3g}%" if abs(x) >= 1e-4 else f"{100 * x:.1e}%"


def px(x: float) -> str:
    """A compact SVG coordinate (one decimal, trailing zeros cut)."""
    return f"{x:.1f}".rstrip("0").rstrip(".")


def finite(x: Any) -> float:
    """A finite float (missing, non-numeric and non-finite values count as 0), for geometry."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


def num_or_nan(x: Any) -> float:
    """A float, or NaN for a missing, non-numeric or non-finite value (a gap in a line chart)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


# ---- colours --------------------------------------------------------------------------------
def color(value: float | None, vmin: float, vmax: float, diverging: bool = False) -> str:
    """Hex colour of ``value`` on a sequential (white -> blue) or diverging (red <- white ->
    blue) scale; None and NaN are light grey."""
    if value is None or math.isnan(value):
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


# ---- HTML blocks ----------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[bool] | None = None,
          cls: str = "data", col_classes: Sequence[str] | None = None) -> str:
    """An HTML table. Numbers in ``numeric`` columns (default: those holding a number in the
    first row) are formatted with ``fmt`` and right-aligned; ``Html`` cells are inserted as they
    are, everything else is escaped. ``col_classes`` sets each column's cell class."""
    numeric = numeric or [isinstance(c, (int, float)) for c in (rows[0] if rows else [])]
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for j, c in enumerate(r):
            is_num = j < len(numeric) and numeric[j] and isinstance(c, (int, float))
            td_cls = col_classes[j] if col_classes and j < len(col_classes) else "num" if is_num else ""
            text = c if isinstance(c, Html) else fmt(c) if is_num or c is None else esc(c)  # None: a dash
            cells.append(f'<td class="{td_cls}">{text}</td>' if td_cls else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def kv_table(title: str, items: Iterable[tuple[Any, Any]]) -> str:
    """A collapsed key/value table (numbers formatted, None a dash, other values as JSON); empty without items."""
    rows = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(fmt(v, 4) if v is None or isinstance(v, (int, float)) else json.dumps(v, default=str))}</td></tr>"
        for k, v in items
    )
    return f'<details><summary>{esc(title)}</summary><table class="kv">{rows}</table></details>' if rows else ""


def cards(items: Iterable[tuple[str, str, str, str]]) -> str:
    """A row of headline figures: (label, value, note, extra class) each, all plain text."""
    return '<div class="cards">' + "".join(
        f'<div class="card {esc(cls)}"><div class="label">{esc(label)}</div><div class="value">{esc(value)}</div>'
        f'<div class="sub">{esc(sub)}</div></div>' for label, value, sub, cls in items) + "</div>"


def bar_cell(value: float, top: float) -> Html:
    """A horizontal bar for a table cell: width |value| / top, blue when positive, red when negative."""
    return Html(f'<span class="bar {"neg" if value < 0 else "pos"}" style="width:{100 * abs(value) / (top or 1):.1f}%"></span>')


def highlighted_tokens(tokens: Sequence[str], values: Sequence[float], vmax: float | None = None, *,
                       mark: int | None = None) -> str:
    """A line of tokens, each shaded by its value (hover shows it); ``mark`` outlines one."""
    m = vmax if vmax is not None else max([abs(float(v)) for v in values] + [1e-9])
    parts = []
    for i, (t, v) in enumerate(zip(tokens, values)):
        style = f"background:{color(float(v), 0.0, m, diverging=float(v) < 0)}"
        if mark is not None and i == mark:
            style += ";outline:1px solid #111"
        parts.append(f'<span class="tok" style="{style}" title="{html_num(v)}">{show_token(t, 40)}</span>')
    return '<div class="ctx">' + "".join(parts) + "</div>"


def json_script(element_id: str, obj: Any) -> str:
    """Data for a page script: a ``<script type="application/json">`` element whose JSON cannot
    end the element or open markup (``<``, ``>``, ``&`` as \\u escapes). Read it with
    ``JSON.parse(el.textContent)`` and put strings into the page with ``textContent`` only."""
    text = json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{esc(element_id)}">{text}</script>'


# ---- page -----------------------------------------------------------------------------------
def asset(name: str) -> str:
    """The text of ``report/assets/NAME`` (package data)."""
    return resources.files("mechscope.report").joinpath("assets").joinpath(name).read_text(encoding="utf-8")


def page(title: str, body: str, *, kind: str, heading: str | None = None, subtitle: str = "",
         header: str = "", css: Sequence[str] = (), js: Sequence[str] = ()) -> str:
    """A complete self-contained HTML document: ``base.css`` and the ``css`` assets inlined in
    one ``<style>``, the ``js`` assets in one ``<script>`` (none when empty), nothing loaded
    from the network. ``kind`` names the page above the heading; ``heading`` is markup for the
    ``<h1>`` (default: the escaped title); ``header`` is markup appended to the header. With
    ``tooltip.js`` the page gets the element it shows hover text in."""
    sub = f'<p class="meta">{esc(subtitle)}</p>' if subtitle else ""
    styles = "".join(asset(n) for n in ("base.css", *css))
    tip = '<div id="tooltip" role="tooltip" hidden></div>\n' if "tooltip.js" in js else ""
    script = f"<script>{''.join(asset(n) for n in js)}</script>\n" if js else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n<link rel="icon" href="data:,">\n'
        f"<title>{esc(title)}</title>\n<style>{styles}</style>\n</head><body>\n"
        f'<header>\n<div class="eyebrow">mechscope \u00b7 {esc(kind)}</div>\n'
        f"<h1>{esc(title) if heading is None else heading}</h1>\n{sub}{header}</header>\n"
        f"<main>\n{body}\n</main>\n"
        "<footer>Generated by mechscope. Self-contained: no network access needed.</footer>\n"
        f"{tip}{script}</body></html>\n"
    )


def write_page(text: str, path: str | Path) -> Path:
    """Write a rendered page (UTF-8), making the parent folder; returns the path. Through a
    temporary file renamed into place, as the results' JSON: a browser (``serve``) or a killed
    run never sees half a page."""
    import os

    from mechscope.results import temporary_path

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(p)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p
