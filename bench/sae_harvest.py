"""Activation harvesting speed against a plain forward pass to the same layer, in one process.

Baseline: a separate, unhooked Hugging Face copy of the model with its decoder layers cut to
the first L + 1 (exactly the work needed for a hook in block L), run on the same packed
contexts, tokenised beforehand. Measured against it: ``ActivationStore.next_batch`` (which
also tokenises, packs, stops the bridge after block L, copies rows into its buffer and
shuffles), the bridge stopped by the capturing hook alone (pre-tokenised, no buffer), and
the bridge's full forward (all layers, split-input modes on) to show what the early stop saves.
Each measurement is the median of ``--repeats`` interleaved rounds (the machine is shared).

    python bench/sae_harvest.py [--model M] [--layer 6] [--contexts 32] [--context-len 128]
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch

from mechscope.activations import ActivationStore, StoreConfig, get_corpus, pack_contexts
from mechscope.models import load_model


def plain_hf(name):
    """A separate, unhooked Hugging Face copy of the same weights (the bridge rewires its own)."""
    from mechscope.models.load import _load_hf, _resolve

    _, target, gguf, local = _resolve(name)
    hf, _ = _load_hf(target, torch.float32, gguf, local)
    return hf.eval()


def truncate(hf, n_layers: int):
    """The base model (no LM head) with only its first ``n_layers`` decoder layers."""
    base = hf.base_model
    for attr in ("layers", "h"):
        if hasattr(base, attr):
            setattr(base, attr, torch.nn.ModuleList(list(getattr(base, attr))[:n_layers]))
            return base
    raise SystemExit("cannot find the decoder layers of this architecture")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--hook", default="blocks.{L}.hook_resid_post")
    ap.add_argument("--contexts", type=int, default=32, help="contexts per measured round")
    ap.add_argument("--context-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(a.model, device="cpu")
    hook = a.hook.format(L=a.layer)
    corpus = get_corpus(a.corpus)
    n_ctx, P, B = a.contexts, a.context_len, a.batch_size
    rows_per_round = n_ctx * (P - 1)
    cfg = StoreConfig(hooks=[hook], context_len=P, batch_size=B, buffer_tokens=2 * rows_per_round, shuffle=True)
    store = ActivationStore(model, corpus, cfg)
    contexts = pack_contexts(model.tokenizer, get_corpus(a.corpus, seed=1), P)
    hf = truncate(plain_hf(a.model), a.layer + 1)

    def baseline():
        toks = torch.tensor([next(contexts) for _ in range(n_ctx)])  # tokenised outside the clock below
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, n_ctx, B):
                hf(input_ids=toks[i : i + B], use_cache=False)
        return time.perf_counter() - t

    def ours():
        t = time.perf_counter()
        store.next_batch(rows_per_round)
        return time.perf_counter() - t

    harvester = store.harvester

    def stop_only():
        toks = torch.tensor([next(contexts) for _ in range(n_ctx)])
        t = time.perf_counter()
        for i in range(0, n_ctx, B):
            harvester.run(toks[i : i + B])
        return time.perf_counter() - t

    def full_bridge():
        toks = torch.tensor([next(contexts) for _ in range(n_ctx)])
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, n_ctx, B):
                model.bridge(toks[i : i + B])
        return time.perf_counter() - t

    baseline(), ours()  # warm-up (the store's first call also fills its buffer)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times: dict[str, list[float]] = {"baseline": [], "store": [], "stop": [], "full": []}
    for _ in range(a.repeats):
        times["baseline"].append(baseline())
        times["store"].append(ours())
        times["stop"].append(stop_only())
        times["full"].append(full_bridge())
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tok = n_ctx * P
    tps = {k: tok / statistics.median(v) for k, v in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print(f"model {model.summary.name} ({model.summary.n_layers} layers), hook {hook}; "
          f"{n_ctx} contexts x {P} tokens per round, batch {B}, median of {a.repeats}")
    print(f"plain HF forward, layers 0..{a.layer} only:     {tps['baseline']:8.0f} tokens/s")
    print(f"ActivationStore.next_batch (tokenise+stop+buffer): {tps['store']:8.0f} tokens/s")
    print(f"bridge stopped after block {a.layer} (no tokenising/buffer): {tps['stop']:8.0f} tokens/s")
    print(f"bridge full forward (all {model.summary.n_layers} layers, no store):  {tps['full']:8.0f} tokens/s")
    print(f"peak RSS after warm-up {rss0:.0f} MiB; after all rounds ({store.tokens_seen:,} tokens through the store) {rss1:.0f} MiB")
    print(f"ratio store / plain forward to layer {a.layer}: {tps['store'] / tps['baseline']:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
