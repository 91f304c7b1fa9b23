"""The base class of SAE architectures, and what a training step hands one.

An architecture decides everything that differs between SAE kinds: the pre-activation, the
activation function, the sparsity and auxiliary losses and how a training step encodes and
decodes a batch, which tensors the module holds and saves, and the ``cfg.json`` keys and
SAELens ``architecture`` name it is saved under. The module (``mechscope.sae.model.SAE``)
holds the parameters and calls its architecture; the trainer (``mechscope.sae.train``) calls
the methods below and never looks at an architecture's name.

Every module holds ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_out]``,
``b_dec [d_out]`` and ``threshold [d_sae]`` (zeros and frozen unless the architecture uses
it), plus whatever ``extra_parameters`` declares. Architectures hold no state of their own:
each method takes the module (or its config) it works on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from mechscope.sae.model import SAE, SAEConfig
    from mechscope.sae.train import TrainConfig

CORE_TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec")


@dataclass
class StepState:
    """What a training step knows besides the batch."""

    cfg: TrainConfig
    step: int  # steps taken before this one
    warm: float  # sparsity-penalty warm-up factor, rising from 1/warm-up steps to 1
    dead: Tensor  # [d_sae] bool: latents that have not fired in the last cfg.dead_tokens tokens


@dataclass
class TrainCode:
    """One training batch encoded: the code, the reconstruction decoded from it, the sparsity loss.

    The code is dense (``dense [batch, d_sae]``) or sparse: ``values`` and ``indices`` either
    ``[batch, k]`` (k entries per token) or flat ``[nnz]`` grouped by token, with ``offsets
    [batch]`` where each token's entries start (``torch.nn.functional.embedding_bag``'s layout).
    ``extra`` carries what the architecture's ``aux_loss`` needs from the forward pass.
    """

    y_hat: Tensor  # [batch, d_out]
    sparsity: Tensor  # scalar
    dense: Tensor | None = None
    values: Tensor | None = None
    indices: Tensor | None = None
    offsets: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def fired(self) -> tuple[Tensor, float]:
        """The latents that fired on this batch (an index or a bool mask into ``[d_sae]``) and the
        mean number of active latents per token (L0). Call under ``torch.no_grad()``."""
        if self.dense is not None:
            on = self.dense > 0
            return on.any(0), float(on.sum(-1).float().mean())
        assert self.values is not None and self.indices is not None
        n = self.y_hat.shape[0]
        active = self.values.detach().reshape(-1) > 0
        return self.indices.reshape(-1)[active], float(active.sum()) / n


def n_aux_latents(aux_k: int | None, d_in: int, dead: Tensor) -> int:
    """Latents in the AuxK loss (per token): ``aux_k`` (default d_in // 2), at most the number of dead ones."""
    return min(aux_k or d_in // 2, int(dead.sum()))


def auxk_loss(W_dec: Tensor, values: Tensor, indices: Tensor, err: Tensor, coef: float) -> Tensor:
    """AuxK (Gao et al. 2024): the dead latents' code ``values``/``indices`` [batch, k_aux],
    decoded without bias, should reconstruct the main code's error ``err`` [batch, d_out]; the
    squared error is normalised by the error's own and scaled by ``coef``. Scalar, never NaN."""
    e_hat = F.embedding_bag(indices, W_dec, mode="sum", per_sample_weights=values.relu())
    e = err.detach()
    aux = coef * (e - e_hat).pow(2).sum(-1).mean() / e.pow(2).sum(-1).mean().clamp_min(1e-8)
    return torch.nan_to_num(aux)


class Architecture:
    """One SAE architecture. Subclass it in a file of ``mechscope/sae/archs/`` and add the class
    to the registry in ``archs/__init__.py``; the module, IO and trainer need no change.

    A subclass sets ``name`` and the two SAELens names and defines ``activate`` and
    ``train_forward``; the other methods have defaults that fit a plain SAE or transcoder.
    """

    name: ClassVar[str]
    """mechscope's name, ``SAEConfig.architecture`` and ``--arch``."""
    saelens_name: ClassVar[str]
    """``cfg.json`` ``architecture`` of an SAE (as SAELens registers it)."""
    saelens_transcoder_name: ClassVar[str]
    """``cfg.json`` ``architecture`` of a transcoder."""
    owns_saelens_names: ClassVar[bool] = True
    """Loading a file saved under these names gives this architecture. False for one that
    borrows another's names (BatchTopK saves as JumpReLU) and is recognised on load by
    ``metadata.mechscope_architecture``."""
    uses_k: ClassVar[bool] = False
    """Needs ``SAEConfig.k`` (active latents per token)."""
    threshold_saved: ClassVar[bool] = False
    """The ``threshold`` tensor is part of the SAE (saved, loaded, read by ``activate``)."""
    threshold_trained: ClassVar[bool] = False
    """``threshold`` gets gradients (otherwise it is frozen; an architecture may still set it)."""
    resamples_dead: ClassVar[bool] = False
    """The trainer periodically points dead latents at badly reconstructed inputs."""

    # ------------------------------------------------------------------ the module
    def extra_parameters(self, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        """Parameters beyond the five every module holds: name -> shape, created as trainable
        zeros after the others, saved and loaded with them."""
        return {}

    def tensor_shapes(self, cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        """The tensors of the saved file (``sae_weights.safetensors``), name -> shape, in order."""
        shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.out_dim), "b_enc": (cfg.d_sae,), "b_dec": (cfg.out_dim,)}
        if self.threshold_saved:
            shapes["threshold"] = (cfg.d_sae,)
        return {**shapes, **self.extra_parameters(cfg)}

    def input_offset(self, sae: SAE) -> Tensor | None:
        """What is subtracted from the input before encoding: ``b_dec [d_in]`` for an SAE that
        applies it, None for a transcoder."""
        c = sae.cfg
        return sae.b_dec if c.apply_b_dec_to_input and not c.is_transcoder else None

    def pre_acts(self, sae: SAE, x: Tensor) -> Tensor:
        """Pre-activations ``[..., d_sae]`` of inputs ``x [..., d_in]``: ``(x - b_dec) @ W_enc + b_enc``."""
        x = x.to(sae.W_enc.dtype)
        off = self.input_offset(sae)
        if off is not None:
            x = x - off
        return x @ sae.W_enc + sae.b_enc

    def activate(self, sae: SAE, pre: Tensor) -> Tensor:
        """Inference activation: feature activations ``[..., d_sae]`` of pre-activations ``[..., d_sae]``."""
        raise NotImplementedError

    def decode(self, sae: SAE, f: Tensor, x: Tensor | None = None) -> Tensor:
        """Output ``[..., d_out]`` of feature activations ``f [..., d_sae]``: ``f @ W_dec + b_dec``.
        ``x [..., d_in]`` is the input, for an architecture whose output also reads it directly."""
        return f @ sae.W_dec + sae.b_dec

    def decode_sparse(self, sae: SAE, values: Tensor, indices: Tensor, offsets: Tensor | None, x: Tensor | None = None) -> Tensor:
        """``decode`` of a sparse code (``TrainCode``'s layout) by gathering the decoder rows it
        names (``embedding_bag``), which skips the (1 - k/d_sae) of the dense product's work on
        zeros. ``[batch, d_out]``."""
        if offsets is None:
            out = F.embedding_bag(indices, sae.W_dec, None, mode="sum", per_sample_weights=values)
        else:
            out = F.embedding_bag(indices.reshape(-1), sae.W_dec, offsets, mode="sum", per_sample_weights=values.reshape(-1))
        return out + sae.b_dec

    @torch.no_grad()
    def fold_scales(self, sae: SAE, scale_in: float, scale_out: float) -> None:
        """Make an SAE trained on ``scale_in * x`` (predicting ``scale_out * y``) read raw ``x``
        and predict raw ``y``, in place: ``W_enc * scale_in``, ``W_dec / scale_out``, ``b_dec / scale_out``
        (an SAE has ``scale_out == scale_in``; the pre-activations, hence thresholds, are unchanged)."""
        sae.W_enc.mul_(scale_in)
        sae.W_dec.div_(scale_out)
        sae.b_dec.div_(scale_out)

    # ------------------------------------------------------------------ cfg.json
    def saelens_architecture(self, cfg: SAEConfig) -> str:
        """The ``cfg.json`` ``architecture`` value."""
        return self.saelens_transcoder_name if cfg.is_transcoder else self.saelens_name

    def saelens_keys(self, cfg: SAEConfig) -> dict[str, Any]:
        """Top-level ``cfg.json`` keys this architecture adds (after the common ones)."""
        return {}

    def saelens_metadata(self, cfg: SAEConfig) -> dict[str, Any]:
        """``cfg.json`` ``metadata`` keys this architecture adds (before the free-form metadata)."""
        return {}

    # ------------------------------------------------------------------ training
    def init_training(self, sae: SAE, cfg: TrainConfig) -> None:
        """Set architecture-specific parameters before the first step (under ``torch.no_grad()``,
        after the decoder bias is initialised)."""

    def train_forward(self, sae: SAE, x: Tensor, st: StepState) -> TrainCode:
        """Encode a training batch ``x [batch, d_in]`` (already scaled), decode it and give the
        sparsity loss, differentiably; training-only statistics may be updated here."""
        raise NotImplementedError

    def aux_loss(self, sae: SAE, code: TrainCode, err: Tensor, st: StepState) -> Tensor:
        """An auxiliary loss on the reconstruction error ``err [batch, d_out]`` (scalar; zero by
        default). Reported as ``aux`` and added to the loss after the sparsity term."""
        return torch.zeros((), device=err.device)

    def after_step(self, sae: SAE, cfg: TrainConfig) -> None:
        """Project parameters back onto their constraints after the optimiser step (the decoder
        rows' unit norm is the trainer's)."""
