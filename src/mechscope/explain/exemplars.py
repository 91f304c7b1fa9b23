"""The exemplars pass: one streaming pass over a corpus that keeps, for every unit of the chosen
layers, what an explainer and a scorer need (Bills et al. 2023; Choi et al. 2024).

    state = harvest_exemplars(model, ExemplarsConfig(units="mlp", n_tokens=65536), db=UnitDB(...))

Algorithm (per batch of packed contexts, per layer; U units, N valid tokens):

1. Pack the corpus into contexts as ``activations/store.py`` does (documents separated by one
   separator token) and run the bridge only up to the last hooked layer (``Harvester``).
   Position 0 of a context (the attention sink) and separator/BOS tokens are not candidates;
   nor, for transcoder features (``cfg.sink_ratio``), are the other attention sinks the sets
   leave out of training (``activations.store.context_sinks``, per context).
2. Calibration: the corpus's first ``CALIBRATION_CONTEXTS`` contexts (the default first batch)
   set, per unit, the histogram range (its min and
   max; ``n_bins`` equal bins between them and one overflow bin each side) and the quantile-bin
   edges for random sampling (its ``quantiles``, default 0.5/0.9/0.99). A first slice, not a
   streaming estimate: the edges must be fixed for the histogram counts and the samples of
   later batches to mean the same thing, and a resumed run reads them from the checkpoint.
3. Top-k and bottom-k: the k largest (smallest) activations of all tokens so far, ties to the
   earlier token (what a stable sort in corpus order keeps). Entries are (value, context,
   position) plus the unit's activations over the window (``before`` tokens before, ``after``
   after, clipped to the context), gathered from the batch's activations at the moment an entry
   enters, only for the entries that enter (evicted slots are reused), so nothing else per token
   is kept and no second forward pass is needed.
4. Random samples: every token gets a key u ~ U[0, 1) from a generator seeded by (seed,
   context) (so keys do not depend on batching, sharding or resuming). A unit keeps, per quantile
   bin, the ``per_quantile`` tokens of smallest key in that bin (a uniform sample of the bin),
   and ``n_random`` tokens of smallest second key among all tokens (a uniform sample); ties to
   the kept entry, then the earlier token.

   Merging (``exemplar_merge.py``): only candidates are merged, the tokens that beat their
   list's current last entry (a unit's k-th value, a bin's m-th key), and after the first
   batches they are a small fraction of the tokens. By value, one clamp of the batch to each
   unit's bounds finds them (``_outside``); by key, no pass at all: the keys are the same for
   every unit, so a unit's candidates are the first tokens in key order (``_key_prefix``), and
   the uniform samples, the same tokens for every unit, are merged once for all units. Each
   list's old entries and candidates are ordered by one int64 (the value's or key's
   order-preserving bits, then the tie-break), so the merge is exact.
5. Density (fraction of tokens > 0), counts of the histogram, number of tokens: sums.
6. At the end, each unit's record: max/min (from the top/bottom lists), density, quantiles (exact
   where the rank falls inside the top-k or bottom-k lists, else linear inside the histogram
   bin, so within one bin width of numpy's ``quantile`` where the two activations around the
   rank share a bin, and of the gap between them otherwise; None where the rank falls past the
   lists into an overflow bin wider than one bin, whose values only the list's last entry and the
   calibrated range bound: on the embedded model a linear guess there was up to 56 bin widths
   off), the histogram (rebinned to at most 32
   bins), the top/bottom output tokens of its direction; its exemplars with their split: each
   (unit, context) pair goes to train/valid/test by a hash of (seed, unit, context), so an
   explainer's train windows never overlap the windows a scorer reads.

Memory is the state, O(units x (k + k_bottom + samples) x window), plus the token ids of the pass
(4 bytes a token, needed to write the windows' tokens); nothing grows with the tokens otherwise.
Resumable: every ``checkpoint_every`` contexts the state is saved as ``state.safetensors``, its
settings and counters in the file's metadata, replaced atomically (never pickle; ``state.json``
is a readable copy); a run with the same config continues after the last checkpoint
and ends with exactly the state of an uninterrupted run (batches are the same, all updates are
deterministic). Shardable by layers and unit ranges (disjoint units, idempotent DB writes)
and by token ranges (``first_context``): every pass and shard calibrates on the corpus's first
``CALIBRATION_CONTEXTS`` contexts (one extra forward for a shard that starts later or a batch
size other than that), so the shards' histogram bins and sample bins mean the same thing, and ``merge_states``
folds the checkpoints of contiguous token shards into the state of one pass over their union:
top/bottom lists and samples keep the best entries of both under the pass's own orders (ties to
the earlier token), counts add. Shards that start on a batch boundary give exactly the state of
the uninterrupted pass (the same batches, so the same activations bit for bit).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, cast

import torch

from mechscope.activations.config import StoreConfig
from mechscope.activations.corpus import changed_corpus
from mechscope.activations.store import Harvester, context_sinks, pack_contexts, sink_hooks, special_token_ids
from mechscope.errors import MechscopeError, check_config
from mechscope.explain.config import ExemplarsConfig
from mechscope.explain.exemplar_merge import (
    INF,
    Scratch,
    _Batch,
    column_order_stat,
    merge_best,
    merge_samples,
    merge_shared_samples,
)
from mechscope.explain.types import Exemplar, ExemplarKind, ExemplarSplit, UnitRecord, UnitRef
from mechscope.explain.units import UnitSource, output_logits, token_strings, unit_source
from mechscope.progress import ProgressArg, as_progress

if TYPE_CHECKING:
    from mechscope.models import Model

STATE_SCHEMA = 2
CALIBRATION_CONTEXTS = 8
"""The histogram range and quantile-bin edges come from the corpus's first 8 contexts (the
default batch), whatever ``batch_size`` and ``first_context``: a pass's results do not depend on
its batch size (a final partial batch is read too), and token shards share one calibration.
Before session 26 the first batch calibrated, so ``--batch-size 1`` and ``8`` gave other
quantiles and per-quantile samples (a sweep found 241 of 256 units' lists differed)."""
TINY = torch.finfo(torch.float32).tiny


@dataclass
class LayerState:
    """The running state of one layer's units (all tensors [.., U] on the harvest device)."""

    top_val: torch.Tensor  # [k, U] unsorted slots
    top_row: torch.Tensor  # [k, U] int64 global row id = context * T + position (-1: empty)
    top_win: torch.Tensor  # [k, U, W] activations over the window (NaN outside the context)
    bot_val: torch.Tensor
    bot_row: torch.Tensor
    bot_win: torch.Tensor
    q_key: torch.Tensor  # [U, nb, m] keys of the quantile-bin samples, sorted ascending (inf: empty)
    q_val: torch.Tensor
    q_row: torch.Tensor
    q_win: torch.Tensor  # [U, nb, m, W]
    r_key: torch.Tensor  # [U, 1, m_r] the uniform random samples
    r_val: torch.Tensor
    r_row: torch.Tensor
    r_win: torch.Tensor
    positive: torch.Tensor  # [U] int64 tokens > 0
    hist: torch.Tensor  # [U, n_bins + 2] int64 (underflow, bins, overflow)
    lo: torch.Tensor  # [U] histogram range start
    inv: torch.Tensor  # [U] bins per unit of activation
    q_edges: torch.Tensor  # [U, nq] quantile-bin edges (rounded to histogram bin edges)
    q_table: torch.Tensor  # [U * (n_bins + 2)] int64: the quantile bin of each histogram bin

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.__dict__)


