"""GPU check: the circuit methods give the CPU's answers on CUDA, and what they cost there.

No weights are needed: tiny GPT-2 / GQA Llama models and a SmolLM2-135M-shaped Llama are built
from configs with random weights (the real graph size, 70,651 edges; the timings do not depend
on the weights' values, the circuits found do).

1. Tiny models, CPU vs CUDA: patched forward passes, suffix runs, EAP / EAP-IG / EAP-IG on
   activations scores, ACDC circuits (must be identical).
2. SmolLM2-shaped model on CUDA: EAP-IG against its floor ((m+1) forward + m backward of the
   plain Hugging Face model), and ACDC's worst case for a fixed time budget: with tau = -1 no
   edge is removed, so no receiver is ever cut off and every edge costs an evaluation.

    python bench/device_check.py [--acdc-seconds 120]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu only for a dry run of this script


def tiny(kind: str, path: str) -> str:
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=128)
        model = transformers.GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    else:  # SmolLM2-135M's shape
        cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                       rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and kind != "smol":
                p.mul_(3.0)
    model.save_pretrained(path, safe_serialization=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["When Mary and John went to the store, John gave a drink to Mary."] * 20, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(path)
    return path


def random_batch(B: int, P: int, vocab: int, seed: int = 0):
    from mechscope.tasks.base import TaskBatch

    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randint(1, vocab, s, generator=g)  # noqa: E731
    return TaskBatch(task="random", clean=r(B, P), corrupt=r(B, P), positions=torch.full((B, 1), P - 1),
                     answers=r(B, 1), wrongs=r(B, 1), lengths=torch.full((B,), P))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def compare_tiny(kind: str) -> None:
    from mechscope.circuits import acdc, edge_scores
    from mechscope.graph import build_graph
    from mechscope.models import load_model
    from mechscope.patching import run_with_edge_mask, source_activations

    path = tiny(kind, tempfile.mkdtemp())
    cpu, gpu = load_model(path, device="cpu"), load_model(path, device=DEV)
    g = build_graph(cpu)
    b = random_batch(4, 8, 512)
    masks = (torch.rand(3, g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(0)) > 0.6).float()
    with torch.no_grad():
        out = {}
        for name, m in (("cpu", cpu), ("cuda", gpu)):
            src = source_activations(m, g, b.clean, b.corrupt, "patching")
            out[name] = run_with_edge_mask(m, g, b.clean, src, masks).cpu()
    print(f"[{kind}] patched logits, max |cpu - cuda|: {(out['cpu'] - out['cuda']).abs().max():.2e}")
    for method in ("eap", "eap-ig", "eap-ig-act"):
        a = edge_scores(cpu, g, b, method, steps=3)
        c = edge_scores(gpu, g, b, method, steps=3).cpu()
        print(f"[{kind}] {method} scores, max |cpu - cuda| {(a - c).abs().max():.2e} (max |score| {a.abs().max():.2e})")
    a, c = acdc(cpu, g, b, tau=0.02), acdc(gpu, g, b, tau=0.02)
    same = torch.equal(a.circuit, c.circuit.cpu())
    print(f"[{kind}] ACDC circuits identical: {same} ({int(a.circuit.sum())} edges kept of {g.n_edges})")


def smol_timings(acdc_seconds: float, n: int, steps: int) -> None:
    from mechscope.circuits.acdc import acdc
    from mechscope.circuits.attribution import edge_scores
    from mechscope.graph import build_graph
    from mechscope.models import load_model

    path = tiny("smol", tempfile.mkdtemp())
    m = load_model(path, device=DEV)
    g = build_graph(m)
    b = random_batch(n, 18, 49152).to(DEV)
    hf = m.bridge.original_model
    emb = hf.get_input_embeddings()

    def floor() -> None:
        with torch.no_grad():
            hf(input_ids=b.corrupt)
        for _ in range(steps):
            x = emb(b.clean).detach().requires_grad_(True)
            torch.autograd.grad(b.per_example_metric(hf(inputs_embeds=x).logits).sum(), [x])

    def ours() -> None:
        edge_scores(m, g, b, "eap-ig", steps=steps, batch_size=n)

    for fn in (floor, ours):
        fn()
    times = {}
    for name, fn in (("floor", floor), ("ours", ours)):
        best = float("inf")
        for _ in range(3):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        times[name] = best
    print(f"[smol-shaped, {g.n_edges:,} edges, {n} x 18 tokens] EAP-IG {steps} steps: {times['ours']:.3f} s; floor "
          f"{times['floor']:.3f} s ({steps + 1} fwd + {steps} bwd, plain HF); ratio {times['ours'] / times['floor']:.2f}x")
    sync()
    t = time.perf_counter()
    res = acdc(m, g, b, tau=-1.0, max_seconds=acdc_seconds)  # keeps every edge: all 70,651 are evaluated
    sync()
    dt = time.perf_counter() - t
    print(f"[smol-shaped] ACDC worst case (tau -1: no edge removed, every edge evaluated): {res.visited:,} of {g.n_edges:,} edges decided in {dt:.0f} s "
          f"(complete: {res.complete}); {res.n_forward:.0f} whole-model passes of forward work")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--acdc-seconds", type=float, default=120)
    ap.add_argument("--n", type=int, default=25)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--skip-tiny", action="store_true")
    a = ap.parse_args()
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if DEV == 'cuda' else 'cpu (dry run)'}")
    if not a.skip_tiny:
        for kind in ("gpt2", "llama"):
            compare_tiny(kind)
    smol_timings(a.acdc_seconds, a.n, a.steps)


if __name__ == "__main__":
    main()
