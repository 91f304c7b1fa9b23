"""The SAE evaluation page (``eval.html``) of ``mechscope sae eval``: the numbers and the
feature-density histogram."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mechscope.report.charts import histogram
from mechscope.report.toolkit import esc, fmt, page, table, write_page

__all__ = ["ce_gap_note", "render_sae_eval", "write_sae_eval"]

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
    ("dead_frac", "dead features, share of all (never fired on these tokens)"),
    ("dense_frac", "dense features, share of all (fire on > 10% of tokens)"),
]
_SHARES = ("dead_frac", "dense_frac")


def ce_gap_note(ce_zero: Any, ce_clean: Any, what: str = "") -> str:
    """Plain text saying why CE loss recovered, (zero - spliced) / (zero - clean), cannot be
    read when zero-ablating is not clearly worse than the clean run (``ce_zero - ce_clean`` at
    most 1e-3 of the clean loss, or 1e-3 nats, e.g. a small random model: the ratio then has a
    tiny or negative denominator); empty when it can be read or the losses are missing."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (ce_zero, ce_clean)):
        return ""
    gap = ce_zero - ce_clean
    if gap > 1e-3 * max(1.0, abs(ce_clean)):
        return ""
    return (f"{what}the zero-ablated model is no worse than the clean one (CE {fmt(ce_zero, 4)} zeroed vs "
            f"{fmt(ce_clean, 4)} clean, a gap of {fmt(gap, 2)} nats), so CE loss recovered, which divides by that gap, "
            "cannot be read.")


def _share(d: dict[str, Any], key: str) -> Any:
    """A share of the features, with the count it stands for where the dictionary size is known."""
    v, n = d.get(key), (d.get("sae") or {}).get("d_sae")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and isinstance(n, int) and n > 0:
        return f"{fmt(v)} ({round(v * n):,} of {n:,})"
    return v


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
    gap = ce_gap_note(d.get("ce_zero"), d.get("ce_clean"))

    def cell(key: str) -> Any:
        if key in _SHARES:
            return _share(d, key)
        if key == "ce_recovered" and gap:
            return f"{fmt(d.get(key))} (cannot be read: see below)"
        return d.get(key)

    metrics = table(["metric", "value"], [[label, cell(key)] for key, label in _ROWS], numeric=[False, True])
    if gap:
        metrics += f'<p class="note">CE loss recovered: {esc(gap)}</p>'
    hist = histogram(d.get("density_hist", {}).get("log10_edges", []), d.get("density_hist", {}).get("counts", []),
                     title="feature density (log10 of the fraction of tokens a feature fires on; first bin: never)",
                     xlabel="log10 density", width=640, height=200)
    return page(f"SAE evaluation: {s.get('hook_name')}", f"<h2>Metrics</h2>{metrics}<h2>Feature density</h2>{hist}",
                kind="SAE evaluation", subtitle=sub)


def write_sae_eval(d: dict[str, Any], path: str | Path) -> Path:
    """Write the SAE evaluation page (``render_sae_eval``) to ``path``."""
    return write_page(render_sae_eval(d), path)
