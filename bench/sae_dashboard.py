"""Feature-dashboard pass against its floor, in one process: the forward to the SAE's hook
plus the SAE encode on the same contexts (what any dashboard must compute), then
``feature_dashboards`` for 100 features and for every feature. Each measurement is the median
of ``--repeats`` interleaved rounds (the machine is shared).

    python bench/sae_dashboard.py [--sae DIR] [--layer 15] [--tokens 4096] [--repeats 3]

Without ``--sae`` a random TopK SAE (d_sae = 8 x d_model, k = 32) at
``blocks.LAYER.hook_resid_post`` of the embedded model is used: the statistics' cost depends
on the density of the codes, not on what the features mean.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mechscope.models import load_model
from mechscope.sae import SAE, SAEConfig, load_sae
from mechscope.sae.dashboard import DashboardConfig, _harvester, acts_at_hook, corpus_contexts, feature_dashboards


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sae", default=None)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    m = load_model(device="cpu")
    if args.sae:
        sae = load_sae(args.sae)
    else:
        d = m.summary.d_model
        sae = SAE(SAEConfig(d_in=d, d_sae=8 * d, architecture="topk", k=32,
                            hook_name=f"blocks.{args.layer}.hook_resid_post", model_name="smollm2"))
    from mechscope.activations import get_corpus

    tokens = corpus_contexts(m.tokenizer, get_corpus(seed=0), args.tokens, 64)
    hook = sae.cfg.hook_name
    h = _harvester(m, hook, 16, 64)

    def floor() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(tokens), 16):
                sae.encode(acts_at_hook(m, hook, tokens[i:i + 16], h))
        return time.perf_counter() - t

    def dash(n: int) -> float:
        cfg = DashboardConfig(features=list(range(min(n, sae.cfg.d_sae))))
        return feature_dashboards(m, sae, cfg, tokens=tokens).seconds

    runs: dict[str, list[float]] = {"floor": [], "100": [], "all": []}
    floor()  # warm-up
    for _ in range(args.repeats):
        runs["floor"].append(floor())
        runs["100"].append(dash(100))
        runs["all"].append(dash(sae.cfg.d_sae))
    med = {k: statistics.median(v) for k, v in runs.items()}
    n = tokens.numel()
    print(f"{m.summary.name}, {hook}, d_sae={sae.cfg.d_sae}, {n} tokens, {args.threads} thread(s), median of {args.repeats}")
    print(f"forward to hook + encode : {med['floor']:7.2f} s  ({n / med['floor']:.0f} tokens/s)")
    print(f"dashboards, 100 features : {med['100']:7.2f} s  {med['100'] / med['floor']:.2f}x")
    print(f"dashboards, all {sae.cfg.d_sae} : {med['all']:7.2f} s  {med['all'] / med['floor']:.2f}x")


if __name__ == "__main__":
    main()
