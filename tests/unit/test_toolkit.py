"""The report toolkit (``report.toolkit``, ``report.charts``) escapes everything and draws what it is given."""

from __future__ import annotations

import json
import re
import xml.dom.minidom

from mechscope.report import charts, toolkit

EVIL = "<script>alert(1)</script>"


def _parses(fragment: str) -> None:
    xml.dom.minidom.parseString(f"<root>{fragment}</root>")  # well-formed, nothing unescaped


def test_primitives_escape_tokens_and_are_well_formed():
    parts = [
        charts.heatmap([[0.0, 1.0], [2.0, float("nan")]], [EVIL, "b"], ["x", EVIL], title=EVIL),
        charts.heatmap([[0.5, None], [0.2, 0.8]], [EVIL, "b"], ["x", EVIL], cell=None, tips=[[EVIL, EVIL]] * 2),
        charts.bar_chart([EVIL, "m3"], [1.5, -2.0], title=EVIL),
        charts.line_chart({EVIL: ([1, 10, 100], [0.1, 0.5, 0.2])}, title=EVIL, logx=True, vlines=[(10, EVIL)]),
        charts.line_chart([charts.Series(EVIL, [1, 2], [0.1, None], tips=[EVIL, EVIL])], legend="top", label=EVIL),
        charts.histogram([0, 1, 2, 3], [3, 0, 1], title=EVIL),
        toolkit.table(["tok", "v"], [[EVIL, 1.25], [toolkit.Html("<b>x</b>"), 2]]),
        toolkit.kv_table(EVIL, [(EVIL, EVIL), ("n", 3)]),
        toolkit.cards([(EVIL, EVIL, EVIL, "")]),
        toolkit.highlighted_tokens([EVIL, " a"], [0.5, 1.0], mark=1),
    ]
    for p in parts:
        assert "<script>" not in p
        _parses(p)
    doc = toolkit.page(EVIL, "".join(parts), kind=EVIL, subtitle=EVIL)
    assert "<script" not in doc and "http://" not in doc.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_json_block_cannot_close_its_script_element():
    block = toolkit.json_script("data", {"token": EVIL, "amp": "a & b"})
    inner = block[block.index(">") + 1:block.rindex("</script>")]
    assert "<" not in inner and ">" not in inner and "&" not in inner
    assert json.loads(inner) == {"token": EVIL, "amp": "a & b"}


def test_fmt_has_one_rule():
    f = toolkit.fmt
    assert f(3000.0) == f(3000) == "3,000" and f(12345678) == "12,345,678"
    assert f(0.92812) == "0.928" and f(3.21) == "3.21" and f(-0.4) == "-0.4" and f(12.3456) == "12.346"
    assert f(0.0) == "0" and f(1.5e-5) == "1.5e-05" and f(123456.7) == "1.23e+05" and f(0.123456, 4) == "0.1235"
    assert f(None) == "—" and f(float("nan")) == "nan" and f(True) == "True" and f(EVIL) == EVIL  # plain text


def test_ticks_are_round_and_cover_the_range():
    assert charts.ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert charts.ticks(-0.13, 1.07) == [0.0, 0.25, 0.5, 0.75, 1.0]
    major, minor = charts.log_ticks(3, 3000)
    assert major == [10, 100, 1000] and 5 in minor and 2000 in minor
    assert charts.log_ticks(3, 300)[0] == [5, 10, 20, 50, 100, 200]  # under 2.5 decades: 2x and 5x labelled too
    assert charts.si(2500) == "2.5k" and charts.si(1e6) == "1M"


def test_heatmap_draws_one_cell_per_value_with_value_in_tooltip():
    out = charts.heatmap([[0.25, 0.5, 0.75]] * 2, ["r0", "r1"], ["c0", "c1", "c2"])
    cells = re.findall(r"<rect [^>]*><title>([^<]*)</title>", out)
    assert len(cells) == 6 and cells[1] == "r0, c1: 0.5"
    masked = charts.heatmap([[1.0, None], [0.5, 0.5]], ["a", "b"], ["a", "b"], indexed=True)
    assert masked.count("data-rc=") == 3 and 'data-rc="1,0"' in masked and "hm-bg" in masked


def test_bar_chart_signs_and_colour_scale():
    out = charts.bar_chart(["a", "b"], [2.0, -1.0])
    assert out.count('fill="#2563eb"') == 1 and out.count('fill="#dc2626"') == 1
    assert toolkit.color(0.0, 0.0, 1.0) == "#ffffff" and toolkit.color(1.0, 0.0, 1.0) == "#2563eb"
    assert toolkit.color(-1.0, -1.0, 1.0, diverging=True) == "#dc2626"


def test_line_chart_breaks_lines_at_missing_values():
    s = charts.Series("s", [1, 2, 3, 4, 5], [0.1, 0.2, None, 0.4, 0.5], cls="faith")
    out = charts.line_chart([s], element_id="plot")
    assert out.count('<polyline class="line faith"') == 2 and 'id="plot"' in out and out.count("<circle") == 4


def test_token_text_shows_whitespace():
    assert toolkit.token_text("a\nb\t") == "a↵b⇥" and toolkit.token_text("  ") == "··"
    assert toolkit.token_text(" Mary", dots=True) == "·Mary" and toolkit.token_text(" Mary") == " Mary"
    assert toolkit.token_text("abcdefghij", 5) == "abcd…"
