"""ACDC: Automated Circuit DisCovery (Conmy et al. 2023), exact edge-level pruning.

1. Start from the full model (no edge patched); the metric is the KL divergence of the
   circuit's next-token distribution from the full model's at the scored positions (or the
   task metric's distance to its clean value).
2. Visit receivers from ``logits`` backwards (reverse forward order). For each incoming edge
   still in the circuit, senders latest first: patch it from the source run; if the metric
   grows by less than ``tau``, leave it patched (removed), else restore it.
3. A receiver whose node has no outgoing edge left cannot affect the output: all its incoming
   edges go at once (their effect is exactly zero, so the greedy result is unchanged).

Speed without changing the result (speculative batching): the candidates of one receiver are
evaluated up to K at a time in one batched forward pass (K doubles after a batch of removals,
up to ``k_batch``, and drops to 1 after a kept edge, so few evaluations are wasted where ACDC
keeps many edges), candidate j with candidates 1..j-1 also
removed, i.e. assuming the common outcome (removal). The scan accepts decisions up to and
including the first kept edge; the candidates after it are re-evaluated from the true state.
Each decision therefore compares exactly the two masks sequential ACDC compares.

Speed without changing the result (suffix runs): while the edges into a layer-l receiver are
decided, every patched edge ends at layer l or above, so blocks 0..l-1 compute what they
compute on the clean batch. Each evaluation starts from the cached clean residual entering
block l and runs only blocks l.. (``mechscope.patching.suffix``), with logits at the scored
positions only; the deltas of senders below l are the cached clean-minus-source outputs. The
receivers near the logits, where ACDC spends most evaluations, cost a few blocks each.

Long runs checkpoint: with ``checkpoint=PATH`` the state (mask, scores, next receiver, the
running metric, edges visited) is written atomically to a safetensors file after each
receiver, and a later call with the same path resumes from it (at most one receiver's work is
lost to a kill, even SIGKILL) and ends with exactly the scores and circuit of an uninterrupted
run: the running metric is restored, not re-evaluated (a fresh evaluation can differ in the last
bits and flip a decision at ``tau``). The checkpoint is keyed by the settings and a digest of
the batch's tokens, so a checkpoint of another task, draw of pairs or model is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from mechscope.circuits.select import receiver_owner
from mechscope.graph import Graph
from mechscope.patching.engine import (
    Ablation,
    run_suffix_with_edge_mask,
    run_with_edge_mask,
    sender_activations,
    source_activations,
)
from mechscope.patching.suffix import SuffixRunner
from mechscope.progress import ProgressArg, as_progress
from mechscope.tasks.base import TaskBatch

if TYPE_CHECKING:
    from mechscope.models import Model


@dataclass
class ACDCResult:
    circuit: torch.Tensor  # bool [S, R], edges kept
    scores: torch.Tensor  # float [S, R], metric increase when the edge was tested
    n_forward: float  # forward work in whole-batch, whole-model passes (a suffix run counts its share)
    complete: bool = True  # False when max_seconds stopped it early (unvisited edges kept)
    visited: int = 0  # edges decided (removed or kept)
    seconds_before: float = 0.0  # pruning time of the earlier runs this one resumed (from the checkpoint)


class _Scorer:
    """The ACDC metric of K masks at once, running only the blocks above the receiver's layer."""

    def __init__(self, model: Model, graph, batch: TaskBatch, ablation: Ablation, metric: str, suffix: bool = True):
        self.model, self.graph, self.batch, self.metric = model, graph, batch.to(model.device), metric
        b = self.batch
        with torch.no_grad():
            self.src = source_activations(model, graph, b.clean, b.corrupt, ablation, b.lengths)
            logits = model.bridge(b.clean)
        rows = torch.arange(len(b), device=logits.device)[:, None]
        keep, compact = torch.unique(b.positions, sorted=True, return_inverse=True)
        self.compact = dataclasses.replace(b, positions=compact)  # positions into the kept columns
        self.ref_logp = logits[rows, b.positions].log_softmax(-1)  # [B, k, V]
        self.ref_metric = b.per_example_metric(logits).mean()
        self.n_forward = 1
        self.runner = SuffixRunner(model, b.clean, keep) if suffix else None
        if self.runner is not None and self.runner.check(logits):
            with torch.no_grad():
                self.clean_delta = sender_activations(model, graph, b.clean) - self.src
            self.n_forward += 2
        else:
            self.runner = None

    @torch.no_grad()
    def __call__(self, masks: torch.Tensor, start: int = 0) -> torch.Tensor:
        b = self.compact
        if self.runner is not None:
            logits = run_suffix_with_edge_mask(self.model, self.graph, self.runner, self.src, self.clean_delta,
                                               masks, start)
            self.n_forward += masks.shape[0] * (self.graph.n_layers - start) / self.graph.n_layers
        else:
            logits = run_with_edge_mask(self.model, self.graph, self.batch.clean, self.src, masks)
            self.n_forward += masks.shape[0]
            b = self.batch
        rows = torch.arange(len(b), device=logits.device)[:, None]
        out = []
        for lg in logits:
            if self.metric == "kl":
                lp = lg[rows, b.positions].log_softmax(-1)
                kl = (self.ref_logp.exp() * (self.ref_logp - lp)).sum(-1).mean()
                out.append(kl)
            else:
                out.append((self.ref_metric - b.per_example_metric(lg).mean()).abs())
        return torch.stack(out).cpu()


