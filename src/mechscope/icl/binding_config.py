"""Settings of the variable-binding setting (Wu, Geiger and Milliere 2025): the program
generator (``BindingDataConfig``), the training run (``BindingConfig``, saved in
``train.json``), per-checkpoint evaluation (``BindingEvalConfig``) and the interchange
sweep on a checkpoint (``BindingInterchangeConfig``), each checked when made.

No torch here: the CLI reads the defaults when it starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mechscope.errors import MechscopeError, check_lr
from mechscope.heads.config import check_toy_model
from mechscope.resources import check_fits_memory, gpt_training_bytes

SETTING = "binding"
"""The ``setting`` recorded in a binding run's ``train.json``."""

Site = Literal["resid", "head"]


MAX_PAIRS = 100_000
"""The most program pairs one interchange sweep takes."""


@dataclass
class BindingDataConfig:
    """Programs of ``lines`` assignment lines (``a = 3 ;`` or ``b = a ;``) and a query ``? b``.

    The query's chain has 1..``hops`` lines (1: the queried variable holds a constant); the
    other lines are distractor chains of 1..``hops`` lines each; chains are interleaved at
    random, each in its own order, so every variable is assigned once, before it is read."""

    lines: int = 6
    hops: int = 3
    n_vars: int | None = None
    """variable names (single letters a, b, ...); at least ``lines``; default max(8, lines)"""
    n_consts: int = 10
    """constants 0 .. n_consts - 1"""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_vars is None:
            self.n_vars = max(8, self.lines)
        if self.hops < 1 or self.lines < self.hops:
            raise MechscopeError(f"--hops must be between 1 and --lines ({self.lines}); got {self.hops}.")
        if self.lines > 26 or self.n_vars > 26:
            raise MechscopeError(f"Programs name variables a-z: --lines ({self.lines}) and the number of variables ({self.n_vars}) "
                                 "must be at most 26.")
        if self.n_vars < self.lines:
            raise MechscopeError(f"--lines ({self.lines}) must be at most the number of variables ({self.n_vars}).")
        if not 2 <= self.n_consts <= 100:
            raise MechscopeError(f"The number of constants must be between 2 and 100; got {self.n_consts}.")


@dataclass
class BindingConfig:
    """A binding training run: a small GPT-2 (with MLPs) trained on the answer token only."""

    layers: int = 4
    heads: int = 4
    d_model: int = 64
    steps: int = 6000
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.01
    n_checkpoints: int = 25
    """checkpoints on a log-spaced schedule between step 1 and ``steps`` (plus step 0)"""
    linear_checkpoints: int = 20
    """extra, evenly spaced checkpoints"""
    n_eval: int = 256
    """held-out programs whose answer loss is logged at each checkpoint"""
    seed: int = 0
    data: BindingDataConfig = field(default_factory=BindingDataConfig)
    setting: str = SETTING

    def __post_init__(self) -> None:
        check_toy_model(self.steps, self.layers, self.heads, self.d_model)
        if self.batch < 1 or self.n_eval < 1:
            raise MechscopeError("train-toy needs --batch >= 1 and at least one evaluation program.")
        check_lr(self.lr)
        seq, d = 3 + 4 * self.data.lines, self.data  # BOS, 4 tokens a line, '?' and the query (binding_data.seq_len)
        check_fits_memory("train-toy --setting binding with these sizes", gpt_training_bytes(
            vocab=4 + (d.n_vars or d.lines) + d.n_consts, positions=seq, d_model=self.d_model, layers=self.layers,
            heads=self.heads, mlp=True, batch=self.batch, seq=seq), "give a smaller --batch, --d-model or --layers")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BindingConfig":
        d = dict(d)
        d["data"] = BindingDataConfig(**d.get("data", {}))
        return cls(**d)


@dataclass
class BindingEvalConfig:
    """Per-checkpoint evaluation of a binding run (``mechscope dynamics`` on it)."""

    n_per_hop: int = 200
    """held-out programs per hop depth"""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_per_hop < 1:
            raise MechscopeError(f"--n must be at least 1 program per hop depth; got {self.n_per_hop}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BindingInterchangeConfig:
    """Interchange interventions on a binding checkpoint: pairs of programs with one layout
    (which line holds which chain's assignment, drawn once from ``seed``), the query chain
    ``depth`` lines long; the counterfactual changes the root constant of the query chain."""

    n: int = 200
    """program pairs"""
    depth: int | None = None
    """hop depth of the query chain (default: the run's --hops)"""
    site: Site = "resid"
    """'resid': the residual stream entering each layer (and the final one); 'head': one head's output"""
    head: int | None = None
    """the head patched when site is 'head' (every head, one at a time, when None)"""
    correct_only: bool = True
    """keep only pairs whose base and counterfactual the model answers correctly"""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.n <= MAX_PAIRS:
            raise MechscopeError(f"--n must be 1 to {MAX_PAIRS:,} pairs (every pair is held in memory at once; at "
                                 f"{MAX_PAIRS:,} an accuracy's standard error is below 0.002); got {self.n:,}.")
        if self.site not in ("resid", "head"):
            raise MechscopeError(f"--site must be 'resid' or 'head'; got '{self.site}'.")
        if self.depth is not None and self.depth < 1:
            raise MechscopeError(f"--depth must be at least 1; got {self.depth}.")
        if self.head is not None and self.head < 0:
            raise MechscopeError(f"--head must be a head index >= 0; got {self.head}.")
        if self.head is not None and self.site != "head":
            raise MechscopeError(f"--head {self.head} picks a head's output, which only --site head patches; add --site head.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
