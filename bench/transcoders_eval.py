"""`mechscope transcoders eval` speed: the fast path (each layer's spliced and zeroed runs start
at its block) against the straightforward one (``2 * n_layers + 3`` full forward passes per
batch), same process, same transcoder set and held-out contexts; prints both times, the ratio,
the largest difference between any two reported numbers, and the projected time of the default
evaluation (``EVAL_TOKENS`` held-out tokens) and of the old default (16,384 tokens).

    nice -n 19 .venv/bin/python bench/transcoders_eval.py /tmp/tc-default --contexts 2
"""

from __future__ import annotations

import argparse
import itertools
import math
import time

import torch


def _diff(a, b) -> float:
    if isinstance(a, dict):
        return max((_diff(a[k], b[k]) for k in a if k not in ("fast", "settings")), default=0.0)
    if isinstance(a, list):
        return max((_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, float) and not (math.isnan(a) or math.isnan(b)):
        return abs(a - b) / max(1.0, abs(b))
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("set_dir")
    ap.add_argument("--contexts", type=int, default=2, help="Held-out contexts of 128 tokens timed (one batch).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-slow", action="store_true", help="Time the fast path only.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from mechscope.activations import get_corpus, pack_contexts
    from mechscope.features.config import EVAL_TOKENS
    from mechscope.features.evaluate import evaluate_transcoders
    from mechscope.features.transcoder_set import load_transcoders
    from mechscope.models import load_model

    m = load_model(None)
    tset = load_transcoders(args.set_dir, "cpu", m)
    toks = torch.tensor(list(itertools.islice(pack_contexts(m.tokenizer, get_corpus(None, split="heldout"), 128), args.contexts)))
    print(f"{len(tset.layers)} transcoders of {m.summary.name}; {args.contexts} held-out contexts of 128 tokens in one batch, "
          f"{torch.get_num_threads()} threads")
    evaluate_transcoders(m, tset, toks[:1, :16])  # warm-up
    t0 = time.perf_counter()
    fast = evaluate_transcoders(m, tset, toks, batch_size=args.contexts)
    t_fast = time.perf_counter() - t0
    print(f"fast path: {t_fast:.1f} s ({fast['settings']['fast']=})", flush=True)
    per_ctx = t_fast / args.contexts
    print(f"  projected: default {EVAL_TOKENS:,} tokens ({EVAL_TOKENS // 128} contexts) {per_ctx * EVAL_TOKENS / 128 / 60:.1f} min; "
          f"16,384 tokens {per_ctx * 128 / 60:.1f} min", flush=True)
    if args.skip_slow:
        return
    t0 = time.perf_counter()
    slow = evaluate_transcoders(m, tset, toks, batch_size=args.contexts, fast=False)
    t_slow = time.perf_counter() - t0
    print(f"full passes: {t_slow:.1f} s; ratio {t_slow / t_fast:.2f}x; largest relative difference of any number {_diff(fast, slow):.2e}")
    print(f"  projected old default (16,384 tokens, full passes): {t_slow / args.contexts * 128 / 60:.1f} min")


if __name__ == "__main__":
    main()
