"""Feature circuits: transcoder sets, the frozen replacement model and attribution graphs.

    from mechscope.features import TranscoderTrainConfig, evaluate_transcoders_on_corpus, train_transcoders
    tset = train_transcoders(model, TranscoderTrainConfig(tokens=300_000), "runs/tc")   # every layer, one harvest
    report = evaluate_transcoders_on_corpus(model, tset)     # per-layer FVU, L0, CE recovered; all layers spliced
    tset = load_transcoders("runs/tc")                        # mechscope or circuit-tracer layout
    qk_attribution(model, tset, tokens, layer=5, head=3, query_pos=9, key_pos=4).top_pairs()   # why a head reads there

The config (``features.config``, no torch) is imported with the package; the other names load
on first use.
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports
from mechscope.features.config import TranscoderTrainConfig

__all__ = [
    "AttributionGraph", "TranscoderSet", "TranscoderTrainConfig", "attribute", "evaluate_transcoders",
    "evaluate_transcoders_on_corpus", "intervene", "load_graph", "load_transcoder_layers", "load_transcoders", "prune",
    "QKAttribution", "qk_attribution", "random_transcoders", "save_transcoders", "scores", "train_transcoders",
    "virtual_weights",
]

if TYPE_CHECKING:  # static checkers and IDEs see the lazy exports (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.features.attribute import AttributionGraph, attribute
    from mechscope.features.evaluate import evaluate_transcoders, evaluate_transcoders_on_corpus
    from mechscope.features.graph_files import load_graph
    from mechscope.features.intervene import intervene
    from mechscope.features.prune import prune, scores
    from mechscope.features.qk import QKAttribution, qk_attribution
    from mechscope.features.train import train_transcoders
    from mechscope.features.transcoder_set import (
        TranscoderSet,
        load_transcoder_layers,
        load_transcoders,
        random_transcoders,
        save_transcoders,
    )
    from mechscope.features.weights import virtual_weights

lazy_exports(__name__, {
    "evaluate_transcoders": "evaluate", "evaluate_transcoders_on_corpus": "evaluate",
    "train_transcoders": "train",
    "TranscoderSet": "transcoder_set", "load_transcoder_layers": "transcoder_set", "load_transcoders": "transcoder_set",
    "random_transcoders": "transcoder_set", "save_transcoders": "transcoder_set",
    "AttributionGraph": "attribute", "attribute": "attribute", "prune": "prune", "scores": "prune",
    "intervene": "intervene", "load_graph": "graph_files", "virtual_weights": "weights",
    "QKAttribution": "qk", "qk_attribution": "qk",
})
