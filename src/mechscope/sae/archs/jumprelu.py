"""JumpReLU SAE (SAELens ``jumprelu``; ``jumprelu_transcoder`` as a transcoder).

``f = relu(pre) * H(pre - threshold)`` with a trained per-latent ``threshold [d_sae]``, as
SAELens computes it (``activate``): a threshold below 0 (a loaded SAELens SAE) lets no negative
activation through; mechscope's own thresholds are at least 1e-4, where ``relu`` changes
nothing, so training uses ``pre * H(pre - threshold)`` (``_JumpSTE``). Trained with
an L0 penalty (warmed up linearly); the step function's gradient to the threshold goes through
a straight-through estimator with a rectangle kernel of width ``jumprelu_bandwidth``
(Rajamanoharan et al. 2024). Thresholds start at ``jumprelu_init_threshold`` and are kept at
or above 1e-4.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechscope.sae.archs.base import Architecture, StepState, TrainCode

if TYPE_CHECKING:
    from mechscope.sae.model import SAE
    from mechscope.sae.train import TrainConfig


class _StepSTE(torch.autograd.Function):
    """Heaviside H(pre - theta) [batch, d_sae]; no gradient to pre, gradient to theta [d_sae]
    through a rectangle kernel of width eps."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: ANN001
        pre, theta = ctx.saved_tensors
        k = ((pre - theta).abs() < ctx.eps / 2).to(pre.dtype) / ctx.eps
        return None, -(k * g).sum(0), None


class _JumpSTE(torch.autograd.Function):
    """pre * H(pre - theta) [batch, d_sae]: the exact gradient to pre where active; to theta
    [d_sae] through the rectangle kernel."""

    @staticmethod
    def forward(ctx, pre: Tensor, theta: Tensor, eps: float) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: ANN001
        pre, theta = ctx.saved_tensors
        active = (pre > theta).to(pre.dtype)
        k = ((pre - theta).abs() < ctx.eps / 2).to(pre.dtype) / ctx.eps
        return g * active, (-theta * k * g).sum(0), None


class JumpReLU(Architecture):
    name = "jumprelu"
    saelens_name = "jumprelu"
    saelens_transcoder_name = "jumprelu_transcoder"
    threshold_saved = True
    threshold_trained = True

    def activate(self, sae: SAE, pre: Tensor) -> Tensor:
        return pre.relu() * (pre > sae.threshold)

    def init_training(self, sae: SAE, cfg: TrainConfig) -> None:
        sae.threshold.fill_(cfg.jumprelu_init_threshold)

    def train_forward(self, sae: SAE, x: Tensor, st: StepState) -> TrainCode:
        pre = self.pre_acts(sae, x)
        theta, eps = sae.threshold, st.cfg.jumprelu_bandwidth
        f = _JumpSTE.apply(pre, theta, eps)
        l0 = _StepSTE.apply(pre, theta, eps).sum(-1).mean()
        sparsity = st.warm * st.cfg.l0 * l0
        return TrainCode(y_hat=self.decode(sae, f, x), sparsity=sparsity, dense=f)

    @torch.no_grad()
    def after_step(self, sae: SAE, cfg: TrainConfig) -> None:
        sae.threshold.clamp_(min=1e-4)
