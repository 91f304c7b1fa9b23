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


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _span(layers: list[Any]) -> str:
    """Layer numbers as "layer 3", "layers 0-1" (consecutive) or "layers 0, 2, 5"."""
    if len(layers) == 1:
        return f"layer {layers[0]}"
    if all(isinstance(x, int) for x in layers) and layers == list(range(layers[0], layers[0] + len(layers))):
        return f"layers {layers[0]}-{layers[-1]}"
    return "layers " + ", ".join(map(str, layers))


def _below_card(rows: list[dict[str, Any]], s: dict[str, Any]) -> tuple[str, str, str, str]:
    """Whether the tuned lens is below the logit lens, over the layers where that can be decided:
    a layer whose logit-lens KL is 0 (the last, where the translator is the identity and both KLs
    are 0) decides nothing; the evaluation leaves out the same layers (``kl_logit`` <= 1e-6)."""
    every = bool(s.get("tuned_below_logit_every_layer"))
    not_below = "layers where not: " + (", ".join(map(str, s.get("layers_tuned_not_below") or [])) or "none")
    undecided = [r.get("layer") for r in rows if _num(r.get("kl_logit")) and r["kl_logit"] <= 1e-6]
    if not rows or not undecided:
        return ("below the logit lens", "every layer" if every else "not everywhere", not_below, "primary")
    n_decided = len(rows) - len(undecided)
    last = [r.get("layer") for r in rows[len(rows) - len(undecided):]]
    if n_decided == 0:
        scope = "no layer"
    elif undecided == last:
        scope = "every layer before the last" if len(undecided) == 1 else f"every layer before {_span(undecided)}"
    else:
        scope = f"every layer but {_span(undecided)}"
    value = scope if every or n_decided == 0 else "not everywhere"
    why = (f"; {_span(undecided)}: KL 0 both ways ({'the translator is the identity' if undecided == last else 'undecidable'}),"
           " left out")
    return ("below the logit lens", value, not_below + why, "primary")


def _ratio_card(rows: list[dict[str, Any]], s: dict[str, Any]) -> tuple[str, str, str, str]:
    """The smallest KL ratio over layers 10-20 (the evaluation's range, ``min_ratio_layers_10_20``),
    labelled with the layers of that range the lens has; over every layer with a ratio where it
    has none of them."""
    rated = [r for r in rows if _num(r.get("ratio"))]
    mid = [r["layer"] for r in rated if _num(r.get("layer")) and 10 <= r["layer"] <= 20]
    if mid or s.get("min_ratio_layers_10_20") is not None or not rated:
        where = _span(mid) if mid else "layers 10-20"
        return (f"min KL ratio, {where}", fmt(s.get("min_ratio_layers_10_20")), "logit-lens KL / tuned-lens KL", "")
    everywhere = [r.get("layer") for r in rated]
    return (f"min KL ratio, {_span(everywhere)}", fmt(min(r["ratio"] for r in rated)),
            "logit-lens KL / tuned-lens KL; the model has no layers 10-20 (the range of the usual figure)", "")


def render_tuned_lens_eval(d: dict[str, Any]) -> str:
    """The page for an ``eval.json`` dict of a tuned lens."""
    rows = d.get("layers") or []
    s = d.get("summary") or {}
    model = (d.get("model") or {}).get("name", "")
    lens = d.get("lens") or {}
    sub = f"{model} | translators read {lens.get('reads', '?')} | {fmt(d.get('tokens', 0))} held-out tokens of {d.get('corpus', '?')}"
    head = cards([
        _below_card(rows, s),
        _ratio_card(rows, s),
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
                [[r.get("layer"), r.get("hook"), r.get("kl_logit"), r.get("kl_tuned"),
                  "n/a" if r.get("ratio") is None else r.get("ratio"), r.get("top1_logit"),
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
