"""The merges of the exemplars pass: the sample merge against the sort-based merge it replaced
(kept here), by both paths (every token, and only the candidates), bit for bit over batches with
ties, partly filled and full bins; the whole ``update`` against an independent reference (a full
stable sort in numpy of every token seen so far) on data with many ties and several bins."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechscope.explain import exemplar_merge
from mechscope.explain.config import ExemplarsConfig
from mechscope.explain.exemplar_merge import (
    INF,
    Scratch,
    _Batch,
    column_order_stat,
    merge_samples,
    merge_shared_samples,
)
from mechscope.explain.exemplars import _best_first, _column_stats, _new_state, _outside, update


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


def _random_batch(g: torch.Generator, cfg: ExemplarsConfig, step: int, U: int, B: int, T: int):
    """(batch, its valid tokens' activations [N, U], their rows [N]) of random activations, about
    a fifth of the tokens (and every context's first) not candidates."""
    acts = torch.randn(B, T, U, generator=g)
    valid = torch.rand(B, T, generator=g) > 0.2
    valid[:, 0] = False
    rows = valid.reshape(-1).nonzero()[:, 0]
    batch = _Batch(acts, rows, step * B * T, cfg)
    return batch, batch.flat.index_select(0, rows), rows


def _state(U, G, m, W):
    return (torch.full((U, G, m), INF), torch.full((U, G, m), math.nan), torch.full((U, G, m), -1, dtype=torch.long),
            torch.full((U, G, m, W), math.nan))


@pytest.mark.parametrize("candidates", ["exact", "all"])
@pytest.mark.parametrize("G,m,grouped", [(4, 3, True), (1, 4, False), (3, 1, True), (2, 40, True)])
def test_merge_samples_equals_sort_based_merge(G, m, grouped, candidates):
    cfg = ExemplarsConfig(context_len=16, batch_size=2, k=4, k_bottom=2, n_tokens=64, before=3, after=2, checkpoint_every=0)
    g = torch.Generator().manual_seed(G * 100 + m)
    U, B, T = 7, 2, 16
    W = cfg.before + cfg.after + 1
    new, old = _state(U, G, m, W), _state(U, G, m, W)
    for step in range(6):
        batch, x, rows = _random_batch(g, cfg, step, U, B, T)
        tok_key = torch.rand(rows.shape[0], generator=g)
        if step % 2:  # coarse keys: many ties, within the batch and with the kept entries
            tok_key = (tok_key * 8).floor() / 8
        group = torch.randint(0, G, x.shape, generator=g) if grouped else None
        grp = group if group is not None else torch.zeros(x.shape, dtype=torch.long)
        if candidates == "exact":  # the (token, unit, bin) triples below their list's m-th key
            tau = new[0][torch.arange(U)[None, :].expand_as(grp), grp, -1]  # [N, U] the m-th key of each token's list
            n_i, u_i = (tok_key[:, None] < tau).nonzero().unbind(1)
        else:  # every token: a superset changes nothing
            n_i, u_i = torch.ones(x.shape, dtype=torch.bool).nonzero().unbind(1)
        merge_samples(*new, tok_key, x, batch, (n_i, u_i, grp[n_i, u_i]))
        _old_merge_samples(*old, group, tok_key, x, batch)
        for a, b in zip(new, old):
            assert torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0)), step
    assert bool(new[0].isfinite().any())