def acdc(
    model,
    graph: Graph,
    batch: TaskBatch,
    tau: float = 0.01,
    ablation: Ablation = "patching",
    metric: Literal["kl", "task"] = "kl",
    k_batch: int | None = None,
    progress: ProgressArg = False,
    checkpoint: str | Path | None = None,
    max_seconds: float | None = None,
    suffix: bool = True,
) -> ACDCResult:
    """Run ACDC; returns the kept edges, per-edge metric increases and the forward count.

    ``max_seconds`` stops after the receiver in progress once the budget is spent (the result
    then covers only the receivers visited; resume with the same ``checkpoint``).
    ``suffix=False`` runs every evaluation through the whole model (the result is the same;
    used by tests to check exactly that).
    """
    import time

    t0 = time.perf_counter()
    if k_batch is None:
        k_batch = default_k_batch(model, len(batch))
    S, R = graph.n_senders, graph.n_receivers
    score = _Scorer(model, graph, batch, ablation, metric, suffix=suffix)
    mask = torch.zeros(S, R)  # 1 = patched (removed)
    scores = torch.zeros(S, R)
    owners = receiver_owner(graph)
    start = R - 1
    settings = {"tau": tau, "metric": metric, "ablation": ablation, "S": S, "R": R,
                "model": model.summary.name, "weights": model.fingerprint(), "batch": _digest(batch)}
    current, visited, before = None, 0, 0.0
    if checkpoint is not None and Path(checkpoint).is_file():
        mask, scores, start, extra, current, visited, before = _load_state(checkpoint, settings)
        score.n_forward += extra
    if current is None:
        current = float(score(mask[None], graph.receiver_layer(start))[0])
    bar = as_progress(progress).phase("acdc (edges tried)", total=graph.n_edges, unit="edge", initial=visited)
    complete = True
    for r in range(start, -1, -1):
        cands = [s for s in reversed(range(S)) if graph.allowed[s, r]]
        ow = owners[r]
        if ow and not any(((1 - mask[o]) * graph.allowed[o]).sum() > 0 for o in ow):
            mask[cands, r] = 1.0  # node cut off from the output: its inputs cannot matter
            bar.advance(len(cands))
            visited += len(cands)
            continue
        i, k = 0, 1
        while i < len(cands):
            chunk = cands[i : i + k]
            trial = mask[None].repeat(len(chunk), 1, 1)
            for j in range(len(chunk)):
                trial[j:, chunk[j], r] = 1.0
            vals = score(trial, graph.receiver_layer(r))
            prev = current
            for j, s in enumerate(chunk):
                scores[s, r] = float(vals[j]) - prev
                i += 1
                bar.advance(1)
                visited += 1
                if vals[j] - prev < tau:
                    mask[s, r] = 1.0
                    prev = float(vals[j])
                else:
                    k = 1  # a kept edge: speculation failed, start small again
                    break  # later evaluations assumed this edge removed: redo them
            else:
                k = min(2 * k, k_batch)  # every candidate removed: speculate further
            current = prev
        if checkpoint is not None:
            _save_state(checkpoint, mask, scores, r - 1, score.n_forward, settings, current, visited,
                        before + time.perf_counter() - t0)
        if max_seconds is not None and r > 0 and time.perf_counter() - t0 > max_seconds:
            complete = False  # budget spent: receivers below r are unvisited (their edges kept)
            break
    bar.close()

    keep = graph.allowed & (mask == 0)
    # Ranking for curves: kept edges score >= tau; a removal that lowered the metric is not
    # "important", so negative increases rank as zero.
    return ACDCResult(circuit=keep, scores=scores.clamp(min=0) * graph.allowed, n_forward=score.n_forward,
                      complete=complete, visited=visited, seconds_before=before)


