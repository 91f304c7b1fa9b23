"""Dissecting factual recall: causal tracing (ROME), attention knockout, attribute extraction
and subject enrichment (Geva et al. 2023).

    from mechscope.recall import RecallConfig, recall, recall_dataset
    res = recall(model, "The Eiffel Tower is in the city of", subject="Eiffel Tower", target=" Paris")
    res.trace.restored["mlp"]        # [n_layers, pos] p(target) with MLP outputs restored
    agg = recall_dataset(model, n=30).aggregate["headline"]
    res.save("recall-out")           # recall.json (+ recall.safetensors)

``RecallConfig`` (``recall.config``, no torch) is imported with the package; the other names
load on first use.
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports
from mechscope.recall.config import RecallConfig, dataset_config

__all__ = [
    "Enrichment", "Extraction", "Knockout", "RecallConfig", "RecallDatasetResult", "RecallResult", "Trace",
    "attention_knockout", "attribute_extraction", "causal_trace", "dataset_config", "known_facts", "recall",
    "recall_dataset", "subject_enrichment",
]

if TYPE_CHECKING:  # static checkers and IDEs see the lazy exports (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.recall.dataset import known_facts, recall_dataset
    from mechscope.recall.enrichment import Enrichment, subject_enrichment
    from mechscope.recall.extraction import Extraction, attribute_extraction
    from mechscope.recall.knockout import Knockout, attention_knockout
    from mechscope.recall.result import RecallDatasetResult, RecallResult
    from mechscope.recall.run import recall
    from mechscope.recall.tracing import Trace, causal_trace

lazy_exports(__name__, {
    "known_facts": "dataset", "recall_dataset": "dataset",
    "Enrichment": "enrichment", "subject_enrichment": "enrichment",
    "Extraction": "extraction", "attribute_extraction": "extraction",
    "Knockout": "knockout", "attention_knockout": "knockout",
    "RecallDatasetResult": "result", "RecallResult": "result",
    "recall": "run",
    "Trace": "tracing", "causal_trace": "tracing",
})
