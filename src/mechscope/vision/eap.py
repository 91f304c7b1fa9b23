"""EAP and EAP-IG over the ViT's head/MLP graph: the language circuit tools on images.

The small ViT (``models.SmallViT``: pre-norm blocks, multi-head attention, an MLP, logits from
the class token) has the shape of the language models' computational graph, so it gets the
very same ``graph.Graph`` (senders ``input``, ``a{l}.h{h}``, ``m{l}``; receivers the q, k and v
input of every head, every MLP input and the logits), and the language tools' ranking
(``circuits.select.importance``), top-k and pruning (``select.top_k``, ``select.prune``),
faithfulness curve with random baselines (``circuits.evaluate.faithfulness_curve``), smallest
faithful circuit and bootstrap interval run on it unchanged. What is image-specific is here:

1. ``EdgeViT.run``: the ViT's forward with every receiver's input written as the residual
   stream minus the patched edges' deltas: for receiver r,
   ``in_r = resid - sum_s patch[s, r] (a_s - a*_s)``, with a_s the sender's output in this run
   and a*_s its output on the corrupt image (the standard edge-patching semantics of ACDC/EAP:
   a patched edge carries the corrupt activation, a kept edge this run's). Each head reads its
   own q, k and v inputs (through the block's shared LayerNorm), so an edge into one head's
   keys changes only that head. With nothing patched it is the model's forward exactly.
2. ``edge_scores``: EAP's first-order estimate of patching each edge alone,
   ``score[s, r] = sum_{b, t} (a*_s - a_s) . d metric / d in_r``, the gradients from one
   backward pass (EAP) or averaged over ``steps`` passes with the input embeddings moved from
   the corrupt to the clean image (EAP-IG, its "inputs" variant). The metric is the logit
   difference between the clean and the corrupt image's classes, averaged over pairs.
3. ``ViTEvaluator``: circuit faithfulness (metric(circuit) - metric(corrupt)) / (metric(clean)
   - metric(corrupt)) on a set of image pairs, with every non-circuit edge patched.

The task is a clean/corrupt image pair per example: a held-out image of one class and one of
another class; edges are scored on training-split pairs and the circuit tested on held-out
test-split pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from mechscope.circuits.evaluate import bootstrap_faithfulness, curve_sizes, faithfulness_curve, smallest_faithful
from mechscope.circuits.select import importance, prune, top_k
from mechscope.errors import MechscopeError
from mechscope.graph import Graph
from mechscope.progress import PhaseHandle, ProgressArg, as_progress
from mechscope.results import write_result_json
from mechscope.vision.concept import class_index
from mechscope.vision.data import Dataset, build_dataset
from mechscope.vision.models import Block, SmallViT, VisionModel

__all__ = ["EdgeViT", "ImagePairs", "ViTEvaluator", "VisionEAPResult", "check_clean_accuracy", "edge_scores", "image_pairs",
           "vision_eap"]

Method = Literal["eap", "eap-ig"]


@dataclass
class ImagePairs:
    """``clean`` and ``corrupt`` images [n, 1, s, s] of two classes, paired by index."""

    clean: torch.Tensor
    corrupt: torch.Tensor
    clean_label: int
    corrupt_label: int

    def __len__(self) -> int:
        return int(self.clean.shape[0])


def image_pairs(vm: VisionModel, ds: Dataset, clean: str, corrupt: str, n: int, split: str, seed: int) -> ImagePairs:
    """Up to ``n`` pairs (a ``clean``-class image, a ``corrupt``-class image) from ``split``."""
    a, b = class_index(vm, clean), class_index(vm, corrupt)
    if a == b:
        raise MechscopeError(f"--clean and --corrupt are the same class ({vm.classes[a]}); give two different classes.")
    part = ds.train if split == "train" else ds.test
    xa, xb = part.of_class(a), part.of_class(b)
    m = min(n, len(xa), len(xb))
    if m < 2:
        raise MechscopeError(f"the {split} split holds {len(xa)} images of {vm.classes[a]} and {len(xb)} of "
                             f"{vm.classes[b]}; at least 2 of each are needed.")
    g = torch.Generator().manual_seed(seed)
    return ImagePairs(xa[torch.randperm(len(xa), generator=g)[:m]], xb[torch.randperm(len(xb), generator=g)[:m]], a, b)


class EdgeViT:
    """A ``SmallViT`` run over ``graph.Graph``'s edges (step 1 of the module docstring)."""

    def __init__(self, vm: VisionModel) -> None:
        if not isinstance(vm.net, SmallViT):
            raise MechscopeError("EAP over heads and MLPs needs a ViT; this model is a CNN "
                                 "(train one with `mechscope vision train --arch vit`).")
        self.net = vm.net
        blocks = [cast(Block, b) for b in self.net.blocks]
        H = blocks[0].h
        self.graph = Graph(n_layers=len(blocks), n_heads=H, n_kv_heads=H)
        self.blocks = blocks

    def _heads(self, blk: Block) -> tuple[torch.Tensor, ...]:
        """Per-head projections: W [3, H, d, e], b [3, H, e] (q, k, v), W_O [H, e, d]."""
        H, e = blk.h, blk.dh
        d = H * e
        W = blk.qkv.weight.view(3, H, e, d).transpose(2, 3)
        b = blk.qkv.bias.view(3, H, e)
        W_O = blk.o.weight.view(d, H, e).permute(1, 2, 0)
        return W, b, W_O

    def input(self, images: torch.Tensor) -> torch.Tensor:
        """The ``input`` sender: class token + patch embeddings + positions [B, T, d]."""
        net, p = self.net, self.net.patch
        tok = images.unfold(2, p, p).unfold(3, p, p).reshape(images.shape[0], -1, p * p)
        return torch.cat([net.cls.expand(images.shape[0], -1, -1), net.embed(tok)], 1) + net.pos

    def run(self, images: torch.Tensor, patch: torch.Tensor | None = None, corrupt: torch.Tensor | None = None,
            bump: torch.Tensor | None = None, x0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, C], sender outputs [S, B, T, d]) of one forward.

        ``patch`` [S, R] (1 = the edge carries ``corrupt``'s sender output [S, B, T, d]);
        ``bump`` [R, B, T, d] is added to every receiver's input (zeros with gradients: EAP);
        ``x0`` replaces the input embeddings (EAP-IG's interpolation).
        """
        g = self.graph
        x = self.input(images) if x0 is None else x0
        outs = [x]
        resid = x

        deltas: list[torch.Tensor] = []  # a_s - a*_s of every sender so far (patched runs only)

        def inputs(rs: slice, n_up: int) -> torch.Tensor:
            base = resid[None].expand(rs.stop - rs.start, -1, -1, -1)
            if patch is not None and corrupt is not None:
                while len(deltas) < n_up:  # each sender's delta is formed once, when first read
                    deltas.append(outs[len(deltas)] - corrupt[len(deltas)])
                delta = torch.stack(deltas[:n_up])
                base = base - torch.einsum("sr,sbtd->rbtd", patch[:n_up, rs].to(delta), delta)
            return base + bump[rs] if bump is not None else base

        for l, blk in enumerate(self.blocks):
            rs = g.receiver_slices(l)
            n_up = g.sender_slice_before(l)
            W, b, W_O = self._heads(blk)
            qkv = [blk.ln1(inputs(rs[c], n_up)) for c in ("q", "k", "v")]  # each [H, B, T, d]
            q, k, v = (torch.einsum("hbtd,hde->hbte", qkv[i], W[i]) + b[i][:, None, None] for i in range(3))
            att = torch.einsum("hbqe,hbke->hbqk", q, k).div(math.sqrt(blk.dh)).softmax(-1)
            heads = torch.einsum("hbte,hed->hbtd", torch.einsum("hbqk,hbke->hbqe", att, v), W_O)  # [H, B, T, d]
            outs += list(heads)
            resid = resid + heads.sum(0) + blk.o.bias
            m_in = inputs(rs["mlp"], g.sender_slice_before(l, mlp=True))[0]
            m = blk.fc2(nn.functional.gelu(blk.fc1(blk.ln2(m_in))))
            outs.append(m)
            resid = resid + m
        r = g.logits_receiver
        final = inputs(slice(r, r + 1), g.n_senders)[0]
        return self.net.out(self.net.ln(final[:, 0])), torch.stack(outs)


def _metric(logits: torch.Tensor, pairs: ImagePairs) -> torch.Tensor:
    """Per-pair logit difference (clean class - corrupt class) [B]."""
    return logits[:, pairs.clean_label] - logits[:, pairs.corrupt_label]


MAX_STEPS = 200
"""Most EAP-IG interpolation steps: past a few dozen the integral barely changes, and each costs a pass."""


def _check_method(method: str, steps: int) -> None:
    if method not in ("eap", "eap-ig"):
        raise MechscopeError(f"unknown method {method!r}; use eap or eap-ig.")
    if not 1 <= steps <= MAX_STEPS:
        raise MechscopeError(f"--steps must be between 1 and {MAX_STEPS} (each step is a forward and backward pass); got {steps}.")


def edge_scores(ev: EdgeViT, pairs: ImagePairs, method: Method = "eap-ig", steps: int = 5,
                progress: ProgressArg = False) -> torch.Tensor:
    """EAP / EAP-IG edge scores [S, R] (step 2 of the module docstring): the estimated change
    of the mean metric when the edge alone is patched to the corrupt image (0 where no edge)."""
    _check_method(method, steps)
    g = ev.graph
    with torch.no_grad():
        _, clean_out = ev.run(pairs.clean)
        _, corrupt_out = ev.run(pairs.corrupt)
    B, T, d = clean_out.shape[1:]
    grads = torch.zeros(g.n_receivers, B, T, d, dtype=clean_out.dtype)
    alphas = [1.0] if method == "eap" else [(i + 1) / steps for i in range(steps)]
    with as_progress(progress).phase(f"{method} scores", total=len(alphas), unit="pass") as bar:
        for a in alphas:
            bump = torch.zeros(g.n_receivers, B, T, d, dtype=clean_out.dtype, requires_grad=True)
            x0 = corrupt_out[0] + a * (clean_out[0] - corrupt_out[0])
            logits, _ = ev.run(pairs.clean, bump=bump, x0=x0)
            _metric(logits, pairs).mean().backward()
            assert bump.grad is not None  # the backward pass just filled it
            grads += bump.grad
            bar.advance()
    grads /= len(alphas)
    delta = (corrupt_out - clean_out).reshape(g.n_senders, -1)
    scores = delta @ grads.reshape(g.n_receivers, -1).T
    return torch.where(g.allowed, scores, torch.zeros((), dtype=scores.dtype))


@dataclass
class ViTEvaluator:
    """Faithfulness of circuits on one set of image pairs (step 3); ``graph`` and
    ``faithfulness`` are what ``circuits.evaluate``'s curve and selection need."""

    ev: EdgeViT
    pairs: ImagePairs
    graph: Graph = field(init=False)

    def __post_init__(self) -> None:
        self.graph = self.ev.graph
        with torch.no_grad():
            lc, _ = self.ev.run(self.pairs.clean)
            lx, self.corrupt_out = self.ev.run(self.pairs.corrupt)
        self.clean_ex, self.corrupt_ex = _metric(lc, self.pairs), _metric(lx, self.pairs)
        self.clean, self.corrupt = self.clean_ex.mean(), self.corrupt_ex.mean()

    @torch.no_grad()
    def per_example(self, circuit: torch.Tensor) -> torch.Tensor:
        """Per-pair metric [n] with every edge outside ``circuit`` [S, R] patched."""
        patch = (~circuit.bool() & self.graph.allowed).float()
        logits, _ = self.ev.run(self.pairs.clean, patch=patch, corrupt=self.corrupt_out)
        return _metric(logits, self.pairs)

    def passes(self, n_masks: int) -> int:
        """Patched forward passes ``faithfulness`` makes for ``n_masks`` circuits (a progress total)."""
        return n_masks

    def faithfulness(self, circuits: torch.Tensor, bar: PhaseHandle | None = None) -> torch.Tensor:
        """Faithfulness [K] of K circuits [K, S, R] (True = kept); ``bar`` advances once per circuit."""
        vals = []
        for c in circuits:
            vals.append(self.per_example(c).mean())
            if bar is not None:
                bar.advance()
        vals_t = torch.stack(vals)
        denom = self.clean - self.corrupt
        return (vals_t - self.corrupt) / (denom if abs(denom) > 1e-9 else 1e-9)

    def faithfulness_interval(self, circuit: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> dict:
        return bootstrap_faithfulness(self.per_example(circuit), self.clean_ex, self.corrupt_ex, n_boot, seed=seed)


@dataclass
class VisionEAPResult:
    """Scores, the chosen circuit and its tests (``to_dict`` for ``eap.json``)."""

    classes: tuple[str, str]
    method: str
    steps: int
    graph: Graph
    scores: torch.Tensor
    circuit: torch.Tensor
    curve: list[dict[str, Any]]
    chosen: dict[str, Any]
    n_pairs: dict[str, int]
    accuracy: dict[str, float]
    n_asked: int | None = None
    """The pairs asked for per split (``n``); where a split gave fewer, ``note`` says so."""

    @property
    def note(self) -> str | None:
        """One sentence when a split holds fewer pairs than ``n_asked`` (every image was used)."""
        n = self.n_asked
        fewer = [f"{self.n_pairs[k]} {what}" for k, what in (("fit", "scoring"), ("held_out", "held-out"))
                 if n is not None and self.n_pairs[k] < n]
        if not fewer:
            return None
        return (f"--n {n} is more pairs than the images give: {' and '.join(fewer)} pairs were used "
                f"(each split gives as many pairs as its rarer class of the two has images).")

    def top_edges(self, k: int = 25) -> list[dict[str, Any]]:
        g = self.graph
        s = torch.where(self.circuit, -self.scores, torch.tensor(float("-inf")))
        idx = s.flatten().argsort(descending=True)[: min(k, int(self.circuit.sum()))].tolist()
        R = g.n_receivers
        return [{"sender": g.senders[i // R], "receiver": g.receivers[i % R], "score": float(self.scores.view(-1)[i])}
                for i in idx]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "kind": "vision-eap", "clean_class": self.classes[0], "corrupt_class": self.classes[1],
                "method": self.method, "steps": self.steps, "n_edges": self.graph.n_edges, "n_pairs": self.n_pairs,
                "accuracy": self.accuracy, "chosen": self.chosen, "curve": self.curve, "top_edges": self.top_edges(),
                **({"note": self.note} if self.note else {})}

    def save(self, out: str | Path) -> Path:
        """``out/eap.json`` (written to a temporary file, then moved into place)."""
        return write_result_json(out, "eap.json", self.to_dict())


def check_clean_accuracy(vm: VisionModel, ev: EdgeViT, fit: ImagePairs, held: ImagePairs) -> dict[str, float]:
    """Top-1 accuracy on the held-out clean and corrupt images, or one sentence when the model
    classifies the clean class at or below chance (1 / classes), or its logit difference does
    not tell the clean images from the corrupt ones: a circuit for a behaviour the model lacks
    is meaningless (``circuits.discover.check_task_performance`` on images)."""
    with torch.no_grad():
        acc = {"clean": float((ev.run(held.clean)[0].argmax(-1) == held.clean_label).float().mean()),
               "corrupt": float((ev.run(held.corrupt)[0].argmax(-1) == held.corrupt_label).float().mean())}
        gap = float((_metric(ev.run(fit.clean)[0], fit) - _metric(ev.run(fit.corrupt)[0], fit)).mean())
    chance = 1 / len(vm.classes)
    a, b = vm.classes[held.clean_label], vm.classes[held.corrupt_label]
    if acc["clean"] <= chance:
        raise MechscopeError(
            f"the model classifies {a!r} at or below chance (held-out accuracy {acc['clean']:.0%} on {len(held)} images, "
            f"chance {chance:.0%}), so a circuit for it would explain a behaviour the model lacks; train longer (more "
            "--epochs) or pick a class it gets right as --clean.")
    if abs(gap) < 1e-3:
        raise MechscopeError(
            f"the model's logit difference {a!r} - {b!r} is the same on {a!r} and {b!r} images (gap {gap:.3g}), so there "
            "is nothing for a circuit to explain; train longer (more --epochs) or pick other classes.")
    return acc


def vision_eap(vm: VisionModel, clean: str, corrupt: str, n: int = 64, method: Method = "eap-ig", steps: int | None = None,
               target: float = 0.8, seed: int = 0, ds: Dataset | None = None, progress: ProgressArg = False) -> VisionEAPResult:
    """Refuse a clean class the model classifies at chance (``check_clean_accuracy``); score the
    ViT's edges on training-split pairs of (``clean``, ``corrupt``) images, choose
    the smallest top-k circuit reaching ``target`` faithfulness on them, and test it and the
    faithfulness curve (with random circuits) on held-out test-split pairs. ``steps``: EAP-IG's
    interpolation steps (default 5); EAP takes one gradient and refuses them (recorded as 1)."""
    if method == "eap" and steps is not None:
        raise MechscopeError("--steps applies to eap-ig; eap takes one gradient at the clean images, so drop --steps.")
    steps = 1 if method == "eap" else 5 if steps is None else steps
    if n < 2:
        raise MechscopeError(f"--n must be at least 2 pairs; got {n}.")
    if not 0 < target <= 1:
        raise MechscopeError(f"--target must lie in (0, 1]; got {target}.")
    _check_method(method, steps)
    ev = EdgeViT(vm)
    ds = ds or build_dataset(vm.cfg.data)
    fit = image_pairs(vm, ds, clean, corrupt, n, "train", seed)
    held = image_pairs(vm, ds, clean, corrupt, n, "test", seed + 1)
    acc = check_clean_accuracy(vm, ev, fit, held)
    prog = as_progress(progress)
    scores = edge_scores(ev, fit, method, steps, prog)
    ranking = importance(scores, method)
    g = ev.graph
    prog.note(f"choosing the smallest circuit reaching {target:.2f} on {len(fit)} scoring pairs")
    k, f_fit = smallest_faithful(ViTEvaluator(ev, fit), ranking, target)
    circuit = prune(g, top_k(g, ranking, k, False))
    held_ev = ViTEvaluator(ev, held)
    chosen = {"n_edges": int(k), "n_edges_after_pruning": int(circuit.sum()), "fraction": k / g.n_edges,
              "faithfulness_fit": f_fit, "held_out": held_ev.faithfulness_interval(circuit, seed=seed)}
    curve = faithfulness_curve(held_ev, ranking, curve_sizes(g), progress=prog)
    return VisionEAPResult(classes=(vm.classes[fit.clean_label], vm.classes[fit.corrupt_label]), method=method, steps=steps,
                           graph=g, scores=scores, circuit=circuit, curve=curve, chosen=chosen,
                           n_pairs={"fit": len(fit), "held_out": len(held)}, accuracy=acc, n_asked=n)
