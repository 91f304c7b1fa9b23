"""Sweep 27: report pages against the JSON of the same command (each test builds a page from a
small hand-made dict; no model)."""

from __future__ import annotations

import re
from typing import Any

from mechscope.report import charts

EVIL = "<script>alert(1)</script>"


def _text(page: str) -> str:
    """The page's visible text, roughly: tags dropped, entities left as they are."""
    return re.sub(r"<[^>]+>", " ", page)


# ---- lens: the DLA note ---------------------------------------------------------------------
def _lens(note: str) -> dict:
    toks = ["When", EVIL]
    return {
        "schema_version": 1, "kind": "lens", "model": {"name": "tiny"}, "settings": {}, "prompt": "".join(toks),
        "tokens": toks, "target": EVIL, "target_id": 3, "distractor": " b", "distractor_id": 4,
        "lens": {"sites": ["resid_post 0"], "target_rank": [[2, 0]], "target_prob": [[0.1, 0.5]],
                 "top_tokens": [[[EVIL], [" a"]]], "top_probs": [[[0.5], [0.5]]], "first_top1_site_last_position": "resid_post 0"},
        "dla": {"total": 1.0, "actual": 1.2, "error": 0.2, "note": note, "top": [{"name": "a0.h1", "value": 0.8}]},
    }


def test_lens_dla_note_is_escaped_once_and_bold():
    from mechscope.report.lens import render_lens

    page = render_lens(_lens(f"The model soft-caps its logits {EVIL}"))
    assert "&lt;strong&gt;" not in page and "&amp;lt;" not in page
    assert "<strong>The model soft-caps its logits &lt;script&gt;alert(1)&lt;/script&gt;</strong>" in page
    assert EVIL not in page


# ---- circuit: bootstrap resamples left out ----------------------------------------------------
def test_circuit_says_why_the_held_out_interval_is_unreliable():
    from test_report import synthetic_circuit

    from mechscope.report.circuit import render_circuit

    d = synthetic_circuit()
    d["metrics"].update(faithfulness_ci=[0.5, 1.4], n_held_out_pairs=6, faithfulness_ci_dropped=0.41)
    page = render_circuit(d)
    sentence = ("41% of the bootstrap resamples had a clean-corrupt gap under a tenth of the full sample's, or of the "
                "other sign, and were left out: the held-out pairs are too few or too varied for a reliable interval")
    assert sentence.replace("'", "&#x27;") in page
    # next to the headline: before the settings and the other metrics
    assert page.index("reliable interval") < page.index("other metrics")
    d["metrics"]["faithfulness_ci_dropped"] = 0.0
    assert "reliable interval" not in render_circuit(d)


# ---- SAE eval: CE recovered without a gap, shares --------------------------------------------
def _sae_eval(ce_zero: float) -> dict:
    return {"schema_version": 1, "tokens": 4096, "l0": 32.0, "mse": 0.5, "fvu": 0.12, "cos": 0.95, "ce_clean": 6.2,
            "ce_sae": 5.9, "ce_zero": ce_zero, "ce_recovered": (ce_zero - 5.9) / (ce_zero - 6.2), "kl": 0.2,
            "dead_frac": 0.25, "dense_frac": 0.015625,
            "density_hist": {"log10_edges": [-2, -1, 0], "counts": [3, 1]},
            "sae": {"architecture": "topk", "d_in": 64, "d_sae": 128, "k": 32, "model_name": EVIL, "hook_name": EVIL},
            "settings": {"corpus": EVIL}}


def test_sae_eval_says_ce_recovered_cannot_be_read_without_a_gap():
    from mechscope.report.sae_eval import render_sae_eval

    bad = render_sae_eval(_sae_eval(5.7))  # zeroing lowers the loss: a random model
    assert "no worse than the clean one" in bad and "cannot be read" in bad
    good = render_sae_eval(_sae_eval(9.0))
    assert "no worse than the clean one" not in good and "cannot be read" not in good
    assert EVIL not in bad


def test_sae_eval_labels_feature_fractions_as_shares():
    from mechscope.report.sae_eval import render_sae_eval

    page = render_sae_eval(_sae_eval(9.0))
    assert "dense features, share of all" in page and "2 of 128" in page
    assert "dead features, share of all" in page and "32 of 128" in page


