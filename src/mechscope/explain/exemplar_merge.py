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
Windows are read from one unit-major copy of the batch (``_Batch``), large temporaries reuse
buffers (``Scratch``), and order statistics are selected, not sorted (``column_order_stat``).
Measured on 6 layers of the embedded model, batches of 8 x 128 tokens, 1 thread, the state bit
for bit the same (2026-12-05): batches 4-11, 36-38 ms a layer before these changes, 29-30 ms
after; the first batch (calibration, lists filling), 344-366 ms before, 158-164 ms after.
"""

from __future__ import annotations

import math

import torch

from mechscope.explain.config import ExemplarsConfig

INF = float("inf")
MAX = torch.iinfo(torch.int64).max
LOW31 = (1 << 31) - 1
# Up to this many windows a layer's batch gathers from the token-major activations (a cache line
# per window token); past it one unit-major copy is cheaper. Measured on a [1024, 1536] batch,
# 2 threads (2026-12-06): 3,000 windows 0.7 ms direct against 2.3 ms through the copy; 10,000:
# 2.8 against 2.5 ms.
DIRECT_WINDOWS = 6000
LOW32 = (1 << 32) - 1


class Scratch:
    """Buffers that the pass's large per-layer temporaries reuse, batch after batch.

    A fresh tensor of a few MB is new memory from the system, and its first write faults in
    every page; measured on the 2-core box (2026-12-05), that made one elementwise pass over a
    [1016, 1536] batch cost 3-4 ms instead of 0.4-0.7 ms. Reusing buffers keeps those pages."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape`` that the next ``get(name, ...)`` reuses."""
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = self._bufs[name] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)


