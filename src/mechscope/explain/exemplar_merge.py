"""Folding one batch into the exemplars pass's running per-unit lists (``exemplars.update``).

Every list is a set of slots per unit (top-k, bottom-k) or per (unit, bin) (the random samples),
and every merge is "keep the best few of old entries + this batch's tokens" under a total order:

- top-k / bottom-k: by value (largest / smallest first), ties to the earlier token (smaller row
  id); what a stable full sort of all tokens in corpus order would keep;
- samples: by key (smallest first), ties to the old entry, then the earlier token.

Both orders become one int64 per entry (order-preserving bits of the value or key in the high
bits, the tie-break in the low bits), so a merge is a ``topk`` over unique integers, which is
exact whatever ``topk`` does with ties.

Speed: once the lists are full almost no token can enter them, so only the candidates (tokens
that beat their list's current last entry; the caller may pass a superset) are merged, grouped
per list into a small padded matrix. While the lists fill (the first batch), the candidates are
bounded by what can enter at all: the batch's k best values of a unit (ties included), the first
m tokens of a bin in key order. Old entries are never re-sorted unless a list takes a token.
"""

from __future__ import annotations

import math

import torch

from mechscope.explain.config import ExemplarsConfig

INF = float("inf")
MAX = torch.iinfo(torch.int64).max
LOW31 = (1 << 31) - 1
LOW32 = (1 << 32) - 1


