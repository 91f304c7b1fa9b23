"""The page of ``mechscope confusion``: pass rates before and after the edit (and the random
control) per language, the edit's cost on English, the lens at confusion points by layer, the
edited neurons and sample generations (model text escaped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechscope.report.charts import bar_chart, line_chart
from mechscope.report.toolkit import cards, esc, fmt, html_num, page, table, write_page

__all__ = ["render_confusion", "write_confusion"]


def _pct(x: Any, unit: str = "") -> str:
    """A rate in percent, one decimal (the tables' headers carry the %; cards pass ``unit="%"``)."""
    return "-" if x is None else f"{100 * float(x):.1f}{unit}"


def _rates_table(d: dict[str, Any], key: str) -> str:
    conds = list(d["conditions"])
    langs = list(d["conditions"]["baseline"][key]["by_lang"])
    rows = []
    for lang in [*langs, "all"]:
        row: list[Any] = [lang]
        for c in conds:
            r = d["conditions"][c][key]["all" if lang == "all" else "by_lang"]
            r = r if lang == "all" else r[lang]
            row += [_pct(r["lpr"]), _pct(r["english_rate"]), f"{r['scored']}/{r['n']}"]
        rows.append(row)
    heads = ["language"] + [f"{c} {h}" for c in conds for h in ("LPR %", "English %", "scored")]
    return table(heads, rows)


def render_confusion(d: dict[str, Any]) -> str:
    """The page for a ``confusion.json`` dict (``ConfusionResult.to_dict()``)."""
    h = d["headline"]
    base = h["baseline"]
    items = [("LPR before", _pct(base["lpr"], "%"), f"held-out {_pct(base['lpr_heldout'], '%')}", "")]
    for name, label in (("top", "after zeroing the top neurons"), ("random", "after zeroing random neurons")):
        if name in h:
            items.append((f"LPR {label}", _pct(h[name]["lpr"], "%"), f"held-out {_pct(h[name]['lpr_heldout'], '%')}", ""))
    s = d["settings"]
    lens = d["lens"]
    figs = ""
    for key, title, ylabel in (("mean_prob", "Probability of the next token by layer", "mean probability"),
                               ("median_rank", "Rank of the next token by layer", "median rank (0 = top)")):
        series = {}
        for name, label in (("confused", "confusion token at confusion points"), ("control", "generated token, no switch")):
            if name in lens:
                ys = lens[name][key]
                series[label] = (list(range(len(ys))), ys)
        chart = line_chart(series, title=f"{title} ({lens['lens']} lens)", xlabel="layer", ylabel=ylabel)
        figs += f"<figure>{chart}</figure>"
    cost_rows = []
    for name, c in d["costs"].items():
        rel = c.get("relative_change", {})
        cost_rows.append([name] + [fmt(c.get(k)) + (f" ({100 * rel[k]:+.1f}%)" if k in rel else "")
                                   for k in ("ioi_accuracy", "facts_accuracy", "perplexity")])
    top = d["neurons"]["top"]
    by_layer = d["neurons"]["top_by_layer"]
    bars = bar_chart([f"L{k}" for k in by_layer], list(by_layer.values()), title="Edited neurons per layer") if by_layer else ""
    spared = any("english_cost" in x for x in top)  # --english-budget: each neuron's zeroing cost on English text
    neuron_rows = [[f"L{x['layer']}.n{x['neuron']}", fmt(x["score"]), fmt(x["confused"]), fmt(x["control"]), x["count"]]
                   + ([fmt(x.get("english_cost"))] if spared else []) for x in top[:30]]
    samples = []
    texts = {c: d["conditions"][c]["texts"] for c in d["conditions"]}
    for i, p in enumerate(d["prompts"]):
        if d["cp_tokens"][i] is None:
            continue
        row = [p["lang"], p["prompt"], d["cp_tokens"][i]] + [texts[c][i][:240] for c in texts]
        samples.append(row)
        if len(samples) >= 20:
            break
    notes = "".join(f"<p class='muted'>{esc(n)}</p>" for n in d.get("notes", []))
    body = (
        f"<p>Model {esc(d['model'].get('name', ''))}: {len(d['prompts'])} prompts ({esc(', '.join(s['langs']))}), greedy "
        f"{s['n_tokens']} new tokens through the chat template. Neurons ranked by {esc(s['ranking'])} over the find split; "
        f"top {s['top_n']} zeroed; control: as many random neurons per layer (seed {s['seed']}).</p>{notes}"
        + cards(items)
        + "<h2>Pass rates</h2><p class='muted small'>LPR (Language Confusion Benchmark): share of responses whose every line "
          f"of at least {s['min_words']} words is identified as the expected language (probability above {s['threshold']}); "
          "English %: share with a line identified as English. All prompts:</p>"
        + _rates_table(d, "rates") + "<p class='muted small'>Held-out prompts only (not used to find the neurons):</p>"
        + _rates_table(d, "heldout")
        + "<h2>Cost on English</h2>"
        + table(["condition", "IOI accuracy", "facts top-1", "perplexity"], cost_rows)
        + f"<h2>Where the English token takes over</h2><p class='muted small'>{html_num(lens['n_confused'])} confusion points, "
          f"{html_num(lens['n_control'])} control positions (relative position {html_num(lens['relative_position'])} of generations "
          f"without a switch).</p>{figs}"
        + f"<h2>Edited neurons</h2>{bars}"
        + table(["neuron", "score", "mean gain, confused", "mean gain, control", "prompts in top"]
                + (["English loss when zeroed alone (nats)"] if spared else []), neuron_rows)
        + "<h2>Generations that switched</h2>"
        + table(["lang", "prompt", "confusion token", *[f"{c} text" for c in texts]], samples)
    )
    return page("Language confusion", body, kind="confusion")


def write_confusion(d: dict[str, Any], path: str | Path) -> Path:
    """Write the confusion page to ``path``."""
    return write_page(render_confusion(d), path)
