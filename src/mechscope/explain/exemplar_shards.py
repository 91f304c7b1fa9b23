"""Merging the checkpoints of token-range shards of one exemplars pass into the state of one pass.

    merged = merge_states([HarvestState.read("s0"), HarvestState.read("s1")])

Shards are runs of ``harvest_exemplars`` with the same settings but ``first_context`` (and the
number of tokens); every shard calibrates on the corpus's first contexts (``exemplars.py``,
``CALIBRATION_CONTEXTS``), so their
histogram and sample bins are the same. The merge needs them contiguous (each starts where the
previous one stopped, ``first_context + contexts_done``) and then, per layer:

- top-k / bottom-k: the best k of both lists by value, ties to the earlier token (the pass's order);
- quantile-bin and uniform samples: the m entries of smallest key per list, ties to the earlier
  token (the keys are seeded by context, so they are the keys the single pass drew);
- histogram, positive counts, tokens, contexts, token ids: added or concatenated.

Nothing here depends on the shards' batching, so the result is the single pass's state whenever
the shards' activations are the ones the single pass computes (shards that start on a batch
boundary: the same batches). Slot layouts may differ; every reader sorts (``exemplars_of``).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from mechscope.errors import MechscopeError
from mechscope.explain.exemplars import HarvestState, LayerState


def _best(val: torch.Tensor, row: torch.Tensor, win: torch.Tensor, dim: int, k: int, largest: bool
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` best entries along ``dim`` of ``val``/``row`` (and ``win``, one more trailing dim)
    by value (``largest``: largest first), ties to the smaller row, empty slots (row -1) last."""
    order = torch.argsort(torch.where(row < 0, torch.iinfo(torch.int64).max, row), dim=dim, stable=True)
    v = val.gather(dim, order)
    key = torch.where(row.gather(dim, order) < 0, torch.inf, -v if largest else v)  # empty slots after every entry
    order = order.gather(dim, torch.argsort(key, dim=dim, stable=True).narrow(dim, 0, k))
    return (val.gather(dim, order), row.gather(dim, order),
            win.gather(dim, order.unsqueeze(-1).expand(*order.shape, win.shape[-1])))


def _merge_layer(a: LayerState, b: LayerState) -> LayerState:
    k, kb = a.top_val.shape[0], a.bot_val.shape[0]
    top = _best(torch.cat([a.top_val, b.top_val]), torch.cat([a.top_row, b.top_row]), torch.cat([a.top_win, b.top_win]),
                0, k, True)
    bot = _best(torch.cat([a.bot_val, b.bot_val]), torch.cat([a.bot_row, b.bot_row]), torch.cat([a.bot_win, b.bot_win]),
                0, kb, False)

    def samples(prefix: str) -> tuple[torch.Tensor, ...]:
        key = torch.cat([getattr(a, prefix + "key"), getattr(b, prefix + "key")], 2)  # [U, G, 2m] (inf: empty)
        row = torch.cat([getattr(a, prefix + "row"), getattr(b, prefix + "row")], 2)
        val = torch.cat([getattr(a, prefix + "val"), getattr(b, prefix + "val")], 2)
        win = torch.cat([getattr(a, prefix + "win"), getattr(b, prefix + "win")], 2)
        m = getattr(a, prefix + "key").shape[2]
        order = torch.argsort(torch.where(row < 0, torch.iinfo(torch.int64).max, row), dim=2, stable=True)
        order = order.gather(2, torch.argsort(key.gather(2, order), dim=2, stable=True)[..., :m])
        return (key.gather(2, order), val.gather(2, order), row.gather(2, order),
                win.gather(2, order.unsqueeze(-1).expand(*order.shape, win.shape[-1])))

    q_key, q_val, q_row, q_win = samples("q_")
    r_key, r_val, r_row, r_win = samples("r_")
    return LayerState(top_val=top[0], top_row=top[1], top_win=top[2], bot_val=bot[0], bot_row=bot[1], bot_win=bot[2],
                      q_key=q_key, q_val=q_val, q_row=q_row, q_win=q_win, r_key=r_key, r_val=r_val, r_row=r_row, r_win=r_win,
                      positive=a.positive + b.positive, hist=a.hist + b.hist, lo=a.lo, inv=a.inv, q_edges=a.q_edges,
                      q_table=a.q_table)