def _new_state(cfg: ExemplarsConfig, acts: torch.Tensor, like: LayerState | None = None) -> LayerState:
    """Empty state calibrated on the first batch's valid activations ``acts`` [N, U], or with
    the calibration of ``like`` (another shard's state of the same pass)."""
    n, U = acts.shape
    dev = acts.device
    W = cfg.before + cfg.after + 1
    nb, m, mr = len(cfg.quantiles) + 1, cfg.per_quantile, cfg.n_random
    if like is not None:
        st = _new_state(cfg, acts)
        st.lo, st.inv, st.q_edges, st.q_table = (t.to(dev).clone() for t in (like.lo, like.inv, like.q_edges, like.q_table))
        return st
    lo, hi, q_raw = _column_stats(acts, cfg.quantiles)  # [U], [U], [nq, U]
    inv = cfg.n_bins / (hi - lo).clamp_min(1e-12)
    q_raw = q_raw.T  # [U, nq]
    # Quantile-bin edges on histogram bin edges, so one index gives a token's histogram bin and sample bin.
    j = ((q_raw - lo[:, None]) * inv[:, None]).round().clamp(0, cfg.n_bins)  # [U, nq] edge numbers
    q_edges = lo[:, None] + j / inv[:, None]
    h = torch.arange(cfg.n_bins + 2, device=dev)  # 0: underflow, 1..n_bins, n_bins + 1: overflow
    q_table = (h[None, :, None] >= j[:, None, :] + 1).sum(-1).reshape(-1)  # [U * (n_bins + 2)]

    def empty(*shape, fill=math.nan, dtype=torch.float32):
        return torch.full(shape, fill, dtype=dtype, device=dev)

    return LayerState(
        top_val=empty(cfg.k, U, fill=-INF), top_row=empty(cfg.k, U, fill=-1, dtype=torch.long), top_win=empty(cfg.k, U, W),
        bot_val=empty(cfg.k_bottom, U, fill=INF), bot_row=empty(cfg.k_bottom, U, fill=-1, dtype=torch.long),
        bot_win=empty(cfg.k_bottom, U, W),
        q_key=empty(U, nb, m, fill=INF), q_val=empty(U, nb, m), q_row=empty(U, nb, m, fill=-1, dtype=torch.long),
        q_win=empty(U, nb, m, W),
        r_key=empty(U, 1, mr, fill=INF), r_val=empty(U, 1, mr), r_row=empty(U, 1, mr, fill=-1, dtype=torch.long),
        r_win=empty(U, 1, mr, W),
        positive=torch.zeros(U, dtype=torch.long, device=dev), hist=torch.zeros(U, cfg.n_bins + 2, dtype=torch.long, device=dev),
        lo=lo.float(), inv=inv.float(), q_edges=q_edges.float(), q_table=q_table.long(),
    )


def _column_stats(x: torch.Tensor, qs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each column's min, max and ``torch.quantile(x, qs, dim=0)`` [len(qs), U] (linear
    interpolation, bit for bit), from order statistics selected in one go, not sorted
    (``column_order_stat``); with NaN, torch's own reductions (NaN propagates)."""
    N = x.shape[0]
    q = torch.tensor(qs, dtype=x.dtype, device=x.device)
    if N < 2 or bool(torch.isnan(x).any()):
        return x.min(0).values, x.max(0).values, torch.quantile(x, q, dim=0)
    ranks = q * (N - 1)
    below, above = ranks.long(), ranks.ceil().long()
    stats = column_order_stat(x, 0, N - 1, *below.tolist(), *above.tolist())  # [2 + 2 * nq, U]
    nq = len(qs)
    quant = torch.lerp(stats[2:2 + nq], stats[2 + nq:], (ranks - below)[:, None].expand(nq, x.shape[1]))
    return stats[0], stats[1], quant


