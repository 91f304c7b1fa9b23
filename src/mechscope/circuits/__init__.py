"""Circuit discovery: EAP, EAP-IG, ACDC, selection, faithfulness evaluation, reference circuits.

From a notebook::

    from mechscope.circuits import DiscoverConfig, discover, compare_with_reference, evaluate_saved
    res = discover(model, DiscoverConfig(task="ioi", method="eap-ig"))
    res.save("ioi-run")                                   # circuit.json + scores
    compare_with_reference(res, "gpt2-ioi")               # node/edge ROC AUC, overlap, Jaccard
    evaluate_saved(model, CircuitResult.load("ioi-run"))  # held-out faithfulness and curve again

Only ``DiscoverConfig`` (``circuits.config``, no torch) is imported with the package; the other
names load on first use.
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports
from mechscope.circuits.config import DiscoverConfig

__all__ = [
    "ACDCResult", "CircuitResult", "DiscoverConfig", "Evaluator", "Reference", "acdc", "compare_with_reference",
    "cpr_cmd", "discover", "edge_scores", "evaluate_saved", "faithfulness_curve", "load_reference", "node_scores",
    "prune", "roc_auc", "threshold", "top_k",
]

if TYPE_CHECKING:  # static checkers and IDEs see the lazy exports (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.circuits.acdc import ACDCResult, acdc
    from mechscope.circuits.attribution import edge_scores, node_scores
    from mechscope.circuits.discover import discover
    from mechscope.circuits.evaluate import Evaluator, cpr_cmd, evaluate_saved, faithfulness_curve, roc_auc
    from mechscope.circuits.reference import Reference, compare_with_reference, load_reference
    from mechscope.circuits.result import CircuitResult
    from mechscope.circuits.select import prune, threshold, top_k

lazy_exports(__name__, {
    "ACDCResult": "acdc", "acdc": "acdc",
    "edge_scores": "attribution", "node_scores": "attribution",
    "discover": "discover",
    "Evaluator": "evaluate", "cpr_cmd": "evaluate", "evaluate_saved": "evaluate", "faithfulness_curve": "evaluate",
    "roc_auc": "evaluate",
    "Reference": "reference", "compare_with_reference": "reference", "load_reference": "reference",
    "CircuitResult": "result",
    "prune": "select", "threshold": "select", "top_k": "select",
})
