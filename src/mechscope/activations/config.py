"""``StoreConfig``: how activations are harvested (also saved in shard manifests), checked
when made.

No torch here: the CLI reads the defaults when it starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mechscope.errors import MechscopeError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
"""Storage dtypes of activations (``activations.store.DTYPES`` maps them to torch's)."""

TOKENS_KEY = "tokens"
"""Key of each row's token id (int) beside the hooks' rows, in shards and, with
``StoreConfig.with_tokens``, in the store's batches."""

SINK_TOKEN = -1
"""The token id served under ``TOKENS_KEY`` for a row that ``StoreConfig.sink_ratio`` marks as
an attention sink (token ids are never negative)."""


def check_sink_ratio(ratio: float | None) -> None:
    """One sentence for a ``sink_ratio`` that is neither None nor above 1 (every place that takes one)."""
    if ratio is not None and not ratio > 1:
        raise MechscopeError(f"sink_ratio must be above 1 (None, or --sink-ratio 0, keeps the sinks), got {ratio}.")


@dataclass
class StoreConfig:
    """How activations are harvested. The same dataclass is saved in shard manifests."""

    hooks: list[str]
    """TransformerLens hook names, e.g. ``["blocks.6.hook_resid_post"]``; several are aligned row by row."""
    context_len: int = 128
    """Tokens per packed context."""
    batch_size: int = 8
    """Contexts per forward pass. With ``shuffle`` it also sets how far the buffer overfills, so
    the order of the shuffled rows (not their set over a whole run) depends on it: compare
    trainings at one batch size."""
    buffer_tokens: int = 32768
    """Rows held in the shuffling buffer (per hook)."""
    shuffle: bool = True
    seed: int = 0
    skip_first: int = 1
    """Leading positions of each context whose activations are dropped (position 0 is an attention sink)."""
    dtype: str = "float32"
    """Storage dtype of activations: float32, bfloat16 or float16."""
    device: str | None = None
    """Where served activations live (default: the model's device)."""
    repeat: bool = True
    """Start the corpus again when it runs out (``corpus_passes`` counts passes)."""
    with_tokens: bool = False
    """Serve each row's token id too, under ``TOKENS_KEY`` (``[n]`` int64), in the same order
    as the rows (so a reader can drop, e.g., the rows of special tokens)."""
    sink_ratio: float | None = None
    """Mark attention-sink positions (needs ``with_tokens`` and a hook inside a block): a position
    whose residual stream after any block up to the deepest hooked one (``blocks.l.hook_resid_post``)
    has a norm more than ``sink_ratio`` times that block's median over the forward batch is served
    with token id ``SINK_TOKEN`` (``activations.store.sink_positions``). None marks nothing."""

    def __post_init__(self) -> None:
        if isinstance(self.hooks, str):
            self.hooks = [self.hooks]
        if not self.hooks:
            raise MechscopeError("StoreConfig needs at least one hook name, e.g. blocks.6.hook_resid_post.")
        if TOKENS_KEY in self.hooks:
            raise MechscopeError(f"'{TOKENS_KEY}' is not a hook name; it is the key of the rows' token ids.")
        if len(set(self.hooks)) != len(self.hooks):
            raise MechscopeError(f"Hook names repeat in {self.hooks}; give each once.")
        if self.context_len < 2:
            raise MechscopeError(f"--context-len must be at least 2 (tokens per context); got {self.context_len}.")
        if self.batch_size < 1:
            raise MechscopeError(f"--batch-size must be at least 1 (contexts per forward pass); got {self.batch_size}.")
        if not 0 <= self.skip_first < self.context_len:
            raise MechscopeError(f"skip_first must be in [0, context_len) = [0, {self.context_len}).")
        if self.dtype not in DTYPE_NAMES:
            raise MechscopeError(f"Unknown dtype '{self.dtype}'; use one of {', '.join(DTYPE_NAMES)}.")
        check_sink_ratio(self.sink_ratio)
        if self.sink_ratio is not None and not self.with_tokens:
            raise MechscopeError("sink_ratio must be above 1 and needs with_tokens=True (sinks are marked in the token ids).")
        if self.buffer_tokens < 2 * self.rows_per_context:
            raise MechscopeError(f"buffer_tokens must be at least two contexts' rows ({2 * self.rows_per_context}).")

    @property
    def rows_per_context(self) -> int:
        return self.context_len - self.skip_first

    @property
    def keys(self) -> list[str]:
        """What each batch holds: the hooks, then ``TOKENS_KEY`` with ``with_tokens``."""
        return [*self.hooks, TOKENS_KEY] if self.with_tokens else list(self.hooks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
