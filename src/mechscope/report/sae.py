"""HTML page for an SAE evaluation: the numbers and the feature-density histogram."""

from __future__ import annotations

from pathlib import Path

from mechscope.report import svg
from mechscope.sae.evaluate import SAEEval

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


def eval_html(r: SAEEval) -> str:
    s = r.sae
    kind = "transcoder" if s.get("hook_name_out") else "SAE"
    sub = (
        f"{s.get('architecture')} {kind}, d_in {s.get('d_in')}, d_sae {s.get('d_sae')}"
        + (f", k {s['k']}" if s.get("k") else "")
        + f" | {s.get('model_name')} {s.get('hook_name')}"
        + (f" -> {s['hook_name_out']}" if s.get("hook_name_out") else "")
        + f" | {r.tokens:,} tokens of {r.settings.get('corpus', 'held-out text')}"
    )
    table = svg.table(["metric", "value"], [[label, getattr(r, key)] for key, label in _ROWS], numeric=[False, True])
    edges = r.density_hist.get("log10_edges", [])
    counts = r.density_hist.get("counts", [])
    hist = svg.histogram(edges, counts, title="feature density (log10 of the fraction of tokens a feature fires on; first bin: never)",
                         xlabel="log10 density", width=640, height=200)
    return svg.page(f"SAE evaluation: {s.get('hook_name')}", f"<h2>Metrics</h2>{table}<h2>Feature density</h2>{hist}", subtitle=sub)


def write_eval_report(r: SAEEval, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(eval_html(r), encoding="utf-8")
    return path
