"""Settings of the in-context meta-learning setting (Minegishi et al. 2025, ICML: "Beyond
induction heads: in-context meta learning induces multi-phase circuit emergence"):
``MetaDataConfig`` (the sequences), ``MetaConfig`` (model and training run; saved in
``train.json``) and ``MetaDynamicsConfig`` (``meta_dynamics``), each checked when made.

No torch here: the CLI reads the defaults when it starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mechscope.errors import MechscopeError, check_lr
from mechscope.resources import check_fits_memory

SETTING = "icml"
"""The value of ``mechscope train-toy --setting`` (and of ``settings.setting`` in train.json)."""

Optimizer = Literal["adam", "sgd"]
OPTIMIZERS = ("adam", "sgd")


@dataclass
class MetaDataConfig:
    """The sequences: ``n_context`` (noisy class vector, label) pairs and a query vector.

    A class is a mean vector in R^dim (normal, variance 1/dim) with a base label in
    [0, n_labels); an example of it is ``(mean + eps * noise) / sqrt(1 + eps^2)``. Each
    sequence draws one hidden task t in [0, tasks); every label in it, the query's included,
    is ``(base label + t) mod n_labels``. The context holds ``n_context / ways`` distinct
    classes, each ``ways`` times, shuffled; the query's class is drawn from all classes."""

    tasks: int = 3
    """hidden tasks T (label shifts 0..T-1)"""
    n_labels: int = 32
    """labels N (the classifier's outputs)"""
    n_classes: int = 512
    """classes (each a mean vector with a base label), shared by every sequence"""
    dim: int = 63
    """dimension of the class vectors"""
    n_context: int = 8
    """(example, label) pairs before the query"""
    ways: int = 2
    """times each context class appears in the context"""
    eps: float = 0.1
    """noise scale within a class"""
    seed: int = 0
    """seed of the class means and base labels (the data's 'world'); batches have their own generator"""

    def __post_init__(self) -> None:
        if self.tasks < 1:
            raise MechscopeError(f"--tasks must be at least 1 (got {self.tasks}).")
        if self.n_labels < 2:
            raise MechscopeError(f"--labels must be at least 2 (got {self.n_labels}); a single label leaves nothing to classify.")
        if self.tasks > self.n_labels:
            raise MechscopeError(f"--tasks ({self.tasks}) cannot exceed --labels ({self.n_labels}): tasks t and t + N shift labels alike.")
        if self.dim < 1 or self.ways < 1:
            raise MechscopeError(f"dim and ways must be at least 1 (got dim {self.dim}, ways {self.ways}).")
        if self.n_context < 1 or self.n_context % self.ways:
            near = max(self.ways, self.n_context - self.n_context % self.ways)
            raise MechscopeError(f"--context must be a positive multiple of {self.ways} (each context class appears {self.ways} "
                                 f"times; got {self.n_context}); pass e.g. --context {near}.")
        if self.n_classes < self.n_context // self.ways:
            raise MechscopeError(f"--classes ({self.n_classes}) must be at least --context / --ways ({self.n_context // self.ways}).")
        if not self.eps >= 0:
            raise MechscopeError(f"--eps must be >= 0 (got {self.eps}).")

    @property
    def n_positions(self) -> int:
        """Tokens per sequence: the context pairs and the query."""
        return 2 * self.n_context + 1


@dataclass
class MetaConfig:
    """A training run of the meta-learning setting (saved as ``train.json``'s ``settings``)."""

    setting: str = SETTING
    attn_layers: int = 2
    """attention layers (residual, no W_O, no LayerNorm, unscaled scores)"""
    heads: int = 1
    d_model: int = 128
    """token width: dim + a one-hot position of d_model - dim entries"""
    mlp_layers: int = 2
    """ReLU layers (d_model wide) between the attention and the classifier"""
    optimizer: Optimizer = "adam"
    lr: float = 1e-3
    """learning rate (the paper's SGD: 0.01)"""
    batch: int = 128
    steps: int = 20000
    """with Adam at lr 1e-3 the full-context circuit forms at ~9,000-10,500 steps (T = 3, seed 0)"""
    n_checkpoints: int = 40
    """checkpoints on a log-spaced schedule between step 1 and ``steps`` (plus step 0)"""
    linear_checkpoints: int = 40
    """extra checkpoints every steps / linear_checkpoints steps"""
    n_eval: int = 2048
    """held-out sequences for the accuracy logged at each checkpoint"""
    seed: int = 0
    data: MetaDataConfig = field(default_factory=MetaDataConfig)

    def __post_init__(self) -> None:
        if self.setting != SETTING:
            raise MechscopeError(f"A MetaConfig's setting is '{SETTING}', not '{self.setting}'.")
        if self.optimizer not in OPTIMIZERS:
            raise MechscopeError(f"Unknown optimizer '{self.optimizer}'; use one of {', '.join(OPTIMIZERS)}.")
        if self.steps < 1 or self.batch < 1 or self.attn_layers < 1 or self.mlp_layers < 0 or self.n_eval < 1:
            raise MechscopeError("train-toy --setting icml needs steps, batch and layers >= 1 (MLP layers >= 0).")
        if self.heads < 1 or self.d_model % self.heads:
            raise MechscopeError(f"--d-model ({self.d_model}) must be divisible by the number of heads ({self.heads}).")
        if self.d_model - self.data.dim < self.data.n_positions:
            raise MechscopeError(
                f"--d-model ({self.d_model}) must leave room for a one-hot position of {self.data.n_positions} entries "
                f"after the {self.data.dim}-dimensional class vector; raise --d-model to at least {self.data.dim + self.data.n_positions}."
            )
        check_lr(self.lr)
        d, P, dm = self.data, self.data.n_positions, self.d_model  # the class means, the model, a batch's activations kept
        need = 4 * (d.n_classes * d.dim + 4 * (self.attn_layers * 3 * dm * dm + self.mlp_layers * dm * dm + dm * d.n_labels)
                    + max(self.batch, self.n_eval) * P * (self.attn_layers * (4 * dm + 2 * self.heads * P) + self.mlp_layers * dm))
        check_fits_memory("train-toy --setting icml with these sizes", need,
                          "give a smaller --classes, --d-model, --batch or --context")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MetaConfig":
        d = dict(d)
        d["data"] = MetaDataConfig(**d.get("data", {}))
        return cls(**d)


@dataclass
class MetaDynamicsConfig:
    """Settings of ``meta_dynamics`` (saved in ``dynamics.json``)."""

    n_eval: int = 2048
    """held-out sequences per checkpoint (accuracy, random-label accuracy, attention metrics)"""
    seed: int = 0
    band: float = 0.05
    """a plateau: consecutive checkpoints whose accuracy stays within this band ..."""
    min_span: float = 1.5
    """... over at least this factor of training steps (last step / first step)"""

    def __post_init__(self) -> None:
        if self.n_eval < 1:
            raise MechscopeError(f"--n must be at least 1 (got {self.n_eval}).")
        if not (0 < self.band < 1) or not (self.min_span >= 1):
            raise MechscopeError("The plateau band must be in (0, 1) and its span factor at least 1.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
