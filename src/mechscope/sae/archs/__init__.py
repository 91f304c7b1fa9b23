"""SAE architectures, one class per file, registered by name.

    relu        ReLU + L1 (SAELens ``standard`` / ``transcoder``)
    topk        k largest pre-activations per token + AuxK (``topk``)
    batchtopk   k * batch largest over the batch + AuxK; JumpReLU at inference (saved as ``jumprelu``)
    jumprelu    pre * H(pre - threshold) + L0 through a straight-through estimator (``jumprelu``)

and, for transcoders, each of them with a linear skip from input to output (``skip_relu``,
``skip_topk``, ``skip_batchtopk``, ``skip_jumprelu``; ``archs/skip.py``, one file for the
shared skip).

A new architecture is one file here with an ``Architecture`` subclass (``archs/base.py`` says
what it defines), plus its class in ``_BUILTIN`` below. Training hyperparameters live in
``TrainConfig``; one the new architecture needs is a new field there.
"""

from __future__ import annotations

from mechscope.errors import MechscopeError
from mechscope.sae.archs.base import Architecture, StepState, TrainCode
from mechscope.sae.archs.batchtopk import BatchTopK
from mechscope.sae.archs.jumprelu import JumpReLU
from mechscope.sae.archs.relu import ReLU
from mechscope.sae.archs.skip import SKIP_VARIANTS, skip_variant, without_skip
from mechscope.sae.archs.topk import TopK

_BUILTIN: tuple[type[Architecture], ...] = (ReLU, TopK, BatchTopK, JumpReLU)

_REGISTRY: dict[str, type[Architecture]] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Add an architecture under ``cls.name`` (usable as a class decorator)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"an SAE architecture named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (*_BUILTIN, *SKIP_VARIANTS):
    register(_cls)

ARCHITECTURES: tuple[str, ...] = tuple(c.name for c in _BUILTIN)
"""The built-in architectures' names (``skip_variant`` names each one's skip-transcoder form)."""


def architecture_names() -> tuple[str, ...]:
    """Names of all registered architectures, in registration order."""
    return tuple(_REGISTRY)


def get_architecture(name: str) -> type[Architecture]:
    """The architecture class registered as ``name``; a one-sentence error for an unknown one."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise MechscopeError(
            f"unknown SAE architecture {name!r}; choose one of {', '.join(architecture_names())}."
        ) from None


def saelens_names() -> list[str]:
    """The SAELens ``architecture`` names mechscope reads, sorted."""
    return sorted({n for c in _REGISTRY.values() if c.owns_saelens_names for n in (c.saelens_name, c.saelens_transcoder_name) if n})


def from_saelens(name: str, mechscope_name: str | None = None) -> tuple[type[Architecture], bool] | None:
    """``(architecture class, is a transcoder)`` for a ``cfg.json`` ``architecture`` name, or None
    when mechscope does not read that name. ``mechscope_name`` (``metadata.mechscope_architecture``)
    picks among the architectures saved under the same name (batchtopk among ``jumprelu``)."""
    if name not in saelens_names():
        return None
    hits = [(c, tc) for c in _REGISTRY.values() for tc, n in ((False, c.saelens_name), (True, c.saelens_transcoder_name)) if n == name]
    for c, tc in hits:
        if c.name == mechscope_name:
            return c, tc
    return next((c, tc) for c, tc in hits if c.owns_saelens_names)


__all__ = [
    "ARCHITECTURES", "Architecture", "BatchTopK", "JumpReLU", "ReLU", "StepState", "TopK", "TrainCode",
    "architecture_names", "from_saelens", "get_architecture", "register", "saelens_names", "skip_variant", "without_skip",
]
