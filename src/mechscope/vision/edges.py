"""Edge pruning in the CNN: cut the edges u -> v between chosen units of adjacent layers.

An edge u -> v is ablated by recomputing the layer that reads u's site (``c1``, ``c2``, ``fc``,
``out``) with u's part of its input replaced by its mean over the reference images, and taking
only v's output from that run; every other output of the layer keeps its real input. The edges
into the logit are the dense units' edges to the concept's logit. (The ViT's edges are not
wired: a head's or neuron's input is the residual stream, not one site.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from mechscope.errors import MechscopeError
from mechscope.vision.models import SmallCNN, VisionModel

Edge = tuple[str, int, int]
"""(site of the sender, sender unit, receiver unit in the next layer; the target class for the logit)."""

_READER = {"conv0": "c1", "conv1": "c2", "conv2": "fc", "fc": "out"}


def _check(vm: VisionModel) -> SmallCNN:
    if not isinstance(vm.net, SmallCNN):
        raise MechscopeError("edge pruning is implemented for the CNN only; train one with --arch cnn.")
    return vm.net


@torch.no_grad()
def reader_means(vm: VisionModel, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mean input (1, ...) of each site's reading layer over ``reference``."""
    net = _check(vm)
    got: dict[str, torch.Tensor] = {}
    hs = [getattr(net, r).register_forward_pre_hook(lambda _m, inp, s=s: got.__setitem__(s, inp[0].mean(0, keepdim=True)))
          for s, r in _READER.items()]
    try:
        net(reference)
    finally:
        for h in hs:
            h.remove()
    return got


def _sender_index(net: SmallCNN, site: str, u: int, x: torch.Tensor) -> torch.Tensor:
    """Mask (1, features...) of sender u's part of the reading layer's input ``x``."""
    m = torch.zeros_like(x[:1], dtype=torch.bool)
    if site == "conv2":  # flattened (channels x h x w)
        hw = x.shape[1] // net.c2.out_channels
        m[:, u * hw:(u + 1) * hw] = True
    else:
        m[:, u] = True
    return m


@contextlib.contextmanager
def edges_ablated(vm: VisionModel, edges: list[Edge], means: dict[str, torch.Tensor]) -> Iterator[None]:
    net = _check(vm)
    by_site: dict[str, dict[int, list[int]]] = {}
    for s, u, v in edges:
        by_site.setdefault(s, {}).setdefault(v, []).append(u)
    hs = []
    for site, recv in by_site.items():
        layer = getattr(net, _READER[site])

        def hook(mod, inp, out, site=site, recv=recv):
            x = inp[0]
            new = out.clone()
            for v, us in recv.items():
                mask = torch.zeros_like(x[:1], dtype=torch.bool)
                for u in us:
                    mask |= _sender_index(net, site, u, x)
                xv = torch.where(mask, means[site].expand_as(x), x)
                new[:, v] = mod.forward(xv)[:, v]  # forward, not __call__: no hook recursion
            return new

        hs.append(layer.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in hs:
            h.remove()


def circuit_edges(vm: VisionModel, units: dict[str, list[int]], target: int) -> list[Edge]:
    names = list(vm.sites)
    out: list[Edge] = []
    for i, s in enumerate(names):
        receivers = units[names[i + 1]] if i + 1 < len(names) else [target]
        out += [(s, u, v) for u in units[s] for v in receivers]
    return out


def random_edges(vm: VisionModel, like: list[Edge], gen: torch.Generator) -> list[Edge]:
    """As many random edges per layer pair as ``like`` has (distinct, any sender and receiver; the logit's receiver kept)."""
    names, out = list(vm.sites), []
    for i, s in enumerate(names):
        n = sum(e[0] == s for e in like)
        n_recv = vm.sites[names[i + 1]].n_units if i + 1 < len(names) else None
        pool = torch.randperm(vm.sites[s].n_units * (n_recv or 1), generator=gen)[:n].tolist()
        tgt = next((e[2] for e in like if e[0] == s), 0)
        out += [(s, p // (n_recv or 1), p % n_recv if n_recv else tgt) for p in pool]
    return out


@torch.no_grad()
def edge_test(vm: VisionModel, units: dict[str, list[int]], images: torch.Tensor, target: int, reference: torch.Tensor,
              random_draws: int = 10, seed: int = 0) -> dict[str, Any]:
    """Class accuracy and mean logit with the circuit's edges cut vs as many random edges cut."""
    means = reader_means(vm, reference)
    mine = circuit_edges(vm, units, target)
    gen = torch.Generator().manual_seed(seed)

    def stats(edges: list[Edge]) -> dict[str, float]:
        with edges_ablated(vm, edges, means):
            lg = vm.net(images)
        return {"accuracy": float((lg.argmax(-1) == target).float().mean()), "logit": float(lg[:, target].mean())}

    full, cut = stats([]), stats(mine)
    rand = [stats(random_edges(vm, mine, gen)) for _ in range(random_draws)]
    r = {k: sum(x[k] for x in rand) / len(rand) for k in ("accuracy", "logit")}
    return {"n_edges": len(mine), "full": full, "circuit_edges_cut": cut, "random_edges_cut": r,
            "accuracy_drop": {"circuit": full["accuracy"] - cut["accuracy"], "random": full["accuracy"] - r["accuracy"]},
            "logit_drop": {"circuit": full["logit"] - cut["logit"], "random": full["logit"] - r["logit"]}}
