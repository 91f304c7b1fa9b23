"""The in-context meta-learning sequences (Minegishi et al. 2025; built on the bursty
classification data of Chan et al. 2022 and Reddy 2023): a fixed set of classes, each a mean
vector with a base label; a sequence shares one hidden task t, and its labels are
``(base label + t) mod N``. The query's class comes from all classes, so the model has to
recall the base label from its weights and infer t from the context.

Token layout of a sequence of n pairs: example i at position 2i, its label at 2i + 1, the
query at 2n (``example_positions``, ``label_positions``, ``query_position``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mechscope.icl.meta_config import MetaDataConfig


@dataclass
class MetaBatch:
    """One batch: ``x`` [batch, n_context + 1, dim] (the context examples, then the query),
    ``labels`` [batch, n_context] (the context labels), ``target`` [batch] (the query's label),
    ``task`` [batch], ``classes`` [batch, n_context + 1]."""

    x: torch.Tensor
    labels: torch.Tensor
    target: torch.Tensor
    task: torch.Tensor
    classes: torch.Tensor


def example_positions(n_context: int) -> list[int]:
    return [2 * i for i in range(n_context)]


def label_positions(n_context: int) -> list[int]:
    return [2 * i + 1 for i in range(n_context)]


def query_position(n_context: int) -> int:
    return 2 * n_context


class MetaData:
    """The world (class means [n_classes, dim], base labels [n_classes]) from ``cfg.seed``;
    ``batch(n, gen)`` draws sequences from the generator ``gen``."""

    def __init__(self, cfg: MetaDataConfig):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed)
        self.means = torch.randn(cfg.n_classes, cfg.dim, generator=g) / math.sqrt(cfg.dim)  # [class, dim]
        self.base = torch.randint(cfg.n_labels, (cfg.n_classes,), generator=g)  # [class]

    def label_of(self, classes: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """``(base[classes] + task) mod N``; ``task`` broadcasts over the last axis of ``classes``."""
        t = task.view(-1, *([1] * (classes.dim() - 1))) if classes.dim() > 1 else task
        return (self.base[classes] + t) % self.cfg.n_labels

    def _noisy(self, classes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        c = self.cfg
        noise = torch.randn(*classes.shape, c.dim, generator=gen) / math.sqrt(c.dim)
        return (self.means[classes] + c.eps * noise) / math.sqrt(1 + c.eps**2)

    def batch(self, n: int, gen: torch.Generator, random_labels: bool = False) -> MetaBatch:
        """``n`` sequences. ``random_labels``: the context labels are uniform over the N labels
        (no information on the task, nor on the classes); the query's label still follows the rule."""
        c = self.cfg
        k = c.n_context // c.ways
        picked = torch.rand(n, c.n_classes, generator=gen).argsort(dim=1)[:, :k]  # [n, k] distinct classes
        ctx = picked.repeat_interleave(c.ways, dim=1)  # [n, n_context]
        order = torch.rand(n, c.n_context, generator=gen).argsort(dim=1)
        ctx = ctx.gather(1, order)
        query = torch.randint(c.n_classes, (n, 1), generator=gen)  # [n, 1]
        task = torch.randint(c.tasks, (n,), generator=gen)  # [n]
        classes = torch.cat([ctx, query], dim=1)  # [n, n_context + 1]
        x = self._noisy(classes, gen)
        labels = self.label_of(ctx, task)
        if random_labels:
            labels = torch.randint(c.n_labels, labels.shape, generator=gen)
        return MetaBatch(x, labels, self.label_of(query, task)[:, 0], task, classes)
