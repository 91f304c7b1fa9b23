"""Attribution-graph cost against its floor, in one process.

Floor: what any implementation of the graph must do on this model: one forward pass of B
copies of the prompt through the plain Hugging Face model (no hooks, parameters frozen,
gradient kept) and as many backward passes from it as the graph needed (one per batch of B
targets), each from the same depth as mechscope's (the residual stream entering the highest
layer a target of that batch sits at, or the last hidden state for logits), with B different
injected gradients. mechscope
adds the freezing hooks, the transcoders' encoders and the edge read-out (dot products of the
gradients with the sources' vectors), and the influence ordering of the features it visits.

The transcoders are random (``random_transcoders``) unless ``--transcoders DIR`` is given:
the cost does not depend on what the features mean, only on how many are active.

    python bench/attribute.py [--model M] [--transcoders DIR] [--tokens 16] [--k 32]
                              [--expansion 8] [--max-features 4096] [--batch 32]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from mechscope.features.attribute import attribute
from mechscope.features.transcoder_set import load_transcoders, random_transcoders
from mechscope.models import load_model


def floor(hf, tokens: torch.Tensor, B: int, depths: list[int]) -> None:
    for p in hf.parameters():
        p.requires_grad_(False)
    emb = hf.get_input_embeddings()
    x = emb(tokens[None].expand(B, -1)).detach().requires_grad_(True)
    hs = hf.model(inputs_embeds=x, output_hidden_states=True).hidden_states  # L + 1 of [B, P, d]
    for d in depths:
        h = hs[min(d, len(hs) - 1)]
        torch.autograd.grad([h], [x], [torch.randn_like(h)], retain_graph=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--transcoders", default=None)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--max-features", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a = ap.parse_args()
    torch.manual_seed(0)
    m = load_model(a.model, device=a.device)
    cuda = m.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    tset = (load_transcoders(a.transcoders, m.device, m) if a.transcoders else
            random_transcoders(m, d_sae=a.expansion * m.summary.d_model, k=a.k, seed=0))
    text = ("The capital city of France is Paris, and the capital city of Italy is Rome. When Mary and John "
            "went to the store, John gave a drink to Mary. The war lasted from the year 1732 to the year 1789. ") * 4
    ids = m.to_tokens(text)
    bos = m.tokenizer.bos_token_id
    ids = ([bos] if bos is not None else []) + ids
    ids = torch.tensor(ids[: a.tokens])
    if cuda:  # kernels compiled and caches allocated outside the timed run
        attribute(m, tset, ids[:8], max_features=64, batch_size=a.batch)
        torch.cuda.reset_peak_memory_stats()
    sync()
    t0 = time.perf_counter()
    g = attribute(m, tset, ids, max_features=a.max_features, batch_size=a.batch)
    sync()
    t_ms = time.perf_counter() - t0
    gpu_peak = torch.cuda.max_memory_allocated() / 1024**3 if cuda else 0.0
    passes, depths = g.settings["backward_passes"], g.settings["backward_depths"]
    from eap_ig import plain_hf  # the EAP-IG bench's unhooked copy of the same weights (bench/ is on sys.path)

    hf = plain_hf(a.model).to(m.device)
    ids_dev = ids.to(m.device)
    if cuda:
        floor(hf, ids_dev[:8], a.batch, depths[:1])
    sync()
    t1 = time.perf_counter()
    floor(hf, ids_dev, a.batch, depths)
    sync()
    t_floor = time.perf_counter() - t1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model {m.summary.name}, {len(ids)} tokens, {tset.n_layers} transcoders of {tset.d_sae[0]} features; "
          f"{g.n_active:,} active features, {g.n_features:,} with rows, {passes} backward passes of batch {a.batch}")
    print(f"mechscope attribute: {t_ms:.1f} s   floor: {t_floor:.1f} s   ratio {t_ms / max(t_floor, 1e-9):.2f}x   "
          f"peak RSS {peak:.1f} GiB" + (f", peak GPU memory {gpu_peak:.2f} GiB (model, transcoders and graph; {torch.cuda.get_device_name()})" if cuda else ""))


if __name__ == "__main__":
    main()
