"""Settings of the SAE tools, each checked when made: ``TrainConfig`` (training),
``DashboardConfig`` (feature dashboards), ``GenerationConfig`` (steering).

No torch here: the CLI reads the defaults when it starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mechscope.errors import MechscopeError, check_at_least, check_lr, check_number_fields


@dataclass
class TrainConfig:
    """How to train. Widths: ``d_sae`` or ``expansion * d_in``.

    The defaults are chosen for short runs (a few hundred thousand tokens, as a transcoder set's
    thirty layers sharing one budget get), measured by ``bench/sae_defaults.py`` on the embedded
    model (TopK k=32, 4,608 latents, 100,000 training rows, held-out FVU; 2-core CPU): SAE on
    ``blocks.10.hook_resid_post``: batch 4096, lr 4e-4, dead window 500k (the old defaults)
    0.559; batch 2048 0.445; batch 1024 0.353; batch 2048 and lr 1.2e-3 0.293, lr 2e-3 0.250;
    a plain TopK loop (batch 2048, constant lr 4e-4) 0.424. Transcoders: ``TranscoderTrainConfig``.
    """

    architecture: str = "topk"
    d_sae: int | None = None
    expansion: int = 8
    k: int = 32
    l1: float = 5.0  # relu: L1 coefficient (inputs normalised to norm sqrt(d_in))
    l0: float = 0.02  # jumprelu: L0 coefficient
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.05
    tokens: int = 2_000_000
    batch_tokens: int = 2048  # small budgets need steps: 4096 halved them (bench/sae_defaults.py)
    lr: float = 2e-3  # 4e-4 learns too slowly in the few hundred steps of a short run (bench/sae_defaults.py)
    lr_warmup: float = 0.02  # fraction of steps
    lr_decay: float = 0.2  # fraction of steps at the end decayed linearly to 0
    l1_warmup: float = 0.05  # fraction of steps
    aux_k: int | None = None  # topk/batchtopk: latents in the AuxK loss (default d_in // 2)
    aux_coef: float = 1 / 32
    dead_tokens: int | None = None  # a latent is dead if it has not fired in this many tokens (default: dead_window)
    centre_init: bool = True  # transcoders: b_enc starts at -mean(x) @ W_enc, so pre-activations start centred
    resample_every: int | None = None  # relu: steps between dead-feature resamplings (default ~ 1/5 run)
    checkpoint_every: int = 250_000  # tokens
    seed: int = 0
    norm_batches: int = 8  # batches used to estimate the input scale
    device: str = "cpu"
    log_every: int = 20  # steps

    def __post_init__(self) -> None:
        from mechscope.sae.archs import get_architecture  # torch: only when a config is made

        check_number_fields(self)
        get_architecture(self.architecture)  # a one-sentence error for an unknown name
        if self.device != "cpu":  # refused here when this machine cannot run it (sae_trainer: the model's device)
            from mechscope.models.load import check_device

            check_device(self.device)
        for option, frac in (("lr_warmup", self.lr_warmup), ("lr_decay", self.lr_decay), ("l1_warmup", self.l1_warmup)):
            if not (math.isfinite(frac) and 0 <= frac <= 1):
                raise MechscopeError(f"{option} is a fraction of the training steps and must lie in [0, 1]; got {frac}.")
        if self.aux_k is not None and self.aux_k < 1:
            raise MechscopeError(f"aux_k must be at least 1 (latents in the AuxK loss), or None for d_in // 2; got {self.aux_k}.")
        if self.dead_tokens is not None and self.dead_tokens < 0:
            raise MechscopeError(f"dead_tokens must be at least 0 (or None for the default); got {self.dead_tokens}.")
        if self.resample_every is not None and self.resample_every < 0:
            raise MechscopeError(f"resample_every must be at least 1 (or None for the default); got {self.resample_every}.")
        if self.log_every < 1:
            raise MechscopeError(f"log_every must be at least 1 (steps between log lines); got {self.log_every}.")
        if self.batch_tokens <= 0:
            raise MechscopeError(f"--batch-tokens must be at least 1 (tokens per training batch); got {self.batch_tokens}.")
        if self.checkpoint_every <= 0:
            raise MechscopeError(f"--checkpoint-every must be at least 1 (tokens between checkpoints); got {self.checkpoint_every}.")
        if self.tokens < self.batch_tokens:
            raise MechscopeError(f"--tokens {self.tokens} is less than one batch ({self.batch_tokens} tokens); train on more tokens.")
        if self.d_sae is not None and self.d_sae < 1:
            raise MechscopeError(f"--d-sae must be at least 1 (or left out for --expansion x the input width); got {self.d_sae}.")
        if self.expansion < 1:
            raise MechscopeError(f"--expansion must be at least 1 (features per input dimension); got {self.expansion}.")
        check_lr(self.lr)
        for option, value in (("--l1", self.l1), ("--l0", self.l0), ("aux_coef", self.aux_coef),
                              ("jumprelu_init_threshold", self.jumprelu_init_threshold)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise MechscopeError(f"{option} must be a finite number of at least 0; got {value}.")
        if not (math.isfinite(self.jumprelu_bandwidth) and self.jumprelu_bandwidth > 0):
            raise MechscopeError(f"jumprelu_bandwidth must be a positive finite number; got {self.jumprelu_bandwidth}.")

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens

    @property
    def dead_window(self) -> int:
        """Tokens without firing after which a latent counts as dead (AuxK, resampling):
        ``dead_tokens``, or a tenth of the run capped at 500,000 (at least one batch), so that
        short runs detect dead latents too."""
        if self.dead_tokens is not None:
            return self.dead_tokens
        return max(self.batch_tokens, min(500_000, self.tokens // 10))


@dataclass
class DashboardConfig:
    """What to compute; also the saved ``settings``."""

    features: list[int] | None = None
    """Feature indices (default: the first 100)."""
    n_tokens: int = 32_768
    """Corpus tokens to read (rounded up to whole contexts)."""
    ctx_len: int = 64
    batch_size: int = 16
    skip_first: int = 1
    n_top: int = 10
    n_quantiles: int = 5
    """Quantile groups of firing tokens, each with a uniform sample."""
    n_samples: int = 5
    window_left: int = 12
    window_right: int = 4
    n_logits: int = 10
    hist_min: float = 1e-3
    hist_max: float = 1e3
    hist_bins: int = 48
    seed: int = 0
    corpus: str = "embedded"
    """Corpus spec for ``mechscope.activations.get_corpus`` (documents shuffled with ``seed``)."""

    def __post_init__(self) -> None:
        check_number_fields(self, integer="a whole number", strings=("corpus",))
        if self.features is not None:  # one index, a range or a numpy array read as a list of ints
            import numbers

            feats = [self.features] if isinstance(self.features, numbers.Integral) else self.features
            if isinstance(feats, (str, bytes)) or not hasattr(feats, "__iter__"):
                raise MechscopeError(f"features is a list of feature indices, not {type(self.features).__name__}.")
            feats = list(feats)
            bad = [f for f in feats if isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 0]
            if bad:
                raise MechscopeError(f"features holds {bad[0]!r}, which is not a feature index (a whole number from 0).")
            if not feats:
                raise MechscopeError("features is empty; give at least one feature index, or None for the first 100.")
            self.features = [int(f) for f in feats]
        check_at_least(("--tokens", self.n_tokens))
        check_at_least(("--ctx-len", self.ctx_len), least=2)
        check_at_least(("--batch-size", self.batch_size), ("--top", self.n_top))
        if self.skip_first >= self.ctx_len:
            raise MechscopeError(f"skip_first={self.skip_first} leaves nothing of a {self.ctx_len}-token context.")

    def stats_config(self):
        """The ``sae.feature_stats.StatsConfig`` of these settings."""
        from mechscope.sae.feature_stats import StatsConfig

        return StatsConfig(n_top=self.n_top, n_samples=self.n_samples, window_left=self.window_left,
                           window_right=self.window_right, hist_min=self.hist_min, hist_max=self.hist_max,
                           hist_bins=self.hist_bins, seed=self.seed)


@dataclass
class GenerationConfig:
    """How ``steer_feature`` / ``steer_actadd`` continue the prompt (saved with the result)."""

    max_new_tokens: int = 40
    temperature: float = 0.0
    """0 = greedy; otherwise sample from softmax(logits / temperature)."""
    top_k: int | None = None
    """Sample only among the top_k tokens (None = all)."""
    seed: int = 0
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise MechscopeError(f"--max-new-tokens must be at least 1; got {self.max_new_tokens}.")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 3.4e38):
            raise MechscopeError(f"--temperature must be a finite number of at least 0 (0: greedy) within float32's range; "
                                 f"got {self.temperature}.")
        if self.top_k is not None and self.top_k < 1:
            raise MechscopeError(f"--top-k must be at least 1 (or left out to sample from all tokens); got {self.top_k}.")
