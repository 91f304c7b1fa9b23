"""The exemplars pass against a plain forward pass to the last hooked layer, in one process.

Floor: the bridge run on the same packed contexts with one hook at the last harvested layer's
MLP neurons that stops the forward there (``Harvester`` with that hook alone): what any pass over
these tokens and layers must compute. mechscope's pass adds the captures of every layer and the
bookkeeping of every unit (top/bottom-k with windows, samples, histogram, density). Writing
the database is timed apart (it is per unit, not per token). Issue 15's target: <= 1.3x.
The two sides are interleaved batch by batch (the floor runs each batch right after the pass
did), so both see the same load on a shared machine.

    python bench/exemplars.py [--model M] [--tokens 16384] [--layers 0-29] [--batch 8] [--db FILE]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from mechscope.activations.config import StoreConfig
from mechscope.activations.corpus import get_corpus
from mechscope.activations.store import Harvester, pack_contexts
from mechscope.cli.common import parse_layers
from mechscope.explain.config import ExemplarsConfig
from mechscope.explain.exemplars import harvest_exemplars, write_db
from mechscope.explain.units import MlpNeurons
from mechscope.models import load_model
from mechscope.models.hooks import mlp_post


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--layers", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--db", default=None, help="also write the units to this database (timed apart)")
    a = ap.parse_args()
    torch.manual_seed(0)
    m = load_model(a.model)
    layers = parse_layers(a.layers, m.summary.n_layers) or []
    cfg = ExemplarsConfig(n_tokens=a.tokens, layers=layers, batch_size=a.batch, context_len=a.context, checkpoint_every=0)
    contexts = []
    for c in pack_contexts(m.tokenizer, iter(get_corpus(None)), a.context):
        contexts.append(c)
        if len(contexts) == cfg.n_contexts:
            break
    floor = Harvester(m, StoreConfig(hooks=[mlp_post(max(layers))], context_len=a.context, batch_size=a.batch,
                                     skip_first=0, shuffle=False, buffer_tokens=2 * a.context))

    def floor_batch(i: int) -> float:
        t0 = time.perf_counter()
        floor.run(torch.tensor(contexts[i * a.batch:(i + 1) * a.batch]), skip_first=0)
        return time.perf_counter() - t0

    # Interleaved: after each batch of the pass, the floor runs the same batch (timed apart), so
    # both sides see the same machine load (this box is shared).
    floor.run(torch.tensor(contexts[:a.batch]), skip_first=0)  # warm-up
    floor_times: list[float] = []
    marks = [time.perf_counter()]

    def after_batch(b: int) -> None:
        marks.append(time.perf_counter())
        floor_times.append(floor_batch(b - 1))
        marks.append(time.perf_counter())

    state = harvest_exemplars(m, cfg, contexts=contexts, on_batch=after_batch)
    pass_times = [marks[2 * i + 1] - marks[2 * i] for i in range(len(floor_times))]
    t_pass, t_floor = sum(pass_times), sum(floor_times)
    steady = sum(pass_times[1:]) / max(sum(floor_times[1:]), 1e-9)
    n_units = sum(st.top_val.shape[1] for st in state.layers.values())
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch threads {torch.get_num_threads()}")
    print(f"model {m.summary.name}, {len(state.layers)} layers, {n_units} units, {state.contexts_done * a.context} tokens "
          f"({state.n_tokens} valid), batch {a.batch} x {a.context}")
    print(f"floor (forward to layer {max(layers)}): {t_floor:.1f} s (per batch: {', '.join(f'{t:.1f}' for t in floor_times)})")
    print(f"exemplars pass: {t_pass:.1f} s (per batch: {', '.join(f'{t:.1f}' for t in pass_times)})")
    print(f"ratio: {t_pass / t_floor:.2f}x; after the first batch (calibration, first fill of the samples): {steady:.2f}x (target <= 1.3x)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if a.db:
        from mechscope.explain.db import UnitDB

        t0 = time.perf_counter()
        write_db(m, MlpNeurons(m), state, UnitDB(a.db, model_id=m.summary.name))
        print(f"database written in {time.perf_counter() - t0:.1f} s: {a.db}")


if __name__ == "__main__":
    main()
