"""How much memory a run would need against what this machine has, so that sizes no machine
here can train (``train-toy --seq-len 1000000``, ``--d-model 10**6``) are one sentence before
anything is allocated, not an allocator traceback or a killed process minutes later."""

from __future__ import annotations

import os

from mechscope.errors import MechscopeError


def physical_memory() -> int | None:
    """Bytes of physical memory (None where the system does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def gpt_training_bytes(*, vocab: int, positions: int, d_model: int, layers: int, heads: int, mlp: bool, batch: int,
                       seq: int) -> int:
    """A lower estimate of a float32 GPT-2-shaped model's training memory with Adam: weights,
    gradients and two moments (16 bytes a parameter), the activations kept for the backward
    pass (per layer and token about 17 d_model floats, with the MLP's 4x expansion, and the
    attention pattern's heads x seq floats twice) and the logits with their gradient."""
    params = (2 * vocab + positions) * d_model + layers * (12 if mlp else 4) * d_model * d_model
    per_layer_token = (17 if mlp else 9) * d_model + 2 * heads * seq
    activations = batch * seq * (layers * per_layer_token + 3 * vocab)
    return 16 * params + 4 * activations


def check_fits_memory(what: str, need: int, fix: str) -> None:
    """Refuse ``what`` when its estimated memory ``need`` (bytes) exceeds this machine's
    physical memory; ``fix`` names the options to lower."""
    have = physical_memory()
    if have is not None and need > have:
        raise MechscopeError(f"{what} would need about {need / 2**30:,.0f} GiB of memory and this machine has "
                             f"{have / 2**30:,.0f} GiB; {fix}.")
