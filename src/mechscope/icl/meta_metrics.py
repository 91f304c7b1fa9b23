"""The three attention metrics of Minegishi et al. 2025 and the plateaus of an accuracy curve.

On patterns [layers, batch, heads, q_pos, k_pos] of sequences laid out as in
``icl.meta_data`` (example i at 2i, its label at 2i + 1, the query at 2n), per layer,
averaged over sequences and heads:

- ``self``: the query's attention to itself (the non-context circuit: answer from the query alone);
- ``label``: the query's attention summed over the label positions (the semi-context circuit);
- ``chunk``: each label position's attention to its own example, averaged over the pairs
  (the full-context circuit binds an example to its label, a "chunk").

Headline values are the first layer's, where all three circuits differ: the query reads itself
(non-context) or the labels (semi-context) there, and a binding must happen there to reach the
query through the next layer (full context). Chosen after looking at both layers of the measured
run (docs/decisions.md): the last layer's query attends to itself until the full-context circuit
forms and then to the labels. ``per_layer`` keeps every layer.
"""

from __future__ import annotations

from typing import Any

import torch

from mechscope.icl.meta_data import example_positions, label_positions, query_position

METRICS = ("self", "label", "chunk")


def attention_metrics(patterns: torch.Tensor, n_context: int) -> dict[str, Any]:
    """``{"self", "label", "chunk"}`` (headline floats) and ``per_layer`` ({metric: [layers]})
    from patterns [layers, batch, heads, q_pos, k_pos]."""
    q = query_position(n_context)
    ex = torch.tensor(example_positions(n_context))
    lab = torch.tensor(label_positions(n_context))
    p = patterns.float()
    per_layer = {
        "self": p[:, :, :, q, q].mean(dim=(1, 2)),  # [layers]
        "label": p[:, :, :, q, lab].sum(-1).mean(dim=(1, 2)),
        "chunk": p[:, :, :, lab, ex].mean(dim=(1, 2, 3)),
    }
    return {**{k: float(v[0]) for k, v in per_layer.items()}, "per_layer": {k: v.tolist() for k, v in per_layer.items()}}


def plateaus(steps: list[int], values: list[float], band: float = 0.05, min_span: float = 1.5) -> list[dict[str, Any]]:
    """Maximal runs of consecutive checkpoints (step > 0) whose values stay within ``band``
    (max - min) and whose last step is at least ``min_span`` times the first; each as
    ``{"start", "end", "mean", "n"}``. Scanned greedily from the first checkpoint."""
    pts = [(s, v) for s, v in zip(steps, values) if s > 0]
    out, i = [], 0
    while i < len(pts):
        j, lo, hi = i, pts[i][1], pts[i][1]
        while j + 1 < len(pts) and max(hi, pts[j + 1][1]) - min(lo, pts[j + 1][1]) <= band:
            j += 1
            lo, hi = min(lo, pts[j][1]), max(hi, pts[j][1])
        if j > i and pts[j][0] >= min_span * pts[i][0]:
            vals = [v for _, v in pts[i : j + 1]]
            out.append({"start": pts[i][0], "end": pts[j][0], "mean": sum(vals) / len(vals), "n": len(vals)})
            i = j + 1
        else:
            i += 1
    return out


def peak_step(steps: list[int], values: list[float]) -> int | None:
    """The step of the highest value (the first such step; None when there are no values)."""
    if not values:
        return None
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    return steps[best]