def _token_keys(seed: int, contexts: range, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two keys in [0, 1) for every token of ``contexts`` [n_ctx * T], from per-context generators."""
    a, b = [], []
    for c in contexts:
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        k = torch.rand(2, T, generator=g)
        a.append(k[0])
        b.append(k[1])
    return torch.cat(a), torch.cat(b)


@torch.no_grad()
def update(state: LayerState, acts: torch.Tensor, valid: torch.Tensor, first_row: int,
           keys: tuple[torch.Tensor, torch.Tensor], cfg: ExemplarsConfig, scratch: Scratch | None = None,
           expected_windows: int | None = None) -> int:
    """Fold one batch ``acts`` [B, T, U] (``valid`` [B, T] bool) into ``state``.

    Only candidates are merged: tokens above a unit's k-th top value or below its k-th bottom
    value, and tokens whose key is below their sample list's m-th key (looked up per (unit,
    histogram bin)), found in one pass and one ``nonzero`` (each merge keeps its exact ones). The
    uniform samples' candidates come from the keys sorted once per batch (the keys are shared by
    all units); while lists fill, the batch's k best values and each bin's first m keys bound them.
    ``scratch``: buffers to reuse across calls (``exemplar_merge.Scratch``; the pass keeps one).
    ``expected_windows``: about how many windows the merges will read (the pass passes what this
    layer's last batch read, which this returns; a hint for ``_Batch.windows``, results do not
    depend on it)."""
    scratch = scratch if scratch is not None else Scratch()
    rows = valid.reshape(-1).nonzero()[:, 0]  # [N]
    batch = _Batch(acts, rows, first_row, cfg, scratch, expected_windows)
    _update(state, batch, keys, cfg, scratch)
    return batch.windows_read


def _update(state: LayerState, batch: _Batch, keys: tuple[torch.Tensor, torch.Tensor], cfg: ExemplarsConfig,
            scratch: Scratch) -> None:
    """``update`` of one batch."""
    rows, acts = batch.rows, batch.flat
    U = acts.shape[1]
    N, dev = rows.shape[0], acts.device
    x = torch.index_select(batch.flat, 0, rows, out=scratch.get("x", (N, U), batch.flat.dtype, dev))  # [N, U]
    work = scratch.get("work", (N, U), x.dtype, dev)
    # Tokens > 0: clamping to [0, the smallest normal float] and rounding up gives exactly 1.0 for
    # x > 0 and 0.0 otherwise (two float passes and a matrix-vector sum; a bool compare and its
    # column sum cost 4x as much on a CPU).
    pos = torch.clamp(x, 0.0, TINY, out=work).ceil_()
    ones = x.new_ones(1, N, dtype=torch.float32 if N < 2**24 else torch.float64)  # exact counts
    state.positive += (ones @ pos.to(ones.dtype))[0].long()
    nb = cfg.n_bins
    # Histogram bin of every token, 0 (below lo) .. nb + 1 (above hi), offset by unit: (x - lo) * inv + 1.
    h = torch.addcmul(1 - state.lo * state.inv, x, state.inv, out=work).floor_().clamp_(0, nb + 1)  # [N, U]
    offset = torch.arange(U, device=dev) * (nb + 2)
    if U * (nb + 2) < 2**24:  # exact in float32: add the unit offset before the one conversion (int32 bins count faster)
        idx = scratch.get("bins", (N, U), torch.int32, dev).copy_(h.add_(offset.float()))
    else:
        idx = h.long().add_(offset)
    state.hist += torch.bincount(idx.view(-1), minlength=U * (nb + 2)).view(U, nb + 2)
    k1, k2 = (k.to(dev)[rows] for k in keys)
    G = state.q_key.shape[1]
    # The thresholds, before any list changes: a token that does not beat them cannot enter.
    thr_top = state.top_val.min(0).values  # [U]
    thr_bot = state.bot_val.max(0).values if cfg.k_bottom else None
    tau_q = state.q_key[:, :, -1] if cfg.per_quantile else torch.zeros(U, G, device=dev)  # [U, G] m-th keys
    dense_best = bool((state.top_row < 0).any()) or bool((state.bot_row < 0).any())
    dense_q = cfg.per_quantile > 0 and bool(tau_q.isinf().float().mean() > 0.25)
    sparse_q = cfg.per_quantile > 0 and not dense_q
    if not dense_best or sparse_q:
        # A superset of the candidates: above the unit's k-th top value, below its k-th bottom value
        # (exact compares: on heavy-tailed units most tokens share a histogram bin), or a key below
        # the m-th key of the token's (unit, bin) sample list.
        # The sample lists: below the top quantile bin one key bound per unit (the bins' largest
        # m-th key; those bins are common, so their bounds are small); the top bin is rare, so its
        # tokens are all candidates, found by value: above its edge less one histogram bin (a
        # superset whatever the rounding of the bin index), which also covers the top-k compare
        # wherever the edge is below the k-th value. Exact selection follows per candidate.
        val_thr = thr_top if not dense_best else None
        bot = thr_bot if not dense_best else None
        key_bound = None
        if sparse_q:
            key_bound = tau_q[:, 0] if G == 1 else tau_q[:, :-1].max(1).values  # [U]
            if G > 1:
                edge = state.q_edges[:, -1] - 1.0 / state.inv  # [U]
                val_thr = edge if val_thr is None else torch.minimum(val_thr, edge)
        n_i, u_i = _outside(x, bot, val_thr, work)
        if key_bound is not None:
            # By key: the keys are the same for every unit, so unit u's candidates are the first
            # tokens in key order, those below its bound (a few per unit), found without a pass.
            n_k, u_k = _key_prefix(k1, key_bound)
            keep = k1[n_i] >= key_bound[u_i]  # the value candidates not found by key
            n_i, u_i = torch.cat([n_i[keep], n_k]), torch.cat([u_i[keep], u_k])
    if dense_best:
        # Lists filling: only the batch's k best values of a unit (ties included) that beat its
        # k-th kept can enter: x >= the k-th best, i.e. above the float just below it.
        k, kb = state.top_val.shape[0], state.bot_val.shape[0]
        kth = column_order_stat(x, N - min(k, N), *([min(kb, N) - 1] if kb else [])).view(-1, U)
        hi = torch.maximum(torch.nextafter(kth[0], torch.tensor(-INF)), thr_top)
        lo = torch.minimum(torch.nextafter(kth[1], torch.tensor(INF)), cast(torch.Tensor, thr_bot)) if kb else None
        _merge_top_bottom(state, x, batch, _outside(x, lo, hi, work), hi, lo)
    else:
        _merge_top_bottom(state, x, batch, (n_i, u_i), thr_top, thr_bot)
    if dense_q:
        # Lists filling: in each (unit, bin) only the bin's first m tokens in (key, token) order can enter.
        _, by_key = torch.sort(k1, stable=True)
        table = state.q_table.to(torch.int8) if G < 128 else state.q_table
        g_t = table.take(idx.index_select(0, by_key).long()).T.contiguous()  # [U, N] bins, tokens in key order
        ctype = torch.int16 if g_t.shape[1] < 2**15 else torch.int32
        first = torch.zeros_like(g_t, dtype=torch.bool)
        for g in range(G):  # unit-major, so each running count is along contiguous memory
            in_g = g_t == g
            first |= in_g & (in_g.cumsum(1, dtype=ctype) <= cfg.per_quantile)
        u_q, pos = first.nonzero().unbind(1)
        n_q, g_q = by_key[pos], g_t[u_q, pos].long()
        sel = k1[n_q] < tau_q[u_q, g_q]
        merge_samples(state.q_key, state.q_val, state.q_row, state.q_win, k1, x, batch, (n_q[sel], u_q[sel], g_q[sel]))
    elif cfg.per_quantile:
        g_i = state.q_table.take(idx[n_i, u_i].long())
        sel = k1[n_i] < tau_q[u_i, g_i]
        merge_samples(state.q_key, state.q_val, state.q_row, state.q_win, k1, x, batch, (n_i[sel], u_i[sel], g_i[sel]))
    if cfg.n_random:
        # Uniform samples: the keys are the same for every unit, so unit u's candidates are the
        # first tokens in (key, token) order, those below its m-th key, and at most m of them.
        # Every unit holds the same tokens (one key per token), so the merge is done once where it can.
        if merge_shared_samples(state.r_key, state.r_val, state.r_row, state.r_win, k2, x, batch):
            return
        n_r, u_r = _key_prefix(k2, state.r_key[:, 0, -1].contiguous(), cfg.n_random)
        if n_r.numel():
            merge_samples(state.r_key, state.r_val, state.r_row, state.r_win, k2, x, batch, (n_r, u_r, torch.zeros_like(u_r)))


def _merge_top_bottom(state: LayerState, x: torch.Tensor, batch: _Batch, cand: tuple[torch.Tensor, torch.Tensor],
                      hi: torch.Tensor, lo: torch.Tensor | None) -> None:
    """Merge the candidates (token, unit) [C] above ``hi`` [U] into the top lists and those below
    ``lo`` [U] (None: no bottom lists) into the bottom lists."""
    n, u = cand
    xv = x[n, u]
    sel = xv > hi[u]
    merge_best(state.top_val, state.top_row, state.top_win, x, batch, True, (n[sel], u[sel]))
    if lo is not None:
        sel = xv < lo[u]
        merge_best(state.bot_val, state.bot_row, state.bot_win, x, batch, False, (n[sel], u[sel]))


def _outside(x: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None, work: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, unit) pairs [C] of ``x`` [N, U] below ``lo`` [U] or above ``hi`` [U] (None: no bound),
    in row-major order, or a superset of them (more do no harm). ``work``: a buffer like ``x`` to use.

    Clamping to [lo, hi] changes exactly the entries outside it, so the candidates are where
    ``x - clamp(x)`` is not zero (exact for floats that differ, with gradual underflow; bounds near
    zero, where a flush-to-zero mode could lose a difference, are compared plainly); the nonzero
    search runs over 64-bit words first (half the elements) and then inside the few words that
    hold one."""
    N, U = x.shape
    if lo is None and hi is None:
        e = x.new_empty(0, dtype=torch.long)
        return e, e
    bounds = [t for t in (lo, hi) if t is not None]
    if (lo is not None and hi is not None and bool((lo > hi).any())) or any(bool(((t.abs() < 1e-30) & (t != 0)).any()) for t in bounds):
        nz = torch.zeros_like(x, dtype=torch.bool)
        if lo is not None:
            nz |= x < lo
        if hi is not None:
            nz |= x > hi
        nz = nz.nonzero()
        return nz[:, 0], nz[:, 1]
    diff = torch.clamp(x, lo, hi, out=work if work is not None else torch.empty_like(x))
    diff = torch.sub(x, diff, out=diff).view(-1)  # [N * U], 0 inside the bounds
    if diff.numel() % 2:
        diff = torch.cat([diff, diff.new_zeros(1)])
    words = diff.view(torch.int64).nonzero()[:, 0]  # words holding a candidate (-0.0 is never a difference)
    j = diff.view(-1, 2)[words].nonzero()
    flat = words[j[:, 0]] * 2 + j[:, 1]
    return flat // U, flat % U


