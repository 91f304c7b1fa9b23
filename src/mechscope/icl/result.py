"""``FewShotResult``: accuracy and knockout curves of one ``mechscope icl`` run, saved as
``icl.json`` (every number, schema-versioned); ``headline`` sums the curves up by half of the
model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechscope.results import write_result_json

SCHEMA_VERSION = 1
FILE = "icl.json"
NEAR_ZERO = 0.05
"""|mean relative change| below this counts as "near 0" in the headline checks."""


def _mean(v: list[float]) -> float | None:
    return sum(v) / len(v) if v else None


def headline(curves: dict[str, dict[str, Any]], layers: list[int], n_layers: int) -> dict[str, Any]:
    """Per sweep: mean effect and control over the windows centred in the lower / upper half,
    the window of the largest |effect|, and the issue's checks (cross >= 2x control below,
    near 0 above; aggregation peaking in the upper half)."""
    lower = [i for i, c in enumerate(layers) if c < n_layers / 2]
    upper = [i for i, c in enumerate(layers) if c >= n_layers / 2]
    out: dict[str, Any] = {}
    for s, c in curves.items():
        e, k, m = c["effect"], c["control"], c.get("matched")
        peak = max(range(len(e)), key=lambda i: abs(e[i]))
        h = {"lower_half": _mean([e[i] for i in lower]), "upper_half": _mean([e[i] for i in upper]),
             "control_lower_half": _mean([k[i] for i in lower]), "control_upper_half": _mean([k[i] for i in upper]),
             "peak_layer": layers[peak], "peak_effect": e[peak]}
        if m is not None:
            h["matched_lower_half"], h["matched_upper_half"] = _mean([m[i] for i in lower]), _mean([m[i] for i in upper])
        cl = h["control_lower_half"]
        h["lower_ratio_to_control"] = h["lower_half"] / cl if cl else None
        out[s] = h
    checks: dict[str, Any] = {}
    if "cross" in out:
        c = out["cross"]
        checks["cross_lower_at_least_2x_control"] = abs(c["lower_half"] or 0) >= 2 * abs(c["control_lower_half"] or 0)
        checks["cross_upper_near_0"] = abs(c["upper_half"] or 0) < NEAR_ZERO
        if "matched_lower_half" in c:
            checks["cross_lower_at_least_2x_matched_control"] = abs(c["lower_half"] or 0) >= 2 * abs(c["matched_lower_half"] or 0)
    if "aggregation" in out:
        checks["aggregation_peak_in_upper_half"] = out["aggregation"]["peak_layer"] >= n_layers / 2
    out["checks"] = checks
    out["near_zero"] = NEAR_ZERO
    return out


@dataclass
class FewShotResult:
    """Few-shot accuracy of the drawn prompts and the knockout curves over the correct ones.

    ``curves[sweep]``: ``effect`` / ``control`` (random edges) / ``matched`` (random edges of the
    same queries) [len(layers)] mean relative change of p(target) (p_knockout - p_clean) / p_clean
    over the knocked-out prompts, ``*_per_prompt`` [prompt][window], ``n_edges`` / ``n_matched``
    / ``clean_prob`` [prompt]."""

    model: dict[str, Any]
    settings: dict[str, Any]
    task: dict[str, Any]
    prompts: list[dict[str, Any]]
    accuracy: float
    chance: float
    window: int
    layers: list[int]
    n_layers: int
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def headline(self) -> dict[str, Any]:
        return headline(self.curves, self.layers, self.n_layers) if self.curves else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION, "kind": "icl-fewshot", "model": self.model, "settings": self.settings,
            "task": self.task, "prompt_format": "\\n + 'x1 -> y1\\n' + ... + 'xq ->'; target: first token of ' yq'",
            "accuracy": self.accuracy, "chance": self.chance, "n_prompts": len(self.prompts),
            "well_above_chance": self.accuracy >= self.chance + self.settings.get("min_above_chance", 0.0),
            "n_correct": sum(p["correct"] for p in self.prompts), "window": self.window, "layers": self.layers,
            "n_layers": self.n_layers, "curves": self.curves, "headline": self.headline, "seconds": self.seconds,
            "prompts": self.prompts,
            "axes": "curves[sweep][effect|control][window index into layers]: mean (p_knockout - p_clean) / p_clean",
        }

    def save(self, out_dir: str | Path) -> Path:
        return write_result_json(out_dir, FILE, self.to_dict())


def load_result(path: str | Path) -> dict[str, Any]:
    """A saved ``icl.json`` (folder or file) as a dict."""
    from mechscope.results import read_result_json

    return read_result_json(path, FILE, SCHEMA_VERSION, "mechscope icl")[0]
