"""mechscope's attribution graph against circuit-tracer's, same model, transcoders, prompt and
targets, on this machine: time of each, and how far their graphs differ.

circuit-tracer 0.5.0 runs from its own environment (``.venv-ct``, made by ``./setup.sh
--test``) in a subprocess (``tests/helpers/circuit_tracer_side.py``): its nnsight backend
loads the model from a folder this script saves (the embedded GGUF dequantised to
safetensors), and its own loader reads the transcoder folder that ``save_transcoders(...,
model)`` writes. The transcoders are random JumpReLU ones (circuit-tracer 0.5.0 reads only
ReLU and JumpReLU), each layer's threshold set so that about ``--k`` features fire per
position on this prompt: the cost depends on how many features are active, not on what they
mean. Times exclude loading; each side runs with the same thread count.

With ``--max-features`` below the number of active features, each tool picks the features
that get rows by its own influence estimate, so the graphs are compared on the nodes both
kept: every feature row and logit row over the sources both kept (feature, token columns).

    python bench/circuit_tracer.py [--tokens 16] [--k 32] [--expansion 8] [--max-features 512] [--batch 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mechscope.features.attribute import attribute
from mechscope.features.transcoder_set import random_transcoders, save_transcoders
from mechscope.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--max-features", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ct-python", default=str(ROOT / ".venv-ct" / "bin" / "python"))
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    m = load_model(None, device="cpu")
    text = ("The capital city of France is Paris, and the capital city of Italy is Rome. When Mary and John "
            "went to the store, John gave a drink to Mary. ") * 4
    ids = torch.tensor(([m.tokenizer.bos_token_id] + m.to_tokens(text))[: a.tokens])
    tset = random_transcoders(m, d_sae=a.expansion * m.summary.d_model, architecture="jumprelu", k=None, seed=0)
    from mechscope.features.replacement import capture

    with torch.no_grad():  # thresholds: about k features per position fire on this prompt
        for tc in tset.layers:
            tc.threshold.zero_()
        run = capture(m, tset, ids)
        for layer, tc in enumerate(tset.layers):
            pre = run.x_in[layer, 1:] @ tc.W_enc + tc.b_enc
            tc.threshold.fill_(float(pre.flatten().kthvalue(pre.numel() - a.k * pre.shape[0]).values))
    work = Path(tempfile.mkdtemp(prefix="ct-bench-"))
    save_transcoders(tset, work / "tc", m)
    sys.path.insert(0, str(ROOT / "bench"))
    import transformers
    from eap_ig import plain_hf

    src = plain_hf(None)  # dequantised weights; a GGUF-loaded model refuses save_pretrained, so copy them out
    cfg = src.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    hf = transformers.AutoModelForCausalLM.from_config(cfg)
    hf.load_state_dict(src.state_dict())
    hf.save_pretrained(work / "model")
    del src
    m.tokenizer.save_pretrained(work / "model")  # the side script adapts both files to transformers 4.57
    del hf

    t0 = time.perf_counter()
    ours = attribute(m, tset, ids, max_features=a.max_features, batch_size=a.batch)
    t_ours = time.perf_counter() - t0
    save_file({"tokens": ids, "logit_tokens": ours.logit_tokens}, str(work / "inputs.safetensors"))
    proc = subprocess.run([a.ct_python, str(ROOT / "tests" / "helpers" / "circuit_tracer_side.py"), str(work / "tc"),
                           str(work / "model"), str(work / "inputs.safetensors"), str(work / "ct.safetensors"),
                           str(a.batch), str(a.max_features), str(a.threads)], capture_output=True, text=True)
    if proc.returncode:
        shutil.rmtree(work, ignore_errors=True)
        sys.exit(f"circuit-tracer failed:\n{proc.stderr[-3000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    theirs = load_file(str(work / "ct.safetensors"))
    shutil.rmtree(work, ignore_errors=True)  # the saved model is about 0.5 GB

    # compare on the nodes both kept
    from mechscope.features.prune import scores

    tf = theirs["active_features"][theirs["selected_features"]]
    key = lambda f: (int(f[0]), int(f[1]), int(f[2]))  # noqa: E731
    their_idx = {key(f): i for i, f in enumerate(tf)}
    common = [(i, their_idx[key(f)]) for i, f in enumerate(ours.features) if key(f) in their_idx]
    oi = torch.tensor([c[0] for c in common], dtype=torch.long)
    ti = torch.tensor([c[1] for c in common], dtype=torch.long)
    F_o, F_t, K = ours.n_features, tf.shape[0], ours.logit_tokens.numel()
    L, P = ours.n_layers, ids.numel()
    tok_o = torch.arange(F_o + L * P, F_o + L * P + P)
    tok_t = torch.arange(F_t + L * P, F_t + L * P + P)
    rows_o = torch.cat([oi, torch.arange(ours.adjacency.shape[0] - K, ours.adjacency.shape[0])])
    rows_t = torch.cat([ti, torch.arange(theirs["adjacency"].shape[0] - K, theirs["adjacency"].shape[0])])
    A = ours.adjacency[rows_o][:, torch.cat([oi, tok_o])]
    B = theirs["adjacency"][rows_t][:, torch.cat([ti, tok_t])]
    diff = float((A - B).abs().max()) / max(float(B.abs().max()), 1e-12)
    their_act = theirs["activation_values"][theirs["selected_features"][ti]]  # its values cover every active feature
    act = float(((ours.activations[oi] - their_act).abs() / their_act.abs()).max())
    s = scores(ours)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model {m.summary.name}, {P} tokens, {L} JumpReLU transcoders of {tset.d_sae[0]} features; "
          f"{ours.n_active:,} active features, rows for {F_o:,} (mechscope) / {F_t:,} (circuit-tracer), {K} logit targets")
    print(f"mechscope attribute: {t_ours:.1f} s   circuit-tracer attribute: {info['attribute_s']:.1f} s   "
          f"ratio {t_ours / info['attribute_s']:.2f}x (circuit-tracer load {info['load_s']:.1f} s, not counted)")
    print(f"features both kept: {len(common):,} of {F_o:,}; on those rows and columns (and logits, tokens): "
          f"max |difference| {diff:.2e} of the largest edge; activations {act:.1e} (relative)")
    print("(scores differ where the tools kept different features: mechscope folds a dropped feature's edges into its error node)")
    print(f"scores: mechscope replacement {s['replacement']:.4f} completeness {s['completeness']:.4f}; "
          f"circuit-tracer {info['replacement']:.4f} / {info['completeness']:.4f}")


if __name__ == "__main__":
    main()
