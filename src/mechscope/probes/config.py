"""``ProbeConfig``: how linear probes are fitted (no torch here: the CLI reads the defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mechscope.errors import MechscopeError

BUILTIN_LABELS = ("capitalised", "ioi-names", "language")
"""Label sets that need no download: see ``mechscope.probes.labels``."""


@dataclass
class ProbeConfig:
    """One probing run: a hook per layer, a label set, the probe and its control task."""

    hook: str = "resid_post"
    """A block site (``resid_pre``, ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``, ``mlp_in``): that site at
    every layer; or a template with ``{L}`` (``blocks.{L}.hook_resid_post``); or one full hook name (one layer)."""
    layers: list[int] | None = None
    """Layers to probe (default: all)."""
    max_items: int = 6000
    """Labelled tokens kept (sampled evenly over the data)."""
    test_fraction: float = 0.2
    """Share of sequences (not tokens) held out for testing, so train and test share no context."""
    control: bool = True
    """Also fit Hewitt and Liang's control task (a random label per word type) and report selectivity."""
    balance: bool = True
    """Subsample so that every class has as many items as the rarest (binary built-ins are very unbalanced)."""
    l2: float = 1e-3
    """Weight of the L2 penalty on the probe's weights (inputs are standardised first)."""
    max_iter: int = 200
    """L-BFGS iterations per probe."""
    context_len: int = 64
    """Tokens per context for corpus-based label sets (at most the model's context)."""
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_items < 20:
            raise MechscopeError(f"--max-items must be at least 20 (got {self.max_items}): a probe needs data.")
        if not 0.05 <= self.test_fraction <= 0.5:
            raise MechscopeError(f"test_fraction must be between 0.05 and 0.5 (got {self.test_fraction}).")
        if self.l2 < 0 or self.max_iter < 1:
            raise MechscopeError("l2 must be >= 0 and max_iter >= 1.")
        if self.context_len < 4 or self.batch_size < 1:
            raise MechscopeError("context_len must be at least 4 and batch_size at least 1.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
