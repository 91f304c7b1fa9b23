"""Batch sources for the trainer beyond the activation store: in-memory tensors (tests,
notebooks) with a resumable position."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mechscope.errors import MechscopeError


class TensorSource:
    """Rows of ``x`` [n, d_in] (and ``y`` [n, d_out] for transcoders) in a seeded random order,
    epoch after epoch; ``state_dict`` records the position so a resumed run sees the same rows."""

    def __init__(self, x: Tensor, y: Tensor | None = None, seed: int = 0):
        if x.dim() != 2 or x.shape[0] == 0:
            raise MechscopeError(f"activations must be a non-empty [n, d] matrix, got shape {list(x.shape)}.")
        if y is not None and y.shape[0] != x.shape[0]:
            raise MechscopeError(f"input and output activations have {x.shape[0]} and {y.shape[0]} rows; they must align.")
        self.x, self.y, self.seed = x, y, seed
        self.epoch, self.offset = 0, 0
        self._perm = self._make_perm()

    def _make_perm(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.x.shape[0], generator=g)

    def next_batch(self, n: int) -> Tensor | tuple[Tensor, Tensor]:
        idx = []
        while n > 0:
            take = self._perm[self.offset : self.offset + n]
            idx.append(take)
            n -= take.numel()
            self.offset += take.numel()
            if self.offset >= self.x.shape[0]:
                self.epoch, self.offset = self.epoch + 1, 0
                self._perm = self._make_perm()
        i = torch.cat(idx)
        return (self.x[i], self.y[i]) if self.y is not None else self.x[i]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._perm = self._make_perm()


class StoreSource:
    """The trainer's view of an ``ActivationStore`` (streaming) or ``ShardStore`` (from disk):
    rows of ``hook_in`` (and aligned rows of ``hook_out`` for a transcoder).

    Resume: for shards, the position is restored exactly by replaying the same seeded order
    (reading only, no model); for a streaming store, the corpus is re-tokenised and the contexts
    already run are skipped without the model, and the rows then waiting in the shuffle buffer
    come back from the checkpoint with the shuffle generator (``state_tensors``), so the
    resumed run sees exactly the rows an uninterrupted one would."""

    def __init__(self, store: Any, hook_in: str, hook_out: str | None = None):
        self.store, self.hook_in, self.hook_out = store, hook_in, hook_out
        self.served = 0

    def next_batch(self, n: int) -> Tensor | tuple[Tensor, Tensor]:
        try:
            b = self.store.next_batch(n)
        except StopIteration:
            raise MechscopeError("the corpus ran out of text before training finished; use a larger corpus or fewer --tokens.") from None
        self.served += n
        return (b[self.hook_in], b[self.hook_out]) if self.hook_out else b[self.hook_in]

    @property
    def streaming(self) -> bool:
        return hasattr(self.store, "_contexts")

    def state_dict(self) -> dict[str, Any]:
        st: dict[str, Any] = {"served": self.served}
        if self.streaming:
            st["contexts"] = self.store.tokens_seen // self.store.cfg.context_len
        return st

    def state_tensors(self) -> dict[str, Tensor]:
        """The streaming store's waiting rows and generator (``ActivationStore.state_tensors``);
        nothing for shards, whose position ``state_dict`` fixes."""
        return self.store.state_tensors() if self.streaming else {}

    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        if self.streaming:
            self.store.load_state_tensors(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.streaming:
            n = int(state.get("contexts", 0))
            for _ in range(n):  # tokenisation only: the model does not run for skipped contexts
                if next(self.store._contexts, None) is None:
                    break
            self.store.tokens_seen = n * self.store.cfg.context_len
        else:
            left = int(state["served"])
            while left > 0:
                k = min(left, 65536)
                self.store.next_batch(k)
                left -= k
        self.served = int(state["served"])
