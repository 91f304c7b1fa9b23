"""Visual circuits (Rajaram et al. 2024) in small vision models trained here, offline.

    from mechscope.vision import DataConfig, TrainConfig, CircuitConfig, train_model, load_vision_model, run_circuit
    vm = train_model(TrainConfig(arch="cnn", data=DataConfig(overlay=(3, 7), mark_class=0)), out="cnn")
    circ = run_circuit(vm, "3", CircuitConfig(k=5))   # k units per layer, from the output down
    circ.units, circ.tests["accuracy_drop"], circ.tests["logit_share"]
    run_composition(vm, CircuitConfig(k=5))            # overlay class vs the union of its parts
    run_attack(vm, CircuitConfig(k=5))                 # typographic analogue: prune the mark's circuit
    vision_eap(vit, clean="3", corrupt="8")            # EAP-IG over a ViT's heads and MLPs (the language graph)

Data: scikit-learn's bundled digits and procedural shapes (``vision.data``); models: a small
CNN and ViT (``vision.models``), safetensors + JSON. The configs (``vision.config``, no torch)
are imported with the package; the other names load on first use.
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports
from mechscope.vision.config import CircuitConfig, DataConfig, TrainConfig

__all__ = [
    "CircuitConfig", "Concept", "DataConfig", "TrainConfig", "VisionCircuit", "VisionModel", "build_dataset",
    "edge_attributions", "find_circuit", "load_vision_model", "resolve_concept", "run_attack", "run_circuit",
    "run_composition", "test_circuit", "train_model", "vision_eap",
]

if TYPE_CHECKING:  # static checkers and IDEs see the lazy exports (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.vision.causal import test_circuit
    from mechscope.vision.circuit import VisionCircuit, edge_attributions, find_circuit
    from mechscope.vision.concept import Concept, resolve_concept
    from mechscope.vision.data import build_dataset
    from mechscope.vision.eap import vision_eap
    from mechscope.vision.models import VisionModel, load_vision_model
    from mechscope.vision.run import run_attack, run_circuit, run_composition
    from mechscope.vision.train import train_model

lazy_exports(__name__, {
    "Concept": "concept", "resolve_concept": "concept",
    "VisionCircuit": "circuit", "edge_attributions": "circuit", "find_circuit": "circuit",
    "VisionModel": "models", "load_vision_model": "models",
    "build_dataset": "data", "vision_eap": "eap",
    "test_circuit": "causal",
    "run_attack": "run", "run_circuit": "run", "run_composition": "run",
    "train_model": "train",
})
