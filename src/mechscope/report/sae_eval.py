"""The SAE evaluation page (``eval.html``) of ``mechscope sae eval``: the numbers and the
feature-density histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechscope.report.charts import histogram
from mechscope.report.toolkit import page, table, write_page

__all__ = ["render_sae_eval", "write_sae_eval"]

_ROWS = [
    ("l0", "L0: active features per token"),
    ("mse", "MSE: summed squared error per token"),
    ("fvu", "FVU: fraction of variance unexplained"),
    ("cos", "cosine similarity of reconstruction and input"),
    ("ce_clean", "CE loss, clean"),
    ("ce_sae", "CE loss, reconstruction spliced in"),
    ("ce_zero", "CE loss, activation zeroed"),
    ("ce_recovered", "CE loss recovered: (zero - sae) / (zero - clean)"),
    ("kl", "KL(clean || spliced), mean per token"),
    ("dead_frac", "dead features (never fired on these tokens)"),
    ("dense_frac", "dense features (fire on > 10% of tokens)"),
]


def render_sae_eval(d: dict[str, Any]) -> str:
    """The page for an ``eval.json`` dict (``SAEEval.to_dict()``)."""
    s = d.get("sae", {})
    kind = "transcoder" if s.get("hook_name_out") else "SAE"
    sub = (
        f"{s.get('architecture')} {kind}, d_in {s.get('d_in')}, d_sae {s.get('d_sae')}"
        + (f", k {s['k']}" if s.get("k") else "")
        + f" | {s.get('model_name')} {s.get('hook_name')}"
        + (f" -> {s['hook_name_out']}" if s.get("hook_name_out") else "")
        + f" | {d.get('tokens', 0):,} tokens of {d.get('settings', {}).get('corpus', 'held-out text')}"
    )
    metrics = table(["metric", "value"], [[label, d.get(key)] for key, label in _ROWS], numeric=[False, True])
    hist = histogram(d.get("density_hist", {}).get("log10_edges", []), d.get("density_hist", {}).get("counts", []),
                     title="feature density (log10 of the fraction of tokens a feature fires on; first bin: never)",
                     xlabel="log10 density", width=640, height=200)
    return page(f"SAE evaluation: {s.get('hook_name')}", f"<h2>Metrics</h2>{metrics}<h2>Feature density</h2>{hist}",
                kind="SAE evaluation", subtitle=sub)


def write_sae_eval(d: dict[str, Any], path: str | Path) -> Path:
    """Write the SAE evaluation page (``render_sae_eval``) to ``path``."""
    return write_page(render_sae_eval(d), path)