# ---- transcoder-set eval --------------------------------------------------------------------
def _transcoders(ce_zero: float, all_zero: float) -> dict:
    row = {"layer": 0, "architecture": EVIL, "d_sae": 8, "fvu": 0.2, "l0": 3.0, "dead_frac": 0.1, "ce_spliced": 6.3,
           "ce_zero": ce_zero, "ce_recovered": 1.548}
    return {"model": EVIL, "tokens": 10, "ce_clean": 6.2137, "layers": [row, {**row, "layer": 1}],
            "all_layers": {"layers": [0, 1], "ce_spliced": 6.4, "ce_zero": all_zero, "ce_recovered": 1.907},
            "summary": {"median_fvu": 0.2, "max_fvu": 0.2, "mean_l0": 3.0, "mean_dead_frac": 0.1},
            "settings": {"corpus": EVIL, "n_layers_model": 2}}


def test_transcoders_eval_shows_clean_ce_and_why_ce_recovered_cannot_be_read():
    from mechscope.report.transcoders import render_transcoders_eval

    bad = render_transcoders_eval(_transcoders(6.1, 6.0))
    assert "6.214" in bad and "CE loss, clean" in bad
    assert "all layers zeroed: the zero-ablated model is no worse than the clean one" in bad
    assert "layers 0, 1 alone zeroed" in bad and "cannot be read" in bad
    good = render_transcoders_eval(_transcoders(9.0, 12.0))
    assert "no worse than the clean one" not in good and "cannot be read" not in good and "6.214" in good
    assert EVIL not in bad


def test_transcoders_eval_labels_mean_dead_as_a_share():
    from mechscope.report.transcoders import render_transcoders_eval

    page = render_transcoders_eval(_transcoders(9.0, 12.0))
    assert "mean dead share" in page and "share of features never firing here" in page
    assert "features never firing here" not in page.replace("share of features never firing here", "")


# ---- tuned lens eval ------------------------------------------------------------------------
def _tuned(n_layers: int) -> dict:
    rows: list[dict[str, Any]] = [{"layer": i, "hook": f"blocks.{i}.hook_resid_pre", "kl_logit": float(n_layers - 1 - i),
             "kl_tuned": (n_layers - 1 - i) / 4, "ratio": 4.0 if i < n_layers - 1 else None, "top1_logit": 0.3,
             "top1_tuned": 0.5} for i in range(n_layers)]
    mid = [r["ratio"] for r in rows if 10 <= r["layer"] <= 20 and r["ratio"] is not None]
    return {"model": {"name": EVIL}, "lens": {"reads": "resid_pre", "path": "x", "source": "y"}, "tokens": 100,
            "corpus": EVIL, "split": "heldout", "context_len": 32, "layers": rows,
            "summary": {"tuned_below_logit_every_layer": True, "layers_tuned_not_below": [],
                        "min_ratio_layers_10_20": min(mid, default=None), "mean_kl_logit": 0.5, "mean_kl_tuned": 0.125}}


def test_tuned_lens_eval_ratio_null_is_n_a():
    from mechscope.report.tuned_lens import render_tuned_lens_eval

    page = render_tuned_lens_eval(_tuned(2))
    assert "None" not in _text(page)
    assert re.search(r"<td[^>]*>n/a</td>", page)


def test_tuned_lens_eval_ratio_card_names_the_layers_it_covers():
    from mechscope.report.tuned_lens import render_tuned_lens_eval

    small = render_tuned_lens_eval(_tuned(2))
    assert "layers 10-20" not in small.split("the model has no layers 10-20")[0]
    assert "min KL ratio, layer 0" in small and "the model has no layers 10-20" in small
    big = render_tuned_lens_eval(_tuned(16))  # layers 10-14 have a ratio, 15 is the last
    assert "min KL ratio, layers 10-14" in big and "no layers 10-20" not in big


def test_tuned_lens_eval_below_claim_leaves_out_the_last_layer():
    from mechscope.report.tuned_lens import render_tuned_lens_eval

    page = render_tuned_lens_eval(_tuned(2))
    assert "every layer before the last" in page
    assert '<div class="value">every layer</div>' not in page
    d = _tuned(3)
    for r in d["layers"]:  # no layer with KL 0 both ways: every layer decides
        r["kl_logit"] += 1.0
        r["kl_tuned"] += 0.1
    assert '<div class="value">every layer</div>' in render_tuned_lens_eval(d)


