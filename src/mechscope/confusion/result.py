"""``ConfusionResult``: one ``mechscope confusion`` run, saved as ``confusion.json`` (every number
and text, schema-versioned) + ``confusion.safetensors`` (the accumulated neuron scores)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechscope.results import library_versions, read_result_json, write_result_json

SCHEMA_VERSION = 1


@dataclass
class ConfusionResult:
    """Pass rates per condition (``baseline``, ``top``: the top neurons zeroed, ``random``: as many
    random neurons zeroed), the lens at confusion points, the edited neurons and the costs."""

    model: dict[str, Any]
    settings: dict[str, Any]
    prompts: list[dict[str, Any]]  # {"prompt", "lang", "split": "find" | "heldout"}
    cp_tokens: list[str | None]  # the baseline's confusion token per prompt (None: no switch)
    conditions: dict[str, dict[str, Any]]  # name -> {"rates", "heldout", "texts", "points", "checks"}
    lens: dict[str, Any]
    top: list[dict[str, Any]]  # {"layer", "neuron", "score", "confused", "control", "count"}
    random: list[list[int]]  # [layer, neuron]
    costs: dict[str, dict[str, Any]]
    confused_scores: torch.Tensor  # [layers, d_mlp] summed top-k gains over confused prefixes
    control_scores: torch.Tensor  # [layers, d_mlp] the same over non-confused prefixes
    timing: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lpr(self, condition: str = "baseline", heldout: bool = False) -> float | None:
        c = self.conditions.get(condition)
        return None if c is None else c["heldout" if heldout else "rates"]["all"]["lpr"]

    def headline(self) -> dict[str, Any]:
        """LPR before/after (all prompts and held-out) and the edit's relative costs."""
        out: dict[str, Any] = {}
        for name in self.conditions:
            out[name] = {"lpr": self.lpr(name), "lpr_heldout": self.lpr(name, True),
                         "english_rate": self.conditions[name]["rates"]["all"]["english_rate"]}
            if name in self.costs:
                out[name]["cost"] = {k: v for k, v in self.costs[name].items() if k != "relative_change"}
                out[name]["relative_change"] = self.costs[name].get("relative_change", {})
        return out

    def to_dict(self) -> dict[str, Any]:
        by_layer: dict[int, int] = {}
        for x in self.top:
            by_layer[x["layer"]] = by_layer.get(x["layer"], 0) + 1
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "confusion",
            "model": self.model,
            "settings": self.settings,
            "versions": library_versions(),
            "headline": self.headline(),
            "prompts": self.prompts,
            "cp_tokens": self.cp_tokens,
            "conditions": self.conditions,
            "lens": self.lens,
            "neurons": {"top": self.top, "random": self.random, "top_by_layer": {str(k): v for k, v in sorted(by_layer.items())}},
            "costs": self.costs,
            "timing": self.timing,
            "notes": self.notes,
        }

    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        write_result_json(out, "confusion.json", self.to_dict(), ensure_ascii=False)
        save_file({"confused_scores": self.confused_scores.contiguous(), "control_scores": self.control_scores.contiguous()},
                  str(out / "confusion.safetensors"))
        return out / "confusion.json"

    @classmethod
    def load(cls, path: str | Path) -> "ConfusionResult":
        d, p = read_result_json(path, "confusion.json", SCHEMA_VERSION, "mechscope confusion")
        from safetensors.torch import load_file

        t = load_file(str(p.parent / "confusion.safetensors"))
        return cls(model=d["model"], settings=d["settings"], prompts=d["prompts"], cp_tokens=d["cp_tokens"],
                   conditions=d["conditions"], lens=d["lens"], top=d["neurons"]["top"], random=d["neurons"]["random"],
                   costs=d["costs"], confused_scores=t["confused_scores"], control_scores=t["control_scores"],
                   timing=d.get("timing", {}), notes=d.get("notes", []))
