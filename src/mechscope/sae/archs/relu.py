"""ReLU SAE (SAELens ``standard``; ``transcoder`` as a transcoder).

``f = ReLU(pre)``. Trained with an L1 penalty on ``|f|`` weighted by the decoder rows' norms,
its coefficient warmed up linearly, and with dead latents resampled towards badly
reconstructed inputs (Anthropic 2023; the trainer does the resampling).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechscope.sae.archs.base import Architecture, StepState, TrainCode

if TYPE_CHECKING:
    from mechscope.sae.model import SAE


class ReLU(Architecture):
    name = "relu"
    saelens_name = "standard"
    saelens_transcoder_name = "transcoder"
    resamples_dead = True

    def activate(self, sae: SAE, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def train_forward(self, sae: SAE, x: Tensor, st: StepState) -> TrainCode:
        f = torch.relu(self.pre_acts(sae, x))
        sparsity = (st.cfg.l1 * st.warm) * (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
        return TrainCode(y_hat=self.decode(sae, f, x), sparsity=sparsity, dense=f)
