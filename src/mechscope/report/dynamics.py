"""The training-dynamics page (``dynamics.html``) of ``mechscope dynamics``, and the same two
charts stacked in one standalone SVG (``dynamics.svg``, for the README)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from mechscope.report.charts import line_chart, stacked_svg
from mechscope.report.toolkit import num_or_nan, page, table, write_page

__all__ = ["render_dynamics", "render_dynamics_svg", "write_dynamics"]

_WIDTH, _HEIGHT = 700, 300


def _charts(d: dict[str, Any]) -> list[str]:
    """Two line charts over training steps: losses; head scores and ICL score; a marker at the
    induction head's formation step."""
    # both axes are linear (line_chart's default, no logx), so step 0 has a place on them and is drawn
    rows = list(d["checkpoints"])
    steps = [r["step"] for r in rows]
    f = d.get("formation", {})
    marks = [(f["induction_step"], "induction head forms")] if f.get("induction_step") is not None else []
    series1 = {"held-out loss": (steps, [num_or_nan(r["loss"]) for r in rows]),
               "loss on repeated half": (steps, [num_or_nan(r["repeated_loss"]) for r in rows])}
    tl = list(d.get("train_loss", []))
    if tl:
        series1 = {"train loss": ([x[0] for x in tl], [x[1] for x in tl]), **series1}
    c1 = line_chart(series1, title="Loss (nats)", xlabel="training step", width=_WIDTH, height=_HEIGHT, vlines=marks,
                    points=False)
    series2 = {
        "induction (max, attention share)": (steps, [num_or_nan(r["max_induction"]) for r in rows]),
        "prev-token (max, attention share)": (steps, [num_or_nan(r["max_previous_token"]) for r in rows]),
        "ICL score (nats)": (steps, [num_or_nan(r["icl_score"]) for r in rows]),
        "K-comp. prev->ind (ratio)": (steps, [num_or_nan(r.get("k_composition_prev_to_induction")) for r in rows]),
    }
    # a series with no value at any checkpoint draws nothing: leave it out of the legend too
    series2 = {k: v for k, v in series2.items() if any(math.isfinite(y) for y in v[1])}
    c2 = line_chart(series2, title="Head scores and ICL score", xlabel="training step", width=_WIDTH,
                    height=_HEIGHT, vlines=marks)
    return [c1, c2]


def render_dynamics_svg(d: dict[str, Any]) -> str:
    """Both charts stacked in one standalone SVG on a white background."""
    return stacked_svg(_charts(d), _WIDTH, _HEIGHT)


_STEPS = ("previous_token_step", "induction_step", "icl_step")
_NOT_FORMED = "not formed (a rise under 0.05 is not formation)"


def _formation_value(key: str, v: Any, f: dict[str, Any]) -> Any:
    """A formation entry as the terminal words it: a null step is "not formed" (or "n/a" where
    the checkpoints are too few to judge), a null ordering "n/a" (a step it needs is missing)."""
    if v is not None:
        return v
    if key in _STEPS:
        return "n/a (too few checkpoints)" if f.get("too_few_checkpoints") else _NOT_FORMED
    if key == "previous_token_before_induction":
        return "n/a (not both formed)"
    return "n/a"


def render_dynamics(d: dict[str, Any]) -> str:
    """The page for a ``dynamics.json`` dict (``DynamicsResult.to_dict()``)."""
    f = d.get("formation", {})
    rows = [[k, _formation_value(k, v, f)] for k, v in f.items()]
    tab_rows = [[r["step"], r["loss"], r["repeated_loss"], r["icl_score"], r["max_previous_token"], r["max_induction"],
                 r["max_k_composition"]] for r in d["checkpoints"]]
    body = (
        "<div class='grid'>" + "".join(f"<figure>{c}</figure>" for c in _charts(d)) + "</div>"
        + "<h2>Formation</h2>" + table(["", "value"], rows)
        + "<p class='small muted'>Formation step: first checkpoint where a score covers half the way from its first to its highest value.</p>"
        + "<h2>Checkpoints</h2>"
        + table(["step", "loss", "repeated-half loss", "ICL score", "max prev-token", "max induction", "max K-comp"], tab_rows,
                numeric=[True] * 7)
    )
    return page("Training dynamics: induction heads", body, kind="training dynamics", subtitle=f"run: {d.get('run')}")


def write_dynamics(d: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """Write the page to ``path`` (``dynamics.html``) and the standalone charts next to it, with
    the suffix ``.svg``; returns both paths."""
    html = write_page(render_dynamics(d), path)
    return html, write_page(render_dynamics_svg(d), html.with_suffix(".svg"))
