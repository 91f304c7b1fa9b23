"""Configs of the description pipeline (no torch here: the CLI reads the defaults when it starts)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mechscope.errors import MechscopeError
from mechscope.features.config import SINK_RATIO

SHARD_FREE = ("first_context", "n_tokens", "checkpoint_every")
"""Settings that may differ between the token shards of one exemplars pass."""


@dataclass
class ExemplarsConfig:
    """The exemplars pass (``mechscope.explain.exemplars.harvest_exemplars``); saved in its checkpoint."""

    units: str = "mlp"
    """``mlp``, ``sae:DIR`` or ``transcoders:DIR``."""
    layers: list[int] | None = None
    """Layers to harvest (default: every layer the source has)."""
    unit_range: tuple[int, int] | None = None
    """Units ``a:b`` of every chosen layer (default: all); a shard of the units."""
    corpus: str | None = None
    """Corpus spec for ``mechscope.activations.corpus.get_corpus`` (default: the embedded corpus)."""
    n_tokens: int = 65536
    """Tokens of the pass (rounded down to whole contexts)."""
    first_context: int = 0
    """Index of the first packed context of the pass (a token-range shard starts further on)."""
    context_len: int = 128
    batch_size: int = 8
    """Contexts per forward pass."""
    k: int = 20
    """Top-k activating exemplars kept per unit."""
    k_bottom: int = 10
    """Bottom-k (most negative) exemplars kept per unit."""
    quantiles: tuple[float, ...] = (0.5, 0.9, 0.99)
    """Edges of the quantile bins that random samples are drawn from (below 0.5, 0.5-0.9, ...)."""
    per_quantile: int = 5
    """Random exemplars per quantile bin."""
    n_random: int = 10
    """Uniformly random exemplars per unit (any activation)."""
    before: int = 24
    """Tokens of the window before the focus token (clipped at the context's start)."""
    after: int = 8
    """Tokens of the window after the focus token (clipped at the context's end)."""
    n_bins: int = 64
    """Histogram bins between the calibration slice's min and max (plus one overflow bin each side)."""
    report_quantiles: tuple[float, ...] = (0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999)
    """Activation quantiles stored in each unit's record."""
    split: tuple[float, float, float] = (0.5, 0.25, 0.25)
    """Fractions of contexts whose exemplars go to train / valid / test (per unit, by seed)."""
    seed: int = 0
    checkpoint_every: int = 256
    """Contexts between checkpoints (0: only when the pass ends; a killed pass then starts again)."""
    n_logits: int = 10
    """Top/bottom output tokens stored per unit."""
    sink_ratio: float | None = None
    """Attention sinks are not candidates: positions whose residual norm after some block up to
    the source's deepest layer exceeds ``sink_ratio`` times that block's median over the
    context's positions from 1 (``activations.store.sink_positions``, the transcoder sets'
    training rule, with per-context medians). None: the source's default: for ``transcoders:DIR``
    the ratio the set was trained with (its ``set.json``; ``SINK_RATIO``, 30, when the set does
    not record one), since its units never saw a sink in training and a sink's value says nothing
    about them; off for ``mlp`` and ``sae:DIR``; 0: off."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.context_len < 2:
            raise MechscopeError(f"--context-len must be at least 2 (a context's first token is never a candidate); got {self.context_len}.")
        if self.batch_size < 1:
            raise MechscopeError(f"--batch-size must be at least 1 (contexts per forward pass); got {self.batch_size}.")
        if self.n_tokens < self.context_len * self.batch_size:
            raise MechscopeError(f"--tokens {self.n_tokens} is less than one batch ({self.batch_size} contexts of {self.context_len}); give more tokens.")
        if self.k < 1 or self.k_bottom < 0 or self.per_quantile < 0 or self.n_random < 0:
            raise MechscopeError("k must be at least 1 and k_bottom, per_quantile, n_random at least 0.")
        if self.k > self.context_len * self.batch_size // 2:
            raise MechscopeError(f"k={self.k} is more than half a batch's tokens; use a smaller --k or larger batches.")
        if self.checkpoint_every < 0:
            raise MechscopeError(f"--checkpoint-every counts contexts between checkpoints (0: only when the pass ends); got {self.checkpoint_every}.")
        if self.before < 0 or self.after < 0:
            raise MechscopeError("before and after must be at least 0.")
        if any(not 0 < q < 1 for q in self.quantiles) or list(self.quantiles) != sorted(self.quantiles):
            raise MechscopeError(f"quantile edges {self.quantiles} must be increasing and inside (0, 1).")
        if abs(sum(self.split) - 1) > 1e-6 or min(self.split) < 0:
            raise MechscopeError(f"split fractions {self.split} must be at least 0 and sum to 1.")
        if self.sink_ratio is not None and self.sink_ratio != 0 and not self.sink_ratio > 1:
            raise MechscopeError(f"--sink-ratio must be above 1 (or 0 to keep the attention sinks), got {self.sink_ratio}.")
        if self.unit_range is not None and not 0 <= self.unit_range[0] < self.unit_range[1]:
            raise MechscopeError(f"--units range {self.unit_range[0]}:{self.unit_range[1]} is empty; give a:b with a < b.")

    @property
    def effective_sink_ratio(self) -> float | None:
        """The sink ratio this pass applies (None: sinks are kept); see ``sink_ratio``."""
        if self.sink_ratio is None:
            return _set_sink_ratio(self.units.split(":", 1)[1]) if self.units.startswith("transcoders:") else None
        return self.sink_ratio or None

    @property
    def n_contexts(self) -> int:
        return self.n_tokens // self.context_len

    def shard_differences(self, other: "ExemplarsConfig") -> list[str]:
        """The settings in which ``other`` differs from this config, apart from those the token
        shards of one pass may differ in (``SHARD_FREE``)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if k not in SHARD_FREE and mine[k] != theirs.get(k)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("quantiles", "report_quantiles", "split", "unit_range"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d


def _set_sink_ratio(folder: str) -> float | None:
    """The ``sink_ratio`` a transcoder set in ``folder`` was trained with (``set.json``'s settings;
    None: it kept the sinks), or ``SINK_RATIO`` where the set does not record one."""
    import json
    from pathlib import Path

    try:
        settings = json.loads((Path(folder) / "set.json").read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return SINK_RATIO
    if not isinstance(settings, dict) or "sink_ratio" not in settings:
        return SINK_RATIO
    r = settings["sink_ratio"]
    return float(r) if isinstance(r, (int, float)) and r > 1 else None
