"""``PairScores``: the scoring pairs' attribution scores, kept so that a cross-validation fold
can be left out, and pooled over pairs one of two ways.

* ``sum`` (attribution's own pooling): an edge's score is the mean over pairs of its per-pair
  score. ``parts`` [F, S, R] holds each fold's share (``edge_score_folds`` with the folds); the
  scores without fold f are the total minus fold f.
* ``median``: an edge's score is the median over pairs of its per-pair score, so a few pairs
  with an extreme gap or an attribution of the wrong sign cannot move the ranking. ``parts``
  [n, S, R] holds each pair's score divided by n (``edge_score_folds`` with one fold per pair:
  the same forward and backward passes, n times the memory of one score tensor); the median is
  multiplied back by n, so both poolings are on the scale of a mean over pairs. The median of
  an even number of pairs is the mean of the two middle ones.

Measured with ``bench/ranking_weights.py`` (IOI, embedded model, ``--n 100 --held-out 0.5``, five draws; the
held-out faithfulness of the top-k circuit at 1/2/3/5% of edges, mean over the draws): sum
0.66 / 0.86 / 0.91 / 0.89, median (lower middle) 0.65 / 0.87 / 0.96 / 1.01; docs/decisions.md, "Selection".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mechscope.circuits.config import POOLS, Pool


@dataclass
class PairScores:
    """Edge scores of the scoring pairs by fold (``pool="sum"``) or by pair (``"median"``).

    ``parts``: float [F, S, R] (sum) or [n, S, R] (median); ``folds``: the CV fold sizes over the
    pairs in order (sum: ``len(folds) == F``; median: ``sum(folds) == n``).
    """

    parts: torch.Tensor
    folds: list[int]
    pool: Pool = "sum"

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"unknown pooling {self.pool!r}; choose {', '.join(POOLS)}")
        rows = len(self.folds) if self.pool == "sum" else sum(self.folds)
        if self.parts.shape[0] != rows:
            raise ValueError(f"{self.parts.shape[0]} score rows for folds {self.folds} pooled by {self.pool}")

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    def total(self) -> torch.Tensor:
        """Pooled scores [S, R] over all pairs."""
        return self._pool(self.parts) if self.pool == "median" else self.parts.sum(0)

    def without(self, f: int) -> torch.Tensor:
        """Pooled scores [S, R] over the pairs outside fold f."""
        if self.pool == "sum":
            return self.parts.sum(0) - self.parts[f]
        a = sum(self.folds[:f])
        b = a + self.folds[f]
        return self._pool(torch.cat([self.parts[:a], self.parts[b:]]))

    def _pool(self, rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        lo = rows.kthvalue((n + 1) // 2, dim=0).values
        hi = lo if n % 2 else rows.kthvalue(n // 2 + 1, dim=0).values
        return (lo + hi) * (sum(self.folds) / 2)
