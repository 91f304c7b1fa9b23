"""Circuit discovery: EAP, EAP-IG, ACDC, selection, faithfulness evaluation, reference circuits."""

from mechscope.circuits.acdc import ACDCResult, acdc
from mechscope.circuits.attribution import edge_scores, node_scores
from mechscope.circuits.discover import DiscoverConfig, discover
from mechscope.circuits.evaluate import Evaluator, cpr_cmd, faithfulness_curve, roc_auc
from mechscope.circuits.reference import Reference, load_reference
from mechscope.circuits.result import CircuitResult
from mechscope.circuits.select import prune, threshold, top_k

__all__ = [
    "ACDCResult", "CircuitResult", "DiscoverConfig", "Evaluator", "Reference", "acdc", "cpr_cmd",
    "discover", "edge_scores", "faithfulness_curve", "load_reference", "node_scores", "prune",
    "roc_auc", "threshold", "top_k",
]
