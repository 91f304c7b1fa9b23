"""``LensResult``: logit lens + direct logit attribution of one prompt, saved as
``lens.json`` (every number, schema-versioned) + ``lens.safetensors`` (the tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechscope.brief import brief_repr
from mechscope.lens.dla import DLA
from mechscope.results import read_result_json, write_result_json

SCHEMA_VERSION = 1


@dataclass
class LensResult:
    """Logit lens over sites (``L{l}.pre|mid|post``) x positions, and the DLA at the last position."""

    model: dict[str, Any]
    prompt: str
    tokens: list[str]
    target: str
    target_id: int
    distractor: str
    distractor_id: int
    sites: list[str]
    rank: torch.Tensor  # [site, pos] target rank (0 = top)
    prob: torch.Tensor  # [site, pos] target probability
    top_ids: torch.Tensor  # [site, pos, k]
    top_probs: torch.Tensor  # [site, pos, k]
    top_tokens: list[list[list[str]]]  # [site][pos][k] decoded top_ids
    dla: DLA
    settings: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # a notebook's last line: one short line, not every tensor
        return brief_repr(self)

    def first_top1_site(self, position: int = -1) -> str | None:
        """The first site at which the target is the top token at ``position``."""
        col = self.rank[:, position]
        hit = (col == 0).nonzero()
        return self.sites[int(hit[0])] if len(hit) else None

    def to_dict(self) -> dict[str, Any]:
        d = self.dla
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "lens",
            "model": self.model,
            "settings": self.settings,
            "prompt": self.prompt,
            "tokens": self.tokens,
            "target": self.target,
            "target_id": self.target_id,
            "distractor": self.distractor,
            "distractor_id": self.distractor_id,
            "lens": {
                "sites": self.sites,
                "target_rank": self.rank.tolist(),
                "target_prob": self.prob.tolist(),
                "top_tokens": self.top_tokens,
                "top_probs": self.top_probs.tolist(),
                "first_top1_site_last_position": self.first_top1_site(),
            },
            "dla": {
                "position": d.position,
                "metric": "logit(target) - logit(distractor), final norm scale frozen at the clean run",
                "heads": d.heads.tolist(),
                "mlps": d.mlps.tolist(),
                "other": d.other,
                "total": d.total,
                "actual": d.actual,
                "error": d.error,
                "exact": d.exact,
                "note": d.note(),
                "top": [{"name": n, "value": v} for n, v in d.top(20)],
            },
        }

    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        write_result_json(out, "lens.json", self.to_dict())
        save_file({"rank": self.rank.contiguous(), "prob": self.prob.contiguous(), "top_ids": self.top_ids.contiguous(),
                   "top_probs": self.top_probs.contiguous(), "dla_heads": self.dla.heads.contiguous(),
                   "dla_mlps": self.dla.mlps.contiguous()}, str(out / "lens.safetensors"))
        return out / "lens.json"

    @classmethod
    def load(cls, path: str | Path) -> "LensResult":
        d, p = read_result_json(path, "lens.json", SCHEMA_VERSION, "mechscope lens")
        from safetensors.torch import load_file

        t = load_file(str(p.parent / "lens.safetensors"))
        dd = d["dla"]
        dla = DLA(position=dd["position"], heads=t["dla_heads"], mlps=t["dla_mlps"], other=dd["other"],
                  total=dd["total"], actual=dd["actual"], error=dd["error"])
        return cls(model=d["model"], prompt=d["prompt"], tokens=d["tokens"], target=d["target"], target_id=d["target_id"],
                   distractor=d["distractor"], distractor_id=d["distractor_id"], sites=d["lens"]["sites"], rank=t["rank"],
                   prob=t["prob"], top_ids=t["top_ids"], top_probs=t["top_probs"], top_tokens=d["lens"]["top_tokens"],
                   dla=dla, settings=d["settings"])