def _check_pair(prev: HarvestState, nxt: HarvestState, names: tuple[str, str]) -> None:
    diff = prev.cfg.shard_differences(nxt.cfg)
    if diff:
        raise MechscopeError(f"shards {names[0]} and {names[1]} were made with other settings ({', '.join(diff)} differ); "
                             "merge only token shards of one pass (the same options but --token-range).")
    fa, fb = prev.model.get("fingerprint"), nxt.model.get("fingerprint")
    if fa and fb and fa != fb:
        raise MechscopeError(f"shards {names[0]} and {names[1]} were made with different models "
                             f"({prev.model.get('source')} and {nxt.model.get('source')}); merge only shards of one model.")
    da, db = prev.model.get("corpus_digest"), nxt.model.get("corpus_digest")
    if da and db and da != db:
        raise MechscopeError(f"shards {names[0]} and {names[1]} were made on different contents of the corpus "
                             f"{prev.cfg.corpus or 'embedded'!r} (the file differs between the machines); run every shard over the same text.")
    if sorted(prev.layers) != sorted(nxt.layers) or prev.unit_offset != nxt.unit_offset:
        raise MechscopeError(f"shards {names[0]} and {names[1]} hold other layers or units; merge only token shards of one pass.")
    end = prev.cfg.first_context + prev.contexts_done
    if nxt.cfg.first_context != end:
        what = "overlap" if nxt.cfg.first_context < end else "leave a gap"
        raise MechscopeError(f"shards {names[0]} (contexts {prev.cfg.first_context}-{end - 1}) and {names[1]} (from context "
                             f"{nxt.cfg.first_context}) {what}; give shards that together cover one range of contexts, "
                             "each finished (run an interrupted one again to complete it).")
    for layer, st in prev.layers.items():
        o = nxt.layers[layer]
        if not (torch.equal(st.lo, o.lo) and torch.equal(st.inv, o.inv) and torch.equal(st.q_table, o.q_table)):
            raise MechscopeError(f"shards {names[0]} and {names[1]} have different histogram bins (layer {layer}): the pass's "
                                 "calibration contexts came out differently (another machine or device, or an older mechscope); run the later shards "
                                 f"with --calibration {names[0]} to take its bins.")


def expected_contexts(cfg) -> int:
    """Contexts a finished pass of ``cfg`` has done (all its contexts: a final partial batch is read too)."""
    return cfg.n_contexts


def merge_states(states: list[HarvestState], names: list[str] | None = None) -> HarvestState:
    """One state from contiguous, finished token shards of one pass (any order; see the module
    docstring). ``names`` (e.g. the checkpoint folders) are used in the error messages."""
    if not states:
        raise MechscopeError("no shards to merge; give two or more checkpoint folders.")
    names = names or [f"#{i}" for i in range(len(states))]
    pairs = sorted(zip(states, names), key=lambda p: p[0].cfg.first_context)
    for i, (st, name) in enumerate(pairs):
        want = expected_contexts(st.cfg)
        if st.contexts_done < want and not (st.exhausted and i == len(pairs) - 1):  # the last may end with the corpus
            what = "ends where the corpus ends but is not the last shard" if st.exhausted else "is unfinished"
            raise MechscopeError(f"shard {name} {what} ({st.contexts_done:,} of {want:,} contexts); run its "
                                 "mechscope exemplars command again (it resumes), then merge.")
    out = pairs[0][0]
    for (prev, pn), (nxt, nn) in zip(pairs, pairs[1:]):
        _check_pair(prev, nxt, (pn, nn))
    for nxt, _ in pairs[1:]:
        out = HarvestState(
            cfg=out.cfg, layers={layer: _merge_layer(st, nxt.layers[layer]) for layer, st in out.layers.items()},
            token_ids=torch.cat([out.token_ids, nxt.token_ids]), contexts_done=out.contexts_done + nxt.contexts_done,
            unit_offset=out.unit_offset, n_tokens=out.n_tokens + nxt.n_tokens, model=out.model or nxt.model,
            exhausted=nxt.exhausted)
    first = pairs[0][0].cfg
    out.cfg = replace(first, n_tokens=out.contexts_done * first.context_len)
    return out
