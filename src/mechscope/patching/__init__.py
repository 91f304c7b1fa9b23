"""Interventions: caching sender outputs and patching edges or nodes, batched over masks."""

from mechscope.patching.engine import (
    Ablation,
    receiver_hooks,
    run_with_edge_mask,
    run_with_node_mask,
    sender_activations,
    sender_hooks,
    source_activations,
)

__all__ = [
    "Ablation",
    "receiver_hooks",
    "run_with_edge_mask",
    "run_with_node_mask",
    "sender_activations",
    "sender_hooks",
    "source_activations",
]
