"""EAP-IG cost against its floor, in one process.

Floor: (m + 1) forward passes and m backward passes of the plain Hugging Face model (no
hooks, parameters frozen, gradient taken with respect to the input embeddings, logits at the
scored positions only), on the same batch. mechscope's EAP-IG does exactly that much model work plus its hooks and the final
score contraction, so the ratio is its overhead.

Query and key edges are scored through the attention softmax exactly by default
(``circuits.qk``); ``--qk linear`` times the plain-gradient variant, ``--qk both`` times the
floor, linear and exact in turns and prints what the exact q/k scoring costs.

    python bench/eap_ig.py [--model M] [--n 25] [--steps 5] [--repeats 5] [--qk exact|linear|both]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from mechscope.circuits.attribution import edge_scores
from mechscope.graph import build_graph
from mechscope.models import load_model
from mechscope.tasks import get_task


def floor(hf, batch, steps: int) -> None:
    """The floor unembeds each example at its scored positions only, as mechscope's passes do
    (``patching.logits_at``); its source run computes no logits at all."""
    emb, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    for p in hf.parameters():
        p.requires_grad_(False)
    rows = torch.arange(len(batch))[:, None]
    with torch.no_grad():
        hf.base_model(input_ids=batch.corrupt)  # the source run
    for _ in range(steps):
        x = emb(batch.clean).detach().requires_grad_(True)
        hidden = hf.base_model(inputs_embeds=x)[0]  # after the final norm
        metric = batch.metric_at(head(hidden[rows, batch.positions])).sum()
        torch.autograd.grad(metric, [x])


def plain_hf(name):
    """A separate, unhooked Hugging Face copy of the same weights (the bridge rewires its own)."""
    from mechscope.models.load import _load_hf, _resolve

    _, target, gguf, local = _resolve(name)
    hf, _ = _load_hf(target, torch.float32, gguf, local)
    return hf.eval()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--task", default="ioi")
    ap.add_argument("--n", type=int, default=25)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--qk", choices=("exact", "linear", "both"), default="exact")
    a = ap.parse_args()
    model = load_model(a.model, device="cpu")
    graph = build_graph(model)
    batch = get_task(a.task).build(model.tokenizer, n=a.n, seed=0)
    hf = plain_hf(a.model)
    # warm-up both
    floor(hf, batch.subset(slice(0, 2)), 1)
    edge_scores(model, graph, batch.subset(slice(0, 2)), "eap-ig", steps=1, batch_size=a.n)
    modes = ("linear", "exact") if a.qk == "both" else (a.qk,)
    fns = [lambda: floor(hf, batch, a.steps)] + [
        (lambda q=q: edge_scores(model, graph, batch, "eap-ig", steps=a.steps, batch_size=a.n, qk=q)) for q in modes]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(a.repeats):  # in turns, so drift in the machine's speed hits every side alike
        for t, fn in zip(times, fns):
            t.append(timed(fn))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model {model.summary.name}: {graph.n_edges:,} edges; task {a.task}, {len(batch)} pairs x {batch.n_pos} tokens, {a.steps} IG steps")
    t_floor = min(times[0])
    print(f"floor ({a.steps + 1} fwd + {a.steps} bwd, plain HF): {t_floor:.2f} s")
    for q, t in zip(modes, times[1:]):
        rounds = sorted(o / f for o, f in zip(t, times[0]))
        print(f"mechscope EAP-IG, q/k edges {q:6s}: {min(t):.2f} s; ratio {min(t) / t_floor:.2f}x of the best times "
              f"(target <= 1.3x); per round {', '.join(f'{r:.2f}' for r in rounds)} (median {rounds[len(rounds) // 2]:.2f}x)")
    if len(modes) == 2:
        print(f"exact q/k scoring costs {min(times[2]) - min(times[1]):.2f} s "
              f"({min(times[2]) / min(times[1]):.2f}x the linear run)")


if __name__ == "__main__":
    main()