def _reference(acts_all, valid_all, k1_all, k2_all, state, cfg, U):
    """Per unit, what a full stable sort of every valid token so far keeps (numpy): top-k by value
    (largest first, ties to the earlier row), bottom-k, and per bin the m smallest keys (ties to the
    earlier row), as lists of rows."""
    rows = np.nonzero(valid_all.reshape(-1))[0]
    x = acts_all.reshape(-1, U)[rows]  # [N, U]
    k1, k2 = k1_all[rows], k2_all[rows]
    nb = cfg.n_bins
    h = torch.addcmul(1 - state.lo * state.inv, torch.from_numpy(x), state.inv).floor_().clamp_(0, nb + 1).long()
    grp = state.q_table.view(U, nb + 2).gather(1, h.T).T.numpy()  # [N, U] bin of each token
    out = []
    for u in range(U):
        top = rows[np.argsort(-x[:, u], kind="stable")[:cfg.k]]
        bot = rows[np.argsort(x[:, u], kind="stable")[:cfg.k_bottom]]
        q = []
        for g in range(len(cfg.quantiles) + 1):
            sel = np.nonzero(grp[:, u] == g)[0]
            q.append(rows[sel[np.argsort(k1[sel], kind="stable")[:cfg.per_quantile]]])
        r = rows[np.argsort(k2, kind="stable")[:cfg.n_random]]
        out.append((top, bot, q, r))
    return out


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_update_equals_a_full_stable_sort(seed, direct, monkeypatch):
    """Activations on a coarse grid (many ties, within a batch and across batches), coarse keys,
    invalid tokens, several bins: after every batch each list holds exactly the reference's rows,
    in the reference's order once sorted the way ``exemplars_of`` reads them, with their windows
    (read from the token-major batch, or every time from the unit-major padded copy)."""
    if not direct:
        monkeypatch.setattr(exemplar_merge, "DIRECT_WINDOWS", 0)
    U, B, T = 9, 4, 16
    cfg = ExemplarsConfig(context_len=T, batch_size=B, k=6, k_bottom=4, per_quantile=3, n_random=4, n_bins=8,
                          quantiles=(0.3, 0.6, 0.9), n_tokens=8 * B * T, before=3, after=2, checkpoint_every=0)
    g = torch.Generator().manual_seed(seed)
    acts_all, valid_all, k1_all, k2_all = [], [], [], []
    state = None
    for step in range(8):
        acts = (torch.randn(B, T, U, generator=g) * 2).round() / 4  # values on a grid of 0.25: ties everywhere
        acts[..., 0] = 0.0  # a unit with every value tied
        valid = torch.rand(B, T, generator=g) > 0.15
        valid[:, 0] = False
        k1 = (torch.rand(B * T, generator=g) * (4 if step % 2 else 64)).floor() / 64  # coarse keys: ties
        k2 = (torch.rand(B * T, generator=g) * 16).floor() / 16
        if state is None:
            state = _new_state(cfg, acts.reshape(-1, U)[valid.reshape(-1)])
        update(state, acts, valid, step * B * T, (k1, k2), cfg)
        acts_all.append(acts)
        valid_all.append(valid)
        k1_all.append(k1)
        k2_all.append(k2)
        flat = torch.cat(acts_all).reshape(-1, U)
        ref = _reference(torch.cat(acts_all).numpy(), torch.cat(valid_all).numpy(), torch.cat(k1_all).numpy(),
                         torch.cat(k2_all).numpy(), state, cfg, U)
        for u, (top, bot, q, r) in enumerate(ref):
            for val, row, win, want, largest in ((state.top_val, state.top_row, state.top_win, top, True),
                                                 (state.bot_val, state.bot_row, state.bot_win, bot, False)):
                # Slots are unsorted: read them by (value, row), as the reference orders them.
                got = sorted(zip(val[:, u].tolist(), row[:, u].tolist()), key=lambda t: (-t[0] if largest else t[0], t[1]))
                assert [rw for _, rw in got] == want.tolist(), (step, u, largest)
                assert row[:, u][_best_first(val, row, largest)[:, u]].tolist() == want.tolist()  # exemplars_of's order
                for s_ in range(val.shape[0]):  # each slot's window is the unit's activations around its row
                    rw = int(row[s_, u])
                    p = rw % T
                    for j, off in enumerate(range(-cfg.before, cfg.after + 1)):
                        w = win[s_, u, j].item()
                        assert (math.isnan(w) if not 0 <= p + off < T else w == flat[rw + off, u].item()), (step, u)
            for gi in range(len(q)):  # samples: sorted slots, empty (-1) after the filled ones
                got_q = state.q_row[u, gi].tolist()
                assert got_q[:len(q[gi])] == q[gi].tolist() and all(v == -1 for v in got_q[len(q[gi]):]), (step, u, gi)
            assert state.r_row[u, 0].tolist() == r.tolist(), (step, u)


