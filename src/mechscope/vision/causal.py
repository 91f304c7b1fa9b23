"""Causal tests of a vision circuit by ablation.

Ablating a unit replaces its output (every element: each spatial position of a channel, each
position and dimension of a head) by its mean over the reference images (``mean``; the
reference set: held-out test images of every class) or by 0 (``zero``). Tests, on the
concept's held-out images, for its target class:

- prune: ablate the circuit's units vs k random units per layer (``random_draws`` draws):
  the drop in class accuracy (share predicted as the target) and in the mean class logit;
  ``acc_ratio`` = circuit's accuracy drop / random circuits' mean accuracy drop.
- keep: ablate every unit outside the circuit (at every site); ``logit_share`` = (kept -
  all ablated) / (full - all ablated) of the mean class logit, so all units keep 1 and none 0;
  ``logit_share_per_layer``: the same with one site's units ablated at a time.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from mechscope.errors import MechscopeError
from mechscope.vision.models import VisionModel

Units = dict[str, list[int]]


@torch.no_grad()
def site_means(vm: VisionModel, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every site's output averaged over ``reference`` images: site -> (1, ...)."""
    from mechscope.vision.circuit import capture

    with capture(vm) as acts:
        vm.net(reference)
    return {n: a.mean(0, keepdim=True) for n, a in acts.items()}


@contextlib.contextmanager
def ablated(vm: VisionModel, units: Units, means: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """While the block runs, the listed units of each site output their mean (``means``) or 0 (None)."""
    handles = []
    for name, us in units.items():
        if not us:
            continue
        site = vm.sites[name]
        idx = torch.tensor(sorted(set(us)))

        def hook(_m, _i, out, site=site, idx=idx, name=name):
            new = out.clone()
            fill = torch.zeros_like(out) if means is None else means[name].expand_as(out)
            new.index_copy_(site.unit_dim, idx, fill.index_select(site.unit_dim, idx))
            return new

        handles.append(site.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def logits_with(vm: VisionModel, images: torch.Tensor, units: Units, means: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Logits (n, n_classes) of ``images`` with ``units`` ablated."""
    with ablated(vm, units, means):
        return vm.net(images)


def complement(vm: VisionModel, units: Units) -> Units:
    """Every unit of every site that ``units`` does not list."""
    return {n: [u for u in range(s.n_units) if u not in set(units.get(n, []))] for n, s in vm.sites.items()}


def all_units(vm: VisionModel) -> Units:
    return {n: list(range(s.n_units)) for n, s in vm.sites.items()}


def random_units(vm: VisionModel, k: int, gen: torch.Generator) -> Units:
    return {n: torch.randperm(s.n_units, generator=gen)[:k].tolist() for n, s in vm.sites.items()}


def _stats(logits: torch.Tensor, target: int) -> dict[str, float]:
    return {"accuracy": float((logits.argmax(-1) == target).float().mean()), "logit": float(logits[:, target].mean())}


def keep_share(full: float, kept: float, none: float) -> float:
    """(kept - none) / (full - none): 1 when the kept units do what the full model does, 0 when they do nothing."""
    return (kept - none) / (full - none) if full != none else float("nan")


def test_circuit(vm: VisionModel, units: Units, images: torch.Tensor, target: int, reference: torch.Tensor,
                 ablation: str = "mean", random_draws: int = 10, seed: int = 0) -> dict[str, Any]:
    """The prune and keep tests (module docstring) of ``units`` on ``images`` for class ``target``."""
    from mechscope.vision.circuit import check_inputs, check_units

    images = check_inputs(vm, images, target)
    reference = check_inputs(vm, reference, target, "reference images")
    check_units(vm, units)
    if ablation not in ("mean", "zero"):
        raise MechscopeError(f"ablation must be 'mean' or 'zero', got {ablation!r}.")
    means = site_means(vm, reference) if ablation == "mean" else None
    k = max(len(us) for us in units.values())
    gen = torch.Generator().manual_seed(seed)
    full = _stats(logits_with(vm, images, {}, means), target)
    pruned = _stats(logits_with(vm, images, units, means), target)
    none = _stats(logits_with(vm, images, all_units(vm), means), target)
    kept = _stats(logits_with(vm, images, complement(vm, units), means), target)
    rand_pruned, rand_kept = [], []
    for _ in range(random_draws):
        r = random_units(vm, k, gen)
        rand_pruned.append(_stats(logits_with(vm, images, r, means), target))
        rand_kept.append(_stats(logits_with(vm, images, complement(vm, r), means), target))

    def mean_of(rows: list[dict[str, float]], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    drop_c = full["accuracy"] - pruned["accuracy"]
    drop_r = full["accuracy"] - mean_of(rand_pruned, "accuracy")
    ldrop_c, ldrop_r = full["logit"] - pruned["logit"], full["logit"] - mean_of(rand_pruned, "logit")
    return {
        "ablation": ablation, "n_images": len(images), "target": target, "k": k, "random_draws": random_draws,
        "full": full, "circuit_pruned": pruned, "all_ablated": none, "circuit_kept": kept,
        "random_pruned": {"accuracy": mean_of(rand_pruned, "accuracy"), "logit": mean_of(rand_pruned, "logit")},
        "random_kept": {"accuracy": mean_of(rand_kept, "accuracy"), "logit": mean_of(rand_kept, "logit")},
        "accuracy_drop": {"circuit": drop_c, "random": drop_r, "ratio": drop_c / drop_r if drop_r > 0 else None},
        "logit_drop": {"circuit": ldrop_c, "random": ldrop_r, "ratio": ldrop_c / ldrop_r if ldrop_r > 0 else None},
        "logit_share": {"circuit": keep_share(full["logit"], kept["logit"], none["logit"]),
                        "random": keep_share(full["logit"], mean_of(rand_kept, "logit"), none["logit"])},
        "logit_share_per_layer": {name: _layer_share(vm, images, target, units, name, means) for name in vm.sites},
    }


def _layer_share(vm: VisionModel, images: torch.Tensor, target: int, units: Units, name: str,
                 means: dict[str, torch.Tensor] | None) -> float:
    """The keep test at one site: only that site's non-circuit units ablated."""
    full = float(logits_with(vm, images, {}, means)[:, target].mean())
    none = float(logits_with(vm, images, {name: list(range(vm.sites[name].n_units))}, means)[:, target].mean())
    kept = float(logits_with(vm, images, {name: complement(vm, units)[name]}, means)[:, target].mean())
    return keep_share(full, kept, none)