def _key_prefix(keys: torch.Tensor, bound: torch.Tensor, cap: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token, unit) pairs [C] with ``keys[token] < bound[unit]`` (``keys`` [N] shared by all units,
    ``bound`` [U]): each unit's first tokens in (key, token) order, at most ``cap`` of them."""
    sk, order = torch.sort(keys, stable=True)
    count = torch.searchsorted(sk, bound.contiguous())  # [U] keys below the bound
    if cap is not None:
        count = count.clamp_(max=cap)
    n = int(count.sum())
    U = bound.shape[0]
    units = torch.repeat_interleave(torch.arange(U, device=keys.device), count)
    j = torch.arange(n, device=keys.device) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    return order[j], units


# ----------------------------------------------------------------------------------- the pass


class Interrupted(Exception):
    """Raised by an ``on_batch`` callback to stop a pass (tests); the last checkpoint stays."""


@dataclass
class HarvestState:
    """Everything the pass has gathered: per-layer states, the token ids, where it stands."""

    cfg: ExemplarsConfig
    layers: dict[int, LayerState]
    token_ids: torch.Tensor  # [contexts done, T] int32
    contexts_done: int
    unit_offset: int  # the first unit index (unit_range[0])
    n_tokens: int  # valid tokens seen
    model: dict = field(default_factory=dict)
    """The model that made it: ``name``, ``source`` and ``fingerprint`` (``Model.fingerprint``)."""
    exhausted: bool = False
    """The corpus ended before the pass had its tokens (a last token shard may be short)."""

    def save(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"{layer}.{name}": t.detach().cpu().contiguous() for layer, st in self.layers.items()
                   for name, t in st.tensors().items()}
        tensors["token_ids"] = self.token_ids.cpu().contiguous()
        meta = {"schema_version": STATE_SCHEMA, "config": self.cfg.to_dict(), "contexts_done": self.contexts_done,
                "unit_offset": self.unit_offset, "n_tokens": self.n_tokens, "layers": sorted(self.layers), "model": self.model,
                "exhausted": self.exhausted}
        # One file is the checkpoint (its settings and counters ride in its metadata), so one
        # os.replace commits it: a kill leaves the old state or the new, never tensors of one
        # and counters of the other. state.json is a copy for people to read. Fixed temporary
        # names: the next save overwrites what a kill mid-write left.
        tmp = folder / "state.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
        os.replace(tmp, folder / "state.safetensors")
        tmp = folder / "state.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, folder / "state.json")

    @classmethod
    def load(cls, folder: str | Path, cfg: ExemplarsConfig, device, fingerprint: str | None = None,
             unit_weights: dict[str, str] | None = None, corpus_digest: str | None = None) -> "HarvestState | None":
        """The checkpoint in ``folder`` if there is one for the same config (and model, by its
        ``fingerprint``, and SAE or transcoder weights, by ``unit_weights``: layer -> the unit
        source's ``weights_fingerprint``, and the corpus's contents by ``corpus_digest``, where both
        record them), else None. The units' folder
        is named in the config, so a dictionary retrained in place would otherwise resume into
        the old one's statistics (found by a sweep)."""
        if not (Path(folder) / "state.safetensors").is_file():
            return None
        state = cls.read(folder, device)
        mine, theirs = cfg.to_dict(), state.cfg.to_dict()
        diff = [k for k in mine if mine[k] != theirs.get(k)]
        if diff:
            raise MechscopeError(f"the checkpoint in {folder} was made with other settings ({', '.join(diff)} differ); "
                                 "use the same options to resume or another --checkpoint folder.")
        made = state.model.get("fingerprint")
        if fingerprint and made and made != fingerprint:
            raise MechscopeError(f"the checkpoint in {folder} was made with another model ({state.model.get('source') or state.model.get('name')}); "
                                 "resume it with that --model or use another --checkpoint folder.")
        was = state.model.get("unit_weights") or {}
        changed = [layer for layer, fp in (unit_weights or {}).items() if was.get(layer) not in (None, fp)]
        if changed:
            raise MechscopeError(f"the checkpoint in {folder} was made with other weights of --units {cfg.units} (layer "
                                 f"{changed[0]} differs: the folder was written again since); use another --checkpoint folder.")
        if corpus_digest and state.model.get("corpus_digest") not in (None, corpus_digest):
            raise changed_corpus(str(folder), cfg.corpus or "embedded")
        state.cfg = cfg
        return state

    @classmethod
    def read(cls, folder: str | Path, device="cpu") -> "HarvestState":
        """The checkpoint in ``folder`` with the settings it was made with (a token shard to merge)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / "state.safetensors").is_file():
            raise MechscopeError(f"{folder} holds no exemplars checkpoint (state.safetensors); give the --checkpoint folder of a mechscope exemplars run.")
        try:
            with safe_open(str(folder / "state.safetensors"), "pt") as f:
                meta = json.loads((f.metadata() or {})["state"])
            if meta.get("schema_version") != STATE_SCHEMA:
                raise MechscopeError(f"the checkpoint in {folder} was made by another version of mechscope (schema "
                                     f"{meta.get('schema_version')}, this one reads {STATE_SCHEMA}); run the pass again.")
            tensors = load_file(str(folder / "state.safetensors"), device=str(device))
            cfg = ExemplarsConfig(**meta["config"])
            layers = {}
            for layer in meta["layers"]:
                fields = {name: tensors[f"{layer}.{name}"] for name in LayerState.__dataclass_fields__}
                layers[int(layer)] = LayerState(**fields)
            counters = int(meta["contexts_done"]), int(meta["unit_offset"]), int(meta["n_tokens"])
            made_by = meta.get("model") or {}
            if not isinstance(made_by, dict):
                raise ValueError("model")
            token_ids = tensors["token_ids"].cpu()
        except MechscopeError:
            raise
        except Exception as e:  # noqa: BLE001 - any damage reads the same to the user
            raise MechscopeError(f"the checkpoint in {folder} is damaged ({type(e).__name__}); delete the folder to start again.") from None
        return cls(cfg, layers, token_ids, *counters, model=made_by, exhausted=bool(meta.get("exhausted", False)))


def _contexts(model: Model, cfg: ExemplarsConfig) -> Iterator[list[int]]:
    from mechscope.activations.corpus import get_corpus

    corpus = get_corpus(cfg.corpus)
    n = 0
    for i, ctx in enumerate(pack_contexts(model.tokenizer, iter(corpus), cfg.context_len)):
        if i < cfg.first_context:
            continue
        yield ctx
        n += 1
        if n == cfg.n_contexts:
            return


def harvest_exemplars(model: Model, cfg: ExemplarsConfig | None, db=None, checkpoint: str | Path | None = None,
                      on_batch: Callable[[int], None] | None = None, progress: ProgressArg = False,
                      source: UnitSource | None = None, contexts: list[list[int]] | None = None,
                      calibration: HarvestState | None = None) -> HarvestState:
    """Run the pass (resuming from ``checkpoint`` when it holds one) and, with ``db``, write every
    unit's record and exemplars. ``on_batch(batches_done)`` runs after each batch (a hook that
    may stop the pass, not progress: ``progress`` is a ``mechscope.progress`` argument).
    ``contexts`` (token id lists, from the corpus's first context) replaces the corpus (tests).
    ``calibration``: another token shard of the same pass (its checkpoint, ``HarvestState.read``),
    whose histogram and sample bins this shard takes instead of recomputing them from the
    calibration contexts: bit-identical bins even where that batch would come out a little
    differently (another machine, device or maths library)."""
    from mechscope.models import require_model

    require_model(model, "harvest_exemplars")
    check_config(cfg, ExemplarsConfig, "harvest_exemplars")
    cfg = cfg or ExemplarsConfig()
    source = source or unit_source(model, cfg.units)
    layers = cfg.layers if cfg.layers is not None else source.layers
    bad = [layer for layer in layers if layer not in source.layers]
    if bad:
        raise MechscopeError(f"layer {bad[0]} is not among the layers of --units {cfg.units} ({_ranges(source.layers)}).")
    a, b = cfg.unit_range or (0, None)
    for layer in layers:
        if db is not None:  # before the pass: another dictionary of the same folder name is refused now
            db.check_source_weights(source.kind, source.source, layer, source.weights_fingerprint(layer))
        if a >= source.n_units(layer):
            raise MechscopeError(f"--units range starts at {a} but layer {layer} has {source.n_units(layer)} units.")
    hooks = list(dict.fromkeys(source.hook(layer) for layer in layers))
    ratio = cfg.effective_sink_ratio
    sinks_read = sink_hooks(model, max(source.layers)) if ratio else []  # the source's deepest layer, as its training
    hooks = list(dict.fromkeys(hooks + sinks_read))
    harvester = Harvester(model, StoreConfig(hooks=hooks, context_len=cfg.context_len, batch_size=cfg.batch_size,
                                             skip_first=0, shuffle=False, buffer_tokens=2 * cfg.context_len))
    dev = model.device
    fingerprint = model.fingerprint()
    unit_weights = {str(layer): source.weights_fingerprint(layer) for layer in layers}
    made_by: dict[str, Any] = {"name": model.summary.name, "source": _model_spec(model), "fingerprint": fingerprint,
                               "unit_weights": unit_weights}
    if contexts is None:  # what the corpus holds: a resume, a calibration shard and a merge must share it
        from mechscope.activations.corpus import get_corpus

        made_by["corpus_digest"] = get_corpus(cfg.corpus).digest()
    state = HarvestState.load(checkpoint, cfg, dev, fingerprint, unit_weights, made_by.get("corpus_digest")) if checkpoint else None
    if state is None:
        state = HarvestState(cfg, {}, torch.zeros(0, cfg.context_len, dtype=torch.int32), 0, a, 0, model=made_by)
    special = torch.tensor(special_token_ids(model.tokenizer), dtype=torch.long)  # separator, BOS and other sinks
    T = cfg.context_len

    def batch_acts(ctx: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """(tokens [B, T], candidate mask [B, T], {layer: activations [B, T, U]}) of one batch."""
        tokens = torch.tensor(ctx, dtype=torch.long)  # [B, T]
        valid = ~torch.isin(tokens, special)
        valid[:, 0] = False
        got = harvester.run(tokens, skip_first=0)  # {hook: [B*T, d]}
        if sinks_read:
            norms = [got[h].view(len(ctx), T, -1).float().norm(dim=-1).cpu() for h in sinks_read]  # [B, T] per block
            valid &= ~context_sinks(norms, cast(float, ratio))
        acts = {layer: source.acts(layer, got[source.hook(layer)].view(len(ctx), T, -1))[..., a:b].float() for layer in layers}
        return tokens, valid, acts

    if calibration is not None and not state.layers:
        _check_calibration(calibration, cfg, made_by, layers, a, b, source)
        cal_layers = calibration.layers
    else:
        cal_layers = {}
    if not state.layers and not cal_layers and (cfg.first_context > 0 or cfg.batch_size != CALIBRATION_CONTEXTS):
        # Calibrate on the corpus's first CALIBRATION_CONTEXTS contexts whatever the batch size and
        # wherever a token shard starts; with the default batch size that is the first batch itself.
        C = CALIBRATION_CONTEXTS
        head = list(contexts[:C]) if contexts is not None else \
            list(itertools.islice(_contexts(model, replace(cfg, first_context=0, n_tokens=max(cfg.n_tokens, C * T))), C))
        if head:
            _, valid0, acts0 = batch_acts(head)
            for layer, x in acts0.items():
                state.layers[layer] = _new_state(cfg, x.reshape(-1, x.shape[-1])[valid0.reshape(-1).to(x.device)])
    stream = iter(contexts[cfg.first_context:cfg.first_context + cfg.n_contexts]) if contexts is not None else _contexts(model, cfg)
    for _ in range(state.contexts_done):  # resume: skip what the checkpoint holds
        next(stream, None)
    bar = as_progress(progress).phase("exemplars", total=cfg.n_contexts * cfg.context_len, unit="tok",
                                      initial=state.contexts_done * cfg.context_len)
    batches = state.contexts_done // cfg.batch_size
    since_ckpt = 0
    scratch = Scratch()
    windows_read: dict[int, int] = {}  # per layer, by the last batch: a hint for the next one
    while True:
        ctx = [c for _, c in zip(range(min(cfg.batch_size, cfg.n_contexts - state.contexts_done)), stream)]
        if not ctx:  # a final partial batch is read too, so the batch size changes no result
            state.exhausted = state.contexts_done < cfg.n_contexts  # the corpus ran out first
            break
        tokens, valid, acts = batch_acts(ctx)
        first = cfg.first_context + state.contexts_done
        keys = _token_keys(cfg.seed, range(first, first + len(ctx)), T)
        for layer, x in acts.items():  # x [B, T, U]
            if layer not in state.layers:
                state.layers[layer] = _new_state(cfg, x.reshape(-1, x.shape[-1])[valid.reshape(-1).to(x.device)],
                                                 cal_layers.get(layer))
            windows_read[layer] = update(state.layers[layer], x, valid.to(x.device), first * T, keys, cfg, scratch,
                                         windows_read.get(layer))
        state.token_ids = torch.cat([state.token_ids, tokens.to(torch.int32)])
        state.contexts_done += len(ctx)
        state.n_tokens += int(valid.sum())
        batches += 1
        since_ckpt += len(ctx)
        bar.advance(tokens.numel())
        if checkpoint and cfg.checkpoint_every and since_ckpt >= cfg.checkpoint_every:
            state.save(checkpoint)
            since_ckpt = 0
        if on_batch is not None:
            on_batch(batches)
    bar.close()
    if state.contexts_done == 0:
        raise MechscopeError(f"the corpus gave fewer than {cfg.batch_size} contexts of {T} tokens; give a larger corpus or smaller --batch-size.")
    if checkpoint:
        state.save(checkpoint)
    if db is not None:
        write_db(model, source, state, db, progress=progress)
    return state


def _check_calibration(cal: HarvestState, cfg: ExemplarsConfig, made_by: dict, layers: list[int], a: int, b: int | None,
                       source: UnitSource) -> None:
    """One sentence unless ``cal`` is a shard of the same pass (settings, model, layers, units)."""
    diff = cfg.shard_differences(cal.cfg)
    if diff:
        raise MechscopeError(f"--calibration was made with other settings ({', '.join(diff)} differ); give a shard of this pass.")
    if cal.model.get("fingerprint") and cal.model["fingerprint"] != made_by["fingerprint"]:
        raise MechscopeError(f"--calibration was made with another model ({cal.model.get('source')}); give a shard of this pass.")
    if None not in (cal.model.get("corpus_digest"), made_by.get("corpus_digest")) and cal.model["corpus_digest"] != made_by["corpus_digest"]:
        raise MechscopeError("--calibration was made on other contents of the corpus (the file differs on that machine); "
                             "give a shard of this pass over the same text.")
    n = (b if b is not None else source.n_units(layers[0])) - a
    if sorted(cal.layers) != sorted(layers) or cal.unit_offset != a or any(st.lo.shape[0] != n for st in cal.layers.values()):
        raise MechscopeError("--calibration holds other layers or units; give a shard of this pass.")


def _model_spec(model: Model) -> str:
    """What ``--model`` loads this model again from anywhere: the embedded default's alias, an
    absolute path, or the hub id."""
    from mechscope.models.load import EMBEDDED_NAME

    if model.summary.name == EMBEDDED_NAME:
        return "default"
    src = Path(model.summary.source).expanduser()
    return str(src.resolve()) if src.exists() else model.summary.source


def _ranges(layers: list[int]) -> str:
    return ", ".join(str(x) for x in layers) if len(layers) < 6 else f"{layers[0]}-{layers[-1]}"


# ----------------------------------------------------------------------------------- results


def quantiles(st: LayerState, n_tokens: int, qs, cfg: ExemplarsConfig) -> torch.Tensor:
    """[U, len(qs)] activation quantiles (numpy's linear definition) from the top/bottom lists
    and the histogram (see the module docstring); NaN where the rank lies in an overflow bin
    beyond the top/bottom lists that spans more than one bin width (not resolved)."""
    U = st.hist.shape[0]
    top = st.top_val.sort(0, descending=True).values.double()  # [k, U]: sorted[n-1-i] = top[i]
    bot = st.bot_val.sort(0).values.double()  # [kb, U]: sorted[i] = bot[i]
    cum = st.hist.cumsum(1).double()  # [U, nb+2]
    width = 1.0 / st.inv.double()
    hi_edge = st.lo.double() + cfg.n_bins * width
    last = cum.shape[1] - 1

    def exact(j: int) -> torch.Tensor | None:
        """sorted[j] when the top or bottom list holds it."""
        if 0 <= n_tokens - 1 - j < top.shape[0]:
            return top[n_tokens - 1 - j]
        if 0 <= j < bot.shape[0]:
            return bot[j]
        return None

    out = torch.empty(U, len(qs), dtype=torch.float64)
    for i, q in enumerate(qs):
        t = q * (n_tokens - 1)  # position in the sorted activations
        j0, frac = math.floor(t), t - math.floor(t)
        a, b = exact(j0), exact(min(j0 + 1, n_tokens - 1))
        if a is not None and b is not None:
            out[:, i] = a * (1 - frac) + b * frac
            continue
        # Inside the histogram: the bin holding sorted position t, values spread evenly in the bin.
        j = torch.searchsorted(cum, torch.full((U, 1), float(t), dtype=torch.float64), right=True)[:, 0].clamp(max=last)
        prev = torch.where(j > 0, cum.gather(1, (j - 1).clamp(min=0)[:, None])[:, 0], torch.zeros(U, dtype=torch.float64))
        cnt = st.hist.gather(1, j[:, None])[:, 0].double().clamp(min=1)
        left = st.lo.double() + (j - 1).double() * width
        right = left + width
        left_pos, right_pos = prev - 0.5, prev + cnt - 0.5
        # Overflow bins: between the last exact value of the bottom (top) list and the range's edge;
        # a linear guess there is kept only where that span is at most one bin wide.
        kb, kt = bot.shape[0], top.shape[0]
        under, over = j == 0, j == last
        nan = torch.full_like(width, math.nan)
        low_end, high_end = (bot[-1] if kb else nan), (top[-1] if kt else nan)
        left = torch.where(under, low_end, torch.where(over, hi_edge, left))
        left_pos = torch.where(under, torch.full_like(prev, max(kb - 1, 0)), left_pos)
        right = torch.where(under, st.lo.double(), torch.where(over, high_end, right))
        right_pos = torch.where(over, torch.full_like(prev, n_tokens - max(kt, 1)), right_pos)
        pos = ((t - left_pos) / (right_pos - left_pos).clamp(min=1e-9)).clamp(0, 1)
        unresolved = (under | over) & ~((right - left).abs() <= width)  # NaN spans count as unresolved
        out[:, i] = torch.where(unresolved, math.nan, left + (right - left) * pos)
    return out


def _split_of(seed: int, unit: torch.Tensor, context: torch.Tensor, fractions) -> list[str]:
    """train/valid/test of each (unit, context) pair, by an integer hash of (seed, unit, context)."""
    h = (unit.long() * 73856093) ^ (context.long() * 19349663) ^ (seed * 83492791 + 0x5BD1E995)
    h = h & 0x7FFFFFFF
    h = (h * 1103515245 + 12345) & 0x7FFFFFFF
    h = ((h >> 13) ^ h) * 1664525 & 0x7FFFFFFF
    u = h.double() / 2**31
    tr, va = fractions[0], fractions[0] + fractions[1]
    return ["train" if x < tr else "valid" if x < va else "test" for x in u.tolist()]


def _best_first(val: torch.Tensor, row: torch.Tensor, largest: bool) -> torch.Tensor:
    """[k, U] slot order by value (largest first for the top list), ties by row: the merge's order."""
    by_row = row.sort(dim=0, stable=True).indices
    return by_row.gather(0, val.gather(0, by_row).sort(dim=0, descending=largest, stable=True).indices)


def exemplars_of(state: HarvestState, layer: int, vocab: list[str]) -> list[list[Exemplar]]:
    """Each unit's exemplars (top sorted by value, bottom, quantile bins, random)."""
    cfg, st = state.cfg, state.layers[layer]
    T, W, U = cfg.context_len, cfg.before + cfg.after + 1, st.top_val.shape[1]
    out: list[list[Exemplar]] = [[] for _ in range(U)]
    top_order, bot_order = _best_first(st.top_val, st.top_row, True), _best_first(st.bot_val, st.bot_row, False)
    groups: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, int | None]] = [
        ("top", st.top_val.gather(0, top_order).T, st.top_row.gather(0, top_order).T,
         st.top_win.gather(0, top_order[..., None].expand(-1, -1, W)).transpose(0, 1), None),
        ("bottom", st.bot_val.gather(0, bot_order).T, st.bot_row.gather(0, bot_order).T,
         st.bot_win.gather(0, bot_order[..., None].expand(-1, -1, W)).transpose(0, 1), None),
    ]
    nb = st.q_key.shape[1]
    for g in range(nb):
        groups.append(("quantile", st.q_val[:, g], st.q_row[:, g], st.q_win[:, g], g))
    groups.append(("random", st.r_val[:, 0], st.r_row[:, 0], st.r_win[:, 0], None))
    ids = state.token_ids
    for kind, val, row, win, qbin in groups:  # val/row [U, m], win [U, m, W]
        ok = (row >= 0).nonzero()
        if ok.shape[0] == 0:
            continue
        u_i, m_i = ok[:, 0], ok[:, 1]
        r = row[u_i, m_i].cpu()
        ctx, pos = r // T, r % T
        local = ctx - cfg.first_context
        splits = _split_of(cfg.seed, u_i.cpu() + state.unit_offset, ctx, cfg.split)
        wins = win[u_i, m_i].cpu()
        for n, (u, c, p, lc) in enumerate(zip(u_i.tolist(), ctx.tolist(), pos.tolist(), local.tolist())):
            p0, p1 = max(0, p - cfg.before), min(T, p + cfg.after + 1)
            acts = wins[n, p0 - (p - cfg.before): p1 - (p - cfg.before)].tolist()
            out[u].append(Exemplar(tokens=[vocab[t] for t in ids[lc, p0:p1].tolist()], acts=acts, focus=p - p0,
                                   kind=cast(ExemplarKind, kind), split=cast(ExemplarSplit, splits[n]), quantile=qbin, context=c, position=p))
    return out


