"""The attribution graph page: ``render_attribution(doc) -> str`` for a ``graph.json`` document
(``mechscope.features.graph_files``); ``write_attribution(doc, path)``.

Self-contained and offline (the toolkit's page shell; ``assets/attribution.css`` and
``assets/attribution.js`` inlined): the document is embedded with ``json_script`` and drawn by
the script into SVG: one row per layer (token embeddings at the bottom, logits at the top),
one column per prompt position, edge width by |weight| (blue positive, red negative).
Clicking a node shows its facts, its strongest inputs and outputs, and highlights the paths
from it to the logits; for a feature, also its card when given (``features.cards``: the
output tokens its decoder promotes and its top-activating corpus contexts, each token shaded
by the feature's activation); each ``--qk`` attention edge is drawn as a dashed arc from the
key position to the query position at its layer, and clicking it outlines the query-side
and key-side nodes of the graph and lists the pairs (the tables below the graph hold the same); every model string reaches the page through ``textContent`` or the
toolkit's escaping, never as markup.
"""

from __future__ import annotations

from pathlib import Path

from mechscope.report.toolkit import esc, fmt, html_num, json_script, page, table, write_page


def _qk_section(qk: list[dict]) -> str:
    """Tables of the QK attributions (``mechscope.features.qk``): per attention edge, the
    largest query-side x key-side pairs and each side's largest components."""
    if not qk:
        return ""
    parts = ['<section class="qk"><h2>Where the heads read from (QK attribution)</h2><p>Each attention score split '
             "exactly into query-side node x key-side node pairs (norm scales frozen, as in the graph); the rows sum to "
             "the score.</p>"]
    for d in qk:
        parts.append(f"<h3>Layer {esc(d['layer'])}, head {esc(d['head'])}: query position {esc(d['query_pos'])} "
                     f"&rarr; key position {esc(d['key_pos'])}</h3><p>score {html_num(d['score'])}, attention weight "
                     f"{html_num(d['weight'])}</p>")
        parts.append(table(["query side", "key side", "contribution"],
                           [[p["query_label"], p["key_label"], p["value"]] for p in d.get("top_pairs", [])[:12]]))
        parts.append(table(["query-side component", "share"], [[c["label"], c["value"]] for c in d.get("query_side", [])[:8]]))
        parts.append(table(["key-side component", "share"], [[c["label"], c["value"]] for c in d.get("key_side", [])[:8]]))
    return "".join(parts) + "</section>"


def render_attribution(doc: dict, qk: list[dict] | None = None, cards: dict[str, dict] | None = None) -> str:
    """The page for one ``graph.json`` document (module docstring), with the QK attributions
    of ``mechscope attribute --qk`` below the graph and the feature cards
    (``features.cards.feature_cards``, keyed "layer:feature") when given."""
    meta = doc.get("metadata", {})
    gen = meta.get("generator", {})
    capped = ""
    if gen.get("links_written", 0) < gen.get("links_total", 0):
        capped = f" Showing the {fmt(gen['links_written'])} strongest of {fmt(gen['links_total'])} links."
    info = (f"{fmt(len(doc.get('nodes', [])))} nodes, {fmt(len(doc.get('links', [])))} links; "
            f"{fmt(gen.get('n_active_features'))} active features ({fmt(gen.get('n_features_with_rows'))} with rows). "
            f"Replacement score {fmt(gen.get('replacement_score'), 2)} (pruned {fmt(gen.get('pruned_replacement_score'), 2)}), "
            f"completeness {fmt(gen.get('completeness_score'), 2)} (pruned {fmt(gen.get('pruned_completeness_score'), 2)}).{capped}")
    body = ('<div id="attr"><div id="graph"></div><aside id="side"><p>Click a node.</p></aside></div>'
            + json_script("graph-data", doc) + (json_script("feature-cards", cards) if cards else "")
            + (json_script("qk-data", qk) if qk else "")
            + _qk_section(qk or []))
    return page(f"Attribution graph: {meta.get('prompt', '')}", body, kind="attribution graph", subtitle=info,
                css=("attribution.css",), js=("attribution.js",))


def write_attribution(doc: dict, path: str | Path, qk: list[dict] | None = None,
                      cards: dict[str, dict] | None = None) -> Path:
    return write_page(render_attribution(doc, qk, cards), path)
