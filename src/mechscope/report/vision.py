"""The page of ``mechscope vision circuit`` / ``attack``: the circuit drawn by layer (units
with their attribution and the reference images that activate them most, inline PNG), the
edge view between chosen units, and the causal tests (prune, keep, attack, composition)."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path
from typing import Any, Sequence

from mechscope.report.toolkit import Html, cards, esc, fmt, html_num, page, px, table, write_page

__all__ = ["png_data_uri", "render_vision", "write_vision"]

_SVG = 'xmlns="http://www.w3.org/2000/svg"'


def png_data_uri(pixels: Sequence[Sequence[int]]) -> str:
    """A grey 8-bit PNG of ``pixels`` (rows of 0-255 values) as a ``data:`` URI."""
    h, w = len(pixels), len(pixels[0]) if pixels else 0
    raw = b"".join(b"\x00" + bytes(max(0, min(255, int(v))) for v in row) for row in pixels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _layers(d: dict[str, Any]) -> str:
    pool = d.get("pool") or []
    cols = []
    for site, us in d["units"].items():
        sc = d["scores"][site]
        kind = (d["model"].get("sites", {}).get(site) or {}).get("kind", "unit")
        cards_ = []
        for u in us:
            imgs = "".join(f'<svg {_SVG} width="32" height="32" viewBox="0 0 32 32"><image width="32" height="32" '
                           f'preserveAspectRatio="none" href="{png_data_uri(pool[i])}"></image></svg>' for i in (d.get("top_images", {}).get(site, {}).get(str(u), []))
                           if 0 <= i < len(pool))
            cards_.append(f'<div class="vunit"><div class="name">{esc(site)}:{esc(u)}</div>'
                          f'<div class="score">{esc(kind)}, attribution {html_num(sc[u])}</div><div class="vimgs">{imgs}</div></div>')
        cols.append(f'<div class="vlayer"><h3>{esc(site)}</h3>{"".join(cards_)}</div>')
    t = d["concept"]
    cols.append(f'<div class="vlayer"><h3>output</h3><div class="vunit"><div class="name">logit {esc(t.get("target_name"))}</div></div></div>')
    return '<div class="vlayers">' + "".join(cols) + "</div>"


def _edges(d: dict[str, Any]) -> str:
    """SVG: chosen units as dots by layer (left: input side), lines of width ~ edge attribution."""
    sites = list(d["units"])
    layers = [[f"{s}:{u}" for u in d["units"][s]] for s in sites] + [[f"logit {d['concept'].get('target_name')}"]]
    dx, dy, top = 150, 26, 30
    w = 40 + dx * (len(layers) - 1) + 120
    h = top + dy * max(len(x) for x in layers) + 10
    pos = {(i, j): (30 + dx * i, top + dy * j) for i, col in enumerate(layers) for j in range(len(col))}
    vmax = max([v for s in sites for row in d["edges"][s] for v in row] + [1e-12])
    lines = []
    for i, s in enumerate(sites):
        for j, u in enumerate(d["units"][s]):
            for jj, v in enumerate(d["edges"][s][u]):
                if (i + 1, jj) in pos and v > 0:
                    (x0, y0), (x1, y1) = pos[(i, j)], pos[(i + 1, jj)]
                    lines.append(f'<line x1="{px(x0)}" y1="{px(y0)}" x2="{px(x1)}" y2="{px(y1)}" stroke-width="{px(0.3 + 5 * v / vmax)}">'
                                 f'<title>{esc(layers[i][j])} \u2192 {esc(layers[i + 1][jj])}: {html_num(v)}</title></line>')
    labels = [f'<circle cx="{px(x)}" cy="{px(y)}" r="4" fill="#111"></circle><text x="{px(x + 6)}" y="{px(y - 6)}">{esc(layers[i][j])}</text>'
              for (i, j), (x, y) in pos.items()]
    heads = "".join(f'<text x="{px(30 + dx * i)}" y="14" font-weight="bold">{esc(n)}</text>' for i, n in enumerate(sites + ["output"]))
    return f'<svg {_SVG} class="vedges" width="{px(w)}" height="{px(h)}" viewBox="0 0 {px(w)} {px(h)}">{heads}{"".join(lines)}{"".join(labels)}</svg>'


def _share(x: float | None) -> str:
    """A signed share as a percentage with one decimal (shares here can be negative or above 1)."""
    return "n/a" if x is None else f"{100 * float(x):.1f}%"


def _tests(t: dict[str, Any]) -> str:
    if not t or "full" not in t:
        return ""
    rows = [[name, t[key]["accuracy"], t[key]["logit"]] for name, key in (
        ("full model", "full"), ("circuit ablated", "circuit_pruned"), (f"{t['k']} random units/layer ablated (mean of {t['random_draws']})", "random_pruned"),
        ("only the circuit kept", "circuit_kept"), ("only random units kept", "random_kept"), ("every unit ablated", "all_ablated"))]
    ratio = t["accuracy_drop"]["ratio"]
    head = cards([
        ("accuracy drop, circuit / random", "n/a" if ratio is None else f"{fmt(ratio, 2)}x",
         f"{_share(t['accuracy_drop']['circuit'])} vs {_share(t['accuracy_drop']['random'])}", ""),
        ("class logit kept by the circuit alone", _share(t["logit_share"]["circuit"]), f"random circuits: {_share(t['logit_share']['random'])}", ""),
    ])
    return (f"<h2>Causal tests ({esc(t['ablation'])} ablation, {esc(t['n_images'])} held-out images)</h2>{head}"
            + table(["condition", "class accuracy", "mean class logit"], rows, numeric=[False, True, True])
            + (f"<p>Edge pruning: cutting the circuit's {esc(t['edges']['n_edges'])} edges between chosen units "
               f"(senders' input to the receiver set to its reference mean) drops class accuracy by "
               f"{esc(_share(t['edges']['accuracy_drop']['circuit']))} and the logit by {html_num(t['edges']['logit_drop']['circuit'])}; "
               f"as many random edges: {esc(_share(t['edges']['accuracy_drop']['random']))} and {html_num(t['edges']['logit_drop']['random'])}.</p>"
               if t.get("edges") else "")
            + ("<p>Class logit kept with one layer's other units ablated at a time: "
               + esc(", ".join(f"{s} {_share(v)}" for s, v in (t.get("logit_share_per_layer") or {}).items())) + ".</p>"
               if t.get("logit_share_per_layer") else "")
            + "<p class='muted small'>Ablated units output their mean over the reference images (mean) or 0 (zero). "
              "Logit kept = (kept - all ablated) / (full - all ablated).</p>")


def _attack(a: dict[str, Any] | None) -> str:
    if not a:
        return ""
    rows = [[name, a[key]["attack_success"], a[key]["clean_accuracy"]] for name, key in (
        ("no ablation", "before"), ("mark circuit ablated", "after"), (f"{a['k']} random units/layer ablated", "random"))]
    return (f"<h2>Typographic analogue: the mark of class {esc(a['mark_class'])}</h2>"
            + table(["condition", "attack success", "clean accuracy"], rows, numeric=[False, True, True])
            + f"<p>Clean accuracy down {html_num(a['clean_accuracy_drop_points'], 2)} points; {esc(a['n_attack'])} marked images of other classes.</p>")


def _composition(c: dict[str, Any] | None) -> str:
    if not c:
        return ""
    rows = [[f"union of parts {' + '.join(c['parts'])}", c["jaccard_union_of_parts"]]]
    rows += [[f"part {k}", v] for k, v in c["jaccard_parts"].items()]
    rows += [[f"class {k}", v] for k, v in c["jaccard_other_classes"].items()]
    rows.append([f"best other pair {c['jaccard_other_pairs_max']['pair']}", c["jaccard_other_pairs_max"]["value"]])
    return (f"<h2>Composition: {esc(c['overlay'])}</h2><p>Jaccard of the overlay class's circuit with:</p>"
            + table(["circuit", "Jaccard"], rows, numeric=[False, True]))


def render_vision(d: dict[str, Any]) -> str:
    """The page for a ``circuit.json`` dict (``VisionCircuit.to_dict()``), optionally with
    ``composition`` (``run_composition``'s dict)."""
    c = d["concept"]
    intro = (f"<p>Concept <b>{esc(c.get('name'))}</b> ({esc(c.get('source'))}), target class <b>{esc(c.get('target_name'))}</b>; "
             f"model {esc(d['model'].get('arch'))} at <code>{esc(d['model'].get('path'))}</code>; "
             f"k = {esc(d['settings'].get('k'))} units per layer, chosen from the output down by "
             f"|activation \u00d7 gradient| towards the units chosen above.</p>")
    body = (intro + "<h2>Circuit by layer</h2><p class='muted small'>Per unit: its attribution and the reference images "
            "that activate it most.</p>" + Html(_layers(d)) + "<h2>Edges between chosen units</h2><figure>" + _edges(d) + "</figure>"
            + _tests(d.get("tests") or {}) + _attack((d.get("tests") or {}).get("attack")) + _composition(d.get("composition")))
    return page(f"Visual circuit: {c.get('name')}", body, kind="vision circuit", css=["vision.css"])


def write_vision(d: dict[str, Any], path: str | Path) -> Path:
    """Write the page (``render_vision``) to ``path``."""
    return write_page(render_vision(d), path)
