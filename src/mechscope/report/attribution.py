"""The attribution graph page: ``render_attribution(doc) -> str`` for a ``graph.json`` document
(``mechscope.features.graph_files``); ``write_attribution(doc, path)``.

Self-contained and offline (the toolkit's page shell; ``assets/attribution.css`` and
``assets/attribution.js`` inlined): the document is embedded with ``json_script`` and drawn by
the script into SVG: one row per layer (token embeddings at the bottom, logits at the top),
one column per prompt position, edge width by |weight| (blue positive, red negative).
Clicking a node shows its facts, its strongest inputs and outputs, and highlights the paths
from it to the logits; every model string reaches the page through ``textContent`` or the
toolkit's escaping, never as markup.
"""

from __future__ import annotations

from pathlib import Path

from mechscope.report.toolkit import fmt, json_script, page, write_page


def render_attribution(doc: dict) -> str:
    """The page for one ``graph.json`` document (module docstring)."""
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
            + json_script("graph-data", doc))
    return page(f"Attribution graph: {meta.get('prompt', '')}", body, kind="attribution graph", subtitle=info,
                css=("attribution.css",), js=("attribution.js",))


def write_attribution(doc: dict, path: str | Path) -> Path:
    return write_page(render_attribution(doc), path)
