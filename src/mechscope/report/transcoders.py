"""The transcoder-set evaluation page (``eval.html``) of ``mechscope transcoders eval``: the
headline figures (all layers spliced at once), a per-layer table and a per-layer plot of FVU
and CE loss recovered, built from ``eval.json`` (``features.evaluate.evaluate_transcoders``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechscope.report.charts import line_chart
from mechscope.report.sae_eval import ce_gap_note
from mechscope.report.toolkit import cards, esc, fmt, kv_table, page, table, write_page

__all__ = ["render_transcoders_eval", "write_transcoders_eval"]


def render_transcoders_eval(d: dict[str, Any]) -> str:
    """The page for an ``eval.json`` dict of a transcoder set."""
    rows = d.get("layers") or []
    all_ = d.get("all_layers") or {}
    summ = d.get("summary") or {}
    settings = d.get("settings") or {}
    n_model = settings.get("n_layers_model")
    partial = n_model is not None and len(rows) != n_model
    sub = (f"{d.get('model', '')} | {len(rows)} layer{'s' * (len(rows) != 1)}"
           + (f" of {n_model}" if partial else "")
           + f" | {fmt(d.get('tokens', 0))} tokens of {settings.get('corpus', 'held-out text')}")
    ce_clean = d.get("ce_clean")
    all_gap = ce_gap_note(all_.get("ce_zero"), ce_clean, "all layers zeroed: ")
    unread = [str(r.get("layer", i)) for i, r in enumerate(rows) if ce_gap_note(r.get("ce_zero"), ce_clean)]
    head = cards([
        ("CE recovered, all spliced", fmt(all_.get("ce_recovered")) + (" (cannot be read)" if all_gap else ""),
         f"± {fmt(all_.get('ce_recovered_ci95'))} (95%); every layer's MLP replaced at once; baseline: all zeroed"
         + ("; zeroing is no worse than clean, see below" if all_gap else ""), "primary"),
        ("CE loss, clean", fmt(ce_clean), "nats per token, nothing spliced", ""),
        ("median FVU", fmt(summ.get("median_fvu")), f"max {fmt(summ.get('max_fvu'))}", ""),
        ("mean L0", fmt(summ.get("mean_l0")), "active features per token", ""),
        ("mean dead share", fmt(summ.get("mean_dead_frac")), "share of features never firing here, mean over layers", ""),
    ])
    gaps = [all_gap] if all_gap else []
    if unread:
        gaps.append(f"layer{'s' * (len(unread) != 1)} {', '.join(unread)} alone zeroed: the zero-ablated model is no worse "
                    "than the clean one, so that layer's CE recovered, which divides by the gap, cannot be read.")
    gap_note = "".join(f'<p class="note">CE recovered: {esc(g)}</p>' for g in gaps)
    tab = table(
        ["layer", "architecture", "d_sae", "FVU", "L0", "dead share", "CE spliced", "CE zeroed", "CE recovered", "± 95%",
         "FVU all positions"],
        [[r.get("layer"), r.get("architecture", ""), r.get("d_sae"), r.get("fvu"), r.get("l0"), r.get("dead_frac"),
          r.get("ce_spliced"), r.get("ce_zero"), r.get("ce_recovered"), r.get("ce_recovered_ci95"), r.get("fvu_with_special")]
         for r in rows],
        numeric=[True, False, True, True, True, True, True, True, True, True, True],
    )
    xs = [r.get("layer", i) for i, r in enumerate(rows)]
    plot = line_chart({"FVU": (xs, [r.get("fvu") for r in rows]), "CE recovered": (xs, [r.get("ce_recovered") for r in rows])},
                      title="per layer, that layer alone spliced in", xlabel="layer", width=640, height=280, hlines=[0.0, 1.0])
    note = ('<p class="note">FVU: squared error of the MLP output over its variance. CE recovered: (CE with the MLP '
            "output zeroed - CE with the transcoder's output spliced in) / (zeroed - clean), that layer alone; the "
            "all-layers figure splices every layer at once, each transcoder reading the spliced run's own input. "
            "The first position of each context (an attention sink) is left clean and unscored, and so are "
            "special tokens' positions (document separators, BOS) unless the settings say exclude_special false, "
            "and the other attention sinks (residual norm above sink_ratio times the median) unless sink_ratio is "
            "null; the FVU over all positions is the table's last column.</p>")
    other = kv_table("all layers spliced", ((k, v) for k, v in all_.items() if k != "layers"))
    body = (f"{head}{gap_note}<h2>Per layer</h2>{note}{plot}{tab}"
            f"<h2>Settings</h2>{other}{kv_table('settings', settings.items())}")
    return page("Transcoder set evaluation", body, kind="transcoder set", subtitle=sub)


def write_transcoders_eval(d: dict[str, Any], path: str | Path) -> Path:
    """Write the page (``render_transcoders_eval``) to ``path``."""
    return write_page(render_transcoders_eval(d), path)
