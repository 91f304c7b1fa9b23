"""Mean ablation takes its mean over the whole evaluation set, never over a chunk of
``batch_size`` examples: the figures do not depend on the chunk size, and equal a mean
computed directly over every example (padding excluded)."""

from __future__ import annotations

import torch

from mechscope.circuits import edge_scores
from mechscope.circuits.crossval import fold_evaluators
from mechscope.circuits.evaluate import Evaluator
from mechscope.graph import build_graph
from mechscope.patching import run_with_edge_mask, sender_activations
from mechscope.tasks.base import TaskBatch


def _batch(B=7, P=9, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randint(1, 512, s, generator=g)  # noqa: E731
    lengths = torch.randint(P - 3, P + 1, (B,), generator=g)
    lengths[0] = P
    clean = r(B, P)
    return TaskBatch(task="random", clean=clean, corrupt=r(B, P), positions=(lengths - 1)[:, None],
                     answers=r(B, 1), wrongs=r(B, 1), lengths=lengths)


@torch.no_grad()
def test_mean_ablation_does_not_depend_on_the_chunk_size(tiny_llama):
    m, g, b = tiny_llama, build_graph(tiny_llama), _batch()
    circuit = torch.rand(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(1)) < 0.3
    circuit &= g.allowed
    evs = [Evaluator(m, g, b, "mean", bs) for bs in (1, 3, 16)]
    faith = [float(ev.faithfulness(circuit[None])[0]) for ev in evs]
    corrupt = [float(ev.corrupt) for ev in evs]
    assert max(corrupt) - min(corrupt) < 1e-4, corrupt
    assert max(faith) - min(faith) < 1e-3, faith
    # A chunk of one example used to be its own mean: nothing ablated, corrupt == clean.
    assert abs(float(evs[0].clean - evs[0].corrupt)) > 1e-3

    # The same baseline from a mean computed here over every example's real positions
    acts = sender_activations(m, g, b.clean)  # [S, B, P, D]
    valid = (torch.arange(b.clean.shape[1])[None] < b.lengths[:, None]).float()  # [B, P]
    mean = (acts * valid[None, :, :, None]).sum(1, keepdim=True) / valid.sum(0)[None, None, :, None]
    full = run_with_edge_mask(m, g, b.clean, mean, g.full_mask())
    assert abs(float(b.per_example_metric(full).mean()) - corrupt[0]) < 1e-4


def test_mean_ablation_scores_do_not_depend_on_the_chunk_size(tiny_llama):
    m, g, b = tiny_llama, build_graph(tiny_llama), _batch(seed=2)
    for method in ("eap", "eap-ig-act"):
        a = edge_scores(m, g, b, method=method, steps=2, ablation="mean", batch_size=2, qk="linear")
        c = edge_scores(m, g, b, method=method, steps=2, ablation="mean", batch_size=16, qk="linear")
        assert a.abs().max() > 1e-4
        assert torch.allclose(a, c, atol=1e-5, rtol=1e-3), (method, (a - c).abs().max())


@torch.no_grad()
def test_folds_share_the_whole_batch_mean(tiny_llama):
    m, g, b = tiny_llama, build_graph(tiny_llama), _batch(B=8, seed=3)
    evs = fold_evaluators(m, g, b, 4, "mean", batch_size=16)  # folds of two pairs
    whole = Evaluator(m, g, b, "mean")
    assert all(torch.equal(ev.mean, evs[0].mean) for ev in evs)
    assert torch.allclose(evs[0].mean, whole.mean, atol=1e-6)
    joined = Evaluator.joined(b, evs)
    assert abs(float(joined.corrupt - whole.corrupt)) < 1e-4
