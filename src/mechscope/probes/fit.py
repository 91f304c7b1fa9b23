"""Multinomial logistic regression, fitted full-batch with L-BFGS on standardised inputs.

Why this probe: Hewitt and Liang's point is that a probe's capacity decides how much it can
memorise; a linear probe with an L2 penalty is the field's default and the one whose
selectivity is easiest to read. Full-batch L-BFGS on a few thousand rows of width d_model
converges in well under a second on a CPU, so all layers and the control task are cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LogisticProbe:
    """``predict(x [n, d]) -> [n]`` class indices; ``weight`` [n_classes, d] acts on standardised inputs."""

    weight: Tensor
    bias: Tensor
    mean: Tensor
    std: Tensor

    def logits(self, x: Tensor) -> Tensor:
        return ((x.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, x: Tensor) -> Tensor:
        return self.logits(x).argmax(-1)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return float((self.predict(x) == y).float().mean()) if len(y) else float("nan")


def fit_logistic(x: Tensor, y: Tensor, n_classes: int, l2: float = 1e-3, max_iter: int = 200) -> LogisticProbe:
    """Fit ``softmax(W z + b)`` to labels ``y`` [n] from rows ``x`` [n, d], z = standardised x;
    loss = mean cross-entropy + ``l2`` * ||W||^2."""
    x = x.float()
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / std
    W = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ W.T + b, y) + l2 * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LogisticProbe(W.detach(), b.detach(), mean, std)
