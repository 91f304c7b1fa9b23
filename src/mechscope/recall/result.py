"""``RecallResult``: the four recall analyses of one fact, saved as ``recall.json`` (every
number, schema-versioned) + ``recall.safetensors`` (the tracing and knockout tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechscope.errors import MechscopeError
from mechscope.recall.categories import position_categories
from mechscope.recall.enrichment import Enrichment
from mechscope.recall.extraction import Extraction
from mechscope.recall.knockout import Knockout
from mechscope.recall.tracing import Trace
from mechscope.results import write_result_json

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = 1

_PARTS: dict[str, Any] = {"causal_tracing": Trace, "attention_knockout": Knockout, "attribute_extraction": Extraction,
                          "subject_enrichment": Enrichment}
"""Each analysis's key in ``RecallResult.to_dict`` and the class that reads it back."""
_OWN_KEYS = frozenset({"schema_version", "kind", "model", "settings", "prompt", "subject", "tokens", "subject_positions",
                       "position_categories", "target", "target_id", *_PARTS})
"""The keys ``RecallResult.to_dict`` writes itself; any other key is one of its ``extras``."""


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
        """Every number as plain JSON (``recall.json``), ``extras`` as top-level keys; ``from_dict``
        reads it back."""
        d: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "kind": "recall", "model": self.model, "settings": self.settings,
            "prompt": self.prompt, "subject": self.subject, "tokens": self.tokens, "subject_positions": self.subject_pos,
            "position_categories": self.categories(), "target": self.target, "target_id": self.target_id, **self.extras,
        }
        for key, part in (("causal_tracing", self.trace), ("attention_knockout", self.knockout),
                          ("attribute_extraction", self.extraction), ("subject_enrichment", self.enrichment)):
            if part is not None:
                d[key] = part.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecallResult:
        """The result ``to_dict`` wrote (also after a JSON round trip), exactly: every tensor with
        the dtype, shape and values it had, and the same ``to_dict``. The dataset run reads its
        finished facts back with it (``recall_dataset``'s checkpoint)."""
        if not isinstance(d, dict) or d.get("kind") != "recall":
            raise MechscopeError("This is not the JSON of one fact's recall result (kind 'recall'); pass what RecallResult.to_dict wrote.")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise MechscopeError(f"This recall result has schema version {d.get('schema_version')!r}; this mechscope reads "
                                 f"version {SCHEMA_VERSION}.")
        parts = {key: (kind.from_dict(d[key]) if key in d else None) for key, kind in _PARTS.items()}
        return cls(model=d["model"], settings=d["settings"], prompt=d["prompt"], subject=d["subject"], tokens=list(d["tokens"]),
                   subject_pos=list(d["subject_positions"]), target=d["target"], target_id=d["target_id"],
                   trace=parts["causal_tracing"], knockout=parts["attention_knockout"],
                   extraction=parts["attribute_extraction"], enrichment=parts["subject_enrichment"],
                   extras={k: v for k, v in d.items() if k not in _OWN_KEYS})

    @classmethod
    def load(cls, path: str | Path) -> RecallResult:
        """The result ``save`` wrote into the folder ``path`` (or its ``recall.json``), exactly
        (``from_dict``); a dataset run's folder is ``RecallDatasetResult``'s, and says so."""
        from mechscope.results import read_result_json

        d, _ = read_result_json(path, "recall.json", SCHEMA_VERSION, "mechscope recall")
        if d.get("kind") == "recall-dataset":
            raise MechscopeError(f"{path} holds a recall run over the facts list (recall --dataset); read its JSON "
                                 "(recall.json: every fact under 'facts'), or load one fact with RecallResult.from_dict.")
        return cls.from_dict(d)

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
    checkpoint_notes: list[str] = field(default_factory=list)
    """One line each when the run read finished facts back from its checkpoint, or discarded the
    pieces of a run with other settings; for the CLI to print, not saved: the result is the same."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION, "kind": "recall-dataset", "model": self.model, "settings": self.settings,
            "n_facts_in_list": self.n_facts, "n_known_top1": self.n_known, "n_analysed": len(self.facts),
            "seconds": self.seconds, "aggregate": self.aggregate,
            "facts": [{k: v for k, v in r.to_dict().items() if k not in ("schema_version", "model", "settings")} for r in self.facts],
        }

    def save(self, out_dir: str | Path) -> Path:
        return write_result_json(out_dir, "recall.json", self.to_dict())
