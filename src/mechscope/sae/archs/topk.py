"""TopK SAE (SAELens ``topk``; ``topk_transcoder`` as a transcoder, a name only mechscope reads).

``f`` keeps the k largest pre-activations of each token, then ReLU (SAELens's semantics).
Trained with the AuxK loss on dead latents (Gao et al. 2024) and never forms the dense code:
the encoder is one autograd function (``_TopKEncode``) whose backward touches only the
selected entries, and decoding gathers the k decoder rows.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechscope.sae.archs.base import Architecture, StepState, TrainCode, auxk_loss, n_aux_latents

if TYPE_CHECKING:
    from mechscope.sae.model import SAE, SAEConfig


def _sparse_weight_grad(idx: Tensor, g: Tensor, xc: Tensor, d_sae: int) -> Tensor:
    """sum over tokens b and slots j of g[b, j] * xc[b], added into row idx[b, j]: [d_sae, d_in]
    from idx, g [batch, k] and xc [batch, d_in]. A sparse-dense product, ~5x faster than the
    dense [d_in, batch] @ [batch, d_sae] it replaces (measured on the 2-core development CPU at
    batch 4096, d_in 576, d_sae 4608, k 32; docs/decisions.md)."""
    b, k = idx.shape
    rows = torch.arange(b, device=idx.device).repeat_interleave(k)
    with warnings.catch_warnings():  # torch 2.11 on CUDA warns that invariant checks are off: deliberate, topk's indices are in range
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        gt = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), rows]), g.reshape(-1), (d_sae, b), check_invariants=False)
        return torch.sparse.mm(gt, xc)


class _TopKEncode(torch.autograd.Function):
    """TopK encoding of ``x - b_dec`` (b_dec None for a transcoder) that also returns, for
    AuxK, the top ``k_aux`` pre-activations among dead latents. Inputs ``x [batch, d_in]``,
    ``b_dec [d_in]``, ``w_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``dead [d_sae]`` bool (or
    None); outputs ``vals, idx [batch, k]`` and ``avals, aidx [batch, k_aux]`` (pre-activations,
    not yet through ReLU). Its backward touches only the selected entries: W_enc's gradient is
    a sparse product instead of a dense GEMM over all d_sae columns, b_enc's an index_add,
    b_dec's ``-W_enc @ grad(b_enc)``."""

    @staticmethod
    def forward(ctx, x: Tensor, b_dec: Tensor | None, w_enc: Tensor, b_enc: Tensor, k: int, dead: Tensor | None, k_aux: int):  # noqa: ANN001
        xc = x - b_dec if b_dec is not None else x
        pre = torch.addmm(b_enc, xc, w_enc)
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        if dead is not None and k_aux > 0:
            avals, aidx = pre.masked_fill_(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        else:
            avals, aidx = xc.new_zeros((xc.shape[0], 0)), idx.new_zeros((xc.shape[0], 0))
        ctx.save_for_backward(xc, w_enc, idx, aidx)
        ctx.has_b_dec = b_dec is not None
        ctx.mark_non_differentiable(idx, aidx)
        return vals, idx, avals, aidx

    @staticmethod
    def backward(ctx, g_vals: Tensor, _gi, g_avals: Tensor, _ga):  # noqa: ANN001
        xc, w_enc, idx, aidx = ctx.saved_tensors
        d_sae = w_enc.shape[1]
        idx_all, g_all = idx, g_vals
        if aidx.shape[1] and g_avals is not None:
            idx_all, g_all = torch.cat([idx, aidx], 1), torch.cat([g_vals, g_avals], 1)
        g_all = torch.nan_to_num(g_all, nan=0.0, posinf=0.0, neginf=0.0)
        g_b = torch.zeros(d_sae, dtype=g_all.dtype, device=g_all.device).index_add_(0, idx_all.reshape(-1), g_all.reshape(-1))
        g_w = _sparse_weight_grad(idx_all, g_all, xc, d_sae).T if ctx.needs_input_grad[2] else None
        g_bdec = -(w_enc @ g_b) if ctx.has_b_dec and ctx.needs_input_grad[1] else None
        return None, g_bdec, g_w, g_b, None, None, None


class TopK(Architecture):
    name = "topk"
    saelens_name = "topk"
    saelens_transcoder_name = "topk_transcoder"
    uses_k = True

    def activate(self, sae: SAE, pre: Tensor) -> Tensor:
        k = sae.cfg.k
        assert k is not None  # SAEConfig requires k for architectures with uses_k
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def saelens_keys(self, cfg: SAEConfig) -> dict[str, Any]:
        return {"k": cfg.k, "rescale_acts_by_decoder_norm": False}

    def train_forward(self, sae: SAE, x: Tensor, st: StepState) -> TrainCode:
        n_aux = n_aux_latents(st.cfg.aux_k, sae.cfg.d_in, st.dead)
        vals, idx, avals, aidx = _TopKEncode.apply(
            x, self.input_offset(sae), sae.W_enc, sae.b_enc, st.cfg.k, st.dead if n_aux else None, n_aux
        )
        vals = vals.relu()
        y_hat = self.decode_sparse(sae, vals, idx, None, x)
        return TrainCode(y_hat=y_hat, sparsity=torch.zeros((), device=x.device), values=vals, indices=idx,
                         extra={"aux_code": (avals, aidx)} if n_aux else {})

    def aux_loss(self, sae: SAE, code: TrainCode, err: Tensor, st: StepState) -> Tensor:
        if "aux_code" not in code.extra:
            return super().aux_loss(sae, code, err, st)
        avals, aidx = code.extra["aux_code"]
        return auxk_loss(sae.W_dec, avals, aidx, err, st.cfg.aux_coef)
