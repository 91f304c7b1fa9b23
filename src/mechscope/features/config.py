"""``TranscoderTrainConfig``: how ``train_transcoders`` trains a transcoder set, checked when
made; ``EVAL_TOKENS``, the evaluation's default length.

No torch at import: the CLI reads the defaults when it starts (making a config imports the
architecture registry, which does).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mechscope.activations.config import check_sink_ratio
from mechscope.errors import MechscopeError, check_lr
from mechscope.sae.config import TrainConfig

EVAL_TOKENS = 4096
"""Default held-out tokens of ``mechscope transcoders eval`` (32 contexts of 128; each CE loss
recovered comes with its 95% interval, so a longer run is a choice made knowing the width)."""

SINK_RATIO = 30.0
"""Default ``sink_ratio`` of training and evaluation (``TranscoderTrainConfig.sink_ratio``)."""

_OWN = ("architecture", "d_sae", "expansion", "k", "tokens", "batch_tokens", "lr", "checkpoint_every", "seed", "device")
"""``TrainConfig`` fields this config sets itself (``train_options`` may not)."""


@dataclass
class TranscoderTrainConfig:
    """How to train one transcoder per layer from one shared stream of activations.

    Every selected layer ``l`` gets a transcoder from ``blocks.l.ln2.hook_normalized`` to
    ``blocks.l.hook_mlp_out``; all of them train on the same ``tokens`` rows, harvested once.
    Activations come in chunks of ``shuffle_contexts`` contexts (``context_len`` tokens each,
    the first position of each dropped as in every mechscope harvest), shuffled within the
    chunk and cut into training batches of ``batch_contexts`` contexts' rows
    (``batch_contexts * (context_len - 1)`` rows, less the special tokens' rows with
    ``exclude_special`` and the sinks' rows with ``sink_ratio``); the chunks are what makes resume exact
    (``mechscope.features.train``). Memory for the chunk: ``shuffle_contexts * (context_len - 1)
    * 2 * sum(d_model of the layers) * 4`` bytes.
    """

    layers: list[int] | None = None
    """Layers to train (None: all)."""
    architecture: str = "topk"
    """relu, topk, batchtopk or jumprelu (``mechscope.sae.archs``)."""
    skip: bool = True
    """Add a linear skip from input to output (the ``skip_<architecture>`` form; circuit-tracer's
    ``W_skip``). On by default since session 15: at 300,000 tokens (``bench/sae_defaults.py``,
    TopK k 32 x 8, held-out FVU) it takes layer 4 from 0.444 to 0.357, layer 13 from 0.497 to
    0.370 and layer 20 from 0.344 to 0.216, and revives most dead latents (layer 4: 30% -> 10%);
    the graph stays exact through it (the MLP's linear part is the skip, its nonlinear part the
    features and error)."""
    k: int = TrainConfig.k
    """Active features per token (topk, batchtopk)."""
    expansion: int = TrainConfig.expansion
    """Features per input dimension (``d_sae = expansion * d_model`` unless ``d_sae`` is set)."""
    d_sae: int | None = None
    tokens: int = 300_000
    """Rows harvested per layer (every layer trains on the same ones), rounded down to whole
    batches; with ``exclude_special`` the special tokens' rows among them are not trained on, nor,
    with ``sink_ratio``, the attention sinks' rows."""
    lr: float = 1.2e-3
    """Measured with ``batch_contexts`` 8 and no skip, before both defaults changed, and not re-tuned
    since (``bench/sae_defaults.py``, embedded model, layer 10, TopK
    k=32 x8, 100,000 rows, held-out FVU): old defaults (lr 4e-4, 2,032-row batches, dead window
    500k, uncentred start) 1.051; centred start and short dead window 0.951; lr 1.2e-3 0.755;
    and 1,016-row batches 0.411 (lr 2.5e-3 at 2,032 rows: 0.505, with 71% dead latents).
    Layer 2: 0.950 -> 0.711 (lr 1.2e-3, 2,032 rows). A plain TopK loop: 1.047 at layer 10.
    MLP outputs are heavy-tailed (at layer 2 the top 1% of tokens, mostly ' ', carry 73% of the
    variance), which is most of what is left."""
    corpus: str | None = None
    """Corpus spec (``activations.get_corpus``; default the embedded corpus), train split."""
    context_len: int = 128
    batch_contexts: int = 4
    """Contexts whose rows make one training batch (508 rows at ``context_len`` 128; short
    runs need the steps, see ``lr``). 4 since session 15: with the skip, at 300,000 tokens,
    held-out FVU 0.357 -> 0.321 (layer 4), 0.370 -> 0.325 (layer 13), 0.216 -> 0.187 (layer
    20) against 8 contexts, for roughly 1.1-1.7x the training time (shared box; ``bench/sae_defaults.py``)."""
    forward_contexts: int = 8
    """Contexts per forward pass of the model."""
    shuffle_contexts: int = 256
    """Contexts per shuffled chunk; a multiple of ``batch_contexts`` and of the forward passes' contexts."""
    checkpoint_every: int = 100_000
    """Tokens between checkpoints (taken at the first chunk boundary after each multiple)."""
    seed: int = 0
    """Seeds the chunk shuffles; layer ``l``'s trainer gets ``seed + l``."""
    exclude_special: bool = True
    """Leave out the rows of special tokens (``activations.special_token_ids``: the document
    separator that packing puts mid-context, BOS, chat markers), as position 0 is left out:
    they are attention sinks whose MLP outputs dwarf every text token's, so a few of them set
    the output scale and most of the loss. Measured in ``bench/sae_defaults.py`` (docs/decisions.md,
    "Transcoder sets: special tokens")."""
    sink_ratio: float | None = SINK_RATIO
    """Leave out the rows of attention sinks (massive activations): positions whose residual
    stream after any block up to the deepest trained layer has a norm more than ``sink_ratio``
    times that block's median over the forward pass (``activations.store.sink_positions``; None:
    keep them). Separators are such sinks too, so they stay out even with ``exclude_special``
    off unless this is None. On the embedded model the others are mostly a newline at position 1
    after a newline at position 0 (about 2% of contexts); their layer-11 MLP outputs are ~770x a
    text token's, so ~50 rows in 300,000 held most of the layer's squared error. 30 sits between
    the largest text ratio in any block (13.2x) and every sink's largest (>= 66x); measured in
    docs/decisions.md ("Transcoder sets: massive-activation sinks")."""
    train_options: dict[str, Any] = field(default_factory=dict)
    """Any other ``TrainConfig`` field (``l1``, ``l0``, ``aux_k``, ``dead_tokens``, ``log_every``, ...)."""

    def __post_init__(self) -> None:
        check_lr(self.lr)
        if self.layers is not None:
            if not self.layers:
                raise MechscopeError("--layers names no layer; give 'all' or layer numbers such as 0,3,5.")
            if len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
                raise MechscopeError(f"--layers {','.join(map(str, self.layers))} repeats a layer or has a negative one; give each layer once.")
            self.layers = sorted(self.layers)
        if self.tokens <= 0:
            raise MechscopeError(f"--tokens must be positive, got {self.tokens}.")
        for option, value, least in (("--k", self.k, 1), ("--expansion", self.expansion, 1), ("--d-sae", self.d_sae, 1),
                                     ("--context-len (context_len)", self.context_len, 2),
                                     ("--batch-contexts (batch_contexts)", self.batch_contexts, 1),
                                     ("forward_contexts", self.forward_contexts, 1),
                                     ("--shuffle-contexts (shuffle_contexts)", self.shuffle_contexts, 1),
                                     ("--checkpoint-every (checkpoint_every)", self.checkpoint_every, 1)):
            if value is not None and value < least:
                raise MechscopeError(f"{option} must be at least {least}; got {value}.")
        if self.sink_ratio is not None and not self.sink_ratio > 1:
            raise MechscopeError(f"--sink-ratio (sink_ratio) {self.sink_ratio}: sink_ratio must be above 1, or --sink-ratio 0 "
                                 "(None in Python) to keep the sinks.")
        if self.shuffle_contexts % self.batch_contexts or self.shuffle_contexts % self.fill_contexts:
            raise MechscopeError(
                f"shuffle_contexts={self.shuffle_contexts} must be a multiple of batch_contexts={self.batch_contexts} "
                f"and of the contexts per store fill ({self.fill_contexts})."
            )
        check_sink_ratio(self.sink_ratio)
        bad = sorted(set(self.train_options) & set(_OWN))
        if bad:
            raise MechscopeError(f"train_options may not set {', '.join(bad)}; they are fields of TranscoderTrainConfig.")
        self.train_config()  # the architecture, the batch size against --tokens and the other options, checked now

    @property
    def rows_per_context(self) -> int:
        return self.context_len - 1  # the harvest drops each context's first position

    @property
    def batch_rows(self) -> int:
        return self.batch_contexts * self.rows_per_context

    @property
    def fill_contexts(self) -> int:
        """Contexts per fill of the activation store: whole forward passes, at least two contexts."""
        return self.forward_contexts * max(1, -(-2 // self.forward_contexts))

    @property
    def arch_name(self) -> str:
        """The architecture trained: ``architecture``, or its ``skip_`` form with ``skip``."""
        from mechscope.sae.archs import get_architecture, skip_variant

        get_architecture(self.architecture)  # one sentence for an unknown name
        return skip_variant(self.architecture) if self.skip else self.architecture

    def train_config(self, layer: int = 0, device: str = "cpu") -> TrainConfig:
        """The ``TrainConfig`` of layer ``layer``'s trainer."""
        try:
            return TrainConfig(architecture=self.arch_name, d_sae=self.d_sae, expansion=self.expansion, k=self.k,
                               tokens=self.tokens, batch_tokens=self.batch_rows, lr=self.lr,
                               checkpoint_every=self.checkpoint_every, seed=self.seed + layer, device=device,
                               **self.train_options)
        except TypeError as exc:
            raise MechscopeError(f"train_options has a key TrainConfig does not know ({exc}).") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def chunk_for(batch_contexts: int, forward_contexts: int = 8, target: int = 256) -> int:
        """The valid ``shuffle_contexts`` nearest ``target`` (at least one multiple of both
        ``batch_contexts`` and the store fill), for callers that set only the batch size."""
        import math

        fill = forward_contexts * max(1, -(-2 // forward_contexts)) if forward_contexts > 0 else 1
        step = math.lcm(max(1, batch_contexts), fill)
        return step * max(1, round(target / step))
