"""The data that the description pipeline passes between its stages (no torch here).

    exemplars pass  ->  UnitRecord + Exemplar lists  ->  UnitStore (SQLite)
    explainer       ->  reads train exemplars, writes Description texts
    scorers         ->  read valid/test exemplars, add scores to a Description
    search / serve  ->  read the store

A unit is one MLP neuron, SAE feature or transcoder feature, named by ``UnitRef``. Every stage
talks to the database through the ``UnitStore`` protocol (``mechscope.explain.db.UnitDB``
implements it), so the stages can run as separate, shardable processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Protocol

UnitKind = Literal["mlp", "sae", "transcoder"]
ExemplarKind = Literal["top", "bottom", "quantile", "random"]
ExemplarSplit = Literal["train", "valid", "test"]


@dataclass(frozen=True, order=True)
class UnitRef:
    """One unit: ``kind`` at ``layer``, index ``index``; ``source`` names the SAE/transcoder set ("" for MLP neurons)."""

    kind: UnitKind
    layer: int
    index: int
    source: str = ""

    @property
    def key(self) -> str:
        """Stable text id, e.g. ``mlp/5/123`` or ``sae:l6-topk/6/42`` (URLs and JSON use it)."""
        head = self.kind if not self.source else f"{self.kind}:{self.source}"
        return f"{head}/{self.layer}/{self.index}"

    @classmethod
    def parse(cls, key: str) -> "UnitRef":
        """Inverse of ``key``; raises ``ValueError`` on a malformed key."""
        head, layer, index = key.rsplit("/", 2)
        kind, _, source = head.partition(":")
        if kind not in ("mlp", "sae", "transcoder"):
            raise ValueError(f"unknown unit kind {kind!r} in {key!r}")
        lay, idx = int(layer), int(index)
        if not (0 <= lay < 2**62 and 0 <= idx < 2**62):  # SQLite's integers end at 2**63
            raise ValueError(f"layer and index must be whole numbers from 0 to 2**62 in {key!r}")
        return cls(kind, lay, idx, source)  # type: ignore[arg-type]


@dataclass
class Exemplar:
    """A window of tokens around one token, with the unit's activation at every token of the window."""

    tokens: list[str]
    acts: list[float]
    focus: int
    """Index in the window of the token this exemplar was chosen for."""
    kind: ExemplarKind
    split: ExemplarSplit
    quantile: int | None = None
    """For ``kind="quantile"``: the quantile bin (0 = lowest)."""
    context: int = -1
    """Which context of the pass (corpus order) the window comes from; -1 when unknown."""
    position: int = -1
    """Token position of ``focus`` within that context."""

    @property
    def act(self) -> float:
        """The activation at the focus token."""
        return self.acts[self.focus]


@dataclass
class UnitRecord:
    """What the exemplars pass knows about a unit besides its exemplars."""

    unit: UnitRef
    max_act: float
    min_act: float
    density: float
    """Fraction of tokens where the unit is > 0 (for MLP neurons: > 0 after the activation function)."""
    quantiles: list[tuple[float, float | None]] = field(default_factory=list)
    """(q, value) pairs, e.g. (0.5, 0.01), (0.99, 1.2), (0.999, 2.3); value None where not resolved
    (``explain.exemplars.quantiles``: the rank lies past the exemplar lists in a wide overflow bin)."""
    histogram: tuple[list[float], list[int]] | None = None
    """Bin edges and counts of the activations over the pass."""
    top_logits: list[tuple[str, float]] = field(default_factory=list)
    """Tokens the unit's output direction promotes most (unembedding of its decoder/output row)."""
    bottom_logits: list[tuple[str, float]] = field(default_factory=list)
    n_tokens: int = 0


@dataclass
class Description:
    """One natural-language description of a unit; several per unit (explainers, settings, versions) coexist."""

    unit: UnitRef
    text: str
    explainer: str
    """``baseline``, ``server``, ``local``."""
    explainer_model: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    """Score name -> value: ``simulation``, ``detection``, ``fuzzing`` and their ``*_shuffled`` controls."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """mechscope version, time, corpus, simulator model, seed."""
    polarity: Literal["positive", "negative"] = "positive"
    id: int | None = None
    """Row id once stored."""
    stale: bool = False
    """Made from exemplars the unit no longer holds (a later exemplars pass replaced them)."""


@dataclass
class SearchHit:
    """One answer to a search: the unit, its best matching description, its rank score."""

    unit: UnitRef
    description: Description
    relevance: float


class UnitStore(Protocol):
    """What every stage needs from the database (implemented by ``mechscope.explain.db.UnitDB``).

    Writes are idempotent: putting the same unit/exemplars/description again replaces, never
    duplicates, so a resumed or repeated shard changes nothing already stored.
    """

    model_id: str

    def put_units(self, records: Iterable[UnitRecord]) -> None: ...
    def put_exemplars(self, unit: UnitRef, exemplars: list[Exemplar]) -> None: ...
    def unit(self, unit: UnitRef) -> UnitRecord | None: ...
    def units(self, kind: UnitKind | None = None, layer: int | None = None, source: str | None = None) -> list[UnitRef]: ...
    def exemplars(self, unit: UnitRef, split: ExemplarSplit | None = None, kind: ExemplarKind | None = None) -> list[Exemplar]: ...
    def put_description(self, description: Description) -> int: ...
    def update_scores(self, description_id: int, scores: dict[str, float]) -> None: ...
    def descriptions(self, unit: UnitRef, explainer: str | None = None) -> list[Description]: ...
    def described(self, explainer: str, settings_key: str) -> set[UnitRef]: ...
    def search(self, query: str, layer: int | None = None, kind: UnitKind | None = None,
               min_score: float | None = None, score_name: str = "simulation", limit: int = 20) -> list[SearchHit]: ...
