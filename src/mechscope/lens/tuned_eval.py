"""Held-out evaluation of a tuned lens against the logit lens (``mechscope tuned-lens eval``).

1. Harvest ``n_tokens`` positions of the corpus's held-out split (every 20th document; the
   lens trains on the others), one forward pass per batch of contexts, at every translator's
   hook and at the final residual.
2. At each position and layer, KL(p_final || q) in nats over the full vocabulary, for q the
   logit lens (the hook's residual through the final norm and unembedding) and the tuned lens
   (the same after the layer's translator), all in float32; also how often q's top token is
   the model's own top token.
3. Per layer: mean KL of both lenses, their ratio (logit / tuned), top-1 agreement; summary:
   whether the tuned lens is below the logit lens at every layer and the smallest ratio over
   layers 10-20 (the issue's targets), clipped to the model's depth.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mechscope.errors import MechscopeError
from mechscope.lens.tuned import TunedLens
from mechscope.models.hooks import FINAL_NORM_IN
from mechscope.models.unembed import final_norm, project
from mechscope.progress import ProgressArg, as_progress
from mechscope.results import library_versions

if TYPE_CHECKING:
    from mechscope.models import Model

EVAL_SCHEMA_VERSION = 1


@torch.no_grad()
def lens_kl(model, lens: TunedLens, rows: dict[str, torch.Tensor], chunk: int = 64) -> dict[str, torch.Tensor]:
    """Sums over the rows of KL(final || lens) and top-1 agreement per layer, for the logit lens
    and the tuned lens: {"kl_logit", "kl_tuned", "top1_logit", "top1_tuned"} each [n_layers]."""
    norm = final_norm(model)
    L = lens.n_layers
    out = {k: torch.zeros(L, dtype=torch.float64) for k in ("kl_logit", "kl_tuned", "top1_logit", "top1_tuned")}
    y = rows[FINAL_NORM_IN]
    for s in range(0, y.shape[0], chunk):
        lp = project(model, y[s:s + chunk], norm).log_softmax(-1)  # [c, V]
        top = lp.argmax(-1)
        p = lp.exp()
        for l, hook in enumerate(lens.hooks):
            h = rows[hook][s:s + chunk]
            for name, x in (("logit", h.float()), ("tuned", lens.translate(h, l))):
                lq = project(model, x, norm).log_softmax(-1)
                out[f"kl_{name}"][l] += float((p * (lp - lq)).sum())
                out[f"top1_{name}"][l] += float((lq.argmax(-1) == top).sum())
    return out


def evaluate_tuned_lens(model: Model, lens: TunedLens, corpus=None, n_tokens: int = 1024, context_len: int = 128,
                        forward_contexts: int = 8, progress: ProgressArg = False) -> dict[str, Any]:
    """Held-out KL to the final distribution per layer, tuned vs logit lens (module docstring),
    as a JSON-ready dict (``kind`` "tuned-lens-eval")."""
    from mechscope.lens.tuned_train import harvest_residuals

    lens.check_fits(model)
    lens = lens.to(model.device)
    t0 = time.perf_counter()
    L = lens.n_layers
    tot = {k: torch.zeros(L, dtype=torch.float64) for k in ("kl_logit", "kl_tuned", "top1_logit", "top1_tuned")}
    n = 0
    bar = as_progress(progress).phase("held-out KL", total=n_tokens, unit="tok")
    for rows, start in harvest_residuals(model, corpus, lens.hooks, n_tokens, "heldout", context_len, forward_contexts):
        part = lens_kl(model, lens, rows)
        for k in tot:
            tot[k] += part[k]
        n += rows[FINAL_NORM_IN].shape[0]
        bar.advance(rows[FINAL_NORM_IN].shape[0])
    bar.close()
    bad = sorted({l for k in tot for l in range(L) if not torch.isfinite(tot[k][l])})
    if bad:
        raise MechscopeError(f"the held-out KL is NaN or inf at layers {bad}, so there is no result to report; the model or "
                             "the translators give non-finite logits on this corpus, so check them or train the lens again.")
    layers: list[dict[str, Any]] = []
    for l, hook in enumerate(lens.hooks):
        kl_l, kl_t = float(tot["kl_logit"][l] / n), float(tot["kl_tuned"][l] / n)
        layers.append({"layer": l, "hook": hook, "kl_logit": kl_l, "kl_tuned": kl_t,
                       "ratio": kl_l / kl_t if kl_t > 0 and math.isfinite(kl_l / kl_t) else None,
                       "top1_logit": float(tot["top1_logit"][l] / n), "top1_tuned": float(tot["top1_tuned"][l] / n)})
    mid = [r for r in layers if 10 <= r["layer"] <= 20 and r["ratio"] is not None]
    nonfinal = [r for r in layers if r["kl_logit"] > 1e-6]  # a translator reading the final residual has KL 0 both ways
    summary = {
        "tuned_below_logit_every_layer": all(r["kl_tuned"] < r["kl_logit"] for r in nonfinal),
        "layers_tuned_not_below": [r["layer"] for r in nonfinal if not r["kl_tuned"] < r["kl_logit"]],
        "min_ratio_layers_10_20": min((r["ratio"] for r in mid), default=None),
        "mean_kl_logit": sum(r["kl_logit"] for r in layers) / L,
        "mean_kl_tuned": sum(r["kl_tuned"] for r in layers) / L,
    }
    return {"schema_version": EVAL_SCHEMA_VERSION, "kind": "tuned-lens-eval", "model": model.summary.to_dict(),
            "lens": {"path": lens.info.get("path"), "reads": lens.reads, "source": lens.info.get("source")},
            "corpus": "embedded" if corpus is None else str(corpus) if isinstance(corpus, (str, Path)) else getattr(corpus, "spec", "?"),
            "split": "heldout", "tokens": n, "context_len": context_len, "layers": layers, "summary": summary,
            "seconds": time.perf_counter() - t0, "versions": library_versions()}