def records_of(model, source: UnitSource, state: HarvestState, layer: int, vocab: list[str]) -> list[UnitRecord]:
    cfg, st = state.cfg, state.layers[layer]
    U, off = st.top_val.shape[1], state.unit_offset
    n = state.n_tokens
    qv = quantiles(st, n, cfg.report_quantiles, cfg)
    dirs = source.directions(layer)[off:off + U]
    top_l, bot_l = output_logits(model, dirs, cfg.n_logits, vocab)
    max_v = st.top_val.max(0).values.cpu()
    min_v = (st.bot_val.min(0).values if st.bot_val.shape[0] else st.lo).cpu()
    hist = st.hist.cpu()
    group = cfg.n_bins // 32 if cfg.n_bins % 32 == 0 and cfg.n_bins > 32 else 1
    counts = hist[:, 1:-1].reshape(U, -1, group).sum(2)  # [U, bins]
    counts[:, 0] += hist[:, 0]
    counts[:, -1] += hist[:, -1]
    steps = torch.arange(counts.shape[1] + 1, dtype=torch.float64) * group
    edges = st.lo.double().cpu()[:, None] + steps[None, :] / st.inv.double().cpu()[:, None]  # [U, bins+1]
    edges[:, 0] = torch.minimum(edges[:, 0], min_v.double())
    edges[:, -1] = torch.maximum(edges[:, -1], max_v.double())
    counts_l, edges_l, qv_l = counts.tolist(), edges.tolist(), qv.tolist()
    positive = st.positive.cpu().tolist()
    recs = []
    for u in range(U):
        recs.append(UnitRecord(
            unit=UnitRef(source.kind, layer, off + u, source.source),  # type: ignore[arg-type]
            max_act=float(max_v[u]), min_act=float(min_v[u]), density=positive[u] / max(n, 1),
            quantiles=[(q, None if math.isnan(v) else round(v, 6)) for q, v in zip(cfg.report_quantiles, qv_l[u])],
            histogram=([round(e, 6) for e in edges_l[u]], counts_l[u]),
            top_logits=top_l[u], bottom_logits=bot_l[u], n_tokens=n))
    return recs


