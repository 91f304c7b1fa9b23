"""``FewShotConfig``: every setting of ``mechscope icl`` (few-shot accuracy and the
position-group attention knockout of Bakalova et al. 2025), checked when made.

No torch here: the CLI reads the defaults when it starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mechscope.errors import MechscopeError, _article

SWEEPS = ("within", "cross", "aggregation")
"""The knockout sweeps: ``within`` blocks Y_i <- X_i, ``cross`` Y_i <- X_j and Y_j (j < i),
``aggregation`` final <- Y_i; each is run beside a seeded control of as many random edges."""


@dataclass
class FewShotConfig:
    """Settings of ``fewshot_knockout`` (and of the accuracy run before it)."""

    task: str = "capital"
    """a built-in task name (``icl.fewshot.task_names()``) or a JSONL file of {"x": ..., "y": ...}"""
    shots: int = 6
    """examples before the query"""
    n: int = 24
    """prompts drawn (seeded) for the accuracy; the knockout runs on those the model gets right"""
    max_knockout: int = 8
    """at most this many correct prompts go through the knockout sweeps"""
    knockout: bool = True
    """False: measure the accuracy only"""
    ambiguous: bool = False
    """prompts whose examples fit two tasks but one (built in for ``capital``: capital vs largest city)"""
    window: int | None = None
    """layers blocked together (None: Geva et al.'s 9 of 48 layers scaled by depth, 6 on SmolLM2's 30)"""
    layer_stride: int = 3
    """knock out windows centred on every ``layer_stride``-th layer"""
    sweeps: tuple[str, ...] = SWEEPS
    min_above_chance: float = 0.2
    """the task counts as done when accuracy >= chance + this; otherwise the run stops (unless forced)"""
    force: bool = False
    """run (the knockout, or with ``knockout=False`` the accuracy) even when the task is not done well above
    chance or every answer starts with the same token (chance 1.0: every prompt scores as right)"""
    seed: int = 0
    max_rows: int = 64
    """forward-pass batch size (rows) of the knockout runs"""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sweeps = tuple(self.sweeps)
        if hasattr(self.task, "__fspath__"):  # a Path: saved settings hold text
            self.task = str(self.task)
        if not isinstance(self.task, str):
            raise MechscopeError(f"--task is a built-in task name or a JSONL file of {{\"x\", \"y\"}} pairs, "
                                 f"not {_article(type(self.task).__name__)}.")
        if not self.task.strip():
            raise MechscopeError("--task is empty; pass a built-in task name or a JSONL file of {\"x\", \"y\"} pairs.")
        if self.shots < 1:
            raise MechscopeError(f"--shots {self.shots} is too small: a few-shot prompt needs at least 1 example.")
        if self.n < 2 or self.max_knockout < 1:
            raise MechscopeError("--n must be at least 2 and --max-knockout at least 1.")
        if self.layer_stride < 1 or (self.window is not None and self.window < 1) or self.max_rows < 1:
            raise MechscopeError("--layer-stride, --window and --max-rows must be at least 1.")
        if not 0 <= self.min_above_chance < 1:
            raise MechscopeError(f"--min-above-chance {self.min_above_chance} must be in [0, 1).")
        bad = [s for s in self.sweeps if s not in SWEEPS]
        if bad or not self.sweeps:
            raise MechscopeError(f"Unknown or no sweep {bad or ''}; choose from {', '.join(SWEEPS)}.")
        if "cross" in self.sweeps and self.shots < 2 and self.knockout:  # --accuracy-only runs no sweep
            raise MechscopeError("The cross-example sweep needs --shots 2 or more (with 1 example no Y_i has an earlier example).")
        if self.ambiguous and self.shots < 2:
            raise MechscopeError("--ambiguous needs --shots 2 or more (ambiguous examples plus one that disambiguates).")

    def window_size(self, n_layers: int) -> int:
        """Layers per knockout window: ``--window``, at most the model's layers (refused above)."""
        if self.window is not None and self.window > n_layers:
            raise MechscopeError(f"--window {self.window} is wider than the model ({n_layers} layers); give at most {n_layers}.")
        return self.window or max(1, round(9 * n_layers / 48))

    def layers(self, n_layers: int) -> list[int]:
        """The window centres."""
        return list(range(0, n_layers, self.layer_stride))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sweeps"] = list(self.sweeps)
        return d
