"""The shared SVG/HTML primitives escape everything and draw what they are given."""

from __future__ import annotations

import re
import xml.dom.minidom

from mechscope.report import svg

EVIL = "<script>alert(1)</script>"


def _parses(fragment: str) -> None:
    xml.dom.minidom.parseString(f"<root>{fragment}</root>")  # well-formed, nothing unescaped


def test_primitives_escape_tokens_and_are_well_formed():
    parts = [
        svg.heatmap([[0.0, 1.0], [2.0, float("nan")]], [EVIL, "b"], ["x", EVIL], title=EVIL),
        svg.bar_chart([EVIL, "m3"], [1.5, -2.0], title=EVIL),
        svg.line_chart({EVIL: ([1, 10, 100], [0.1, 0.5, 0.2])}, title=EVIL, logx=True, vlines=[(10, EVIL)]),
        svg.histogram([0, 1, 2, 3], [3, 0, 1], title=EVIL),
        svg.table(["tok", "v"], [[EVIL, 1.25]]),
        svg.highlighted_tokens([EVIL, " a"], [0.5, 1.0], mark=1),
    ]
    for p in parts:
        assert "<script>" not in p
        _parses(p)
    doc = svg.page(EVIL, "".join(parts), subtitle=EVIL)
    assert "<script>" not in doc and "http://" not in doc.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_heatmap_draws_one_cell_per_value_with_value_in_tooltip():
    out = svg.heatmap([[0.25, 0.5, 0.75]] * 2, ["r0", "r1"], ["c0", "c1", "c2"])
    cells = re.findall(r"<rect [^>]*><title>([^<]*)</title>", out)
    assert len(cells) == 6 and cells[1] == "r0, c1: 0.5"


def test_bar_chart_signs_and_colour_scale():
    out = svg.bar_chart(["a", "b"], [2.0, -1.0])
    assert out.count('fill="#2563eb"') == 1 and out.count('fill="#dc2626"') == 1
    assert svg.color(0.0, 0.0, 1.0) == "#ffffff" and svg.color(1.0, 0.0, 1.0) == "#2563eb"
    assert svg.color(-1.0, -1.0, 1.0, diverging=True) == "#dc2626"
