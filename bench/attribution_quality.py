"""Attribution graphs on real prompts with a trained transcoder set: replacement and
completeness scores (full and pruned graph), and the causal check of the top features.

For each prompt (facts, IOI, greater-than), the graph's target is the model's top next token.
Causal check, in the replacement model (transcoders spliced, errors kept, everything else
recomputed): turn off (set to 0) the 10 features of highest influence on the logits, and
separately 10 features drawn at random from all the prompt's active features; report the drop of the target's logit (demeaned) for both.
Influence (circuit-tracer's) is unsigned: it ranks features that push the target down as high as
those that push it up, so a third set is the 10 features of largest *signed* total effect on the
target in the graph (the same path sum over the raw, signed adjacency), the ones the graph says
support it.

    python bench/attribution_quality.py --transcoders DIR [--max-features 1024] [--n-off 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mechscope.features.attribute import attribute
from mechscope.features.intervene import replacement_forward
from mechscope.features.prune import influence, normalise_rows, prune, scores
from mechscope.features.replacement import capture
from mechscope.features.transcoder_set import load_transcoders
from mechscope.models import load_model

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "The capital city of France is",
    "Michael Jordan plays the sport of",
    "The Colosseum is located in the city of",
    "The currency of Japan is the",
    "When Mary and John went to the store, John gave a drink to",
    "When Tom and Sarah went to the park, Sarah gave a ball to",
    "After Alice and Bob finished lunch, Bob handed the bill to",
    "The war lasted from the year 1732 to the year 17",
    "The contract ran from the year 1685 to the year 16",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transcoders", required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-features", type=int, default=1024)
    ap.add_argument("--n-off", type=int, default=10)
    a = ap.parse_args()
    m = load_model(a.model)
    tset = load_transcoders(a.transcoders, m.device, m)
    bos = m.tokenizer.bos_token_id
    g_rand = torch.Generator().manual_seed(0)
    rows = []
    for text in PROMPTS:
        ids = ([bos] if bos is not None else []) + m.to_tokens(text)
        t0 = time.perf_counter()
        g = attribute(m, tset, ids, max_features=a.max_features, max_logits=1)
        secs = time.perf_counter() - t0
        pr = prune(g)
        full, pruned = scores(g), scores(g, pr.node_mask, pr.edge_mask)
        infl = influence(normalise_rows(g.adjacency), g.logit_weights())[: g.n_features]
        top = infl.topk(min(a.n_off, g.n_features)).indices
        signed = influence(g.adjacency, g.logit_weights())[: g.n_features]  # signed path sums to the target
        sup = signed.topk(min(a.n_off, g.n_features)).indices
        run = capture(m, tset, ids)
        rand = run.active[torch.randperm(len(run.active), generator=g_rand)[: len(top)]]  # any active feature
        tok = int(g.logit_tokens[0])

        def target_logit(clamps) -> float:
            lg = replacement_forward(m, tset, run, clamps)[-1]
            return float(lg[tok] - lg.mean())

        base = target_logit([])
        off = lambda rows: [(int(r[0]), int(r[2]), int(r[1]), 0.0) for r in rows.tolist()]  # noqa: E731  (layer, pos, f)
        d_top, d_rand = base - target_logit(off(g.features[top])), base - target_logit(off(rand))
        d_sup = base - target_logit(off(g.features[sup]))
        rows.append((text, m.tokenizer.decode([tok]), full, pruned, d_top, d_rand, secs, g.n_active, int(pr.node_mask[: g.n_features].sum()),
                     d_sup))
        print(f"{text!r} -> {m.tokenizer.decode([tok])!r}: replacement {full['replacement']:.2f} (pruned {pruned['replacement']:.2f}), "
              f"completeness {full['completeness']:.2f} (pruned {pruned['completeness']:.2f}); top-{len(top)} off: "
              f"{-d_top:+.2f}, top-{len(sup)} by signed effect off: {-d_sup:+.2f}, random {len(top)} off: {-d_rand:+.2f}; "
              f"{g.n_active} active, "
              f"{int(pr.node_mask[: g.n_features].sum())} features kept; {secs:.0f} s", flush=True)
    mean = lambda k: sum(k(r) for r in rows) / len(rows)  # noqa: E731
    print(f"mean over {len(rows)} prompts: replacement {mean(lambda r: r[2]['replacement']):.2f} "
          f"(pruned {mean(lambda r: r[3]['replacement']):.2f}), completeness {mean(lambda r: r[2]['completeness']):.2f} "
          f"(pruned {mean(lambda r: r[3]['completeness']):.2f}); target logit drop: top features "
          f"{mean(lambda r: r[4]):.2f} (median {statistics.median(r[4] for r in rows):.2f}), by signed effect "
          f"{mean(lambda r: r[9]):.2f} (median {statistics.median(r[9] for r in rows):.2f}), random features "
          f"{mean(lambda r: r[5]):.2f}")


if __name__ == "__main__":
    main()
