"""One call per command: ``run_circuit`` (find a concept's circuit and test it),
``run_composition`` (the overlay class's circuit against its parts') and ``run_attack`` (the
typographic analogue: prune the mark's circuit, measure the attack and clean accuracy).

    from mechscope.vision import load_vision_model, run_circuit, CircuitConfig
    circ = run_circuit(load_vision_model("cnn"), "3", CircuitConfig(k=5))
    circ.tests["accuracy_drop"]["ratio"], circ.tests["logit_share"]["circuit"]
"""

from __future__ import annotations

import os
from typing import Any

import torch

from mechscope.errors import MechscopeError, check_config
from mechscope.progress import ProgressArg, as_progress
from mechscope.vision.causal import logits_with, random_units, site_means
from mechscope.vision.circuit import VisionCircuit, check_k, find_circuit
from mechscope.vision.concept import Concept, resolve_concept
from mechscope.vision.config import CircuitConfig
from mechscope.vision.data import Dataset, build_dataset
from mechscope.vision.models import VisionModel, require_vision_model


def reference_images(ds: Dataset, n: int, seed: int) -> torch.Tensor:
    """``n`` clean held-out images of every class (seeded sample): the ablation means and the report's top images."""
    perm = torch.randperm(len(ds.test), generator=torch.Generator().manual_seed(seed))[:n]
    return ds.test.images[perm]


def circuit_of(vm: VisionModel, concept: Concept, cfg: CircuitConfig, ds: Dataset, test: bool = True,
               progress: ProgressArg = False) -> VisionCircuit:
    """``find_circuit`` on ``cfg.n_reference`` reference images, then (``test``) the prune and
    keep tests and, for a CNN, the edge test; ``progress`` sees one phase of these steps."""
    from mechscope.vision.causal import test_circuit

    edges = test and vm.cfg.arch == "cnn"
    with as_progress(progress).phase(f"circuit of {concept.name}", total=1 + test + edges, unit="step") as bar:
        ref = reference_images(ds, cfg.n_reference, cfg.seed)
        circ = find_circuit(vm, concept, cfg, reference=ref)
        bar.advance(done="attribution")
        if test:
            circ.tests = test_circuit(vm, circ.units, concept.eval_images, concept.target, ref, cfg.ablation,
                                      cfg.random_draws, cfg.seed)
            bar.advance(done="prune and keep tests")
        if edges:
            from mechscope.vision.edges import edge_test

            circ.tests["edges"] = edge_test(vm, circ.units, concept.eval_images, concept.target, ref, cfg.random_draws, cfg.seed)
            bar.advance(done="edge test")
    return circ


