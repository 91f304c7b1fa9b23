"""Interventions: caching sender outputs and patching edges or nodes, batched over masks."""

from mechscope.patching.engine import (
    Ablation,
    receiver_hooks,
    run_suffix_with_edge_mask,
    run_with_edge_mask,
    run_with_node_mask,
    sender_activations,
    sender_hooks,
    source_activations,
)
from mechscope.patching.suffix import SuffixRunner

__all__ = [
    "SuffixRunner",
    "Ablation",
    "receiver_hooks",
    "run_with_edge_mask",
    "run_suffix_with_edge_mask",
    "run_with_node_mask",
    "sender_activations",
    "sender_hooks",
    "source_activations",
]
