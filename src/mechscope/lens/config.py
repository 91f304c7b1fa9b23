"""``TunedLensTrainConfig``: how ``train_tuned_lens`` trains a tuned lens, checked when made;
``default_tuned_dir``: where ``mechscope recall`` looks for a model's translators.

No torch here: the CLI reads the defaults when it starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from mechscope.errors import MechscopeError, check_lr

Reads = Literal["resid_post", "resid_pre"]
MatmulDtype = Literal["auto", "bfloat16", "float32"]
CacheDtype = Literal["bfloat16", "float32"]


@dataclass
class TunedLensTrainConfig:
    """Settings of ``train_tuned_lens`` (``mechscope.lens.tuned_train``), saved with the lens.

    Stage 1 (closed form) reads ``tokens`` positions of the corpus's train split; stage 2 (KL)
    takes ``kl_steps`` Adam steps of ``kl_batch`` positions each, drawn from ``kl_tokens``
    positions cached during stage 1 (their residuals at every layer: ``kl_tokens * (n_layers +
    1) * d_model * 2`` bytes in bfloat16).
    """

    tokens: int = 24_000
    """Positions whose residuals feed the closed-form (least-squares) start."""
    reads: Reads = "resid_post"
    """Hook each translator reads: ``resid_post`` (the residual stream after block l) or
    ``resid_pre`` (entering block l; the tuned-lens package's layout)."""
    corpus: str | None = None
    """Corpus spec (``activations.get_corpus``; default the embedded corpus), train split."""
    context_len: int = 128
    forward_contexts: int = 8
    """Contexts per forward pass of the model."""
    ridge: float = 1e-3
    """Ridge penalty of the closed form, relative to the mean diagonal of the inputs' Gram
    matrix; pulls each translator towards the identity."""
    kl_steps: int = 150
    """Adam steps of the KL fine-tune (0: the closed form alone)."""
    kl_batch: int = 64
    """Positions per KL step (all layers train on the same ones)."""
    kl_tokens: int = 4096
    """Positions cached for the KL fine-tune (a seeded sample of stage 1's, spread over the
    corpus read); steps cycle through them in seeded epochs."""
    token_chunk: int = 64
    """Positions whose full-vocabulary logits are held at once (memory: ``token_chunk *
    n_layers * d_vocab * 4`` bytes, plus autograd's copies)."""
    lr: float = 1e-4
    """Adam's learning rate of the KL fine-tune. Adam moves every entry of A_l by about lr per
    step, so an output moves by up to lr * d_model: at 1e-3 on SmolLM2 (d_model 576) the
    training-batch KL of layer 0 rose from 1.36 to ~4.2 nats in 40 steps of 16 positions."""
    matmul_dtype: MatmulDtype = "auto"
    """dtype of the unembedding matmuls of the KL fine-tune (logits, softmax and the loss stay
    float32; evaluation always uses float32). ``auto``: bfloat16 on a GPU and on CPUs with
    bfloat16 instructions (AMX or AVX512-BF16: ~3.5x faster than float32), float32 elsewhere:
    on an AVX2-only CPU (session 18's AMD EPYC box) a [64, 576] x [576, 49152] bfloat16 matmul
    took 17.6 s against 0.12 s in float32 (144x slower), so a bfloat16 default stalled training
    there. ``train_tuned_lens`` records the resolved dtype in the settings."""
    cache_dtype: CacheDtype = "bfloat16"
    """dtype of the residuals cached for the KL fine-tune."""
    checkpoint_every: int = 50
    """KL steps between checkpoints (the closed form is checkpointed when it is done)."""
    keep_checkpoint: bool = True
    """Keep ``out/checkpoint/`` (the KL cache and the final optimiser state) after the run, so
    that ``resume`` with more ``kl_steps`` extends a finished run exactly; it holds
    ``kl_tokens * (n_layers + 1) * d_model`` cached values and four copies of the translators
    (the closed form's, the final ones, Adam's two moments): about 310 MB for SmolLM2-135M at
    the defaults. False removes it when the lens is saved."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reads not in ("resid_post", "resid_pre"):
            raise MechscopeError(f"reads='{self.reads}' is not a translator input; use resid_post or resid_pre.")
        if self.tokens < 1 or self.kl_steps < 0 or self.kl_batch < 1 or self.kl_tokens < 1 or self.token_chunk < 1:
            raise MechscopeError("--tokens, --kl-batch, --kl-tokens and token_chunk must be positive and --kl-steps at least 0.")
        if self.context_len < 2 or self.forward_contexts < 1 or self.checkpoint_every < 1:
            raise MechscopeError("context_len must be at least 2, forward_contexts and checkpoint_every at least 1.")
        if self.kl_tokens > self.tokens:
            raise MechscopeError(f"--kl-tokens {self.kl_tokens} exceeds --tokens {self.tokens}; the KL set is drawn from those.")
        if self.ridge < 0:
            raise MechscopeError("ridge must be at least 0.")
        check_lr(self.lr)
        if self.matmul_dtype not in ("auto", "bfloat16", "float32"):
            raise MechscopeError(f"matmul_dtype must be auto, bfloat16 or float32, got '{self.matmul_dtype}'.")
        if self.cache_dtype not in ("bfloat16", "float32"):
            raise MechscopeError(f"cache_dtype must be bfloat16 or float32, got '{self.cache_dtype}'.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


HELDOUT_TOKENS = 1024
"""Held-out positions ``mechscope tuned-lens eval`` scores by default."""


def default_tuned_dir(model_name: str) -> Path:
    """Where translators of ``model_name`` are looked for when ``--tuned`` is not given:
    ``$MECHSCOPE_CACHE/tuned-lens/<model>``, else ``$XDG_CACHE_HOME/mechscope/tuned-lens/<model>``,
    else ``~/.cache/mechscope/tuned-lens/<model>`` (``<model>``: the name with anything but
    letters, digits, ``.``, ``_`` and ``-`` replaced by ``_``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", model_name) or "model"
    if os.environ.get("MECHSCOPE_CACHE"):
        root = Path(os.environ["MECHSCOPE_CACHE"]).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mechscope"
    return root / "tuned-lens" / safe
