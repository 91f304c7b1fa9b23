"""Aggregate per-fact recall results into the papers' summary figures (plain JSON numbers)."""

from __future__ import annotations

from statistics import mean
from typing import Any

import torch

from mechscope.recall.categories import CATEGORIES
from mechscope.recall.knockout import GROUPS


def _tracing(results: list, L: int) -> dict[str, Any] | None:
    tr = [r for r in results if r.trace is not None]
    if not tr:
        return None
    by: dict[str, dict[str, Any]] = {}
    for kind in tr[0].trace.restored:
        by[kind] = {}
        for cat in CATEGORIES:
            rows, clean, corr = [], [], []
            for r in tr:
                pos = r.categories()[cat]
                if pos:
                    rows.append(r.trace.restored[kind][:, pos].mean(1))
                    clean.append(r.trace.clean_prob)
                    corr.append(r.trace.corrupt_prob)
            if not rows:
                by[kind][cat] = None
                continue
            m, c, k = torch.stack(rows).mean(0), mean(clean), mean(corr)
            rec = (m - k) / (c - k) if c != k else torch.full_like(m, float("nan"))
            by[kind][cat] = {"n": len(rows), "restored_prob": m.tolist(), "clean_prob": c, "corrupt_prob": k,
                             "recovered": rec.tolist()}
    return {"layers": tr[0].trace.layers, "clean_prob": mean(r.trace.clean_prob for r in tr), "corrupt_prob": mean(r.trace.corrupt_prob for r in tr),
            "by_category": by}


def _knockout(results: list) -> dict[str, Any]:
    out: dict[str, Any] = {"layers": results[0].knockout.layers if results else []}
    for g in GROUPS:
        curves = [r.knockout.relative_change[g] for r in results if g in r.knockout.relative_change]
        out[g] = {"n": len(curves), "relative_change": torch.stack(curves).mean(0).tolist()} if curves else None
    return out


def _extraction(results: list) -> dict[str, Any] | None:
    ex = [r.extraction for r in results if r.extraction is not None]
    if not ex:
        return None
    out: dict[str, Any] = {"n": len(ex)}
    for k in ("attn", "mlp"):
        ranks = torch.stack([getattr(e, k + "_rank") for e in ex]).float()  # [facts, L]
        out[k + "_rate"] = (ranks == 0).float().mean(0).tolist()
        out[k + "_median_rank"] = ranks.median(0).values.tolist()
        out[k + "_any"] = float((ranks == 0).any(1).float().mean())
    return out


def _enrichment(results: list) -> dict[str, Any] | None:
    en = [r.enrichment for r in results if r.enrichment is not None]
    if not en:
        return None
    return {"n": len(en), "rate": torch.stack([e.rate for e in en]).mean(0).tolist(),
            "control_rate": torch.stack([e.control_rate for e in en]).mean(0).tolist(),
            "mean_related_tokens": mean(len(e.related) for e in en)}


def _peak(values: list[float], layers: list[int], keep) -> dict[str, float]:
    """The largest value (NaN skipped) among the layers for which keep(layer) holds."""
    cand = [(v, l) for v, l in zip(values, layers) if keep(l) and v == v]
    v, l = max(cand) if cand else (float("nan"), -1)
    return {"layer": l, "value": v}


def _trough(values: list[float], layers: list[int]) -> dict[str, float]:
    v, l = min(zip(values, layers))
    return {"layer": l, "value": v}


def headline(agg: dict[str, Any], L: int) -> dict[str, Any]:
    """The figures the issue's verification names, from the aggregate.

    Tracing: the peak recovered fraction per (kind, category) over all layers and over the
    early-middle layers [0, 2L/3). Knockout: per group, the most negative mean relative
    change and the mean over windows centred in the upper half [L/2, L).
    """
    h: dict[str, Any] = {}
    t = agg.get("causal_tracing")
    if t:
        ls = t["layers"]
        h["tracing_peak_recovered"] = {
            kind: {cat: {"all_layers": _peak(v["recovered"], ls, lambda l: True),
                         "early_middle": _peak(v["recovered"], ls, lambda l: l < (2 * L) // 3)}
                   for cat, v in cats.items() if v is not None}
            for kind, cats in t["by_category"].items()
        }
    k = agg.get("attention_knockout")
    if k:
        h["knockout"] = {}
        for subset, groups in k.items():
            ls = groups["layers"]
            h["knockout"][subset] = {
                g: {"min": _trough(v["relative_change"], ls),
                    "upper_half_mean": mean(x for x, l in zip(v["relative_change"], ls) if l >= L // 2)}
                for g, v in groups.items() if g != "layers" and v is not None
            }
    return h


def aggregate(results: list, L: int) -> dict[str, Any]:
    """Everything the dataset report shows, from per-fact ``RecallResult``s."""
    agg: dict[str, Any] = {"n": len(results)}
    agg["causal_tracing"] = _tracing(results, L)
    ko = [r for r in results if r.knockout is not None]
    if ko:
        agg["attention_knockout"] = {"all": _knockout(ko),
                                     "subject_not_first": _knockout([r for r in ko if r.subject_pos[0] != 0])}
    agg["attribute_extraction"] = _extraction(results)
    agg["subject_enrichment"] = _enrichment(results)
    agg["headline"] = headline(agg, L)
    return agg