def default_k_batch(model: Model, n_examples: int) -> int:
    """Largest speculative batch worth running: 8 masks on a GPU; on a CPU as many as keep a
    pass at about 50 rows (SmolLM2-135M, 2 cores: 25 rows 1.10 s, 50 rows 1.73 s, 100 rows
    4.56 s: past ~50 rows a batch costs more than the same rows run one after the other)."""
    if model.device.type != "cpu":
        return 8
    return max(1, 50 // max(1, n_examples))


def _digest(batch: TaskBatch) -> str:
    """Short digest of what the scores depend on in ``batch``: its tokens, scored positions and answers."""
    import hashlib

    h = hashlib.sha256()
    for t in (batch.clean, batch.corrupt, batch.positions, batch.answers, batch.wrongs, batch.lengths,
              batch.candidates, batch.signs):
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(batch.metric_name.encode())
    return h.hexdigest()[:16]


def _save_state(path, mask, scores, next_r, n_forward, settings, current, visited, seconds=0.0) -> None:
    from safetensors.torch import save_file

    # repr of a float reads back to the same float: the resumed run continues from the exact metric.
    # seconds: pruning time so far, over every run of this checkpoint (a resumed run reports the total).
    meta = {"next_receiver": str(next_r), "n_forward": str(n_forward), "settings": json.dumps(settings),
            "current": repr(current), "visited": str(visited), "seconds": repr(float(seconds))}
    tmp = f"{path}.tmp"  # a fixed name: the next save overwrites what a kill mid-write left
    save_file({"mask": mask.contiguous(), "scores": scores.contiguous()}, tmp, metadata=meta)
    os.replace(tmp, path)  # atomic: a kill leaves the old or the new state, never half


def _load_state(path, settings):
    from safetensors import safe_open

    from mechscope.errors import MechscopeError

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        saved = json.loads(meta["settings"])
        if saved.get("weights") != settings["weights"] and {k: v for k, v in saved.items() if k != "weights"} == {
                k: v for k, v in settings.items() if k != "weights"}:
            raise MechscopeError(
                f"The ACDC checkpoint '{path}' was made with other weights than this model's (same name, "
                f"{settings['model']}, another fingerprint); delete it or resume with the model that made it."
            )
        if saved != settings:
            raise MechscopeError(
                f"The ACDC checkpoint '{path}' was made with other settings ({meta['settings']}); "
                "delete it or pass the same settings to resume."
            )
        current = float(meta["current"]) if "current" in meta else None
        return (f.get_tensor("mask"), f.get_tensor("scores"), int(meta["next_receiver"]), float(meta["n_forward"]),
                current, int(meta.get("visited", 0)), float(meta.get("seconds", 0.0)))
