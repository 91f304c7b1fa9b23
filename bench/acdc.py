"""ACDC wall time against one forward pass per edge (the naive implementation's cost), in one process.

Runs mechscope's ACDC (speculative batching, cut-off receivers skipped, only the blocks above
each receiver run) and times one plain patched forward pass of the same batch; the naive ACDC
does one such pass per edge. Also counts the forward work ACDC actually did (``n_forward``, in
whole-model passes of the batch: a suffix run counts its share of the blocks).

Default model: the hand-built induction toy (its circuit is known, so ACDC's removal pattern
is realistic). ``--model`` takes any model mechscope loads; ``--task`` any task name.

    python bench/acdc.py [--model DIR] [--task induction] [--n 8] [--tau 0.05]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from mechscope.circuits.acdc import acdc
from mechscope.graph import build_graph
from mechscope.models import load_model
from mechscope.patching import run_with_edge_mask, source_activations


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the hand-built induction toy")
    ap.add_argument("--task", default=None, help="default: the toy's induction task")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tau", type=float, default=0.05)
    ap.add_argument("--ablation", default="zero")
    ap.add_argument("--k-batch", type=int, default=None, help="default: ~50 rows per pass on CPU, 8 masks on GPU")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop early; rates are then per edge visited")
    a = ap.parse_args()
    if a.model is None:
        from mechscope.circuits.toy import induction_task, save_induction_toy

        model = load_model(save_induction_toy(tempfile.mkdtemp()), device="cpu")
        batch = induction_task(model.tokenizer, n=a.n, seq_len=10, seed=0)
        label = "induction toy (hand-built, 2 layers)"
    else:
        from mechscope.tasks import get_task

        model = load_model(a.model, device="cpu")
        batch = get_task(a.task or "ioi").build(model.tokenizer, n=a.n, seed=0)
        label = model.summary.name
    g = build_graph(model)
    src = source_activations(model, g, batch.clean, batch.corrupt, a.ablation, batch.lengths)
    mask = g.empty_mask()
    mask[0, -1] = 1.0
    with torch.no_grad():
        run_with_edge_mask(model, g, batch.clean, src, mask)
        t = time.perf_counter()
        for _ in range(5):
            run_with_edge_mask(model, g, batch.clean, src, mask)
        t_fwd = (time.perf_counter() - t) / 5
    t = time.perf_counter()
    res = acdc(model, g, batch, tau=a.tau, ablation=a.ablation, k_batch=a.k_batch, max_seconds=a.max_seconds)
    t_acdc = time.perf_counter() - t
    visited = int(res.visited)
    naive = visited * t_fwd
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: {label}; {g.n_edges:,} edges; {len(batch)} examples x {batch.n_pos} tokens; tau {a.tau}")
    if not res.complete:
        print(f"stopped after {a.max_seconds:.0f} s: {visited:,} of {g.n_edges:,} edges visited")
    print(f"one patched forward pass: {t_fwd * 1000:.1f} ms -> naive ACDC (one pass per edge visited): {naive:.1f} s")
    print(f"mechscope ACDC: {t_acdc:.1f} s, {res.n_forward:.0f} whole-model passes of forward work, {int(res.circuit.sum())} edges kept")
    print(f"ratio: {t_acdc / naive:.2f}x of one forward pass per edge")


if __name__ == "__main__":
    main()
