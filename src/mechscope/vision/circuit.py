"""Cross-layer attribution circuits (Rajaram et al. 2024) in a small CNN or ViT.

From the output down: the concept's logit is the one unit above the last site; at each site,
for every unit u and every unit v already chosen one layer up, the edge attribution is

    E[u, v] = mean over concept images of | sum over u's elements of a_u * d s_v / d a_u |

(``s_v``: v's scalar activation, ``Site.unit_value``); a unit's score is the sum of its edges
to the chosen units above, and the k best units are chosen. The edges between chosen units are
the circuit's edge view.

    from mechscope.vision import load_vision_model, find_circuit, resolve_concept
    vm = load_vision_model("cnn")
    concept = resolve_concept(vm, "3")
    circ = find_circuit(vm, concept, CircuitConfig(k=5))
    circ.units            # {"fc": [..], "conv2": [..], ...}
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from mechscope.brief import brief_repr
from mechscope.errors import MechscopeError
from mechscope.results import write_result_json
from mechscope.vision.concept import Concept
from mechscope.vision.config import CircuitConfig
from mechscope.vision.models import VisionModel

SCHEMA = 1
LOGIT = "logit"
"""The name of the layer above the last site: the concept's logit."""


@contextlib.contextmanager
def capture(vm: VisionModel) -> Iterator[dict[str, torch.Tensor]]:
    """Record every site's output (with its autograd graph) while the block runs."""
    acts: dict[str, torch.Tensor] = {}
    handles = [s.register_forward_hook(lambda _m, _i, out, n=n: acts.__setitem__(n, out)) for n, s in vm.sites.items()]
    try:
        yield acts
    finally:
        for h in handles:
            h.remove()


def check_k(vm: VisionModel, k: int) -> None:
    """``k`` fits every layer of the model, or one sentence naming the narrowest."""
    narrow = min(vm.sites.items(), key=lambda kv: kv[1].n_units)
    if k > narrow[1].n_units:
        raise MechscopeError(f"--k {k} is larger than layer {narrow[0]}, which has {narrow[1].n_units} units; "
                             f"use --k {narrow[1].n_units} or less.")


def check_inputs(vm: VisionModel, images: Any, target: Any, what: str = "images") -> torch.Tensor:
    """``images`` as float (n, 1, s, s) with pixels in [0, 1], and ``target`` a class index of the
    model, or one sentence saying what is wrong (shape, NaN, pixel scale, class)."""
    from mechscope.vision.data import check_images

    if not isinstance(images, torch.Tensor):
        raise MechscopeError(f"{what} must be a torch tensor (n, 1, s, s) of pixels in [0, 1], got a {type(images).__name__}.")
    check_images(images, vm.cfg.data.size, what)
    x = images if images.ndim == 4 else images[:, None]  # the caller's dtype kept (float64 in exactness tests)
    if not x.is_floating_point():
        raise MechscopeError(f"{what} must hold float pixels in [0, 1], got {x.dtype}; divide 8-bit images by 255.")
    if not bool(torch.isfinite(x).all()):
        raise MechscopeError(f"{what} hold NaN or infinite pixels; give finite values in [0, 1].")
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise MechscopeError(f"{what} hold pixels from {float(x.min()):g} to {float(x.max()):g}, but the model was trained on "
                             "[0, 1]; divide 8-bit images by 255.")
    n = len(vm.classes)
    if isinstance(target, bool) or not hasattr(target, "__index__") or not 0 <= int(target) < n:
        raise MechscopeError(f"target must be a class index from 0 to {n - 1} ({', '.join(vm.classes[:12])}"
                             f"{', ...' if n > 12 else ''}); got {target!r}.")
    return x


def check_units(vm: VisionModel, units: Any) -> None:
    """``units`` maps sites of the model to unit indices inside each site, or one sentence."""
    if not isinstance(units, dict):
        raise MechscopeError(f"units must be a dict of site -> unit indices (sites: {', '.join(vm.sites)}), got a "
                             f"{type(units).__name__}.")
    for site, us in units.items():
        if site not in vm.sites:
            raise MechscopeError(f"units name a site {site!r} the model lacks; its sites are {', '.join(vm.sites)}.")
        n = vm.sites[site].n_units
        if not all(hasattr(u, "__index__") and not isinstance(u, bool) and 0 <= int(u) < n for u in us):
            raise MechscopeError(f"units of site {site} must be indices from 0 to {n - 1}; got {list(us)[:8]}.")