@pytest.mark.parametrize("case", ["both", "lo", "hi", "crossed", "zero", "tiny", "odd"])
def test_outside_finds_exactly_the_entries_beyond_the_bounds(case):
    """The clamp-and-subtract search against plain compares: bounds on one side or both, crossed
    bounds (a lower bound above the upper one), bounds at 0 (with -0.0 and 0.0 entries), bounds
    near the smallest normal float, an odd number of entries (the 64-bit words' last one is half)."""
    g = torch.Generator().manual_seed(len(case))
    N, U = (7, 5) if case == "odd" else (64, 12)
    x = (torch.randn(N, U, generator=g) * 2).round() / 4  # ties with the bounds
    x[0, :3] = torch.tensor([-0.0, 0.0, 1e-35])
    lo, hi = torch.quantile(x, 0.2, dim=0), torch.quantile(x, 0.8, dim=0)
    if case == "lo":
        hi = None
    elif case == "hi":
        lo = None
    elif case == "crossed":
        lo, hi = hi, lo
        lo[0] = hi[0] + 1.0
    elif case == "zero":
        lo, hi = torch.zeros(U), torch.zeros(U)
    elif case == "tiny":
        lo, hi = torch.full((U,), -3e-35), torch.full((U,), 2e-35)
        x[1, :4] = torch.tensor([2.5e-35, -3.5e-35, 2e-35, 1e-36])
    n, u = _outside(x, lo, hi, torch.empty_like(x) if case != "odd" else None)
    want = torch.zeros_like(x, dtype=torch.bool)
    if lo is not None:
        want |= x < lo
    if hi is not None:
        want |= x > hi
    got = torch.zeros_like(want)
    got[n, u] = True
    # A superset is allowed (more candidates do no harm) but these bounds leave none extra except
    # -0.0 against a bound of 0.0 (it clamps to +0.0); every true candidate must be there.
    assert bool((got >= want).all())
    extra = got & ~want
    assert bool((x[extra] == 0).all()), x[extra]
    assert torch.equal(n * U + u, (n * U + u).sort().values)  # row-major order


def test_shared_sample_merge_equals_per_unit_merges():
    """The uniform samples merged once for every unit hold, slot for slot, what U separate merges
    hold (keys with ties, empty and full lists); lists that differ between units are refused."""
    cfg = ExemplarsConfig(context_len=16, batch_size=2, k=4, k_bottom=2, n_tokens=64, before=3, after=2, checkpoint_every=0)
    g = torch.Generator().manual_seed(5)
    U, B, T, m = 6, 2, 16, 5
    W = cfg.before + cfg.after + 1
    shared, each = _state(U, 1, m, W), _state(U, 1, m, W)
    for step in range(7):
        batch, x, rows = _random_batch(g, cfg, step, U, B, T)
        tok_key = (torch.rand(rows.shape[0], generator=g) * (4 if step % 2 else 64)).floor() / 64
        assert merge_shared_samples(*shared, tok_key, x, batch)
        n_i, u_i = torch.ones(x.shape, dtype=torch.bool).nonzero().unbind(1)  # every token a candidate
        merge_samples(*each, tok_key, x, batch, (n_i, u_i, torch.zeros_like(u_i)))
        for a, b in zip(shared, each):
            assert torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0)), step
    shared[0][2, 0, 0] = 0.5  # one unit's list differs: refused, nothing changed
    before = [t.clone() for t in shared]
    assert not merge_shared_samples(*shared, torch.rand(rows.shape[0], generator=g), x, batch)
    for a, b in zip(shared, before):
        assert torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0))