class _Batch:
    """One batch's activations of one layer and the maps between valid rows and windows."""

    def __init__(self, acts: torch.Tensor, rows: torch.Tensor, first_row: int, cfg: ExemplarsConfig,
                 scratch: Scratch | None = None, expected: int | None = None):
        B, T, U = acts.shape
        self.flat = acts.reshape(B * T, U)  # [B*T, U]
        self.rows = rows  # [N] local row ids (b * T + p) of the valid tokens
        self.first_row, self.B, self.T, self.cfg = first_row, B, T, cfg
        self.scratch = scratch if scratch is not None else Scratch()
        self._padded: torch.Tensor | None = None  # [U, B, before + T + after], made once, on first use
        self.windows_read = 0  # windows read so far (a row of ``windows_all`` counts once)
        self.expected = expected  # about how many windows the merges will read, if known (a hint)

    def windows(self, local_rows: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
        """Activations of unit ``units[i]`` over the window around local row ``local_rows[i]`` -> [n, W]
        (NaN outside the context).

        Few windows are gathered from the token-major activations; where the windows expected
        (the layer's last batch read about as many) or those read so far pass ``DIRECT_WINDOWS``,
        from one unit-major copy of the batch padded with NaN on both sides of every context, where
        each window is one contiguous run. The same values either way
        (tests/unit/test_exemplars_merge.py)."""
        n = local_rows.shape[0]
        few = self.expected is None or self.expected <= DIRECT_WINDOWS
        direct = self._padded is None and few and self.windows_read + n <= DIRECT_WINDOWS
        self.windows_read += n
        if direct:
            idx, outside = self._window_rows(local_rows)  # [n, W]
            out = self.flat[idx, units[:, None]]
            return out.masked_fill_(outside, math.nan)
        # Padded position p + j holds the token at p + j - before: the window's first token at j = 0.
        return self._padded_windows()[units, local_rows // self.T, local_rows % self.T]

    def windows_all(self, local_rows: torch.Tensor) -> torch.Tensor:
        """Every unit's activations over the windows around ``local_rows`` [n] -> [U, n, W]."""
        self.windows_read += local_rows.shape[0]
        if self._padded is None:  # a few rows (the uniform samples' new tokens): whole rows of the batch
            idx, outside = self._window_rows(local_rows)
            out = self.flat[idx.view(-1)].view(*idx.shape, -1)  # [n, W, U]
            return out.masked_fill_(outside[..., None], math.nan).permute(2, 0, 1)
        return self._padded_windows()[:, local_rows // self.T, local_rows % self.T]

    def _window_rows(self, local_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``flat`` [n, W] around each local row (clamped into its context) and where the
        window runs outside its context [n, W] bool."""
        cfg = self.cfg
        p = local_rows % self.T
        q = p[:, None] + torch.arange(-cfg.before, cfg.after + 1, device=local_rows.device)  # [n, W] positions
        outside = (q < 0) | (q >= self.T)
        return (local_rows - p)[:, None] + q.clamp(0, self.T - 1), outside

    def _padded_windows(self) -> torch.Tensor:
        """[U, B, T, W] view: the window around every token of every unit."""
        cfg = self.cfg
        if self._padded is None:
            U = self.flat.shape[1]
            dt, dev = self.flat.dtype, self.flat.device
            pad = self.scratch.get("padded", (U, self.B, cfg.before + self.T + cfg.after), dt, dev)
            pad[:, :, :cfg.before] = math.nan
            pad[:, :, cfg.before + self.T:] = math.nan
            # One transposing copy straight into the padded buffer (1.8 ms on a [1024, 1536] batch
            # against 2.5 ms through a contiguous transposed copy; 2-core box, 2026-12-06).
            pad[:, :, cfg.before:cfg.before + self.T].copy_(self.flat.reshape(self.B, self.T, U).permute(2, 0, 1))
            self._padded = pad
        return self._padded.unfold(2, cfg.before + cfg.after + 1, 1)


def column_order_stat(x: torch.Tensor, *ranks: int) -> torch.Tensor:
    """The values of rank ``ranks`` (0: smallest) in each column of ``x`` [N, U] -> [U] (one rank)
    or [len(ranks), U]; what ``x.sort(0).values[ranks]`` holds.

    On a CPU numpy's introselect (``partition``) on the unit-major copy: measured 4.8 ms against
    19 ms for ``topk(20, dim=0)`` and 31 ms against 149 ms for ``torch.quantile`` (three
    quantiles) on a [1016, 1536] batch, 1 thread (2026-12-05). Columns with NaN sort it last, as
    torch does."""
    if x.device.type != "cpu":
        s = x.sort(0).values
        out = s[list(ranks)]
    else:
        import numpy as np

        xt = x.detach().T.contiguous().numpy()
        part = torch.from_numpy(np.partition(xt, sorted(set(ranks)), axis=1))  # [U, N]
        out = part[:, list(ranks)].T.to(x.dtype)
    return out[0] if len(ranks) == 1 else out


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
               largest: bool, cand: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Merge the batch's [N, U] activations ``x`` into the running best-k slots ``val``/``row`` [k, U],
    ``win`` [k, U, W] (in place). ``cand``: the (token, unit) pairs [C] that can enter (those that
    beat their unit's k-th value; more do no harm).

    Evicted slots (ascending) take the entering tokens best first, so the slots' layout does not
    depend on the path."""
    k = val.shape[0]
    N, U = x.shape
    if k == 0 or N == 0:
        return
    dev = x.device
    n_i, u_i = cand
    if n_i.numel() == 0:
        return
    units, inverse, col, (n_i, u_i) = _grouped(u_i, n_i, u_i)
    hi = ordered_bits(x[n_i, u_i])
    old_row = row[:, units].T  # [A, k]
    hi_old = ordered_bits(val[:, units].T)
    if batch.first_row + batch.flat.shape[0] + k < LOW31:
        # Tie-break by global row (+ 1), so old and new entries compare by their rows directly: every
        # old row is earlier than the batch's; empty slots (value -inf or +inf, which no candidate
        # has) by slot number.
        slots = torch.arange(k, device=dev).expand_as(old_row)
        old_tie = torch.where(old_row >= 0, old_row + 1, slots)
        new_tie = batch.rows[n_i] + (batch.first_row + 1)
    else:  # rows past 2^31: the old entries' rank by row (empty slots, row -1, first), new after them
        old_tie = torch.empty_like(old_row).scatter_(1, torch.argsort(old_row, dim=1, stable=True),
                                                     torch.arange(k, device=dev).expand_as(old_row))
        new_tie = n_i + k
    new = _padded(units.shape[0], inverse, col, ((LOW32 - hi if largest else hi) << 31) | new_tie)
    old = ((LOW32 - hi_old if largest else hi_old) << 31) | old_tie  # [A, k]
    sel_key, sel = torch.cat([old, new], 1).topk(k, dim=1, largest=False)  # [A, k], best first
    kept = torch.zeros(units.shape[0], k + 1, dtype=torch.bool, device=dev)
    kept.scatter_(1, sel.clamp(max=k), True)
    evicted = (~kept[:, :k]).nonzero()  # (a, slot), ascending per a
    entering = (sel >= k).nonzero()  # (a, position), best first per a; as many per a as evicted
    if entering.shape[0] == 0:
        return
    u, slot = units[evicted[:, 0]], evicted[:, 1]
    tie = sel_key[entering[:, 0], entering[:, 1]] & LOW31
    local = tie - (batch.first_row + 1) if batch.first_row + batch.flat.shape[0] + k < LOW31 else batch.rows[tie - k]
    val[slot, u] = batch.flat[local, u]
    row[slot, u] = local + batch.first_row
    W = win.shape[-1]
    win.view(-1, W).index_copy_(0, slot * win.shape[1] + u, batch.windows(local, u))  # win[slot, u] = ...


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
    W = win.shape[-1]
    flat_win = k_win.view(-1, W)  # [U * G * m, W]
    w = flat_win.index_select(0, lists[a2] * m + o[a2, r2])  # [c, W], read before writing
    if not bool(filled.all()):
        w[~filled[a2, r2]] = math.nan
    if nz.shape[0]:
        w[is_new[a2, r2]] = batch.windows(local, u)  # both in (a, r) order
    k_key[lists], k_val[lists], k_row[lists] = new_key, new_val, new_row
    flat_win.index_copy_(0, lists[a2] * m + r2, w)


def merge_shared_samples(key: torch.Tensor, val: torch.Tensor, row: torch.Tensor, win: torch.Tensor, tok_key: torch.Tensor,
                         x: torch.Tensor, batch: _Batch) -> bool:
    """``merge_samples`` for lists ``key`` [U, 1, m] that every unit holds alike (the uniform samples:
    one key per token, the same candidate tokens for every unit), done once and copied to every
    unit: the same entries in the same slots as U separate merges. Returns False, changing
    nothing, where the units' lists differ (the caller then merges them one by one)."""
    U, G, m = key.shape
    if m == 0 or G != 1 or U == 0:
        return True
    k0, r0 = key[0, 0], row[0, 0]
    if not (bool((key[:, 0] == k0).all()) and bool((row[:, 0] == r0).all())):
        return False
    dev = x.device
    sk, order = torch.sort(tok_key, stable=True)
    c = min(int(torch.searchsorted(sk, k0[-1:]).item()), m)  # tokens below the m-th key, in (key, token) order
    if c == 0:
        return True
    n_c = order[:c]
    slots = torch.arange(m, device=dev)
    new = (tok_key[n_c].view(torch.int32).long() << 32) | (n_c + m)
    old = torch.where(k0.isfinite(), (k0.view(torch.int32).long() << 32) | slots, MAX)
    codes = torch.cat([old, new]).topk(m, largest=False).values  # [m] ascending
    filled = codes != MAX
    idx = codes & LOW32
    is_new = filled & (idx >= m)
    o = torch.where(filled & ~is_new, idx, 0)
    key[:, 0] = torch.where(filled, (codes >> 32).int().view(torch.float32), INF)
    changed = (is_new | (o != slots) | ~filled).nonzero()[:, 0]  # positions whose entry changes
    r_new = is_new.nonzero()[:, 0]
    n = idx[r_new] - m
    local = batch.rows[n]
    vals = val[:, 0].gather(1, o.expand(U, m))  # [U, m]
    vals[:, ~filled] = math.nan
    vals[:, r_new] = x[n].T
    rows = torch.where(filled, r0.gather(0, o), -1)
    rows[r_new] = local + batch.first_row
    w = win[:, 0, o[changed]]  # [U, c, W], read before writing
    w[:, ~filled[changed]] = math.nan
    w[:, is_new[changed]] = batch.windows_all(local)
    val[:, 0], win[:, 0, changed] = vals, w
    row[:, 0] = rows
    return True
