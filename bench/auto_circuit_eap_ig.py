"""EAP-IG edge scores: mechscope against auto-circuit, same architecture, same batch, one process.

auto-circuit (PyPI ``auto-circuit``) computes EAP-IG as ``mask_gradient_prune_scores`` with
``integrated_grad_samples``. Both tools here score every edge of a randomly initialised GPT-2
small (12 layers x 12 heads, d_model 768; weights do not matter for timing) on the same random
clean/corrupt tokens with the same number of IG steps, q/k/v split on both sides.

auto-circuit 1.0.1 imports ``HookedTransformer`` and ``HookedTransformerKeyValueCache`` from
transformer-lens; install it beside transformer-lens 3.9 (where ``HookedTransformer`` still
exists) and this script stubs the key-value cache class, which edge scoring never uses:

    pip install "transformer-lens==3.9.0" auto-circuit==1.0.1 && pip install -e .
    python bench/auto_circuit_eap_ig.py [--n 16] [--pos 16] [--steps 5]
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import types

import torch


def _stub_kv_cache() -> None:
    import transformer_lens as tl

    class HookedTransformerKeyValueCache:  # noqa: D401 - placeholder, never instantiated here
        """Placeholder: auto-circuit imports it; edge scoring never builds a cache."""

    mod = types.ModuleType("transformer_lens.past_key_value_caching")
    mod.HookedTransformerKeyValueCache = HookedTransformerKeyValueCache
    sys.modules.setdefault("transformer_lens.past_key_value_caching", mod)
    if not hasattr(tl, "HookedTransformerKeyValueCache"):
        tl.HookedTransformerKeyValueCache = HookedTransformerKeyValueCache


def mechscope_model(vocab: int):
    import transformers

    from mechscope.circuits.toy import build_tokenizer
    from mechscope.models import load_model

    d = tempfile.mkdtemp()
    cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=768, n_layer=12, n_head=12)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d, safe_serialization=True)
    build_tokenizer().save_pretrained(d)
    return load_model(d, device="cpu")


def auto_circuit_model(vocab: int):
    from auto_circuit.utils.graph_utils import patchable_model
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=12, d_model=768, n_ctx=128, d_head=64, n_heads=12,
                                  d_vocab=vocab, act_fn="gelu_new", normalization_type="LN", device="cpu")
    ht = HookedTransformer(cfg)
    ht.set_use_attn_result(True)
    ht.set_use_split_qkv_input(True)
    ht.set_use_hook_mlp_in(True)
    ht.eval()
    return patchable_model(ht, factorized=True, slice_output="last_seq", separate_qkv=True, device=torch.device("cpu"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--pos", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    _stub_kv_cache()
    from auto_circuit.data import PromptDataLoader, PromptDataset
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores

    from mechscope.circuits.attribution import edge_scores
    from mechscope.graph import build_graph
    from mechscope.tasks.base import TaskBatch

    vocab, g = 50257, torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (a.n, a.pos), generator=g)
    corrupt = torch.randint(0, vocab, (a.n, a.pos), generator=g)
    ans, wrong = torch.randint(0, vocab, (a.n, 1), generator=g), torch.randint(0, vocab, (a.n, 1), generator=g)

    ms = mechscope_model(vocab)
    graph = build_graph(ms)
    batch = TaskBatch(task="random", clean=clean, corrupt=corrupt, positions=torch.full((a.n, 1), a.pos - 1),
                      answers=ans, wrongs=wrong, lengths=torch.full((a.n,), a.pos))
    edge_scores(ms, graph, batch.subset(slice(0, 2)), "eap-ig", steps=1)  # warm-up
    t = time.perf_counter()
    edge_scores(ms, graph, batch, "eap-ig", steps=a.steps, batch_size=a.n)
    t_ms = time.perf_counter() - t

    ac = auto_circuit_model(vocab)
    ds = PromptDataset(clean, corrupt, [x for x in ans], [x for x in wrong])
    dl = PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=a.n, shuffle=False)
    t = time.perf_counter()
    scores = mask_gradient_prune_scores(ac, dl, None, grad_function="logit", answer_function="avg_diff",
                                        integrated_grad_samples=a.steps)
    t_ac = time.perf_counter() - t
    n_ac = sum(int(v.numel()) for v in scores.values())

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"random GPT-2 small, {a.n} pairs x {a.pos} tokens, {a.steps} IG steps")
    print(f"mechscope EAP-IG:    {t_ms:.2f} s for {graph.n_edges:,} edges")
    print(f"auto-circuit EAP-IG: {t_ac:.2f} s for {n_ac:,} edge scores")
    print(f"ratio: auto-circuit / mechscope = {t_ac / t_ms:.2f}x")


if __name__ == "__main__":
    main()
