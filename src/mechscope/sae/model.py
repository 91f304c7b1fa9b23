"""The sparse autoencoder (and transcoder) module: one class for every architecture.

    f = act(x' @ W_enc + b_enc)          x' = x - b_dec (SAE) or x (transcoder)
    x_hat = f @ W_dec + b_dec

Shapes: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``,
``threshold [d_sae]`` (used by JumpReLU, and BatchTopK at inference), with ``d_out == d_in``
for an SAE. These are SAELens's names and layouts, so saving is a rename-free dump (see
``io.py``).

What differs between architectures (the pre-activation, the activation, the losses and
training step, the saved tensors and ``cfg.json`` keys) is an ``Architecture`` object from
``mechscope.sae.archs``, chosen by ``SAEConfig.architecture``; the module holds the
parameters and calls it. Activations by architecture (SAELens semantics, so both libraries
reconstruct the same):
- ``relu``: ReLU(pre).
- ``topk``: keep the k largest pre-activations per token, then ReLU.
- ``batchtopk``: while training, the k * batch largest over the whole batch; at inference a
  JumpReLU whose threshold is the running mean of the smallest kept activation (Bussmann et
  al. 2024), which is also how SAELens stores it.
- ``jumprelu``: relu(pre) * (pre > threshold) (as SAELens), thresholds trained with a straight-through estimator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mechscope.errors import MechscopeError
from mechscope.sae.archs import ARCHITECTURES, Architecture, get_architecture

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig"]


FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass
class SAEConfig:
    """What an SAE is: its widths, activation and where in which model it reads."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int | None = None  # topk / batchtopk
    hook_name: str = ""
    model_name: str = ""
    d_out: int | None = None  # transcoders: output width (None = reconstruct the input)
    hook_name_out: str | None = None  # transcoders: the hook whose activation is predicted
    dtype: str = "float32"
    apply_b_dec_to_input: bool = True  # SAEs subtract b_dec before encoding; transcoders never do
    metadata: dict[str, Any] = field(default_factory=dict)  # training provenance, free-form

    def __post_init__(self) -> None:
        from mechscope.errors import check_number_fields

        check_number_fields(self)
        if self.d_in <= 0 or self.d_sae <= 0 or (self.d_out is not None and self.d_out <= 0):
            out = f", d_out={self.d_out}" if self.d_out is not None else ""
            raise MechscopeError(f"SAE widths must be positive (d_in={self.d_in}, d_sae={self.d_sae}{out}).")
        if self.dtype not in FLOAT_DTYPES:
            raise MechscopeError(f"SAEConfig.dtype must be a float type, one of {', '.join(FLOAT_DTYPES)}; got {self.dtype!r}.")
        if get_architecture(self.architecture).uses_k and not self.k:
            raise MechscopeError(f"a {self.architecture} SAE needs k (the number of active features per token).")
        if self.k is not None and not 0 < self.k <= self.d_sae:
            raise MechscopeError(f"k={self.k} must lie between 1 and d_sae={self.d_sae}.")

    @property
    def is_transcoder(self) -> bool:
        return self.d_out is not None and self.hook_name_out is not None

    @property
    def out_dim(self) -> int:
        return self.d_out if self.d_out is not None else self.d_in

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


def init_seed(metadata: dict[str, Any]) -> int:
    """``metadata["seed"]`` (0 when absent), the seed of an SAE's initial weights: a whole number
    torch can seed with, else one sentence (a cfg.json's ``metadata.seed`` of "abc", 2**70 or
    [1] would otherwise fail inside torch)."""
    v = metadata.get("seed", 0)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not _SEED_MIN <= v <= _SEED_MAX:
        raise MechscopeError(f"the SAE's metadata.seed must be a whole number between {_SEED_MIN} and {_SEED_MAX} (it "
                             f"seeds the initial weights); got {v!r}: fix it or remove it from the cfg.json.")
    return v


class SAE(nn.Module):
    """A sparse autoencoder or transcoder; ``sae(x)`` reconstructs, ``encode``/``decode`` split it.
    ``arch`` is its ``Architecture`` (``mechscope.sae.archs``)."""

    W_skip: nn.Parameter
    """Only where the architecture adds it (``arch.extra_parameters``: skip transcoders); test
    with ``hasattr``. Declared for type checkers, not created here."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.arch: Architecture = get_architecture(cfg.architecture)()
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.out_dim
        dtype = getattr(torch, cfg.dtype)
        g = torch.Generator().manual_seed(init_seed(cfg.metadata))
        w_dec = torch.randn(d_sae, d_out, generator=g, dtype=torch.float32)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec.to(dtype))
        # Encoder initialised to the decoder's transpose (tied init: fewer dead latents early on).
        w_enc = w_dec.T.clone() if d_out == d_in else torch.randn(d_in, d_sae, generator=g) / d_in**0.5
        self.W_enc = nn.Parameter(w_enc.to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=dtype), requires_grad=self.arch.threshold_trained)
        for name, shape in self.arch.extra_parameters(cfg).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype)))

    # ------------------------------------------------------------------ forward pieces
    def pre_acts(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_sae] pre-activations."""
        return self.arch.pre_acts(self, x)

    def activate(self, pre: Tensor) -> Tensor:
        """Inference activation of pre-activations [..., d_sae]."""
        return self.arch.activate(self, pre)

    def _check_width(self, t: Tensor, width: int, what: str, shape: str) -> None:
        """One sentence when ``t``'s last dimension is not ``width`` (else a shape RuntimeError
        deep in a matmul)."""
        if not isinstance(t, Tensor):
            raise MechscopeError(f"the SAE's {what} must be a torch.Tensor of shape {shape}; got a {type(t).__name__}.")
        if t.ndim == 0 or t.shape[-1] != width:
            raise MechscopeError(f"the SAE's {what} must have shape {shape} (last dimension {width}); got shape "
                                 f"{list(t.shape)}.")

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations [..., d_sae] of inputs [..., d_in]."""
        self._check_width(x, self.cfg.d_in, "input", "[..., d_in]")
        return self.activate(self.pre_acts(x))

    def decode(self, f: Tensor, x: Tensor | None = None) -> Tensor:
        """[..., d_sae] -> [..., d_out]. ``x`` [..., d_in], the input ``f`` was encoded from, is
        read only by an architecture whose output also depends on the input directly."""
        self._check_width(f, self.cfg.d_sae, "feature activations", "[..., d_sae]")
        if x is not None:
            self._check_width(x, self.cfg.d_in, "input", "[..., d_in]")
        return self.arch.decode(self, f, x)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x), x)

    # ------------------------------------------------------------------ helpers
    @torch.no_grad()
    def set_decoder_unit_norm(self) -> None:
        """Training constraint: decoder rows back to unit norm (the optimiser step's drift
        is removed, not compensated; see ``remove_parallel_grad``)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the gradient component along each decoder row, so a step moves rows
        along the unit sphere (the usual companion of the unit-norm constraint)."""
        if self.W_dec.grad is not None:
            w = self.W_dec
            self.W_dec.grad.sub_((self.W_dec.grad * w).sum(1, keepdim=True) * w)

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        c = self.cfg
        kind = "transcoder" if c.is_transcoder else "SAE"
        return f"{kind} {c.architecture} d_in={c.d_in} d_sae={c.d_sae}" + (f" k={c.k}" if c.k else "") + f" hook={c.hook_name}"
