"""The recall page of ``mechscope recall``: causal-tracing heatmaps, knockout curves,
attribute-extraction and subject-enrichment curves, for one fact (``kind`` "recall") or
aggregated over the facts list (``kind`` "recall-dataset")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechscope.report.charts import heatmap, line_chart
from mechscope.report.toolkit import esc, html_num, page, table, write_page

__all__ = ["render_recall", "write_recall"]

KIND_TITLE = {"resid": "residual stream", "mlp": "MLP outputs (window)", "attn": "attention outputs (window)"}


def _tracing_fact(t: dict[str, Any], tokens: list[str], subject_pos: list[int]) -> str:
    cols = [f"{'* ' if p in subject_pos else ''}{p}:{tok}" for p, tok in enumerate(tokens)]  # first: long tokens are cut
    figs = []
    for kind, mat in t["restored_prob"].items():
        rows = [[mat[i][p] for i in range(len(t["layers"]))] for p in range(len(tokens))]  # position x layer
        figs.append(heatmap(rows, cols, [str(l) for l in t["layers"]], title=f"restored p(target): {KIND_TITLE[kind]}",
                            vmin=0.0, row_title="position (* subject)", col_title="layer", cell=14))
    return (f"<p>clean p = {html_num(t['clean_prob'])}, corrupted p = {html_num(t['corrupt_prob'])} (noise std {html_num(t['noise_std'])}, "
            f"window {esc(t['window'])} layers).</p><div class='grid'>" + "".join(figs) + "</div>")


def _curves(curves: dict[str, list[float]], layers: list[int], title: str, ylabel: str, ylim=None) -> str:
    series = {k: (layers, v) for k, v in curves.items() if v is not None}
    return line_chart(series, title=title, xlabel="layer", ylabel=ylabel, ylim=ylim)


def _fact_page(d: dict[str, Any]) -> str:
    """The page for one fact (``RecallResult.to_dict()``)."""
    parts = [f"<p>Prompt <code>{esc(d['prompt'])}</code>, subject <code>{esc(d['subject'])}</code> "
             f"(positions {esc(d['subject_positions'])}), target <code>{esc(d['target'])}</code>.</p>"]
    if "causal_tracing" in d:
        parts.append("<h2>Causal tracing</h2>" + _tracing_fact(d["causal_tracing"], d["tokens"], d["subject_positions"]))
    if "attention_knockout" in d:
        k = d["attention_knockout"]
        parts.append(f"<h2>Attention knockout (window {esc(k['window'])})</h2>"
                     + _curves(k["relative_change"], k["layers"], "relative change of p(target)", "(p_ko - p) / p")
                     + table(["group", "key positions"], [[g, str(v)] for g, v in k["key_positions"].items()]))
    if "attribute_extraction" in d:
        e = d["attribute_extraction"]
        L = list(range(len(e["attn_rank"])))
        parts.append("<h2>Attribute extraction at the last position</h2>"
                     f"<p>attribute top-1 in attention outputs at layers {esc(e['attn_layers'])}, in MLP outputs at "
                     f"{esc(e['mlp_layers'])}.</p>"
                     + table(["layer", "attn rank", "attn top token", "mlp rank", "mlp top token"],
                             [[l, e["attn_rank"][l], repr(e["attn_top_token"][l]), e["mlp_rank"][l], repr(e["mlp_top_token"][l])] for l in L],
                             numeric=[True, True, False, True, False]))
    if "subject_enrichment" in d:
        n = d["subject_enrichment"]
        L = list(range(len(n["rate"])))
        parts.append("<h2>Subject enrichment</h2>"
                     + _curves({"subject": n["rate"], f"control ({n['control_subject']})": n["control_rate"]}, L,
                               "attribute rate of the top tokens at the last subject token", "rate")
                     + f"<p class='small muted'>related tokens: {esc(', '.join(n['related_tokens']))}</p>")
    return page(f"Recall: {d['prompt']}", "".join(parts), kind="factual recall", subtitle=f"mechscope recall, {d['model'].get('name', '')}")


def _dataset_page(d: dict[str, Any]) -> str:
    """The page for the facts list (``RecallDatasetResult.to_dict()``)."""
    a = d["aggregate"]
    parts = [f"<p>{esc(d['n_analysed'])} facts drawn from the {esc(d['n_known_top1'])} of {esc(d['n_facts_in_list'])} facts the model "
             f"gets top-1; {html_num(d['seconds'])} s.</p>"]
    t = a.get("causal_tracing")
    if t:
        parts.append(f"<h2>Causal tracing, averaged by position category</h2><p>mean clean p = {html_num(t['clean_prob'])}, "
                     f"mean corrupted p = {html_num(t['corrupt_prob'])}.</p><div class='grid'>")
        for kind, cats in t["by_category"].items():
            names = [c for c, v in cats.items() if v is not None]
            rows = [cats[c]["restored_prob"] for c in names]
            parts.append(heatmap(rows, [f"{c} ({cats[c]['n']})" for c in names], [str(l) for l in t["layers"]],
                                 title=f"mean restored p: {KIND_TITLE[kind]}", vmin=0.0, col_title="layer", cell=14,
                                 label_limit=22))
        parts.append("</div>")
        for kind, cats in t["by_category"].items():
            parts.append(_curves({c: v["recovered"] for c, v in cats.items() if v is not None and c != "before_subject"},
                                 t["layers"], f"recovered fraction: {KIND_TITLE[kind]}", "(p_r - p*) / (p - p*)"))
    k = a.get("attention_knockout")
    if k:
        parts.append("<h2>Attention knockout (last position &rarr; key group)</h2>")
        for subset, groups in k.items():
            parts.append(_curves({g: v["relative_change"] for g, v in groups.items() if g != "layers" and v},
                                 groups["layers"], f"mean relative change of p ({subset})", "(p_ko - p) / p"))
    e = a.get("attribute_extraction")
    if e:
        L = list(range(len(e["attn_rate"])))
        parts.append("<h2>Attribute extraction</h2>"
                     + _curves({"attention": e["attn_rate"], "MLP": e["mlp_rate"]}, L, "fraction of facts with the attribute top-1", "rate")
                     + f"<p>facts with an extraction event: attention {html_num(e['attn_any'])}, MLP {html_num(e['mlp_any'])}.</p>")
    n = a.get("subject_enrichment")
    if n:
        L = list(range(len(n["rate"])))
        parts.append("<h2>Subject enrichment</h2>"
                     + _curves({"subject": n["rate"], "control": n["control_rate"]}, L, "mean attribute rate (top-50)", "rate"))
    rows = [[f["subject"], f["target"], f.get("relation", ""), f.get("causal_tracing", {}).get("clean_prob", float("nan")),
             f.get("causal_tracing", {}).get("corrupt_prob", float("nan"))] for f in d["facts"]]
    parts.append("<h2>Facts</h2>" + table(["subject", "target", "relation", "clean p", "corrupted p"], rows,
                                          numeric=[False, False, False, True, True]))
    return page("Recall over the facts list", "".join(parts), kind="factual recall", subtitle=f"mechscope recall --dataset facts, {d['model'].get('name', '')}")


def render_recall(d: dict[str, Any]) -> str:
    """The page for a ``recall.json`` dict: one fact, or the facts list (``kind`` "recall-dataset")."""
    return _dataset_page(d) if d.get("kind") == "recall-dataset" else _fact_page(d)


def write_recall(d: dict[str, Any], path: str | Path) -> Path:
    """Write the recall page (``render_recall``) to ``path``."""
    return write_page(render_recall(d), path)
