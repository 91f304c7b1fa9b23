"""Streaming per-feature statistics for dashboards: one pass, memory independent of the corpus.

``FeatureStats.update(tokens, acts)`` takes one batch of contexts (token ids [batch, pos] and the
selected features' activations [batch, pos, F]) and updates, for all F features at once (tensor
operations over the feature axis; no Python loop over features):

1. **density**: the number of tokens with activation > 0;
2. **histogram**: counts per bin ``[zero, (0, e_0), [e_0, e_1), ..., [e_last, inf)]`` with
   log-spaced edges ``e``; the zero bin counts activations <= 0, so every feature's counts sum
   to the number of tokens seen;
3. **top-k contexts**: each context's maximum activation (and its position) is merged into a
   running top-k [F, k], together with the token window around the maximum and the per-token
   activations in it;
4. **samples per bin** (for quantile groups): every firing token gets a uniform random key, and
   per (feature, histogram bin) the ``n_samples`` tokens with the smallest keys are kept
   (bottom-k sampling). The bottom-k of a union is the bottom-k of the parts' bottom-k sets, so
   the buffer merges batch by batch, and at the end the union of any range of bins yields an
   exact uniform sample (without replacement) of that range's tokens.

Windows hold ``window_left`` tokens before the centre token and ``window_right`` after it;
positions outside the context have token id -1 and activation 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class StatsConfig:
    n_top: int = 10
    """Top activating contexts kept per feature."""
    n_samples: int = 5
    """Tokens kept per (feature, histogram bin) for the quantile groups."""
    window_left: int = 12
    window_right: int = 4
    hist_min: float = 1e-3
    """Lowest log-spaced edge; positive activations below it go to the underflow bin."""
    hist_max: float = 1e3
    hist_bins: int = 48
    """Log-spaced bins between hist_min and hist_max (plus zero, underflow and overflow bins)."""
    seed: int = 0


class FeatureStats:
    """Streaming dashboard statistics for F features (see the module docstring)."""

    def __init__(self, n_features: int, cfg: StatsConfig | None = None, device: str | torch.device = "cpu"):
        self.cfg = c = cfg or StatsConfig()
        self.F, self.device = n_features, torch.device(device)
        self.W = c.window_left + 1 + c.window_right
        self.edges = torch.logspace(math.log10(c.hist_min), math.log10(c.hist_max), c.hist_bins + 1,
                                    dtype=torch.float64, device=self.device)
        self.NB = len(self.edges) + 2  # zero, underflow, hist_bins, overflow
        F, k, W = n_features, c.n_top, self.W
        self.n_tokens = 0
        self.n_contexts = 0
        self.n_firing = torch.zeros(F, dtype=torch.long, device=self.device)
        self.sum_act = torch.zeros(F, dtype=torch.float64, device=self.device)
        self.max_act = torch.zeros(F, dtype=torch.float64, device=self.device)
        self.hist = torch.zeros(F, self.NB, dtype=torch.long, device=self.device)
        # top-k contexts: [F, k] (+ window [F, k, W])
        self.top_val = torch.full((F, k), -math.inf, device=self.device)
        self.top_ctx = torch.full((F, k), -1, dtype=torch.long, device=self.device)
        self.top_pos = torch.full((F, k), -1, dtype=torch.long, device=self.device)
        self.top_tok = torch.full((F, k, W), -1, dtype=torch.long, device=self.device)
        self.top_win = torch.zeros(F, k, W, device=self.device)
        # bottom-k samples per (feature, bin), stored flat: segment = feature * NB + bin
        self.s_seg = torch.empty(0, dtype=torch.long, device=self.device)
        self.s_key = torch.empty(0, device=self.device)
        self.s_val = torch.empty(0, device=self.device)
        self.s_ctx = torch.empty(0, dtype=torch.long, device=self.device)
        self.s_pos = torch.empty(0, dtype=torch.long, device=self.device)
        self.s_tok = torch.empty(0, W, dtype=torch.long, device=self.device)
        self.s_win = torch.empty(0, W, device=self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(c.seed)

    # ---------------------------------------------------------------- helpers
    def bins(self, acts: Tensor) -> Tensor:
        """Histogram bin index of each activation (0 = zero bin, 1 = underflow, NB-1 = overflow)."""
        b = torch.bucketize(acts.double(), self.edges, right=True) + 1  # 1..len(edges)+1
        return torch.where(acts > 0, b, torch.zeros_like(b))

    def bin_edges(self) -> list[tuple[float, float]]:
        """(lo, hi) of every bin; the zero bin is (0, 0), the overflow bin's hi is inf."""
        e = self.edges.tolist()
        return [(0.0, 0.0), (0.0, e[0])] + list(zip(e[:-1], e[1:])) + [(e[-1], math.inf)]

    def _windows(self, tokens: Tensor, acts: Tensor, b: Tensor, pos: Tensor, feat: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids and activations [n, W] in the window around (context b, position pos) for
        feature column ``feat`` (all [n])."""
        c = self.cfg
        L = tokens.shape[1]
        idx = pos[:, None] + torch.arange(-c.window_left, c.window_right + 1, device=tokens.device)  # [n, W]
        ok = (idx >= 0) & (idx < L)
        idx_c = idx.clamp(0, L - 1)
        tok = torch.where(ok, tokens[b[:, None], idx_c], torch.full_like(idx_c, -1))
        win = torch.where(ok, acts[b[:, None], idx_c, feat[:, None]], torch.zeros((), dtype=acts.dtype, device=acts.device))
        return tok, win.float()

    # ---------------------------------------------------------------- update
    @torch.no_grad()
    def update(self, tokens: Tensor, acts: Tensor) -> None:
        """Add one batch: ``tokens`` [B, L] ids, ``acts`` [B, L, F] feature activations.
        Contexts are numbered in the order they arrive."""
        B, L, F = acts.shape
        if F != self.F or tokens.shape != (B, L):
            raise ValueError(f"expected tokens [B, L] and acts [B, L, {self.F}], got {tuple(tokens.shape)} and {tuple(acts.shape)}")
        tokens, acts = tokens.to(self.device), acts.to(self.device)
        offset = self.n_contexts
        self.n_tokens += B * L
        self.n_contexts += B
        # everything below the top-k works on the firing entries only (SAE codes are sparse)
        b, pos, feat = (acts > 0).nonzero(as_tuple=True)  # [M] each
        vals = acts[b, pos, feat]
        fired = torch.bincount(feat, minlength=F)
        self.n_firing += fired
        self.sum_act.index_add_(0, feat, vals.double())
        hb = self.bins(vals)  # [M], positive bins 1..NB-1
        self.hist += torch.bincount(feat * self.NB + hb, minlength=F * self.NB).view(F, self.NB)
        self.hist[:, 0] += B * L - fired  # the zero bin
        self._update_top(tokens, acts, offset)
        self._update_samples(tokens, acts, b, pos, feat, vals, hb, offset)

    def _update_top(self, tokens: Tensor, acts: Tensor, offset: int) -> None:
        B, L, F = acts.shape
        k = self.cfg.n_top
        mx, arg = acts.max(dim=1)  # [B, F] per-context maximum and its position
        self.max_act = torch.maximum(self.max_act, mx.max(0).values.double())
        vals = torch.cat([self.top_val, mx.T.float()], dim=1)  # [F, k + B]
        # A stable sort, not topk: equal values keep the earlier context (the buffer holds earlier
        # contexts, and the batch follows in order), so the kept contexts do not depend on the batch size.
        new_val, sel = (t[:, :k] for t in vals.sort(dim=1, descending=True, stable=True))  # [F, k]
        from_batch = sel >= k
        # candidate windows only for the selected batch entries
        fb, kb = from_batch.nonzero(as_tuple=True)  # feature, slot
        b = sel[fb, kb] - k
        pos = arg[b, fb]
        tok, win = self._windows(tokens, acts, b, pos, fb)
        keep = sel.clamp(max=k - 1)  # slot in the old buffer (ignored where from_batch)
        top_ctx = torch.gather(self.top_ctx, 1, keep)
        top_pos = torch.gather(self.top_pos, 1, keep)
        top_tok = torch.gather(self.top_tok, 1, keep[..., None].expand(-1, -1, self.W))
        top_win = torch.gather(self.top_win, 1, keep[..., None].expand(-1, -1, self.W))
        top_ctx[fb, kb] = b + offset
        top_pos[fb, kb] = pos
        top_tok[fb, kb] = tok
        top_win[fb, kb] = win
        self.top_val, self.top_ctx, self.top_pos, self.top_tok, self.top_win = new_val, top_ctx, top_pos, top_tok, top_win

    def _update_samples(self, tokens: Tensor, acts: Tensor, b: Tensor, pos: Tensor, feat: Tensor,
                        vals: Tensor, hb: Tensor, offset: int) -> None:
        """Merge the firing entries (b, pos, feat) [M] into the per-(feature, bin) bottom-k."""
        s = self.cfg.n_samples
        if len(b) == 0:
            return
        seg_new = feat * self.NB + hb
        key_new = torch.rand(len(b), generator=self.gen, device=self.device)
        seg = torch.cat([self.s_seg, seg_new])
        key = torch.cat([self.s_key, key_new])
        order = key.argsort()
        order = order[seg[order].argsort(stable=True)]  # by segment, then key
        seg_sorted = seg[order]
        _, counts = torch.unique_consecutive(seg_sorted, return_counts=True)
        starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
        rank = torch.arange(len(order), device=self.device) - starts
        chosen = order[rank < s]
        n_old = len(self.s_seg)
        old, new = chosen[chosen < n_old], chosen[chosen >= n_old] - n_old
        tok, win = self._windows(tokens, acts, b[new], pos[new], feat[new])
        self.s_seg = torch.cat([self.s_seg[old], seg_new[new]])
        self.s_key = torch.cat([self.s_key[old], key_new[new]])
        self.s_val = torch.cat([self.s_val[old], vals[new].float()])
        self.s_ctx = torch.cat([self.s_ctx[old], b[new] + offset])
        self.s_pos = torch.cat([self.s_pos[old], pos[new]])
        self.s_tok = torch.cat([self.s_tok[old], tok])
        self.s_win = torch.cat([self.s_win[old], win])

    # ---------------------------------------------------------------- results
    # Read-out converts the buffers to Python lists once (cached until the next update), so
    # asking for every feature of a wide SAE stays linear in the buffer size.
    def _lists(self) -> dict:
        if getattr(self, "_cache_at", None) != self.n_tokens:
            order = torch.argsort(self.s_seg, stable=True)  # by feature, then bin
            seg = self.s_seg[order]
            bounds = torch.searchsorted(seg, torch.arange(self.F + 1, device=self.device) * self.NB)
            self._cache = {
                "top": (self.top_val.tolist(), self.top_ctx.tolist(), self.top_pos.tolist(),
                        self.top_tok.tolist(), self.top_win.tolist()),
                "s": (seg.tolist(), self.s_key[order].tolist(), self.s_val[order].tolist(), self.s_ctx[order].tolist(),
                      self.s_pos[order].tolist(), self.s_tok[order].tolist(), self.s_win[order].tolist()),
                "bounds": bounds.tolist(), "hist": self.hist.tolist(), "max": self.max_act.tolist(),
                "edges": self.bin_edges(),
            }
            self._cache_at = self.n_tokens
        return self._cache

    def top(self, j: int) -> list[dict]:
        """Feature j's top contexts (activation > 0 only), highest first."""
        val, ctx, pos, tok, win = (x[j] for x in self._lists()["top"])
        return [{"value": val[i], "context": ctx[i], "position": pos[i], "token_ids": tok[i], "acts": win[i]}
                for i in range(len(val)) if val[i] > 0]

    def quantile_groups(self, j: int, n_groups: int) -> list[dict]:
        """Feature j's firing tokens split into up to ``n_groups`` groups at quantiles of the
        histogram (boundaries on bin edges, so a bin is never split), each with a uniform sample
        of ``n_samples`` of its tokens (highest activation first). Groups run from the lowest
        activations up; a bin holding more than 1/n_groups of the mass merges groups."""
        c = self._lists()
        counts = c["hist"][j][1:]  # positive bins only
        total = sum(counts)
        if total == 0:
            return []
        group_of: dict[int, int] = {}  # positive bin (1-based) -> group
        below = 0
        for i, n in enumerate(counts):
            if n:
                group_of[i + 1] = min(n_groups - 1, n_groups * below // total)
            below += n
        seg, key, val, ctx, pos, tok, win = c["s"]
        a, b = c["bounds"][j], c["bounds"][j + 1]
        members: dict[int, list[int]] = {}
        for i in range(a, b):
            members.setdefault(group_of[seg[i] - j * self.NB], []).append(i)
        edges, out = c["edges"], []
        for g in sorted(set(group_of.values())):
            bins = [k for k, v in group_of.items() if v == g]
            chosen = sorted(members.get(g, []), key=lambda i: key[i])[: self.cfg.n_samples]  # bottom-k of the union
            chosen.sort(key=lambda i: -val[i])
            out.append({"lo": edges[bins[0]][0], "hi": min(edges[bins[-1]][1], c["max"][j]),
                        "n_tokens": sum(counts[k - 1] for k in bins),
                        "samples": [{"value": val[i], "context": ctx[i], "position": pos[i], "token_ids": tok[i],
                                     "acts": win[i]} for i in chosen]})
        return out
