"""``RecallResult``: the four recall analyses of one fact, saved as ``recall.json`` (every
number, schema-versioned) + ``recall.safetensors`` (the tracing and knockout tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechscope.recall.categories import position_categories
from mechscope.recall.enrichment import Enrichment
from mechscope.recall.extraction import Extraction
from mechscope.recall.knockout import Knockout
from mechscope.recall.tracing import Trace
from mechscope.results import write_result_json

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1


@dataclass
class RecallResult:
    """Causal trace, attention knockout, attribute extraction and subject enrichment of one fact
    (a part is None when it was not run)."""

    model: dict[str, Any]
    settings: dict[str, Any]
    prompt: str
    subject: str
    tokens: list[str]
    subject_pos: list[int]
    target: str
    target_id: int
    trace: Trace | None = None
    knockout: Knockout | None = None
    extraction: Extraction | None = None
    enrichment: Enrichment | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def categories(self) -> dict[str, list[int]]:
        return position_categories(len(self.tokens), self.subject_pos)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "kind": "recall", "model": self.model, "settings": self.settings,
            "prompt": self.prompt, "subject": self.subject, "tokens": self.tokens, "subject_positions": self.subject_pos,
            "position_categories": self.categories(), "target": self.target, "target_id": self.target_id, **self.extras,
        }
        if self.trace is not None:
            t = self.trace
            d["causal_tracing"] = {
                "clean_prob": t.clean_prob, "corrupt_prob": t.corrupt_prob, "noise_std": t.noise_std, "window": t.window, "layers": t.layers,
                "restored_prob": {k: v.tolist() for k, v in t.restored.items()},
                "axes": "[layer index into layers][position]; resid: hook_resid_post of that layer; mlp/attn: outputs of the window around it",
            }
            if t.note:
                d["causal_tracing"]["note"] = t.note
        if self.knockout is not None:
            k = self.knockout
            d["attention_knockout"] = {
                "clean_prob": k.clean_prob, "window": k.window, "layers": k.layers, "key_positions": k.positions,
                "relative_change": {g: v.tolist() for g, v in k.relative_change.items()},
                "axes": "[window centre: index into layers]; (p_knockout - p_clean) / p_clean",
            }
        if self.extraction is not None:
            e = self.extraction
            d["attribute_extraction"] = {
                "attn_rank": e.attn_rank.tolist(), "mlp_rank": e.mlp_rank.tolist(),
                "attn_top_token": e.attn_top_tokens, "mlp_top_token": e.mlp_top_tokens,
                "attn_layers": e.layers("attn"), "mlp_layers": e.layers("mlp"),
            }
        if self.enrichment is not None:
            n = self.enrichment
            d["subject_enrichment"] = {
                "rate": n.rate.tolist(), "control_rate": n.control_rate.tolist(), "control_subject": n.control_subject,
                "related_tokens": n.related, "top_tokens": n.top_tokens,
            }
        return d

    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        write_result_json(out, "recall.json", self.to_dict())
        tensors: dict[str, torch.Tensor] = {}
        if self.trace is not None:
            tensors |= {f"trace_{k}": v.contiguous() for k, v in self.trace.restored.items()}
        if self.knockout is not None:
            tensors |= {f"knockout_{g}": v.contiguous() for g, v in self.knockout.relative_change.items()}
        if self.extraction is not None:
            tensors |= {"extraction_attn_rank": self.extraction.attn_rank, "extraction_mlp_rank": self.extraction.mlp_rank}
        if self.enrichment is not None:
            tensors |= {"enrichment_rate": self.enrichment.rate, "enrichment_control_rate": self.enrichment.control_rate}
        if tensors:
            save_file(tensors, str(out / "recall.safetensors"))
        return out / "recall.json"


@dataclass
class RecallDatasetResult:
    """Recall over the facts list: every fact's result and the aggregate figures."""

    model: dict[str, Any]
    settings: dict[str, Any]
    n_facts: int
    n_known: int
    facts: list[RecallResult]
    aggregate: dict[str, Any]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION, "kind": "recall-dataset", "model": self.model, "settings": self.settings,
            "n_facts_in_list": self.n_facts, "n_known_top1": self.n_known, "n_analysed": len(self.facts),
            "seconds": self.seconds, "aggregate": self.aggregate,
            "facts": [{k: v for k, v in r.to_dict().items() if k not in ("schema_version", "model", "settings")} for r in self.facts],
        }

    def save(self, out_dir: str | Path) -> Path:
        return write_result_json(out_dir, "recall.json", self.to_dict())
