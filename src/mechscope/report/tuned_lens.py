"""The tuned-lens evaluation page (``eval.html``) of ``mechscope tuned-lens eval``: held-out KL
to the final distribution per layer, tuned lens against logit lens, from ``eval.json``
(``lens.tuned_eval.evaluate_tuned_lens``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mechscope.report.charts import line_chart
from mechscope.report.toolkit import cards, fmt, kv_table, page, table, write_page

__all__ = ["render_tuned_lens_eval", "write_tuned_lens_eval"]


def _log10(v: Any) -> float | None:
    return math.log10(v) if isinstance(v, (int, float)) and v > 0 else None


def render_tuned_lens_eval(d: dict[str, Any]) -> str:
    """The page for an ``eval.json`` dict of a tuned lens."""
    rows = d.get("layers") or []
    s = d.get("summary") or {}
    model = (d.get("model") or {}).get("name", "")
    lens = d.get("lens") or {}
    sub = f"{model} | translators read {lens.get('reads', '?')} | {fmt(d.get('tokens', 0))} held-out tokens of {d.get('corpus', '?')}"
    head = cards([
        ("below the logit lens", "every layer" if s.get("tuned_below_logit_every_layer") else "not everywhere",
         "layers where not: " + (", ".join(map(str, s.get("layers_tuned_not_below") or [])) or "none"), "primary"),
        ("min KL ratio, layers 10-20", fmt(s.get("min_ratio_layers_10_20")), "logit-lens KL / tuned-lens KL", ""),
        ("mean KL, logit lens", fmt(s.get("mean_kl_logit")), "nats", ""),
        ("mean KL, tuned lens", fmt(s.get("mean_kl_tuned")), "nats", ""),
    ])
    xs = [r.get("layer") for r in rows]
    kl = line_chart({"logit lens": (xs, [r.get("kl_logit") for r in rows]), "tuned lens": (xs, [r.get("kl_tuned") for r in rows])},
                    title="KL(final || lens) per layer, nats", xlabel="layer", width=640, height=300, hlines=[0.0])
    klog = line_chart({"logit lens": (xs, [_log10(r.get("kl_logit")) for r in rows]),
                       "tuned lens": (xs, [_log10(r.get("kl_tuned")) for r in rows])},
                      title="log10 KL per layer", xlabel="layer", width=640, height=260)
    top = line_chart({"logit lens": (xs, [r.get("top1_logit") for r in rows]), "tuned lens": (xs, [r.get("top1_tuned") for r in rows])},
                     title="top-1 agreement with the model's own prediction", xlabel="layer", width=640, height=260,
                     ylim=(0.0, 1.0))
    tab = table(["layer", "hook", "KL logit lens", "KL tuned lens", "ratio", "top-1 logit", "top-1 tuned"],
                [[r.get("layer"), r.get("hook"), r.get("kl_logit"), r.get("kl_tuned"), r.get("ratio"), r.get("top1_logit"),
                  r.get("top1_tuned")] for r in rows],
                numeric=[True, False, True, True, True, True, True])
    note = ('<p class="note">KL(p_final || q) in nats over the full vocabulary at each held-out position, averaged; '
            "p_final is the model's own next-token distribution, q the lens's reading of the layer's residual stream "
            "(logit lens: final norm and unembedding; tuned lens: the layer's affine translator first). A translator "
            "reading the final residual is the identity, so both lenses have KL 0 there.</p>")
    body = (f"{head}<h2>Per layer</h2>{note}<figure>{kl}</figure><figure>{klog}</figure><figure>{top}</figure>{tab}"
            f"<h2>Settings</h2>{kv_table('evaluation', [('corpus', d.get('corpus')), ('split', d.get('split')), ('tokens', d.get('tokens')), ('context length', d.get('context_len')), ('seconds', d.get('seconds')), ('lens', lens.get('path')), ('lens source', lens.get('source'))])}")
    return page("Tuned lens evaluation", body, kind="tuned lens", subtitle=sub)


def write_tuned_lens_eval(d: dict[str, Any], path: str | Path) -> Path:
    """Write the page (``render_tuned_lens_eval``) to ``path``."""
    return write_page(render_tuned_lens_eval(d), path)
