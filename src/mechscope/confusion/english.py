"""Sparing the neurons English needs: a confusion edit kept within a budget on English text.

The neurons that push the English token at confusion points are mostly last-layer neurons that
English text needs too (README, "Language confusion": zeroing the top 100 cost +61% perplexity).
``spare_english`` walks down the confusion ranking and measures, for each neuron, what zeroing
it alone costs on English text: the increase of the mean next-token loss (nats per token) on
contexts of the embedded corpus's *training* split (the cost probe measures perplexity on the
held-out split, so neurons are never chosen on the text that judges them). A neuron is kept
only if that cost is at most ``log(1 + budget) / top_n``, its share of the allowed relative
perplexity increase, until ``top_n`` are kept or ``max_tries`` neurons have been measured.

The cost is measured by zeroing, not estimated from a gradient: a trained model sits near a
minimum of its training loss in every parameter, the scale of a neuron's output included, so
the first-order estimate (activation x gradient) is close to 0 for every neuron and says
nothing. Measured on the embedded model (docs/decisions.md, "Language confusion"): the
first-order costs of the plain top 100 summed to -0.06 nats, their zeroing cost +0.45.
On SmolLM2-135M a 2% budget leaves the edit no better than random neurons (README table): the
neurons that write the switch are the ones English needs. The facts cost is not in the budget.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from mechscope.confusion.cost import corpus_contexts
from mechscope.confusion.edit import Neuron, zeroed_neurons
from mechscope.errors import MechscopeError
from mechscope.heads.icl import per_token_loss

if TYPE_CHECKING:
    from mechscope.models import Model


def english_contexts(model: Model, n: int = 4, length: int = 128) -> torch.Tensor:
    """``n`` contexts [n, length] of the embedded corpus's training split (at most the model's context)."""
    out = corpus_contexts(model, "train", n, length)
    if not out:
        raise MechscopeError("The corpus gave no context to measure what neurons are worth to English; check the corpus.")
    return torch.tensor(out, dtype=torch.long)


def mean_loss(hf: Any, contexts: torch.Tensor, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy (nats) of a Hugging Face causal LM over ``contexts`` [n, pos]."""
    if contexts.dim() != 2 or contexts.shape[1] < 2 or len(contexts) == 0:
        raise MechscopeError(f"English contexts must be [n, pos] with n >= 1 and pos >= 2; got shape {tuple(contexts.shape)}.")
    return float(per_token_loss(hf, contexts, batch_size).mean())  # no_grad inside; every position has n contexts


def spare_english(hf: Any, ranking: list[Neuron], contexts: torch.Tensor, top_n: int, budget: float,
                  max_tries: int, bar: Any = None) -> tuple[list[Neuron], dict[Neuron, float]]:
    """The first ``top_n`` neurons of ``ranking`` (best first) whose zeroing alone raises the mean
    loss on ``contexts`` by at most ``log(1 + budget) / top_n`` nats, measuring at most
    ``max_tries`` of them; and every measured neuron's cost. ``hf``: the Hugging Face model to
    measure on (its weights are restored after each measurement); ``bar``: a progress phase
    advanced once per measured neuron."""
    if not 0 < budget < 10:  # NaN fails too
        raise MechscopeError(f"The English budget must be a relative perplexity increase above 0 and below 10, "
                             f"such as 0.02; got {budget}.")
    cap = math.log1p(budget) / top_n
    base = mean_loss(hf, contexts)
    kept: list[Neuron] = []
    costs: dict[Neuron, float] = {}
    for neuron in ranking[:max_tries]:
        with zeroed_neurons([hf], [neuron]):
            costs[neuron] = mean_loss(hf, contexts) - base
        if bar is not None:
            bar.advance()
        if costs[neuron] <= cap:
            kept.append(neuron)
            if len(kept) == top_n:
                break
    return kept, costs
