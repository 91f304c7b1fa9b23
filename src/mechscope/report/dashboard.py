"""Render feature dashboards (``dashboard.json``, from ``mechscope.sae.dashboard``) as one
self-contained HTML page: an index table, then one section per feature with its top activating
contexts (per-token shading, the maximum outlined), quantile groups with uniform samples, the
activation histogram, the top positive and negative output logits and the firing density.

Everything is drawn with the report toolkit (``toolkit``, ``charts``), which escapes every string it is
given (model tokens can contain markup); the page loads nothing from the network and runs no script.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mechscope.report.charts import bar_chart, histogram
from mechscope.report.toolkit import esc, fmt, highlighted_tokens, html_num, page, pct, show_token, write_page

__all__ = ["render_dashboard", "write_dashboard"]

def render_dashboard(data: dict[str, Any]) -> str:
    """HTML for a parsed ``dashboard.json`` (``DashboardResult.to_dict()``)."""
    feats = data["features"]
    model, sae, st = data.get("model", {}), data.get("sae", {}), data.get("settings", {})
    sub = (f"{model.get('name', '?')} · SAE {sae.get('architecture', '?')} d_sae={sae.get('d_sae', '?')} at "
           f"{sae.get('hook_name', '?')} · {data['n_tokens']:,} tokens in {data['n_contexts']:,} contexts of "
           f"{st.get('ctx_len', '?')} · {len(feats)} features")
    parts = [_index(feats), _explain(data)]
    parts += [_feature(f, data["hist_bins"]) for f in feats]
    return page("Feature dashboards", "".join(parts), kind="SAE feature dashboards", subtitle=sub, css=["dashboard.css"])


def write_dashboard(data: dict[str, Any], path: str | Path) -> Path:
    """Write the dashboard page (``render_dashboard``) to ``path``."""
    return write_page(render_dashboard(data), path)


def _index(feats: list[dict]) -> str:
    rows = []
    for f in feats:
        top = f["top"][0] if f["top"] else None
        tok = top["tokens"][top["centre"]] if top else ""
        rows.append(f'<tr><td><a href="#f{int(f["feature"])}">{int(f["feature"])}</a></td>'
                    f'<td class="num">{pct(f["density"])}</td><td class="num">{html_num(f["max_act"])}</td>'
                    f'<td>{show_token(tok, 24)}</td><td>{esc(", ".join(t for t, _ in f["logits_pos"][:3]))}</td></tr>')
    head = "<tr><th>feature</th><th>density</th><th>max act</th><th>top token</th><th>top output logits</th></tr>"
    return f'<h2>Index</h2><table class="data"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _explain(data: dict) -> str:
    st = data.get("settings", {})
    return ('<p class="muted small">Top contexts: the contexts with the highest maximum activation, a window of '
            f'{esc(st.get("window_left", "?"))} tokens before and {esc(st.get("window_right", "?"))} after the maximum '
            '(outlined). Quantile groups split the firing tokens at quantiles of the histogram and show a uniform '
            'random sample of each. Output logits: the decoder direction through the final norm weight and the '
            'unembedding (direct effect on the logits). Density: the fraction of tokens on which the feature fires.</p>')


def _feature(f: dict, hist_bins: list) -> str:
    fid = int(f["feature"])
    head = (f'<div class="feat" id="f{fid}"><h2>Feature {fid}</h2>'
            f'<span class="stat">density <b>{pct(f["density"])}</b> ({f["n_firing"]:,} tokens)</span>'
            f'<span class="stat">max <b>{html_num(f["max_act"])}</b></span>'
            f'<span class="stat">mean when firing <b>{html_num(f["mean_act"])}</b></span>')
    if not f["n_firing"]:
        return head + '<p class="muted">This feature never fired on the corpus read.</p></div>'
    figs = [_histogram(f, hist_bins)]
    for name, rows in (("top positive logits", f["logits_pos"]), ("top negative logits", f["logits_neg"])):
        if rows:
            figs.append(bar_chart([t for t, _ in rows], [v for _, v in rows], title=name, width=300, bar=13))
    body = [f'<div class="grid">{"".join(figs)}</div>', "<h3>Top activating contexts</h3>"]
    body += [_ctx(e, f["max_act"]) for e in f["top"]]
    body.append("<h3>Quantile groups</h3>")
    total = f["n_firing"] or 1
    for g in reversed(f["quantiles"]):
        label = (f'[{fmt(g["lo"])}, {fmt(g["hi"])}]: {g["n_tokens"]:,} tokens ({pct(g["n_tokens"] / total)} of firings), '
                 f'{len(g["samples"])} sampled')
        body.append(f"<details><summary>{esc(label)}</summary>{''.join(_ctx(e, f['max_act']) for e in g['samples'])}</details>")
    return head + "".join(body) + "</div>"


def _ctx(e: dict, vmax: float) -> str:
    line = highlighted_tokens(e["tokens"], e["acts"], vmax=vmax or None, mark=e["centre"])
    return f'<div class="row"><span class="val">{html_num(e["value"])}</span>{line}</div>'


def _histogram(f: dict, hist_bins: list) -> str:
    counts = f["hist"][1:]  # positive bins
    nz = [i for i, c in enumerate(counts) if c]
    a, b = nz[0], nz[-1] + 1
    bins = hist_bins[1:]
    edges = [bins[a][0]] + [(hi if hi is not None and math.isfinite(hi) else f["max_act"]) for _, hi in bins[a:b]]
    title = f"activation histogram (firing tokens; {f['hist'][0]:,} at zero)"
    return histogram(edges, counts[a:b], title=title, xlabel="activation (log-spaced bins)", width=380)
