"""Defects found by session 38's sweeps, each fixed and tested here (every test fails on the
code before the fix). Report pages: what a page shows must agree with the JSON it was made from."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser

from mechscope.report.toolkit import fmt, pct


def _text(page: str) -> str:
    """The visible text of a page (scripts and styles left out)."""
    out: list[str] = []

    class P(HTMLParser):
        skip = 0

        def handle_starttag(self, tag, attrs):
            self.skip += tag in ("style", "script")

        def handle_endtag(self, tag):
            self.skip -= tag in ("style", "script")

        def handle_data(self, data):
            if not self.skip:
                out.append(data)

    P().feed(page)
    return " ".join(" ".join(out).split())


def test_a_circuit_of_every_edge_reads_100_percent_not_1e2():
    from test_report import synthetic_circuit

    from mechscope.report.circuit import render_circuit

    d = synthetic_circuit()
    d["metrics"].update(n_edges_kept=110, n_edges=110)
    assert "edges kept 110 100% of 110" in _text(render_circuit(d))
    assert pct(1.0) == "100%" and pct(0.995) == "99.5%"


def test_small_densities_are_percentages_with_their_sign():
    assert pct(9e-5) == "9.0e-03%" and pct(1.2e-4) == "0.012%" and pct(0.12) == "12%"


def test_a_fraction_never_reads_as_a_whole_number():
    assert fmt(0.996, 2) == "0.996" and fmt(0.9996, 3) == "0.9996" and fmt(0.9987, 2) == "0.999"
    assert fmt(0.5, 2) == "0.5" and fmt(1.0, 2) == "1" and fmt(2.25, 3) == "2.25" and fmt(-0.9999, 2) == "-0.9999"


def test_a_nan_faithfulness_is_a_gap_not_a_point_at_zero():
    from test_report import synthetic_circuit

    from mechscope.report.circuit import render_circuit

    d = synthetic_circuit()
    d["curve"][3]["faithfulness"] = math.nan
    d["metrics"]["faithfulness"] = math.nan
    svg = re.search(r'<svg[^>]*id="faithfulness-plot".*?</svg>', render_circuit(d), re.S).group(0)
    tips = re.findall(r'<circle class="pt (?:faith|kept)"[^>]*><title>([^<]*)</title>', svg)
    n = int(d["curve"][3]["n_edges"])
    assert len(tips) == len(d["curve"]) - 1 and not any(t.startswith(f"{n} edges") or t.startswith("circuit:") for t in tips)


def test_the_dynamics_chart_names_each_series_unit():
    from test_report import sample_dynamics

    from mechscope.report.dynamics import render_dynamics

    page = render_dynamics(sample_dynamics())
    assert "Head scores and ICL score (nats)" not in page
    assert "ICL score (nats)" in page and "induction (max, attention share)" in page


def test_a_constant_heatmap_is_coloured_not_blank():
    from test_report import sample_heads, sample_lens

    from mechscope.report.heads import render_heads
    from mechscope.report.lens import render_lens

    d = sample_lens()
    d["lens"]["target_rank"] = [[0] * len(row) for row in d["lens"]["target_rank"]]  # top-1 everywhere: darkest
    hm = re.search(r'<svg[^>]*class="heatmap".*?</svg>', render_lens(d), re.S).group(0)
    fills = set(re.findall(r'fill="(#[0-9a-f]{6})"><title>[^<]*rank 0', hm))
    assert fills == {"#2563eb"}
    h = sample_heads(1, 1)
    h["scores"]["previous_token"] = [[0.13]]
    svg = re.findall(r'<svg[^>]*class="heatmap".*?</svg>', render_heads(h), re.S)[0]
    assert re.findall(r'fill="(#[0-9a-f]{6})"><title>a0\.h0', svg) != ["#ffffff"]


def test_the_pattern_viewer_opens_on_the_most_inductive_head_despite_a_nan():
    from test_report import sample_heads

    from mechscope.report.heads import render_heads

    h = sample_heads()
    h["scores"]["induction"] = [[math.nan, 0.9, 0.1], [0.2, 0.3, 0.4]]
    assert re.findall(r'<option value="\d+" selected>([^<]*)', render_heads(h)) == ["a0.h1"]


def test_missing_values_are_dashes_not_none():
    from test_report import sample_binding_dynamics, sample_lens, sample_sae_eval, sample_transcoders_eval

    from mechscope.report.binding import render_binding_dynamics
    from mechscope.report.lens import render_lens
    from mechscope.report.sae_eval import render_sae_eval
    from mechscope.report.transcoders import render_transcoders_eval

    s = sample_sae_eval()
    s["fvu"] = None
    tc = sample_transcoders_eval()
    tc["layers"][0].update(ce_recovered=None, ce_recovered_ci95=None)
    lens = sample_lens()
    lens["lens"]["first_top1_site_last_position"] = None
    b = sample_binding_dynamics()
    b["phases"]["systematic_step"] = None
    for page in (render_sae_eval(s), render_transcoders_eval(tc), render_lens(lens), render_binding_dynamics(b)):
        text = _text(page)
        assert not re.search(r"\bNone\b", text) and '""' not in text, text[:400]
    assert "none (not top-1 at any site)" in _text(render_lens(lens))


def test_a_long_subject_token_keeps_its_marker():
    from mechscope.report.recall import _tracing_fact

    t = {"restored_prob": {"resid": [[0.1] * 3 for _ in range(2)]}, "layers": [0, 1], "clean_prob": 0.5, "corrupt_prob": 0.1,
         "noise_std": 0.3, "window": 1}
    html = _tracing_fact(t, ["The", " Switzerland", " is"], [1])
    labels = re.findall(r'class="rl"[^>]*>([^<]*)<', html) or re.findall(r">(\*? ?\d:[^<]*)<", html)
    assert any(lab.startswith("* 1:") for lab in labels), labels


def test_the_probe_chart_plots_against_the_layer():
    from test_report import sample_probe

    from mechscope.report.probe import render_probe

    p = sample_probe()
    p.update(layers=[0, 5, 10], hooks=[f"blocks.{i}.hook_resid_post" for i in (0, 5, 10)], accuracy=[0.5, 0.6, 0.7],
             train_accuracy=[0.5, 0.6, 0.7], control_accuracy=[None] * 3, selectivity=[None] * 3)
    svg = re.findall(r"<svg.*?</svg>", render_probe(p), re.S)[0]
    assert re.findall(r"<title>(accuracy:[^<]*)</title>", svg)[-1] == "accuracy: x=10, y=0.7"
    legend = re.findall(r'<text x="[\d.]+" y="[\d.]+" font-size="11">([^<]*)</text>', svg)
    assert "control accuracy" not in legend and "accuracy" in legend  # nothing drawn, nothing in the legend


def test_confusion_cards_carry_the_percent_sign():
    from test_report import sample_confusion

    from mechscope.report.confusion import render_confusion

    d = sample_confusion()
    d["headline"]["baseline"].update(lpr=0.5, lpr_heldout=0.25)
    assert "LPR before 50.0% held-out 25.0%" in _text(render_confusion(d))