def test_update_same_with_rows_past_2_31_and_reused_buffers():
    """``update`` keys old and new entries by their global row while rows fit in 31 bits and by
    their rank otherwise: a pass placed 2^31 rows further on keeps the same entries (rows shifted).
    One ``Scratch`` reused across layers of other widths and batch sizes changes nothing."""
    U, B, T = 7, 3, 16
    cfg = ExemplarsConfig(context_len=T, batch_size=B, k=4, k_bottom=3, per_quantile=2, n_random=3, n_bins=8,
                          n_tokens=6 * B * T, before=3, after=2, checkpoint_every=0)
    g = torch.Generator().manual_seed(11)
    near, far, fresh = None, None, None
    scratch = Scratch()
    for step in range(6):
        acts = (torch.randn(B, T, U, generator=g) * 2).round() / 4
        valid = torch.rand(B, T, generator=g) > 0.1
        valid[:, 0] = False
        keys = (torch.rand(B * T, generator=g), torch.rand(B * T, generator=g))
        if near is None:
            near, far, fresh = (_new_state(cfg, acts.reshape(-1, U)[valid.reshape(-1)]) for _ in range(3))
        update(near, acts, valid, step * B * T, keys, cfg, scratch)
        update(far, acts, valid, 2**31 + step * B * T, keys, cfg)
        update(fresh, acts, valid, step * B * T, keys, cfg)
        other = torch.randn(2 * B, T, U + 5, generator=g)  # another layer through the same buffers
        ov = torch.ones(2 * B, T, dtype=torch.bool)
        update(_new_state(cfg, other.reshape(-1, U + 5)), other, ov, 0, (torch.rand(2 * B * T), torch.rand(2 * B * T)), cfg, scratch)
    for name, a in near.tensors().items():
        b, c = far.tensors()[name], fresh.tensors()[name]
        if name.endswith("_row"):
            b = torch.where(b >= 0, b - 2**31, b)
        assert torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0)), name
        assert torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(c, nan=-7.0)), name


@pytest.mark.parametrize("shape", [(1016, 40), (7, 5), (2, 3), (100, 1)])
def test_selected_order_statistics_equal_torch_sorting(shape):
    """The calibration's min, max and quantiles (selected by numpy's partition) equal torch's
    min, max and ``quantile`` bit for bit, on continuous values and on a grid full of ties; the
    k-th best equals ``topk``'s; a column with NaN gives torch's answer (NaN propagates)."""
    g = torch.Generator().manual_seed(shape[0])
    for grid in (False, True):
        x = torch.randn(*shape, generator=g)
        if grid:
            x = (x * 4).round() / 4
        for qs in [(0.5, 0.9, 0.99), (0.1,), (0.001, 0.25, 0.75)]:
            lo, hi, q = _column_stats(x, qs)
            assert torch.equal(q, torch.quantile(x, torch.tensor(qs), dim=0)), qs
            assert torch.equal(lo, x.min(0).values) and torch.equal(hi, x.max(0).values)
        for k in {1, 2, shape[0]}:
            assert torch.equal(column_order_stat(x, shape[0] - k), x.topk(k, dim=0).values[-1])
            assert torch.equal(column_order_stat(x, k - 1), x.topk(k, dim=0, largest=False).values[-1])
    x[0, 0] = math.nan
    lo, hi, q = _column_stats(x, (0.5,))
    assert math.isnan(hi[0]) and math.isnan(q[0, 0]) and math.isnan(lo[0])


@pytest.mark.parametrize("contiguous", [True, False])
def test_windows_read_directly_equal_the_padded_copy(contiguous):
    """A window read from the token-major batch equals the one read from the unit-major padded copy
    (NaN where it runs outside its context), for single units and for every unit at once, also
    when the batch is a slice of wider activations (``--unit-range``)."""
    cfg = ExemplarsConfig(context_len=16, batch_size=3, n_tokens=48, before=5, after=3, checkpoint_every=0)
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(3, 16, 11, generator=g)
    acts = wide.clone()[..., :7] if contiguous else wide[..., 2:9]
    rows = torch.arange(48)
    local = torch.tensor([0, 1, 4, 15, 16, 20, 31, 32, 40, 47])
    units = torch.randint(0, 7, (local.shape[0],), generator=g)
    direct = _Batch(acts, rows, 0, cfg)
    padded = _Batch(acts, rows, 0, cfg)
    padded._padded_windows()  # the copy exists: every read goes through it
    same = lambda a, b: torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0))  # noqa: E731
    assert direct._padded is None
    a, b = direct.windows(local, units), padded.windows(local, units)
    assert a.shape == (10, 9) and same(a, b)
    assert bool(a[0, :5].isnan().all()) and not bool(a[0, 5:].isnan().any())  # token 0: nothing before it
    assert a[3, 5].item() == acts[0, 15, units[3]].item() and bool(a[3, 6:].isnan().all())
    a, b = direct.windows_all(local), padded.windows_all(local)
    assert a.shape == (7, 10, 9) and same(a, b)
    assert direct._padded is None  # neither read needed the copy
