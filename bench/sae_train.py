"""SAE training speed and quality: mechscope's trainer against SAELens's, same process, same data.

Both train a TopK SAE (same k, width, learning rate, warm-up and decay, batch size, input
normalisation to a fixed average norm) on the SAME cached activations in the SAME order (rows
read from shards written by `mechscope sae harvest`). Reported: training tokens/s of each and
the ratio, and FVU / L0 of both finished SAEs on held-out rows (the last 10% of the shards,
never trained on), computed by one function for both (SAELens's SAE is saved with its own
``save_model`` and read with mechscope's loader, which the interop test shows reconstructs
identically).

SAELens needs transformer-lens < 4, so run this with the interop environment:

    .venv-saelens/bin/python bench/sae_train.py --shards DIR [--tokens 200000] [--threads 2]

where DIR comes from `mechscope sae harvest --hook blocks.15.hook_resid_post --out DIR ...`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def held_out_quality(sae, x: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        f = sae.encode(x)
        err = (sae.decode(f) - x).pow(2).sum(-1).mean()
        var = (x - x.mean(0)).pow(2).sum(-1).mean()
    return {"fvu": float(err / var), "l0": float((f > 0).sum(-1).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", required=True)
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    from mechscope.sae import load_sae
    from mechscope.sae.sources import TensorSource
    from mechscope.sae.train import TrainConfig, Trainer

    man = json.loads((Path(args.shards) / "manifest.json").read_text())
    hook = man["hooks"][0]
    rows = [load_file(str(Path(args.shards) / s["file"]))[hook].float() for s in man["shards"]]
    data = torch.cat(rows)
    n_hold = max(4096, data.shape[0] // 10)
    train, held = data[:-n_hold], data[-n_hold:]
    d_in = data.shape[1]
    d_sae = args.expansion * d_in
    steps = args.tokens // args.batch
    print(f"{data.shape[0]:,} rows of {hook} (d={d_in}); training on {args.tokens:,} tokens ({steps} steps of {args.batch}), "
          f"held out {held.shape[0]:,}; TopK k={args.k}, d_sae={d_sae}, {args.threads} threads")

    warm, decay = max(1, int(0.02 * steps)), int(0.2 * steps)
    # --- mechscope
    cfg = TrainConfig(architecture="topk", d_sae=d_sae, k=args.k, tokens=args.tokens, batch_tokens=args.batch, lr=args.lr,
                      lr_warmup=warm / steps, lr_decay=decay / steps, checkpoint_every=10**12, log_every=10**9)
    out_m = tempfile.mkdtemp()
    tr = Trainer(TensorSource(train, seed=0), cfg, out_m, d_in=d_in, hook_name=hook, model_name=man["model"])
    t0 = time.perf_counter()
    tr.run()
    t_m = time.perf_counter() - t0

    # --- SAELens, same batches in the same order
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    src = TensorSource(train, seed=0)

    def provider():
        while True:
            yield src.next_batch(args.batch)

    sl_cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=args.k, normalize_activations="expected_average_only_in",
                                   rescale_acts_by_decoder_norm=False)
    sae_l = TopKTrainingSAE(sl_cfg)
    tcfg = SAETrainerConfig(total_training_samples=args.tokens, train_batch_size_samples=args.batch, lr=args.lr,
                            lr_warm_up_steps=warm, lr_decay_steps=decay, lr_end=0.0, n_batches_for_norm_estimate=8,
                            dead_feature_window=1000, feature_sampling_window=2000)
    trainer = SAETrainer(tcfg, sae_l, provider())
    t0 = time.perf_counter()
    trained = trainer.fit()
    t_l = time.perf_counter() - t0
    out_l = tempfile.mkdtemp()
    trained.save_inference_model(out_l) if hasattr(trained, "save_inference_model") else trained.save_model(out_l)
    sae_l_inf = load_sae(out_l)

    q_m, q_l = held_out_quality(load_sae(out_m), held), held_out_quality(sae_l_inf, held)
    with torch.no_grad():  # SAELens's own forward on the same rows, as a check of the conversion
        own = (trained(held) - held).pow(2).sum(-1).mean() / (held - held.mean(0)).pow(2).sum(-1).mean()
    print(f"SAELens FVU by its own forward: {float(own):.3f}")
    tps_m, tps_l = args.tokens / t_m, args.tokens / t_l
    print(f"{'':12}{'tokens/s':>10}{'seconds':>9}{'FVU':>8}{'L0':>7}")
    print(f"{'mechscope':12}{tps_m:>10,.0f}{t_m:>9.1f}{q_m['fvu']:>8.3f}{q_m['l0']:>7.1f}")
    print(f"{'SAELens':12}{tps_l:>10,.0f}{t_l:>9.1f}{q_l['fvu']:>8.3f}{q_l['l0']:>7.1f}")
    print(f"mechscope / SAELens training speed: {tps_m / tps_l:.2f}x")


if __name__ == "__main__":
    main()
