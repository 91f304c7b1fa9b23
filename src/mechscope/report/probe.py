"""The page of ``mechscope probe``: accuracy, control accuracy and selectivity by layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechscope.report.charts import line_chart
from mechscope.report.toolkit import esc, html_num, page, table, write_page

__all__ = ["render_probe", "write_probe"]


def render_probe(d: dict[str, Any]) -> str:
    """The page for a ``probe.json`` dict (``ProbeResult.to_dict()``)."""
    labels = [str(L) for L in d["layers"]]
    by_layer = all(isinstance(L, int) for L in d["layers"]) and len(set(d["layers"])) == len(d["layers"])
    xs = list(d["layers"]) if by_layer else list(range(len(d["layers"])))  # else: several hooks of one layer
    xlabel = "layer" if by_layer else "probed hook (index into the table)"
    series = {"accuracy": (xs, d["accuracy"]), "control accuracy": (xs, d["control_accuracy"]),
              "majority baseline": (xs, [d["majority"]] * len(xs))}
    acc = line_chart(series, title="Held-out accuracy by layer", xlabel=xlabel, ylabel="accuracy",
                     ylim=(0.0, 1.0))
    sel = line_chart({"selectivity": (xs, d["selectivity"])}, title="Selectivity = accuracy - control accuracy",
                     xlabel=xlabel, hlines=[0.0])
    rows = [[lab, h, a, t, c if c is not None else "-", s if s is not None else "-"]
            for lab, h, a, t, c, s in zip(labels, d["hooks"], d["accuracy"], d["train_accuracy"], d["control_accuracy"],
                                          d["selectivity"])]
    counts = ", ".join(f"{esc(k)} {v}" for k, v in d["class_counts"].items())
    body = (
        f"<p>Label set <code>{esc(d['label_set'])}</code>: classes {counts}; {d['n_train']} training and {d['n_test']} "
        f"held-out tokens (split by sequence), {d['n_word_types']} word types. Majority-class accuracy "
        f"{html_num(d['majority'])}. Model {esc(d['model'].get('name', ''))}.</p>"
        "<p class='muted small'>Control task (Hewitt and Liang 2019): each word type gets one random label; a probe that "
        "does as well there as on the real labels has memorised word types. Selectivity near zero means the accuracy "
        "says nothing about the property.</p>"
        f"<figure>{acc}</figure><figure>{sel}</figure>"
        + table(["layer", "hook", "accuracy", "train acc.", "control acc.", "selectivity"], rows,
                numeric=[False, False, True, True, True, True])
    )
    return page(f"Probe: {d['label_set']}", body, kind="linear probe")


def write_probe(d: dict[str, Any], path: str | Path) -> Path:
    """Write the probe page to ``path``."""
    return write_page(render_probe(d), path)
