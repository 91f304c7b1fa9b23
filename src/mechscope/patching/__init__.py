"""Interventions: caching sender outputs and patching edges or nodes, batched over masks;
interchange interventions at (site, position) from a counterfactual input."""

from mechscope.patching.engine import (
    Ablation,
    logits_at,
    receiver_hooks,
    run_suffix_with_edge_mask,
    run_with_edge_mask,
    run_with_node_mask,
    sender_activations,
    sender_hooks,
    source_activations,
)
from mechscope.patching.interchange import InterchangeResult, Site, interchange_accuracy, patched_logits
from mechscope.patching.suffix import SuffixRunner

__all__ = [
    "InterchangeResult",
    "Site",
    "SuffixRunner",
    "interchange_accuracy",
    "patched_logits",
    "Ablation",
    "logits_at",
    "receiver_hooks",
    "run_with_edge_mask",
    "run_suffix_with_edge_mask",
    "run_with_node_mask",
    "sender_activations",
    "sender_hooks",
    "source_activations",
]
