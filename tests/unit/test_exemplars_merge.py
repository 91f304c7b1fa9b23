"""The sample merge of the exemplars pass against the sort-based merge it replaced (kept here):
the same winners in the same slots, bit for bit, over batches with ties, partly filled and full bins."""

from __future__ import annotations

import math

import pytest
import torch

from mechscope.explain.config import ExemplarsConfig
from mechscope.explain.exemplars import INF, _Batch, _merge_samples


def _old_merge_samples(key: torch.Tensor, val: torch.Tensor, row: torch.Tensor, win: torch.Tensor,
                   group: torch.Tensor | None, tok_key: torch.Tensor, x: torch.Tensor, batch) -> None:
    """Keep per (unit, group) the m tokens of smallest key (in place). ``key`` [U, G, m] sorted;
    ``group`` [N, U] the group of each token (None: one group); ``tok_key`` [N] the tokens' keys."""
    U, G, m = key.shape
    if m == 0:
        return
    tau = key[:, :, -1]  # [U, G] the m-th smallest so far
    tau_tok = tau.T[group.clamp(0, G - 1), torch.arange(U, device=x.device)] if group is not None else tau[:, 0][None, :]
    cand = (tok_key[:, None] < tau_tok).nonzero()  # (n, u)
    if cand.shape[0] == 0:
        return
    n_i, u_i = cand[:, 0], cand[:, 1]
    g_i = group[n_i, u_i] if group is not None else torch.zeros_like(u_i)
    # Old entries and candidates together, sorted by (unit, group, key); keep the first m of each group.
    old = key.isfinite().nonzero()  # (u, g, slot)
    all_u = torch.cat([old[:, 0], u_i])
    all_g = torch.cat([old[:, 1], g_i])
    all_k = torch.cat([key[old[:, 0], old[:, 1], old[:, 2]], tok_key[n_i]]).double()
    order = torch.argsort((all_u * G + all_g).double() + all_k * 0.5, stable=True)
    gid = (all_u * G + all_g)[order]
    start = torch.searchsorted(gid, gid, right=False)
    rank = torch.arange(gid.shape[0], device=x.device) - start
    kept = order[rank < m]
    rank = rank[rank < m]
    n_old = old.shape[0]
    is_old = kept < n_old
    o = kept[is_old]
    c = kept[~is_old] - n_old
    ou, og, os_ = old[o, 0], old[o, 1], old[o, 2]
    new = (
        torch.cat([key[ou, og, os_], tok_key[n_i[c]]]),
        torch.cat([val[ou, og, os_], x[n_i[c], u_i[c]]]),
        torch.cat([row[ou, og, os_], batch.rows[n_i[c]] + batch.first_row]),
        torch.cat([win[ou, og, os_], batch.windows(batch.rows[n_i[c]], u_i[c])]),
    )
    ku = torch.cat([ou, u_i[c]])
    kg = torch.cat([og, g_i[c]])
    kr = torch.cat([rank[is_old], rank[~is_old]])
    key.fill_(INF)
    val.fill_(math.nan)
    row.fill_(-1)
    win.fill_(math.nan)
    key[ku, kg, kr], val[ku, kg, kr], row[ku, kg, kr], win[ku, kg, kr] = new


def _state(U, G, m, W):
    return (torch.full((U, G, m), INF), torch.full((U, G, m), math.nan), torch.full((U, G, m), -1, dtype=torch.long),
            torch.full((U, G, m, W), math.nan))


@pytest.mark.parametrize("G,m,grouped", [(4, 3, True), (1, 4, False), (3, 1, True), (2, 40, True)])
def test_merge_samples_equals_sort_based_merge(G, m, grouped):
    cfg = ExemplarsConfig(context_len=16, batch_size=2, k=4, k_bottom=2, n_tokens=64, before=3, after=2, checkpoint_every=0)
    g = torch.Generator().manual_seed(G * 100 + m)
    U, B, T = 7, 2, 16
    W = cfg.before + cfg.after + 1
    new, old = _state(U, G, m, W), _state(U, G, m, W)
    for step in range(6):
        acts = torch.randn(B, T, U, generator=g)
        valid = torch.rand(B, T, generator=g) > 0.2
        valid[:, 0] = False
        rows = valid.reshape(-1).nonzero()[:, 0]
        batch = _Batch(acts, rows, step * B * T, cfg)
        x = batch.flat.index_select(0, rows)
        tok_key = torch.rand(rows.shape[0], generator=g)
        if step % 2:  # coarse keys: many ties, within the batch and with the kept entries
            tok_key = (tok_key * 8).floor() / 8
        group = torch.randint(0, G, x.shape, generator=g) if grouped else None
        _merge_samples(*new, group, tok_key, x, batch)
        _old_merge_samples(*old, group, tok_key, x, batch)
        for a, b in zip(new, old):
            assert torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0)), step
    assert bool(new[0].isfinite().any())
