"""The head-taxonomy result: ``heads.json`` (schema-versioned) + ``heads.safetensors``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechscope.graph.names import head_node
from mechscope.results import check_tensors_match, library_versions, read_result_json, save_with_json

SCHEMA_VERSION = 1

# score name -> (what it is, higher means)
SCORE_INFO: dict[str, str] = {
    "previous_token": "attention share on the previous token (repeated random tokens, BOS excluded)",
    "duplicate_token": "attention share on earlier copies of the current token (repeated random tokens)",
    "induction": "attention share on the token after an earlier copy of the current token (prefix matching, repeated random tokens)",
    "text_previous_token": "previous-token score on real text",
    "text_duplicate_token": "duplicate-token score on real text",
    "text_induction": "induction score on real text",
    "bos_mass": "mean attention on the first position (BOS), excluded from the scores above",
    "copying_eigen": "sum(eigenvalues) / sum(|eigenvalues|) of the full OV circuit (Olsson et al.)",
    "copying_top1": "share of sampled tokens that are the top logit of their own full-OV row",
    "ablation": "loss increase on the repeated half when the head is mean-ablated (NaN: not ablated)",
}
CATEGORIES = {
    "previous-token": "previous_token",
    "duplicate-token": "duplicate_token",
    "induction": "induction",
    "copying": "copying_eigen",
    "induction (causal)": "ablation",
}


@dataclass
class HeadsResult:
    """Per-head scores [n_layers, n_heads], composition scores, ICL score and an example."""

    model: dict[str, Any]
    settings: dict[str, Any]
    scores: dict[str, torch.Tensor]  # name -> [n_layers, n_heads]
    composition: dict[str, torch.Tensor]  # 'q'/'k'/'v' -> [L, H, L, H]
    icl: dict[str, Any]
    ablation: dict[str, Any]
    example_tokens: list[str]
    example_patterns: torch.Tensor  # [L, H, pos, pos]
    text_source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def top_heads(self, score: str, k: int = 5) -> list[dict]:
        s = self.scores[score]
        flat = torch.nan_to_num(s.flatten(), nan=-math.inf)
        vals, idx = flat.topk(min(k, int(torch.isfinite(flat).sum())))
        H = s.shape[1]
        return [{"head": head_node(i // H, i % H), "score": v} for v, i in zip(vals.tolist(), idx.tolist())]

    def top_by_category(self, k: int = 5) -> dict[str, list[dict]]:
        return {cat: self.top_heads(name, k) for cat, name in CATEGORIES.items() if name in self.scores}

    def top_pairs(self, kind: str = "k", k: int = 20) -> list[dict]:
        from mechscope.heads.composition import top_pairs

        return top_pairs(self.composition[kind], k)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "settings": self.settings,
            "versions": library_versions(),
            "text_source": self.text_source,
            "score_definitions": {k: v for k, v in SCORE_INFO.items() if k in self.scores},
            "scores": {k: _nested(v) for k, v in self.scores.items()},
            "top_heads": self.top_by_category(),
            "top_composition_pairs": {kind: self.top_pairs(kind) for kind in self.composition},
            "icl": self.icl,
            "ablation": self.ablation,
            "example_tokens": self.example_tokens,
            **self.extra,
        }

    def save(self, out_dir: str | Path) -> Path:
        """``heads.json`` and ``heads.safetensors``, saved as one (``results.save_with_json``)."""
        tensors = {f"score.{k}": v for k, v in self.scores.items()}
        tensors |= {f"composition.{k}": v for k, v in self.composition.items()}
        tensors["example_patterns"] = self.example_patterns
        return save_with_json(out_dir, "heads.json", self.to_dict(), "heads.safetensors", tensors)

    @classmethod
    def load(cls, path: str | Path) -> "HeadsResult":
        d, p = read_result_json(path, "heads.json", SCHEMA_VERSION, "mechscope heads")
        from safetensors.torch import load_file

        check_tensors_match(d, p.parent / "heads.safetensors", str(path))
        t = load_file(str(p.parent / "heads.safetensors"))
        scores = {k[6:]: v for k, v in t.items() if k.startswith("score.")}
        comp = {k[12:]: v for k, v in t.items() if k.startswith("composition.")}
        known = {"schema_version", "model", "settings", "versions", "text_source", "score_definitions", "scores",
                 "top_heads", "top_composition_pairs", "icl", "ablation", "example_tokens", "tensors_digest"}
        return cls(model=d["model"], settings=d["settings"], scores=scores, composition=comp, icl=d["icl"],
                   ablation=d["ablation"], example_tokens=d["example_tokens"],
                   example_patterns=t["example_patterns"], text_source=d.get("text_source", ""),
                   extra={k: v for k, v in d.items() if k not in known})


def _nested(t: torch.Tensor) -> list:
    return [[None if math.isnan(x) else x for x in row] for row in t.tolist()]

