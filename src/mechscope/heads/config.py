"""Settings of the head methods: ``HeadsConfig`` (``head_scores``), ``ToyConfig`` and its
``DataConfig`` (``train_toy``), ``DynamicsConfig`` (``dynamics``), each checked when made.

No torch here: the CLI reads the defaults when it starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mechscope.errors import MechscopeError, check_at_least, check_lr, check_number_fields
from mechscope.resources import check_fits_memory, gpt_training_bytes

DataKind = Literal["repeats"]


@dataclass
class HeadsConfig:
    """Settings of ``head_scores`` (saved in ``heads.json``)."""

    n: int = 50
    """repeated random-token sequences"""
    seq_len: int = 20
    """length of the random segment R (sequences are BOS + R + R)"""
    n_text: int = 8
    """real-text windows"""
    text_len: int | None = None
    """tokens per text window (default: min(520, context - 1))"""
    text: str | None = None
    """text source: None (embedded corpus, else Python docs), 'pydoc', a .txt/.jsonl file or folder"""
    copy_tokens: int = 1000
    """tokens sampled for the top-1 copying rate"""
    ablate: int = 10
    """top induction heads ablated one at a time (-1: every head)"""
    top_k: int = 5
    """k for top-k induction heads ablated together vs random k-sets"""
    n_random: int = 5
    seed: int = 0
    composition: bool = True
    example_len: int = 10
    """|R| of the example sequence whose attention patterns are stored"""

    def __post_init__(self) -> None:
        check_number_fields(self)
        if self.text is not None and not str(self.text).strip():
            raise MechscopeError("HeadsConfig.text is empty; give a .txt/.jsonl file or folder, 'pydoc', or leave it out "
                                 "(None) for the embedded corpus.")
        check_at_least(("HeadsConfig.copy_tokens", self.copy_tokens), ("HeadsConfig.n_random", self.n_random),
                       ("HeadsConfig.example_len", self.example_len), ("HeadsConfig.seq_len", self.seq_len),
                       ("HeadsConfig.text_len", 1 if self.text_len is None else self.text_len))
        if self.n < 1 or self.n_text < 1:
            raise MechscopeError("--n and the number of text windows must be at least 1.")
        if self.n < 2:
            raise MechscopeError("--n 1 leaves mean ablation nothing to average (one sequence is its own mean, every "
                                 "ablation effect 0); give --n 2 or more.")
        if self.top_k < 1 or self.ablate < -1:
            raise MechscopeError(f"--top-k must be at least 1 and --ablate at least 0 (-1: every head); "
                                 f"got --top-k {self.top_k}, --ablate {self.ablate}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DataConfig:
    """The toy run's training data (``heads.toydata``)."""

    kind: DataKind = "repeats"
    vocab: int = 64
    """number of content tokens (the model's vocabulary is vocab + 1 with BOS)"""
    seq_len: int = 64
    """content tokens per sequence (after BOS)"""
    alpha: float = 0.3
    """Dirichlet concentration of each token's successor distribution (smaller = peakier)"""
    n_repeats: int = 4
    min_span: int = 4
    max_span: int = 12
    seed: int = 0
    """seed of the Markov chains (the data's 'world'); batches have their own generator"""

    def __post_init__(self) -> None:
        check_number_fields(self, "train-toy data")
        if self.vocab < 2:
            raise MechscopeError(f"--vocab {self.vocab} leaves nothing to predict; give at least 2 content tokens.")
        if not 1 <= self.min_span <= self.max_span or self.n_repeats < 0 or not self.alpha > 0:
            raise MechscopeError("train-toy data needs 1 <= min_span <= max_span, n_repeats >= 0 and alpha > 0; got "
                                 f"min_span {self.min_span}, max_span {self.max_span}, n_repeats {self.n_repeats}, alpha {self.alpha}.")
        if self.seq_len < 2 * self.min_span + 1:  # toydata places a span and its repeat after the first half
            raise MechscopeError(f"--seq-len {self.seq_len} is too short for a repeated span of {self.min_span} tokens, so there "
                                 f"would be no induction to learn; give --seq-len {2 * self.min_span + 1} or more.")


def check_toy_model(steps: int, layers: int, heads: int, d_model: int) -> None:
    """Refuse a toy run without steps or layers, or whose width does not split into its heads."""
    if steps < 1 or layers < 1 or heads < 1 or d_model < heads or d_model % heads:
        raise MechscopeError("train-toy needs steps >= 1, layers >= 1 and d_model divisible by the number of heads.")


@dataclass
class ToyConfig:
    """Settings of a toy training run (saved as ``train.json``)."""

    layers: int = 2
    heads: int = 4
    d_model: int = 128
    attn_only: bool = True
    steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    n_checkpoints: int = 40
    """checkpoints on a log-spaced schedule between step 1 and ``steps`` (plus step 0)"""
    linear_checkpoints: int = 30
    """extra checkpoints every steps / linear_checkpoints steps (late phase changes need them)"""
    n_eval: int = 64
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        check_number_fields(self, "train-toy")
        check_toy_model(self.steps, self.layers, self.heads, self.d_model)
        check_at_least(("--batch", self.batch), ("train-toy's n_eval", self.n_eval))
        check_at_least(("train-toy's warmup", self.warmup), ("train-toy's weight_decay", self.weight_decay), least=0)
        if self.n_checkpoints < 0 or self.linear_checkpoints < 0:
            raise MechscopeError(f"--checkpoints and --linear-checkpoints count checkpoints, so they cannot be negative; got "
                                 f"{self.n_checkpoints} and {self.linear_checkpoints}.")
        check_lr(self.lr)
        check_fits_memory("train-toy with these sizes", gpt_training_bytes(
            vocab=self.data.vocab + 1, positions=self.data.seq_len + 1, d_model=self.d_model, layers=self.layers,
            heads=self.heads, mlp=not self.attn_only, batch=self.batch, seq=self.data.seq_len + 1),
            "give a smaller --seq-len, --batch, --d-model, --layers or --vocab")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ToyConfig":
        d = dict(d)
        d["data"] = DataConfig(**d.get("data", {}))
        return cls(**d)


@dataclass
class DynamicsConfig:
    """Settings of ``dynamics`` (saved in ``dynamics.json``)."""

    n: int = 32
    """repeated random-token sequences per checkpoint"""
    seq_len: int = 24
    """|R| of the repeated sequences (BOS + R + R)"""
    n_eval: int = 64
    """held-out sequences for loss and ICL score"""
    text: str | None = None
    """text source when the run has no train.json (see heads.sequences.text_source)"""
    seed: int = 0

    def __post_init__(self) -> None:
        check_number_fields(self, "dynamics")
        check_at_least(("--n", self.n), ("--seq-len", self.seq_len), ("dynamics' n_eval", self.n_eval))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
