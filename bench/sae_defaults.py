"""Does mechscope's trainer, with its defaults, do as well as a plain TopK loop at a small budget?

Harvests the embedded model's activations once (train split for training, held-out split for
scoring; cached under ``--cache`` so a rerun skips the model), then trains in this one process,
on the same rows:

- ``reference``: a plain TopK loop written here (Adam lr 4e-4, batch 2048, constant learning
  rate, inputs and targets scaled to an average norm of sqrt(d), decoder rows renormalised to
  unit norm after each step, b_dec started at the targets' mean, W_enc = W_dec^T, no
  auxiliary loss);
- ``mechscope``: ``mechscope.sae.train.Trainer`` with the defaults a user gets
  (``TrainConfig`` for an SAE as ``mechscope sae train`` makes it; ``TranscoderTrainConfig``'s
  per-layer ``TrainConfig`` for a transcoder as ``mechscope transcoders train`` makes it),
  changed only by ``--set key=value`` (to try other settings, or the old defaults).

and prints, for each, held-out FVU (summed squared error over summed per-dimension variance,
on raw activations), L0, dead fraction, the training seconds and, with ``--ce-contexts N``, CE
loss recovered when its output is spliced into the model on N held-out contexts (zero
ablation as the baseline, ``mechscope.sae.evaluate.evaluate_sae``).

    nice -n 19 .venv/bin/python bench/sae_defaults.py --hook blocks.10.hook_resid_post --tokens 300000
    nice -n 19 .venv/bin/python bench/sae_defaults.py --transcoder-layers 2,10,20,28 --tokens 300000
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


# --------------------------------------------------------------------------- data
def harvest(model, hooks: list[str], split: str, n_tokens: int, context_len: int, cache: Path) -> dict[str, torch.Tensor]:
    """Rows {hook: [n, d]} (position 0 of each context dropped) and ``tokens`` [n] of the first
    ``n_tokens`` rows of ``split`` (``SINK_TOKEN`` where the harvester marks an attention sink
    with the transcoder sets' default ``sink_ratio``); read from ``cache`` when it holds them."""
    from mechscope.activations import StoreConfig, get_corpus, pack_contexts
    from mechscope.activations.store import Harvester
    from mechscope.features.config import SINK_RATIO

    key = f"{split}_{context_len}_sinks{SINK_RATIO:g}_" + "_".join(sorted(h.replace(".", "-") for h in hooks))
    path = cache / f"{hashlib.sha1(key.encode()).hexdigest()[:12]}_{split}.safetensors"
    meta = cache / (path.stem + ".json")
    if path.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        if info["key"] == key and info["rows"] >= n_tokens:  # a larger harvest serves a smaller run
            return {h: t[:n_tokens] for h, t in load_file(str(path)).items()}
    rows_per = context_len - 1
    n_ctx = -(-n_tokens // rows_per)
    ctx = list(itertools.islice(pack_contexts(model.tokenizer, get_corpus(None, split=split), context_len), n_ctx))
    hv = Harvester(model, StoreConfig(hooks=hooks, context_len=context_len, with_tokens=True, sink_ratio=SINK_RATIO))
    out: dict[str, list[torch.Tensor]] = {h: [] for h in [*hooks, "tokens"]}
    t0 = time.perf_counter()
    for i in range(0, len(ctx), 8):
        r = hv.run(torch.tensor(ctx[i : i + 8]))
        for h in out:
            out[h].append(r[h])
        if i % 400 == 0:
            print(f"  harvest {split}: {i}/{len(ctx)} contexts, {time.perf_counter() - t0:.0f} s", flush=True)
    res = {h: torch.cat(v)[:n_tokens].contiguous() for h, v in out.items()}
    cache.mkdir(parents=True, exist_ok=True)
    save_file(res, str(path))
    meta.write_text(json.dumps({"key": key, "rows": n_tokens}))
    return res


# --------------------------------------------------------------------------- the plain loop
def reference_topk(x: torch.Tensor, y: torch.Tensor, d_sae: int, k: int, tokens: int, *, transcoder: bool,
                   batch: int = 2048, lr: float = 4e-4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A plain TopK SAE/transcoder loop; returns raw-unit weights {W_enc, b_enc, W_dec, b_dec}."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = x.shape[1], y.shape[1]
    sx = math.sqrt(d_in) / float(x[:20_000].norm(dim=1).mean())
    sy = math.sqrt(d_out) / float(y[:20_000].norm(dim=1).mean()) if transcoder else sx
    w_dec = torch.randn(d_sae, d_out, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    W_dec = torch.nn.Parameter(w_dec)
    W_enc = torch.nn.Parameter(w_dec.T.clone() if d_in == d_out else torch.randn(d_in, d_sae, generator=g) / d_in**0.5)
    b_enc = torch.nn.Parameter(torch.zeros(d_sae))
    b_dec = torch.nn.Parameter((y[:20_000] * sy).mean(0))
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=lr)
    perm = torch.randperm(x.shape[0], generator=g)
    for step in range(tokens // batch):
        i = perm[(torch.arange(batch) + step * batch) % x.shape[0]]
        xb, yb = x[i] * sx, y[i] * sy
        pre = (xb if transcoder else xb - b_dec) @ W_enc + b_enc  # [batch, d_sae]
        vals, idx = pre.topk(k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        loss = (f @ W_dec + b_dec - yb).pow(2).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=1, keepdim=True)
    with torch.no_grad():  # fold the scales: the weights read raw x and predict raw y
        return {"W_enc": W_enc * sx, "b_enc": b_enc.detach().clone(), "W_dec": W_dec / sy, "b_dec": b_dec / sy}


# --------------------------------------------------------------------------- scoring
@torch.no_grad()
def held_out(sae, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    f = sae.encode(x)
    err = (sae.decode(f, x) - y).pow(2).sum(-1).mean()
    var = (y - y.mean(0)).pow(2).sum(-1).mean()
    return {"fvu": float(err / var), "l0": float((f > 0).sum(-1).float().mean()), "dead": float(((f > 0).sum(0) == 0).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hook", default=None, help="SAE on this hook (e.g. blocks.10.hook_resid_post).")
    ap.add_argument("--transcoder-layers", default=None, help="Transcoders (ln2.hook_normalized -> hook_mlp_out) of these layers, e.g. 2,10.")
    ap.add_argument("--tokens", type=int, default=300_000)
    ap.add_argument("--heldout", type=int, default=16_384)
    ap.add_argument("--ce-contexts", type=int, default=0, help="Held-out contexts for CE loss recovered (0: skip).")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mechscope-sae-defaults")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides for mechscope's run, key=value.")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--harvest-hooks", default=None, help="Harvest these hooks too (comma-separated), so later runs reuse the cache.")
    ap.add_argument("--harvest-only", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    ap.add_argument("--include-special", action="store_true",
                    help="Transcoders: keep special tokens' rows (document separators, BOS) and attention sinks' rows in training "
                         "and held-out FVU; by default both leave them out, as mechscope's transcoder sets do (exclude_special, "
                         "sink_ratio). SAE jobs keep "
                         "them (as `mechscope sae train` does), and --ce-contexts splices every position (evaluate_sae).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from dataclasses import replace

    from mechscope.features.config import TranscoderTrainConfig
    from mechscope.features.train import layer_hooks
    from mechscope.models import load_model
    from mechscope.sae.config import TrainConfig
    from mechscope.sae.model import SAE, SAEConfig
    from mechscope.sae.sources import TensorSource
    from mechscope.sae.train import Trainer

    m = load_model(None)
    jobs = [(args.hook, None, None)] if args.hook else []
    if args.transcoder_layers:
        jobs += [(*layer_hooks(int(s)), int(s)) for s in args.transcoder_layers.split(",")]
    if not jobs:
        raise SystemExit("give --hook and/or --transcoder-layers")
    hooks = list(dict.fromkeys(h for j in jobs for h in j[:2] if h))
    if args.harvest_hooks:
        hooks = list(dict.fromkeys(hooks + args.harvest_hooks.split(",")))
    train = harvest(m, hooks, "train", args.tokens, 128, args.cache)
    held = harvest(m, hooks, "heldout", args.heldout, 128, args.cache)
    if args.harvest_only:
        return
    keep_rows = {"train": None, "held": None}  # transcoders: special tokens' and sinks' rows left out, as mechscope's sets do
    if not args.include_special and args.transcoder_layers:
        from mechscope.activations import special_token_ids

        special = torch.tensor(special_token_ids(m.tokenizer))
        for name, rows in (("train", train), ("held", held)):
            tok = rows["tokens"].long()
            keep_rows[name] = ~torch.isin(tok, special) & (tok >= 0)
            print(f"  transcoders leave out {int(torch.isin(tok, special).sum()):,} special-token rows (not sinks) and "
                  f"{int((tok < 0).sum()):,} sink rows of {tok.numel():,} ({name}; sinks over the blocks up to the deepest "
                  "harvested hook, as a set of those layers would)", flush=True)
    overrides = {}
    for kv in args.set:
        key, _, val = kv.partition("=")
        cur = getattr(TrainConfig, key)
        if val == "None":
            overrides[key] = None
        elif isinstance(cur, bool):
            overrides[key] = val.lower() in ("1", "true", "yes")
        elif cur is not None:
            overrides[key] = type(cur)(val)
        else:
            overrides[key] = float(val) if "." in val or "e" in val else int(val)

    ce_ctx = None
    if args.ce_contexts:
        from mechscope.activations import get_corpus, pack_contexts

        ce_ctx = torch.tensor(list(itertools.islice(pack_contexts(m.tokenizer, get_corpus(None, split="heldout"), 128), args.ce_contexts)))
    results = []
    for hin, hout, layer in jobs:
        x, xh = train[hin], held[hin]
        y, yh = (train[hout], held[hout]) if hout else (x, xh)
        if hout and keep_rows["train"] is not None:
            x, y, xh, yh = x[keep_rows["train"]], y[keep_rows["train"]], xh[keep_rows["held"]], yh[keep_rows["held"]]
        d = x.shape[1]
        if layer is None:
            cfg = TrainConfig(architecture="topk", tokens=args.tokens)
        else:
            cfg = TranscoderTrainConfig(tokens=args.tokens, layers=[layer]).train_config(layer)
        cfg = replace(cfg, **overrides, checkpoint_every=10**12)
        d_sae = cfg.d_sae or cfg.expansion * d
        name = f"{hin}" + (f" -> {hout}" if hout else "")
        print(f"\n{name}: {args.tokens:,} training rows drawn from {x.shape[0]:,} harvested, {xh.shape[0]:,} held-out rows; TopK k={cfg.k}, d_sae={d_sae}", flush=True)
        row = {"hook": hin, "hook_out": hout, "tokens": args.tokens, "k": cfg.k, "d_sae": d_sae}
        sae_cfg = SAEConfig(d_in=d, d_sae=d_sae, architecture="topk", k=cfg.k, hook_name=hin, d_out=d if hout else None,
                            hook_name_out=hout, model_name=m.summary.name)
        sides = []
        if not args.skip_reference:
            t0 = time.perf_counter()
            w = reference_topk(x, y, d_sae, cfg.k, args.tokens, transcoder=hout is not None)
            ref = SAE(sae_cfg)
            ref.load_state_dict({**ref.state_dict(), **w})
            sides.append(("reference", ref, time.perf_counter() - t0, "Adam 4e-4 const, batch 2048"))
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            tr = Trainer(TensorSource(x, y if hout else None, seed=cfg.seed), cfg, tmp, d_in=d, d_out=d if hout else None,
                         hook_name=hin, hook_name_out=hout, model_name=m.summary.name)
            sae = tr.run()
        sides.append(("mechscope", sae, time.perf_counter() - t0,
                      f"batch {cfg.batch_tokens}, lr {cfg.lr:g}, warm-up {cfg.lr_warmup:g}, decay {cfg.lr_decay:g}"
                      + (f", {' '.join(args.set)}" if args.set else "")))
        for label, s, secs, how in sides:
            q = held_out(s, xh, yh)
            if ce_ctx is not None:
                from mechscope.sae.evaluate import evaluate_sae

                q["ce_recovered"] = evaluate_sae(m, s, ce_ctx).ce_recovered
            row[label] = {**q, "seconds": secs, "settings": how}
            print(f"  {label:9s} held-out FVU {q['fvu']:.4f}  L0 {q['l0']:.1f}  dead {q['dead']:.3f}"
                  + (f"  CE recovered {q['ce_recovered']:.4f}" if "ce_recovered" in q else "") + f"  {secs:.0f} s  ({how})", flush=True)
        results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
