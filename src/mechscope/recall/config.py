"""``RecallConfig``: every setting of the recall analyses (also saved with each result),
checked when made; ``dataset_config`` and ``check_dataset`` for the run over the facts list.

No torch here: the CLI reads the defaults when it starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from mechscope.errors import MechscopeError

TraceKind = Literal["resid", "mlp", "attn"]


@dataclass
class RecallConfig:
    """Settings of ``recall`` / ``recall_dataset``.

    Windows default to the papers' choices scaled by depth: ROME traced MLP/attention with a
    window of 10 layers and Geva et al. knocked out attention in windows of 9 layers, both on
    48-layer GPT-2 XL, so ``None`` means ``round(10 * n_layers / 48)`` and
    ``round(9 * n_layers / 48)`` (6 and 6 on the 30-layer SmolLM2).
    """

    samples: int = 3
    """noise samples per causal-tracing run (ROME used 10)"""
    noise: float = 3.0
    """noise std as a multiple of the embedding std of the facts list's subjects (ROME: 3)"""
    trace_window: int | None = None
    """layers restored together when tracing MLP / attention outputs (None: depth-scaled 10/48)"""
    kinds: tuple[TraceKind, ...] = ("resid", "mlp", "attn")
    """which states causal tracing restores"""
    knockout_window: int | None = None
    """layers whose last-position attention edges are blocked together (None: depth-scaled 9/48)"""
    top_k: int = 50
    """projected tokens per layer in the subject-enrichment measure (Geva: 50)"""
    gen_tokens: int = 24
    """tokens generated per prompt to build a subject's related-token set"""
    layer_stride: int = 1
    """trace and knock out at every ``layer_stride``-th layer only (the dataset run uses 2)"""
    seed: int = 0
    max_rows: int = 64
    """forward-pass batch size (rows) for the batched tracing and knockout runs"""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.samples < 1 or self.layer_stride < 1:
            raise MechscopeError("--samples and --layer-stride must be at least 1.")
        for name in ("trace_window", "knockout_window"):  # 0 or less restored or blocked nothing, without a word
            w = getattr(self, name)
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
                raise MechscopeError(f"RecallConfig.{name} must be a whole number of layers, at least 1 (None: the papers' "
                                     f"depth-scaled default); got {w!r}.")
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        if not kinds or (bad := [k for k in kinds if k not in get_args(TraceKind)]):
            raise MechscopeError(f"RecallConfig.kinds holds {', '.join(map(repr, bad)) if kinds else 'nothing'}; choose among "
                                 f"{', '.join(get_args(TraceKind))}.")
        self.kinds = kinds

    def windows(self, n_layers: int) -> tuple[int, int]:
        tw = self.trace_window or max(1, round(10 * n_layers / 48))
        kw = self.knockout_window or max(1, round(9 * n_layers / 48))
        return tw, kw

    def layers(self, n_layers: int) -> list[int]:
        """The layers (window centres) traced and knocked out."""
        return list(range(0, n_layers, max(1, self.layer_stride)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d


DATASETS = ("facts",)
"""Datasets ``recall_dataset`` runs over: the shipped facts list."""
DATASET_N = 30
"""Facts a dataset run draws by default."""


def dataset_config(**kw) -> RecallConfig:
    """The dataset run's defaults: one noise draw per fact (the aggregate averages over facts)
    and every second layer, which keeps 30 facts to a few minutes on a CPU."""
    return RecallConfig(**{"samples": 1, "layer_stride": 2, **kw})


def check_dataset(name: str, n: int) -> None:
    """Refuse an unknown dataset or too few facts to aggregate."""
    if name not in DATASETS:
        raise MechscopeError(f"Unknown dataset '{name}'; the only one is 'facts' (the shipped facts list).")
    if n < 2:
        raise MechscopeError(f"--n {n} is too small: the aggregate needs at least 2 facts.")


def window_layers(center: int, width: int, n_layers: int) -> range:
    """Layers of a window of ``width`` around ``center``, clipped to the model (ROME's
    convention: [center - width // 2, center + ceil(width / 2)))."""
    return range(max(0, center - width // 2), min(n_layers, center - (-width // 2)))


def check_subject_positions(subject_pos: Any, n_tokens: int, who: str) -> list[int]:
    """``subject_pos`` as sorted distinct token positions inside a prompt of ``n_tokens``
    tokens, else one sentence (``models.prompt.subject_positions`` finds them from the text)."""
    import numbers

    if isinstance(subject_pos, (str, bytes)) or not hasattr(subject_pos, "__iter__"):
        raise MechscopeError(f"{who}: subject_pos is a list of the subject's token positions, not {type(subject_pos).__name__}; "
                             "mechscope.models.prompt.subject_positions(model, prompt, subject) finds them.")
    pos = list(subject_pos)
    if not pos:
        raise MechscopeError(f"{who}: subject_pos is empty; give the subject's token positions (at least one).")
    bad = [p for p in pos if isinstance(p, bool) or not isinstance(p, numbers.Integral) or not 0 <= int(p) < n_tokens]
    if bad:
        raise MechscopeError(f"{who}: subject position {bad[0]!r} is not a token position of the prompt (0..{n_tokens - 1}).")
    return sorted({int(p) for p in pos})
