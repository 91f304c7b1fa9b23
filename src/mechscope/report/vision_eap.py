"""The page of ``mechscope vision eap``: the held-out faithfulness curve of the ViT's edge
ranking against random circuits of the same size, the chosen circuit's figures and its
strongest edges (``render_vision_eap(d) -> str`` for an ``eap.json`` dict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechscope.report.charts import line_chart
from mechscope.report.toolkit import fmt, kv_table, num_or_nan, page, table, write_page

__all__ = ["render_vision_eap", "write_vision_eap"]


def render_vision_eap(d: dict[str, Any]) -> str:
    """The page for one ``eap.json`` dict (``VisionEAPResult.to_dict()``)."""
    curve = d.get("curve", [])
    xs = [num_or_nan(c.get("fraction")) for c in curve]
    chart = line_chart({"top edges (held-out pairs)": (xs, [num_or_nan(c.get("faithfulness")) for c in curve]),
                        "random edges": (xs, [num_or_nan(c.get("random")) for c in curve])},
                       title="Faithfulness by circuit size", xlabel="fraction of edges", ylabel="faithfulness",
                       logx=True, hlines=[0.0, 1.0], legend="top")
    ch = d.get("chosen", {})
    held = ch.get("held_out", {})
    facts = [("classes (clean vs corrupt)", f"{d.get('clean_class')} vs {d.get('corrupt_class')}"),
             ("method", f"{d.get('method')} ({d.get('steps')} steps)" if d.get("method") == "eap-ig" else d.get("method")),
             ("pairs (scoring / held-out)", f"{fmt((d.get('n_pairs') or {}).get('fit'))} / {fmt((d.get('n_pairs') or {}).get('held_out'))}"),
             ("chosen circuit", f"{fmt(ch.get('n_edges'))} of {fmt(d.get('n_edges'))} edges ({fmt(100 * num_or_nan(ch.get('fraction')), 2)}%)"),
             ("faithfulness, scoring pairs", fmt(ch.get("faithfulness_fit"))),
             ("faithfulness, held-out pairs", f"{fmt(held.get('faithfulness'))} (95% interval {fmt(held.get('ci_low'))} to "
                                              f"{fmt(held.get('ci_high'))})"),
             ("held-out accuracy (clean / corrupt images)", f"{fmt((d.get('accuracy') or {}).get('clean'))} / "
                                                             f"{fmt((d.get('accuracy') or {}).get('corrupt'))}")]
    edges = table(["sender", "receiver", "score"], [[e["sender"], e["receiver"], e["score"]] for e in d.get("top_edges", [])])
    body = (kv_table("Circuit", facts) + chart
            + "<h2>Strongest edges of the circuit</h2><p>EAP score: the estimated change of the logit difference when "
              "the edge alone carries the corrupt image's activation (negative: the edge carries the behaviour).</p>"
            + edges)
    return page(f"ViT circuit: {d.get('clean_class')} vs {d.get('corrupt_class')}", body, kind="vision EAP circuit",
                subtitle="EAP over the ViT's heads and MLPs (the language graph and selection, on images)")


def write_vision_eap(d: dict[str, Any], path: str | Path) -> Path:
    return write_page(render_vision_eap(d), path)