# ---- training dynamics ----------------------------------------------------------------------
def _dynamics(k_comp: bool = False) -> dict:
    rows = [{"step": s, "loss": 4 - i * 0.5, "repeated_loss": 4 - i * 0.8, "icl_score": -0.01 * i,
             "max_previous_token": 0.1 + 0.01 * i, "max_induction": 0.05 + 0.2 * i, "max_k_composition": 0.1 * i,
             "k_composition_prev_to_induction": 0.05 * i if k_comp else None} for i, s in enumerate((0, 100, 200, 300))]
    return {"schema_version": 1, "run": EVIL, "settings": {}, "checkpoints": rows, "train_loss": [[0, 4.5], [300, 1.5]],
            "formation": {"previous_token_step": None, "induction_step": 200, "icl_step": None,
                          "previous_token_before_induction": None, "eval_data": "random", "too_few_checkpoints": False}}


def test_dynamics_formation_table_says_not_formed():
    from mechscope.report.dynamics import render_dynamics

    page = render_dynamics(_dynamics())
    tab = page[page.index("<h2>Formation</h2>"):page.index("<h2>Checkpoints</h2>")]
    assert "<td></td>" not in tab
    assert tab.count("not formed") == 2 and "n/a" in tab


def test_dynamics_legend_leaves_out_a_series_without_data():
    from mechscope.report.dynamics import render_dynamics_svg

    assert "K-comp." not in render_dynamics_svg(_dynamics())
    assert "K-comp. prev-&gt;ind" in render_dynamics_svg(_dynamics(k_comp=True))


def test_dynamics_charts_draw_step_zero_on_the_linear_axis():
    from mechscope.report.dynamics import render_dynamics_svg

    svg = render_dynamics_svg(_dynamics())
    assert "induction (max, attention share): x=0, y=0.05" in svg  # the score at step 0, as a point's hover text
    assert svg.count("<circle") == 4 * 3  # 4 checkpoints x 3 series with data


# ---- heads ----------------------------------------------------------------------------------
def test_heads_settings_show_the_example_length_used():
    from test_report import sample_heads

    from mechscope.report.heads import render_heads

    d = sample_heads()
    d["settings"] = {"seq_len": 3, "example_len": 10}
    page = render_heads(d)
    assert "example_len=10," not in page and not page.rstrip().endswith("example_len=10")
    assert "example_len=3 (10 asked, capped at seq_len)" in page
    d["settings"] = {"seq_len": 20, "example_len": 10}
    assert "example_len=10" in render_heads(d)


# ---- charts / probe: near-constant values ------------------------------------------------------
def _y_labels(svg: str) -> list[str]:
    return re.findall(r'<text x="52" y="[^"]*" font-size="10" text-anchor="end">([^<]*)</text>', svg)


def _pts(svg: str) -> list[float]:
    return [float(y) for y in re.findall(r'<circle class="pt" cx="[^"]*" cy="([^"]*)"', svg)]


def test_line_chart_draws_near_constant_values_flat_with_distinct_ticks():
    svg = charts.line_chart({"s": ([0, 1], [0.0051547, 0.0051546])})
    ys = _pts(svg)
    assert len(ys) == 2 and abs(ys[0] - ys[1]) < 2  # flat: under 2 px apart
    labels = _y_labels(svg)
    assert len(labels) >= 2 and len(set(labels)) == len(labels)


def test_line_chart_keeps_a_meaningful_range():
    svg = charts.line_chart({"s": ([0, 1, 2], [0.1, 0.5, 0.2])})
    ys = _pts(svg)
    assert max(ys) - min(ys) > 150  # spread over the plot as before
    assert _y_labels(svg) == ["0.1", "0.2", "0.3", "0.4", "0.5"]


def test_probe_selectivity_of_near_equal_values_is_flat():
    from mechscope.report.probe import render_probe

    d = {"layers": [0, 1], "hooks": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], "accuracy": [0.6, 0.6],
         "train_accuracy": [0.7, 0.7], "control_accuracy": [0.5948453, 0.5948454], "selectivity": [0.0051547, 0.0051546],
         "majority": 0.4, "label_set": EVIL, "class_counts": {EVIL: 3}, "n_train": 40, "n_test": 10, "n_word_types": 12,
         "model": {"name": "tiny"}}
    page = render_probe(d)
    sel = page[page.index("Selectivity = accuracy"):]
    sel = sel[:sel.index("</svg>")]
    ys = _pts(sel)
    assert len(ys) == 2 and abs(ys[0] - ys[1]) < 2
    labels = _y_labels(sel)
    assert len(set(labels)) == len(labels) >= 2
    assert EVIL not in page
