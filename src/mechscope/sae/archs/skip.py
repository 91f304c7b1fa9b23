"""Skip transcoders: any transcoder architecture plus a linear map from input to output
(Paulo et al. 2025, "Transcoders beat sparse autoencoders"; circuit-tracer's ``W_skip``).

    y_hat = act(x @ W_enc + b_enc) @ W_dec + b_dec + x @ W_skip.T

``W_skip [d_out, d_in]`` is the layout SAELens (``SkipTranscoder``) and circuit-tracer
(``SingleLayerTranscoder.compute_skip``) both use, so it is saved and loaded without a
transpose in either layout. It starts at zero (as in both libraries) and trains with the rest;
no sparsity penalty and no norm constraint apply to it.

The skip is one behaviour shared by four architectures, so it lives here once (``LinearSkip``)
and each variant is a two-line class over the architecture it extends; the activation,
sparsity and auxiliary losses are that architecture's, unchanged:

    skip_relu       SAELens ``skip_transcoder``
    skip_jumprelu   SAELens ``jumprelu_skip_transcoder``
    skip_batchtopk  saved as ``jumprelu_skip_transcoder`` (BatchTopK is a JumpReLU at inference)
    skip_topk       ``topk_skip_transcoder`` (no SAELens class; a name only mechscope reads)

A skip architecture is for transcoders only (an SAE with a linear skip could learn the
identity and leave the features nothing to do), so it has no SAE name and refuses a config
without an output hook.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from mechscope.errors import MechscopeError
from mechscope.sae.archs.base import Architecture
from mechscope.sae.archs.batchtopk import BatchTopK
from mechscope.sae.archs.jumprelu import JumpReLU
from mechscope.sae.archs.relu import ReLU
from mechscope.sae.archs.topk import TopK

if TYPE_CHECKING:
    from mechscope.sae.model import SAE, SAEConfig


class LinearSkip(Architecture):
    """Adds ``x @ W_skip.T`` to the output of the architecture it is mixed into (listed after
    it in the bases: ``class SkipTopK(LinearSkip, TopK)``)."""

    plain: ClassVar[type[Architecture]]
    """The architecture without the skip."""
    saelens_name = ""  # no SAE form

    def extra_parameters(self, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        if not cfg.is_transcoder:
            raise MechscopeError(
                f"{self.name} is a transcoder architecture (a linear skip from input to output); give it an "
                f"output hook, or use {self.plain.name} for an SAE."
            )
        return {**super().extra_parameters(cfg), "W_skip": (cfg.out_dim, cfg.d_in)}

    def skip(self, sae: SAE, x: Tensor | None) -> Tensor:
        """``x @ W_skip.T``: [..., d_in] -> [..., d_out]."""
        if x is None:
            raise MechscopeError(f"a {self.name} transcoder's output reads its input too; pass x to decode.")
        return x.to(sae.W_skip.dtype) @ sae.W_skip.T

    def decode(self, sae: SAE, f: Tensor, x: Tensor | None = None) -> Tensor:
        return super().decode(sae, f, x) + self.skip(sae, x)

    def decode_sparse(self, sae: SAE, values: Tensor, indices: Tensor, offsets: Tensor | None, x: Tensor | None = None) -> Tensor:
        return super().decode_sparse(sae, values, indices, offsets, x) + self.skip(sae, x)

    @torch.no_grad()
    def fold_scales(self, sae: SAE, scale_in: float, scale_out: float) -> None:
        """Also ``W_skip * scale_in / scale_out``: trained to map ``scale_in * x`` to
        ``scale_out * y``, it then maps raw ``x`` to raw ``y``."""
        super().fold_scales(sae, scale_in, scale_out)
        sae.W_skip.mul_(scale_in / scale_out)


class SkipReLU(LinearSkip, ReLU):
    name = "skip_relu"
    plain = ReLU
    saelens_transcoder_name = "skip_transcoder"


class SkipTopK(LinearSkip, TopK):
    name = "skip_topk"
    plain = TopK
    saelens_transcoder_name = "topk_skip_transcoder"


class SkipBatchTopK(LinearSkip, BatchTopK):
    name = "skip_batchtopk"
    plain = BatchTopK
    saelens_transcoder_name = "jumprelu_skip_transcoder"


class SkipJumpReLU(LinearSkip, JumpReLU):
    name = "skip_jumprelu"
    plain = JumpReLU
    saelens_transcoder_name = "jumprelu_skip_transcoder"


SKIP_VARIANTS: tuple[type[LinearSkip], ...] = (SkipReLU, SkipTopK, SkipBatchTopK, SkipJumpReLU)


def skip_variant(name: str) -> str:
    """The name of architecture ``name`` with a linear skip (``topk`` -> ``skip_topk``; a
    skip architecture's own name stays); a one-sentence error when there is none."""
    for cls in SKIP_VARIANTS:
        if name in (cls.name, cls.plain.name):
            return cls.name
    raise MechscopeError(
        f"architecture {name!r} has no skip variant; choose one of {', '.join(c.plain.name for c in SKIP_VARIANTS)}."
    )


def without_skip(name: str) -> str:
    """The architecture ``name`` without its skip (``skip_topk`` -> ``topk``; others unchanged)."""
    for cls in SKIP_VARIANTS:
        if name == cls.name:
            return cls.plain.name
    return name