def write_db(model: Model, source: UnitSource, state: HarvestState, db, chunk: int = 512,
             progress: ProgressArg = False) -> None:
    """Every harvested unit's record and exemplars into ``db`` (idempotent: replaces)."""
    vocab = token_strings(model.tokenizer, int(model.summary.d_vocab))
    db.set_model_summary(_summary(model))
    bar = as_progress(progress).phase("database", total=sum(st.top_val.shape[1] for st in state.layers.values()), unit="unit")
    for layer in sorted(state.layers):
        db.check_source_weights(source.kind, source.source, layer, source.weights_fingerprint(layer), record=True)
        db.set_unit_count(source.kind, source.source, layer, source.n_units(layer))
        # the pass that made these units (its seed chose the samples and splits): recorded, so it can be told and repeated
        db.set_exemplars_settings(source.kind, source.source, layer, {
            **state.cfg.to_dict(), "contexts_done": state.contexts_done, "n_tokens_seen": state.n_tokens,
            "corpus_digest": state.model.get("corpus_digest")})
        recs = records_of(model, source, state, layer, vocab)
        exs = exemplars_of(state, layer, vocab)
        for i in range(0, len(recs), chunk):
            db.put_units(recs[i:i + chunk])
            db.put_exemplars_many([(r.unit, e) for r, e in zip(recs[i:i + chunk], exs[i:i + chunk])])
            bar.advance(len(recs[i:i + chunk]))
    bar.close()


def _summary(model: Model) -> dict:
    from dataclasses import asdict

    out = {k: v for k, v in asdict(model.summary).items() if isinstance(v, (int, str, float))}
    out["source"] = _model_spec(model)  # what --model (and describe's default simulator) loads again from anywhere
    return out