def edge_attributions(vm: VisionModel, images: torch.Tensor, target: int, k: int,
                      contrast: torch.Tensor | None = None, baseline: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Select k units per site from the output down; returns ``units`` (site -> chosen units,
    best first), ``scores`` (site -> every unit's score) and ``edges`` (site -> [n_units x
    n_chosen_above] matrix, the columns in the order of the chosen units above). With
    ``contrast`` images, a unit's score is its summed edges on the concept's images minus
    those on the contrast images (same chosen units above): units the concept uses and the
    contrast does not. With ``baseline`` (site -> (1, ...) values, e.g. ``causal.site_means``),
    the activation is taken relative to it, (a - baseline) * grad: the first-order effect of
    replacing the unit by the baseline, i.e. of the mean ablation the tests make."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MechscopeError(f"k must be a whole number of units per layer, at least 1; got {k!r}.")
    check_k(vm, k)
    images = check_inputs(vm, images, target)
    if contrast is not None:
        contrast = check_inputs(vm, contrast, target, "contrast images")
    names = list(vm.sites)
    runs = []
    for x in (images, contrast) if contrast is not None else (images,):
        with capture(vm) as acts:
            logits = vm.net(x)
        runs.append((acts, [logits[:, target]]))
    units: dict[str, list[int]] = {}
    scores: dict[str, list[float]] = {}
    edges: dict[str, list[list[float]]] = {}
    for name in reversed(names):
        site = vm.sites[name]
        es = []
        for acts, above in runs:
            a = acts[name]
            cols = []
            for s_v in above:
                (g,) = torch.autograd.grad(s_v.sum(), a, retain_graph=True)
                d = a if baseline is None else a - baseline[name]
                cols.append(site.unit_sum(d * g).abs().mean(0))  # (n_units,)
            es.append(torch.stack(cols, 1).detach())  # (n_units, n_above)
        score = es[0].sum(1) - (es[1].sum(1) if len(es) > 1 else 0)
        chosen = torch.topk(score, k).indices.tolist()
        units[name], scores[name], edges[name] = chosen, score.tolist(), es[0].tolist()
        for acts, above in runs:
            vals = site.unit_value(acts[name])
            above[:] = [vals[:, u] for u in chosen]
    order = {n: i for i, n in enumerate(names)}
    return {"units": dict(sorted(units.items(), key=lambda kv: order[kv[0]])),
            "scores": dict(sorted(scores.items(), key=lambda kv: order[kv[0]])),
            "edges": dict(sorted(edges.items(), key=lambda kv: order[kv[0]]))}


@torch.no_grad()
def unit_values(vm: VisionModel, images: torch.Tensor, batch: int = 512) -> dict[str, torch.Tensor]:
    """Every unit's scalar activation on ``images``: site -> (n, n_units)."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in vm.sites}
    for i in range(0, len(images), batch):
        with capture(vm) as acts:
            vm.net(images[i:i + batch])
        for n, s in vm.sites.items():
            out[n].append(s.unit_value(acts[n]))
    return {n: torch.cat(v) for n, v in out.items()}


@dataclass
class VisionCircuit:
    """A circuit (site -> chosen units), its scores and edges, the top-activating images of its
    units, and the causal tests run on it (``tests``, filled by ``causal.test_circuit``)."""

    concept: dict[str, Any]
    model: dict[str, Any]
    settings: dict[str, Any]
    units: dict[str, list[int]]
    scores: dict[str, list[float]]
    edges: dict[str, list[list[float]]]
    top_images: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """site -> unit (as a string) -> indices into ``pool`` of its top-activating reference images."""
    pool: list[list[list[int]]] = field(default_factory=list)
    """Reference images (size x size, 0-255) the top images point into."""
    tests: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # a notebook's last line: one short line, not every tensor
        return brief_repr(self)

    def unit_set(self) -> set[tuple[str, int]]:
        return {(s, u) for s, us in self.units.items() for u in us}

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA, "kind": "vision-circuit", "concept": self.concept, "model": self.model,
                "settings": self.settings, "units": self.units, "scores": self.scores, "edges": self.edges,
                "top_images": self.top_images, "pool": self.pool, "tests": self.tests}

    def save(self, out: str | Path) -> Path:
        """``out/circuit.json``."""
        return write_result_json(out, "circuit.json", self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> "VisionCircuit":
        from mechscope.results import read_result_json

        d, p = read_result_json(path, "circuit.json", SCHEMA, "mechscope vision circuit")
        missing = [k for k in ("concept", "model", "units", "scores", "edges") if k not in d]
        if d.get("kind") != "vision-circuit" or missing:
            raise MechscopeError(f"'{p}' is not a vision circuit; pass the folder `mechscope vision circuit` wrote.")
        d.setdefault("settings", {})
        d.setdefault("top_images", {})
        d.setdefault("pool", [])
        d.setdefault("tests", {})
        return cls(**{k: d[k] for k in ("concept", "model", "settings", "units", "scores", "edges", "top_images", "pool", "tests")})


def find_circuit(vm: VisionModel, concept: Concept, cfg: CircuitConfig, reference: torch.Tensor | None = None) -> VisionCircuit:
    """The k-per-layer circuit of ``concept`` (its first ``cfg.n_concept`` images); with
    ``reference`` images, each chosen unit's ``cfg.top_images`` top-activating ones are kept,
    and with ``cfg.contrast`` the first ``cfg.n_concept`` of them are the contrast set."""
    contrast = reference[: cfg.n_concept] if cfg.contrast and reference is not None else None
    baseline = None
    if cfg.baseline == "mean":
        from mechscope.vision.causal import site_means

        if reference is None:
            raise MechscopeError("baseline='mean' needs reference images to take the mean over.")
        baseline = site_means(vm, reference)
    sel = edge_attributions(vm, concept.images[: cfg.n_concept], concept.target, cfg.k, contrast, baseline)
    circ = VisionCircuit(concept=concept.describe(), model={"path": vm.path, "arch": vm.cfg.arch, "classes": vm.classes,
                                                           "sites": {n: {"kind": s.kind, "n_units": s.n_units} for n, s in vm.sites.items()}},
                         settings=cfg.to_dict(), **sel)
    if reference is not None:
        vals = unit_values(vm, reference)
        used: dict[int, int] = {}
        for name, us in circ.units.items():
            tops = {}
            for u in us:
                idx = torch.topk(vals[name][:, u], min(cfg.top_images, len(reference))).indices.tolist()
                tops[str(u)] = [used.setdefault(i, len(used)) for i in idx]
            circ.top_images[name] = tops
        inv = sorted(used, key=lambda i: used[i])
        circ.pool = (reference[inv, 0].clamp(0, 1) * 255).round().to(torch.int64).tolist()
    return circ