def run_circuit(vm: VisionModel, spec: str | int | os.PathLike[str], cfg: CircuitConfig | None = None, target: str | None = None,
                progress: ProgressArg = False) -> VisionCircuit:
    """The circuit of concept ``spec`` (``concept.resolve_concept``) with its causal tests
    (``cfg=None``: ``CircuitConfig()``'s defaults)."""
    require_vision_model(vm, "run_circuit")
    check_config(cfg, CircuitConfig, "run_circuit")
    cfg = cfg or CircuitConfig()
    check_k(vm, cfg.k)
    ds = build_dataset(vm.cfg.data)
    return circuit_of(vm, resolve_concept(vm, spec, target, ds), cfg, ds, progress=progress)


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def run_composition(vm: VisionModel, cfg: CircuitConfig | None = None, progress: ProgressArg = False) -> dict[str, Any]:
    """Circuits of every class; Jaccard of the overlay class's units with the union of its two
    parts' units, with every other class's, and with the union of every other pair's."""
    require_vision_model(vm, "run_composition")
    check_config(cfg, CircuitConfig, "run_composition")
    cfg = cfg or CircuitConfig()
    pair = vm.cfg.data.overlay
    if pair is None:
        raise MechscopeError("this model was trained without an overlay class; retrain with --overlay A,B.")
    check_k(vm, cfg.k)
    ds = build_dataset(vm.cfg.data)
    n_base = vm.cfg.data.n_base_classes
    sets = {}
    with as_progress(progress).phase("class circuits", total=n_base + 1, unit="class") as bar:
        for c in range(n_base + 1):
            circ = circuit_of(vm, resolve_concept(vm, str(c), None, ds), cfg, ds, test=False)
            sets[c] = circ.unit_set()
            bar.advance()
    ov = sets[n_base]
    union = jaccard(ov, sets[pair[0]] | sets[pair[1]])
    others = {vm.classes[c]: jaccard(ov, sets[c]) for c in range(n_base) if c not in pair}
    parts = {vm.classes[c]: jaccard(ov, sets[c]) for c in pair}
    pairs = {f"{vm.classes[a]}|{vm.classes[b]}": jaccard(ov, sets[a] | sets[b])
             for a in range(n_base) for b in range(a + 1, n_base) if (a, b) != tuple(sorted(pair))}
    best_pair = max(pairs, key=lambda p: pairs[p])
    return {"kind": "vision-composition", "overlay": vm.classes[n_base], "parts": [vm.classes[c] for c in pair], "k": cfg.k,
            "jaccard_union_of_parts": union, "jaccard_parts": parts, "jaccard_other_classes": others,
            "jaccard_other_pairs_max": {"pair": best_pair, "value": pairs[best_pair]},
            "union_beats_every_other_class": union > max(others.values()),
            "union_beats_every_other_pair": union > pairs[best_pair],
            "units": {vm.classes[c]: sorted(f"{s}:{u}" for s, u in v) for c, v in sets.items()}}


def run_attack(vm: VisionModel, cfg: CircuitConfig | None = None, progress: ProgressArg = False) -> tuple[VisionCircuit, dict[str, Any]]:
    """The typographic analogue: the mark's circuit from mark-only images, then the attack
    success (marked images of other classes predicted as the mark's class) and the clean test
    accuracy with no ablation, with the mark's circuit ablated, and with k random units per
    layer ablated (mean over ``random_draws``)."""
    require_vision_model(vm, "run_attack")
    check_config(cfg, CircuitConfig, "run_attack")
    cfg = cfg or CircuitConfig()
    if vm.cfg.data.mark_class is None:
        raise MechscopeError("this model was trained without a mark; retrain with --mark-class C to run the attack.")
    check_k(vm, cfg.k)
    ds = build_dataset(vm.cfg.data)
    concept = resolve_concept(vm, "mark", None, ds)
    p = as_progress(progress)
    circ = circuit_of(vm, concept, cfg, ds, test=False, progress=p)
    ref = reference_images(ds, cfg.n_reference, cfg.seed)
    means = site_means(vm, ref) if cfg.ablation == "mean" else None
    att, mc = ds.attack_images(), vm.cfg.data.mark_class

    def measure(units: dict[str, list[int]]) -> dict[str, float]:
        clean = logits_with(vm, ds.test.images, units, means).argmax(-1)
        hit = logits_with(vm, att.images, units, means).argmax(-1)
        return {"attack_success": float((hit == mc).float().mean()),
                "clean_accuracy": float((clean == ds.test.labels).float().mean())}

    gen = torch.Generator().manual_seed(cfg.seed)
    with p.phase("attack with random and circuit ablations", total=cfg.random_draws + 2, unit="ablation") as bar:
        rand = []
        for _ in range(cfg.random_draws):
            rand.append(measure(random_units(vm, cfg.k, gen)))
            bar.advance()
        before = measure({})
        bar.advance()
        after = measure(circ.units)
        bar.advance()
    res: dict[str, Any] = {"kind": "vision-attack", "mark_class": vm.classes[mc], "k": cfg.k, "ablation": cfg.ablation,
           "n_attack": len(att), "n_clean": len(ds.test), "before": before, "after": after,
           "random": {key: sum(r[key] for r in rand) / len(rand) for key in ("attack_success", "clean_accuracy")}}
    res["clean_accuracy_drop_points"] = 100 * (res["before"]["clean_accuracy"] - res["after"]["clean_accuracy"])
    circ.tests = {"attack": res}
    return circ, res
