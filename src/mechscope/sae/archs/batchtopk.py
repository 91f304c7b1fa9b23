"""BatchTopK SAE (Bussmann et al. 2024), saved as SAELens ``jumprelu`` (``jumprelu_transcoder``).

While training, the code keeps the ``k * batch`` largest ReLU'd pre-activations over the whole
batch, so tokens share a budget of k per token on average; AuxK on dead latents as for TopK.
At inference it is a JumpReLU whose ``threshold`` (one value for all latents) is the running
mean of the smallest activation kept per batch, which is how SAELens stores a BatchTopK SAE
too (``relu(pre) * H(pre - threshold)``, as SAELens's JumpReLU); ``metadata.mechscope_architecture``
and ``metadata.k`` tell mechscope it was BatchTopK.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from mechscope.sae.archs.base import Architecture, StepState, TrainCode, auxk_loss, n_aux_latents

if TYPE_CHECKING:
    from mechscope.sae.model import SAE, SAEConfig


class BatchTopK(Architecture):
    name = "batchtopk"
    saelens_name = "jumprelu"
    saelens_transcoder_name = "jumprelu_transcoder"
    owns_saelens_names = False
    uses_k = True
    threshold_saved = True

    def activate(self, sae: SAE, pre: Tensor) -> Tensor:
        return pre.relu() * (pre > sae.threshold)

    def saelens_metadata(self, cfg: SAEConfig) -> dict[str, Any]:
        return {"k": cfg.k}

    def train_forward(self, sae: SAE, x: Tensor, st: StepState) -> TrainCode:
        pre = self.pre_acts(sae, x)
        flat = pre.relu().flatten()
        vals, idx = flat.topk(st.cfg.k * x.shape[0], sorted=True)
        rows, cols = idx // pre.shape[1], idx % pre.shape[1]
        order = rows.argsort(stable=True)  # group the kept entries by token for embedding_bag
        counts = torch.bincount(rows, minlength=x.shape[0])
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
        values, indices = vals[order], cols[order]
        with torch.no_grad():  # inference threshold: running mean of the smallest kept value
            pos = vals[vals > 0]
            if pos.numel():
                m = pos.min()
                if st.step == 0:
                    sae.threshold.fill_(float(m))
                else:
                    sae.threshold.mul_(0.99).add_(0.01 * m)
        y_hat = self.decode_sparse(sae, values, indices, offsets, x)
        return TrainCode(y_hat=y_hat, sparsity=torch.zeros((), device=x.device), values=values, indices=indices,
                         offsets=offsets, extra={"pre": pre})

    def aux_loss(self, sae: SAE, code: TrainCode, err: Tensor, st: StepState) -> Tensor:
        if not st.dead.any():
            return super().aux_loss(sae, code, err, st)
        n_aux = n_aux_latents(st.cfg.aux_k, sae.cfg.d_in, st.dead)
        avals, aidx = code.extra["pre"].masked_fill(~st.dead, float("-inf")).topk(n_aux, dim=-1, sorted=False)
        return auxk_loss(sae.W_dec, avals, aidx, err, st.cfg.aux_coef)
