"""In-context-learning score (Olsson et al. 2022): the loss at a late token minus the loss at
an early token of the same contexts, averaged over contexts. Olsson et al. use the 500th and
the 50th token; a model that uses its context gets better later on, so the score is negative
(more negative = more in-context learning).

Token index i counts content tokens after the prefix (BOS): the loss "at token i" is the
cross-entropy of predicting content token i from everything before it. To cut noise the loss
is averaged over ``window`` consecutive token indices starting at each index. For contexts
shorter than 501 tokens the indices scale down: early = max(1, n // 10), late = n - window.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from mechscope.errors import MechscopeError
from mechscope.models import plain_attention


def default_indices(n_content: int, window: int = 1) -> tuple[int, int]:
    """(early, late) token indices for contexts of ``n_content`` tokens after the prefix."""
    if n_content >= 500 + window:
        return 50, 500
    return max(1, n_content // 10), max(2, n_content - window)


@torch.no_grad()
def per_token_loss(model: Any, tokens: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean over contexts of the CE at each position [pos - 1] (entry j predicts token j + 1)."""
    if len(tokens) == 0:
        raise MechscopeError("per_token_loss needs at least one context; got none.")
    net = getattr(model, "bridge", model)
    total: torch.Tensor | None = None
    with plain_attention(model) if hasattr(model, "bridge") else contextlib.nullcontext():
        for s in range(0, len(tokens), batch_size):
            t = tokens[s : s + batch_size].to(next(net.parameters()).device)
            out = net(t)
            logits = getattr(out, "logits", out)[:, :-1]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), t[:, 1:], reduction="none")  # [b, pos-1]
            part = ce.sum(0).float().cpu()
            total = part if total is None else total + part
    assert total is not None  # at least one batch ran
    return total / len(tokens)


def icl_score(model: Any, tokens: torch.Tensor, prefix_len: int, early: int | None = None,
              late: int | None = None, window: int = 5) -> dict[str, float]:
    """{'icl_score', 'early_loss', 'late_loss', 'early', 'late'} on ``tokens`` [n, prefix + content]."""
    return icl_from_loss(per_token_loss(model, tokens), prefix_len, early, late, window)


def icl_from_loss(loss: torch.Tensor, prefix_len: int, early: int | None = None, late: int | None = None,
                  window: int = 5) -> dict[str, float]:
    """The ICL score from mean per-position losses [pos - 1] (``per_token_loss``)."""
    n_content = loss.shape[0] + 1 - prefix_len
    window = max(1, min(window, n_content // 4))
    e0, l0 = default_indices(n_content, window)
    early = e0 if early is None else early
    late = l0 if late is None else late
    # content token i is predicted at position prefix_len + i - 1

    def at(i: int) -> float:
        j = prefix_len + i - 1
        return float(loss[max(j, 0) : j + window].mean())

    el, ll = at(early), at(late)
    return {"icl_score": ll - el, "early_loss": el, "late_loss": ll, "early": early, "late": late, "window": window}