class _Batch:
    """One batch's activations of one layer and the maps between valid rows and windows."""

    def __init__(self, acts: torch.Tensor, rows: torch.Tensor, first_row: int, cfg: ExemplarsConfig):
        B, T, U = acts.shape
        self.flat = acts.reshape(B * T, U)  # [B*T, U]
        self.rows = rows  # [N] local row ids (b * T + p) of the valid tokens
        self.first_row, self.T, self.cfg = first_row, T, cfg
        self.offsets = torch.arange(-cfg.before, cfg.after + 1, device=acts.device)  # [W]
        self._flat1d: torch.Tensor | None = None  # flat as one contiguous row (made once, for take)

    def windows(self, local_rows: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Activations of unit ``units[i]`` over the window around local row ``local_rows[i]`` -> [n, W]."""
        p = local_rows % self.T
        pos = p[:, None] + self.offsets  # [n, W]
        ok = (pos >= 0) & (pos < self.T)
        U = self.flat.shape[1]
        flat_idx = ((local_rows - p)[:, None] + pos.clamp(0, self.T - 1)) * U + units[:, None]
        if self._flat1d is None:
            self._flat1d = self.flat.contiguous().view(-1)  # a copy only for a unit range (a strided slice)
        vals = self._flat1d.take(flat_idx)
        return torch.where(ok, vals, math.nan)


def ordered_bits(v: torch.Tensor) -> torch.Tensor:
    """float32 ``v`` -> int64 in [0, 2^32) with the same order (-0.0 equal to +0.0; no NaN)."""
    b = (v.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    b = b ^ ((b >> 31) & LOW31)  # negative floats: flip the magnitude bits, so int32 order is float order
    return b.long() + (1 << 31)


def _grouped(gid: torch.Tensor, *cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                              tuple[torch.Tensor, ...]]:
    """Entries with group ids ``gid`` [C] (any order) -> (groups [A] ascending, row of each entry in
    that list [C], column within its group [C], ``cols`` in the new entry order)."""
    order = torch.argsort(gid, stable=True)
    gid = gid[order]
    groups, inverse, counts = torch.unique_consecutive(gid, return_inverse=True, return_counts=True)
    start = torch.cumsum(counts, 0) - counts
    col = torch.arange(gid.shape[0], device=gid.device) - start[inverse]
    return groups, inverse, col, tuple(c[order] for c in cols)


def _padded(n_groups: int, inverse: torch.Tensor, col: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[n_groups, widest group] int64: each group's keys, padded with MAX."""
    width = int(col.max()) + 1 if col.numel() else 1
    out = torch.full((n_groups, width), MAX, dtype=torch.int64, device=keys.device)
    out[inverse, col] = keys
    return out


def merge_best(val: torch.Tensor, row: torch.Tensor, win: torch.Tensor, x: torch.Tensor, batch: _Batch,
               largest: bool, cand: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Merge the batch's [N, U] activations ``x`` into the running best-k slots ``val``/``row`` [k, U],
    ``win`` [k, U, W] (in place). ``cand``: the (token, unit) pairs [C] that beat their unit's k-th
    value (the only ones that can enter), or None for every token of every unit.

    Evicted slots (ascending) take the entering tokens best first, so the slots' layout does not
    depend on the path."""
    k = val.shape[0]
    N, U = x.shape
    if k == 0 or N == 0:
        return
    dev = x.device
    if cand is None:  # only the batch's k best values (ties included) that beat the k-th kept can enter
        thr = val.min(0).values if largest else val.max(0).values  # [U]
        kth = x.topk(min(k, N), dim=0, largest=largest).values[-1]  # [U]
        ok = (x >= kth) & (x > thr) if largest else (x <= kth) & (x < thr)
        nz = ok.nonzero()
        cand = (nz[:, 0], nz[:, 1])
    n_i, u_i = cand
    if n_i.numel() == 0:
        return
    units, inverse, col, (n_i, u_i) = _grouped(u_i, n_i, u_i)
    hi = ordered_bits(x[n_i, u_i])
    new = _padded(units.shape[0], inverse, col, ((LOW32 - hi if largest else hi) << 31) | (n_i + k))
    # Old entries: tie-break by their row's rank among the unit's slots (empty slots, row -1, first).
    old_row = row[:, units].T  # [A, k]
    rank = torch.empty_like(old_row).scatter_(1, torch.argsort(old_row, dim=1, stable=True),
                                              torch.arange(k, device=dev).expand_as(old_row))
    hi_old = ordered_bits(val[:, units].T)
    old = ((LOW32 - hi_old if largest else hi_old) << 31) | rank  # [A, k]
    sel_key, sel = torch.cat([old, new], 1).topk(k, dim=1, largest=False)  # [A, k], best first
    kept = torch.zeros(units.shape[0], k + 1, dtype=torch.bool, device=dev)
    kept.scatter_(1, sel.clamp(max=k), True)
    evicted = (~kept[:, :k]).nonzero()  # (a, slot), ascending per a
    entering = (sel >= k).nonzero()  # (a, position), best first per a; as many per a as evicted
    if entering.shape[0] == 0:
        return
    u, slot = units[evicted[:, 0]], evicted[:, 1]
    n = (sel_key[entering[:, 0], entering[:, 1]] & LOW31) - k
    local = batch.rows[n]
    val[slot, u] = x[n, u]
    row[slot, u] = local + batch.first_row
    win[slot, u] = batch.windows(local, u)


def merge_samples(key: torch.Tensor, val: torch.Tensor, row: torch.Tensor, win: torch.Tensor, tok_key: torch.Tensor,
                  x: torch.Tensor, batch: _Batch, cand: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """Keep per (unit, bin) the m entries of smallest key (in place). ``key`` [U, G, m] sorted
    ascending (inf: empty); ``tok_key`` [N] the tokens' keys; ``cand``: (token, unit, bin) triples
    [C] holding every token that can enter its list (those whose key is below the list's m-th; more
    do no harm).

    A list that takes no token keeps its slots; one that does is rewritten in key order."""
    U, G, m = key.shape
    n_i, u_i, g_i = cand
    if m == 0 or n_i.numel() == 0:
        return
    dev = x.device
    N = tok_key.shape[0]
    tok_c = (tok_key.view(torch.int32).long() << 32) | (torch.arange(N, device=dev) + m)  # [N] keys are >= 0
    lists, inverse, col, (n_i,) = _grouped(u_i * G + g_i, n_i)
    new = _padded(lists.shape[0], inverse, col, tok_c[n_i])  # [A, widest]
    k_key, k_val, k_row, k_win = (t.view(U * G, m, *t.shape[3:]) for t in (key, val, row, win))
    o_key = k_key[lists]  # [A, m]
    slots = torch.arange(m, device=dev)
    old = torch.where(o_key.isfinite(), (o_key.view(torch.int32).long() << 32) | slots, MAX)
    c = torch.cat([old, new], 1).topk(m, dim=1, largest=False).values  # [A, m] ascending
    filled = c != MAX
    idx = c & LOW32
    is_new = filled & (idx >= m)
    o = torch.where(filled & ~is_new, idx, 0)  # old slot (0 for empties and new ones, overwritten below)
    new_key = torch.where(filled, (c >> 32).int().view(torch.float32), INF)
    new_val = torch.where(filled, k_val[lists].gather(1, o), math.nan)
    new_row = torch.where(filled, k_row[lists].gather(1, o), -1)
    nz = is_new.nonzero()  # (a, r) of the entering tokens
    if nz.shape[0]:
        a, r = nz[:, 0], nz[:, 1]
        n = idx[a, r] - m
        u = lists[a] // G
        local = batch.rows[n]
        new_val[a, r] = x[n, u]
        new_row[a, r] = local + batch.first_row
    # Windows (the bulk of the state) move only where a position's entry changed.
    a2, r2 = (is_new | (o != slots) | ~filled).nonzero().unbind(1)
    w = torch.where(filled[a2, r2, None], k_win[lists[a2], o[a2, r2]], math.nan)  # [c, W] read before writing
    if nz.shape[0]:
        w[is_new[a2, r2]] = batch.windows(local, u)  # both in (a, r) order
    k_key[lists], k_val[lists], k_row[lists] = new_key, new_val, new_row
    k_win[lists[a2], r2] = w
