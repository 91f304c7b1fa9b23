"""Exact attention-softmax effects of query and key edges (AtP*'s QK fix, per edge).

Gradient attribution goes blind where a softmax saturates: an induction head that puts
weight 0.9999 on one key has almost zero gradient with respect to its keys and queries, yet
patching the previous-token head's output into those keys moves the pattern completely.
Kramar et al. 2024 (AtP*) compute the effect of a query or key change *through the softmax*
exactly and linearise only downstream of the head. mechscope does that for every edge into a
query or key receiver:

1. From the clean pass: each layer's residual input x [B, P, D], rotated queries and keys,
   values, the attention pattern A, and (over the IG passes) the averaged gradient of the
   metric at the head's output z, g_z [B, P, H, e].
2. For an edge s -> q of head h, the query input becomes x + d_s (d_s = src_s - clean_s).
   With the layer's norm in its fitted form (y = scale * base(x) + bias; base = RMS or
   layer normalisation, see ``models.norms.fit_norm``) and W' the projection with the scale
   folded in, the query moves *exactly* by

       dq_s = (inv'_s - inv) x_c W' + inv'_s d_s W'_c,   inv'_s = 1 / rms(x_c + d_{s,c})

   (x_c, d_c: centred for layer norm, W'_c: W' centred over d), where inv'_s needs only the
   dot products x_c . d_s and |d_s|^2. Rotary embeddings are applied to dq_s (they are
   linear per position) and the new scores are S + scale * rot(dq_s) . k. Keys likewise.
3. The new pattern is softmax'd exactly; the edge's score is
   sum_{b,i,j} g_z[b,i,h] . (A'_s - A)[b,h,i,j] v[b,j]: exact at the head, first order
   downstream (IG-averaged for EAP-IG). A key edge enters a KV head: its score sums over the
   query heads of the group.

Cost: the products d_s . (W'_c rot^T k) are batched GEMMs over (position, example) of
[senders, d_model] x [d_model, heads * positions]; for short prompts (positions < d_head)
that is cheaper than projecting every sender's delta through W_Q and W_K. A query row only
sees the keys up to itself, so the rows go in about ``QK_BLOCKS`` blocks, each against the
keys up to its end (about 9/16 of the square), and the softmax and readout work in
place on the GEMM's output. The deltas come position first, [P, B, S, D], permuted once by
the caller for all layers. Measured on 2 cores (session 14, 25 IOI prompts x 18 tokens, 150 senders):
1.34 s a layer before, about 0.4 s now, with the same effects to 5e-7.

Per-head query/key norms (Qwen3, Gemma 3: an RMS norm over each head's d_head after the
projection and before rotary) make the score change nonlinear in d_s, so the readout trick
above does not apply. Those layers take ``_chunk_normed``: every sender's moved pre-norm query
(and key) is formed, [H, P, B, S, e], and dotted with the clean keys (queries) rotated back and
scaled by the norm's gain; its 1 / rms multiplies the scores. The projection of every delta
costs about d_head / positions times the readout's products (docs/decisions.md: 1.3 s against
0.6 s a layer at SmolLM2's shape, 201 senders, 25 x 18 positions); the effects are
exact in the same sense (tested against the patched head's output on a tiny Qwen3 and Gemma 3).

Nothing is assumed about the attention module: the rotary formula, the head norms' form, the
score scale and the pattern are checked against the model's own hooks on the first batch
(pattern and z reconstructed to 1e-4); Gemma 2's soft-capped scores (``c * tanh(s / c)``,
before the mask) are read when the module names its cap, and a sliding window shorter than the
prompts when the module or its config names it (session 29). A layer that does not match
(ALiBi, partial rotary, a query/key norm over all heads (OLMo-2) or of unknown form, a residual
norm of unknown form) keeps the plain gradient score for its q/k edges, and
``QKExact.fallback_layers`` says which.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mechscope.models.hooks import attn_hook, attn_pattern, attn_z
from mechscope.models.norms import fit_norm, head_norm_modules

if TYPE_CHECKING:
    from mechscope.models import Model

MAX_ELEMS = 48_000_000  # per chunk of examples: the largest temporaries (``effects`` counts them per layout)
QK_BLOCKS = 8
"""About this many blocks of query rows in the readout, each against the keys up to its end
(2 cores, 150-290 senders: 8 beat 2, 4 and one row a block at 18 and 64 positions)."""


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF's rotary helper: [x1, x2] -> [-x2, x1] on the last dimension."""
    a, b = x.chunk(2, -1)
    return torch.cat([-b, a], -1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding x * cos + rotate_half(x) * sin; cos/sin broadcast to x."""
    return x * cos + rotate_half(x) * sin


def rotate_t(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The transpose of ``rotate``: (rotate(q) . u) == (q . rotate_t(u))."""
    return u * cos - rotate_half(u * sin)


def _need(t: torch.Tensor | None) -> torch.Tensor:
    """A captured tensor that the clean pass must have left (``verify`` checks before use)."""
    if t is None:
        raise RuntimeError("exact q/k scoring needs the clean pass's captures of this layer; they are missing")
    return t


@dataclass
class LayerCapture:
    """What the clean pass leaves for one layer (filled by hooks, ``None`` until then)."""

    q: torch.Tensor | None = None  # [B, P, H, e] before rotary (and before a per-head query norm)
    k: torch.Tensor | None = None  # [B, P, KV, e] before rotary and the key norm; captured only with head norms
    q_rot: torch.Tensor | None = None  # [B, P, H, e]
    k_rot: torch.Tensor | None = None  # [B, P, KV, e]
    v: torch.Tensor | None = None  # [B, P, KV, e]
    pattern: torch.Tensor | None = None  # [B, H, P, P]
    z: torch.Tensor | None = None  # [B, P, H, e]
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    gz: torch.Tensor | None = None  # summed over passes, [B, P, H, e]


@dataclass
class QKExact:
    """Per-layer captures of one sub-batch and the exact q/k edge effects computed from them."""

    n_layers: int
    scale: list[float] = field(default_factory=list)
    cap: list[float] = field(default_factory=list)  # per layer, the scores' soft-cap c (0: none)
    window: list[int] = field(default_factory=list)  # per layer, the sliding window (0: none)
    checked: dict[int, bool] = field(default_factory=dict)  # layer -> reconstruction matched
    head_norms: dict[int, tuple[HeadNorm | None, HeadNorm | None]] = field(default_factory=dict)  # layer -> (query, key) norms read

    def __post_init__(self) -> None:
        self.layers = [LayerCapture() for _ in range(self.n_layers)]

    @property
    def fallback_layers(self) -> list[int]:
        return [l for l, ok in self.checked.items() if not ok]

    def reset(self) -> None:
        self.layers = [LayerCapture() for _ in range(self.n_layers)]

    def hooks(self, model: Model, capture_clean: bool) -> list[tuple[str, object]]:
        """Forward hooks: the clean-pass tensors (when ``capture_clean``)."""
        if not capture_clean:
            return []
        names = set(model.bridge.hook_dict)
        hooks = []
        for l in range(self.n_layers):
            rot = attn_hook(l, "rot_q") in names
            want = {"q": attn_hook(l, "q"), "q_rot": attn_hook(l, "rot_q" if rot else "q"),
                    "k_rot": attn_hook(l, "rot_k" if rot else "k"), "v": attn_hook(l, "v"),
                    "pattern": attn_pattern(l), "z": attn_z(l)}
            if rot:
                want |= {"cos": attn_hook(l, "cos"), "sin": attn_hook(l, "sin")}
            if any(m is not None for m in head_norm_modules(model, l)):
                want["k"] = attn_hook(l, "k")
            for attr, name in want.items():
                hooks.append((name, self._grab(l, attr)))
        return hooks

    def _grab(self, l: int, attr: str):
        def hook(x, hook):
            setattr(self.layers[l], attr, x.detach())
            return x

        return hook

    def add_gz(self, l: int, g: torch.Tensor) -> None:
        c = self.layers[l]
        c.gz = g.detach().float().clone() if c.gz is None else c.gz.add_(g.detach().float())

    def verify(self, model: Model, l: int, heads) -> bool:
        """Check rotary, score scale and pattern against the model's own values (once per layer)."""
        if l in self.checked:
            return self.checked[l]
        c = self.layers[l]
        got = (c.q, c.q_rot, c.v, c.pattern, c.z)
        ok = heads.kind in ("rms", "ln") and c.k_rot is not None and all(t is not None for t in got)
        if ok:
            q, q_rot, v, pattern, z = (_need(t) for t in got)
        norms = head_norm_modules(model, l)
        if ok and any(m is not None for m in norms):  # per-head query/key norms: read them, then check with them
            e = q.shape[-1]
            qn, kn = (HeadNorm.fit(m, e, q.device) if m is not None else None for m in norms)
            ok = (c.cos is not None and c.cos.shape[-1] == e and c.k is not None
                  and all((m is None) == (n is None) for m, n in zip(norms, (qn, kn)))
                  and _close(rotate(_norm(_need(c.k).float(), kn), c.cos.float()[:, :, None], _need(c.sin).float()[:, :, None]),
                             _need(c.k_rot)))
            if ok:
                self.head_norms[l] = (qn, kn)
                q = _norm(q.float(), qn)
        if ok and c.cos is not None:
            e = q.shape[-1]
            ok = c.cos.shape[-1] == e and _close(rotate(q.float(), c.cos.float()[:, :, None], _need(c.sin).float()[:, :, None]), q_rot)
        if ok:
            attn = model.bridge.blocks[l].attn.original_component
            e = q_rot.shape[-1]
            cands = [getattr(attn, "scaling", None), getattr(attn, "scale", None), 1 / math.sqrt(e)]
            cap = getattr(attn, "attn_logit_softcapping", None) or getattr(getattr(attn, "config", None), "attn_logit_softcapping", None)
            caps = [0.0] + ([float(cap)] if isinstance(cap, (int, float)) and cap > 0 else [])  # Gemma 2: c * tanh(s / c)
            # The layer's declared sliding window, the only one tried: where every masked key's
            # weight is tiny anyway, "no window" would pass the check too and then score keys
            # the model never sees.
            win = declared_window(attn, l)
            windows = [win if win is not None and 0 < win < q_rot.shape[1] else 0]
            ok = False
            for sc, cp, win in itertools.product([float(x) for x in cands if isinstance(x, (int, float))], caps, windows):
                A = torch.softmax(soft_cap(self._scores(c, sc, win), cp), -1)
                if _close(A, pattern) and _close(_attend(A, v), z):
                    for name in ("scale", "cap", "window"):
                        got = getattr(self, name)
                        got += [0] * (self.n_layers - len(got))
                    self.scale[l], self.cap[l], self.window[l] = sc, cp, win
                    ok = True
                    break
        self.checked[l] = ok
        return ok

    @staticmethod
    def _scores(c: LayerCapture, scale: float, window: int = 0) -> torch.Tensor:
        """Masked clean attention scores [B, H, P, P] from the rotated q and k: causal, and with
        ``window`` > 0 a query sees only the ``window`` latest keys (itself included), as
        Hugging Face's sliding-window masks do."""
        q_rot, k_rot = _need(c.q_rot), _need(c.k_rot)
        H, KV = q_rot.shape[2], k_rot.shape[2]
        k = k_rot.float().repeat_interleave(H // KV, 2)
        s = torch.einsum("bihe,bjhe->bhij", q_rot.float(), k) * scale
        P = s.shape[-1]
        mask = torch.ones(P, P, dtype=torch.bool, device=s.device).triu(1)
        if window > 0:
            mask |= torch.ones(P, P, dtype=torch.bool, device=s.device).tril(-window)
        return s.masked_fill(mask, float("-inf"))

    def effects(self, l: int, heads, x: torch.Tensor, delta: torch.Tensor, steps: int,
                positions_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact effects of every upstream sender's edge into layer ``l``'s queries and keys.

        x [B, P, D] the layer's residual input; delta [S, B, P, D] = src - clean of the S
        upstream senders, or [P, B, S, D] with ``positions_first`` (the layout the products
        use: a caller scoring every layer permutes once, not once per layer). Returns
        per-example effects (q [S, B, H], k [S, B, KV]).
        """
        c = self.layers[l]
        if not positions_first:
            delta = delta.permute(2, 1, 0, 3).contiguous()
        P, B, S, D = delta.shape
        H, KV = _need(c.q_rot).shape[2], _need(c.k_rot).shape[2]
        G = H // KV
        scale = self.scale[l]
        cap = self.cap[l] if l < len(self.cap) else 0.0
        window = self.window[l] if l < len(self.window) else 0
        W = heads.W  # [H + 2KV, D, e], norm scale folded in
        Wc = W - W.mean(1, keepdim=True) if heads.kind == "ln" else W
        eq = torch.zeros(S, B, H, device=x.device)
        ek = torch.zeros(S, B, KV, device=x.device)
        normed = l in self.head_norms
        e = W.shape[-1]
        per_ex = H * P * (2 * S * (e + P) + 4 * P * e) if normed else P * -(-P // QK_BLOCKS) * H * (D + S)  # the largest temporaries (normed: the moved vectors and scores, and the rotated other side's copies)
        step = max(1, MAX_ELEMS // max(per_ex, 1))
        gz = _need(c.gz) / steps
        for b0 in range(0, B, step):
            bs = slice(b0, min(B, b0 + step))
            d = delta[:, bs].float() if step >= B else delta[:, bs].float().contiguous()  # per chunk: one copy, not one per block
            if normed:
                eq[:, bs], ek[:, bs] = self._chunk_normed(c, bs, heads, Wc, x[bs].float(), d, gz[bs], scale, G, cap,
                                                          self.head_norms[l], window)
            else:
                eq[:, bs], ek[:, bs] = self._chunk(c, bs, heads, Wc, x[bs].float(), d, gz[bs], scale, G, cap, window)
        return eq, ek

    def _chunk(self, c: LayerCapture, bs: slice, heads, Wc, x, d, gz, scale, G, cap: float = 0.0, window: int = 0):
        """Effects for the examples ``bs``; d [P, B, S, D] (position, example, sender, model).

        Query position i only sees keys j <= i, so the products run over blocks of query
        rows, each against the keys up to the block's end: about 9/16 of the square.
        """
        P, B, S, D = d.shape
        H, KV = _need(c.q_rot).shape[2], _need(c.k_rot).shape[2]
        x, inv2, dinv = _moved_scale(heads, x, d)
        q_rot, k_rot, S0, A0, M = self._clean(c, bs, gz, scale, G, cap, window)
        ci, si = _rotary(c, bs, B)
        Wq, Wk = Wc[:H], Wc[H : H + KV]  # [H, D, e], [KV, D, e]
        Wk_h = Wk.repeat_interleave(G, 0)  # [H, D, e]
        y0q = torch.einsum("bpd,hde->bphe", x, Wq)  # x_c W' (= x_c W'_c: x_c has zero mean)
        y0k = torch.einsum("bpd,gde->bpge", x, Wk)
        k_h = k_rot.repeat_interleave(G, 2)  # [B, P, H, e]
        if ci is not None and si is not None:
            y0q, y0k = rotate(y0q, ci, si), rotate(y0k, ci, si)
        Y = torch.einsum("bihe,bjhe->bhij", y0q, k_h)
        Yk = torch.einsum("bihe,bjhe->bhij", q_rot, y0k.repeat_interleave(G, 2))
        # Per-position rotation, position first: [P, B, 1, 1, e] (identity without rotary).
        rc = ci.permute(1, 0, 2, 3)[:, :, :, None] if ci is not None else None
        rs = si.permute(1, 0, 2, 3)[:, :, :, None] if si is not None else None
        kt = k_h.permute(0, 2, 1, 3)  # [B, H, j, e]
        qt = q_rot.permute(0, 2, 1, 3)  # [B, H, i, e]
        # Pattern tensors as [i, b, 1, h, j] (query side) and [j, b, 1, h, i] (key side).
        iq = [t.permute(2, 0, 1, 3)[:, :, None] for t in (Y, S0, A0, M)]
        ik = [t.permute(3, 0, 1, 2)[:, :, None] for t in (Yk, S0, A0, M)]
        eq = torch.zeros(B, S, H, device=x.device)
        ek = torch.zeros(B, S, H, device=x.device)
        rows = -(-P // QK_BLOCKS)  # at most QK_BLOCKS blocks
        for i0 in range(0, P, rows):
            i1 = min(P, i0 + rows)
            bi = i1 - i0
            # Query rows i0:i1 against keys :i1. T[i, b, s, h, j] = d[i,b,s] . (Wq[h] rot_i^T k[b,j,h]).
            u = kt[None, :, :, :i1]  # [1, B, H, j, e]
            u = rotate_t(u, rc[i0:i1], rs[i0:i1]) if rc is not None and rs is not None else u.expand(bi, -1, -1, -1, -1)
            T = self._readout(d[i0:i1], u, Wq)  # [bi, B, S, H, i1]
            eq += self._side(T, inv2[i0:i1], dinv[i0:i1], tuple(t[i0:i1, ..., :i1] for t in iq), scale, dim=-1, cap=cap)
            # Keys :i1 for the same rows. T[j, b, s, h, i] = d[j,b,s] . (Wk[g(h)] rot_j^T q[b,i,h]).
            w = qt[None, :, :, i0:i1]  # [1, B, H, i, e]
            w = rotate_t(w, rc[:i1], rs[:i1]) if rc is not None and rs is not None else w.expand(i1, -1, -1, -1, -1)
            T = self._readout(d[:i1], w, Wk_h)  # [i1, B, S, H, bi]
            ek += self._side(T, inv2[:i1], dinv[:i1], tuple(t[:i1, ..., i0:i1] for t in ik), scale, dim=0, cap=cap)
        return eq.permute(1, 0, 2), ek.permute(1, 0, 2).reshape(S, B, KV, G).sum(-1)

    def _clean(self, c: LayerCapture, bs: slice, gz, scale: float, G: int, cap: float, window: int):
        """The clean side of examples ``bs``, shared by both paths: rotated q [B, P, H, e] and k
        [B, P, KV, e], scores S0 before any soft-cap, pattern A0 and readout M = g_z . v, each
        [B, H, i, j]."""
        q_rot, k_rot = _need(c.q_rot)[bs].float(), _need(c.k_rot)[bs].float()
        v = _need(c.v)[bs].float().repeat_interleave(G, 2)  # [B, P, H, e]
        S0 = self._scores(LayerCapture(q_rot=q_rot, k_rot=k_rot), scale, window)
        A0 = torch.softmax(soft_cap(S0, cap), -1)
        M = torch.einsum("bihe,bjhe->bhij", gz.float(), v)
        return q_rot, k_rot, S0, A0, M

    @staticmethod
    def _readout(d: torch.Tensor, u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """T[p, b, s, h, n] = d[p, b, s] . (W[h] u[p, b, h, n]): d [R, B, S, D], u [R, B, H, N, e], W [H, D, e]."""
        R, B, S, D = d.shape
        H, N, e = u.shape[2], u.shape[3], u.shape[4]
        Rm = torch.matmul(u.permute(2, 0, 1, 3, 4).reshape(H, R * B * N, e), W.transpose(1, 2))  # [H, R B N, D]
        Rm = Rm.view(H, R * B, N, D).transpose(0, 1).reshape(R * B, H * N, D)
        return torch.bmm(d.reshape(R * B, S, D), Rm.transpose(1, 2)).view(R, B, S, H, N)

    @staticmethod
    def _side(T: torch.Tensor, inv2: torch.Tensor, dinv: torch.Tensor, pattern: tuple[torch.Tensor, ...],
              scale: float, dim: int, cap: float = 0.0) -> torch.Tensor:
        """sum (softmax(cap(S0 + dS)) - A0) M over the pattern, dS = scale (dinv Y + inv2 T), in place on T.

        T [P1, B, S, H, P2] with the changed position first; inv2, dinv [P1, B, S];
        ``pattern`` = (Y, S0, A0, M), each broadcast to T, S0 the scores before the soft-cap
        ``cap`` (0: none); ``dim`` is the key axis of the softmax. Returns [B, S, H].
        """
        Y, S0, A0, M = pattern
        T.mul_(inv2[..., None, None]).addcmul_(dinv[..., None, None], Y).mul_(scale).add_(S0)
        return _settle(T, S0, A0, M, dim, cap)

    def _chunk_normed(self, c: LayerCapture, bs: slice, heads, Wc, x, d, gz, scale, G, cap: float,
                      norms: tuple[HeadNorm | None, HeadNorm | None], window: int = 0):
        """``_chunk`` for a layer with per-head query/key norms (same returns). The norm is not
        linear in d, so every sender's moved pre-norm query (key) is formed, head first,
        [n, P, B, S, e]; its norm's gain and the rotation go onto the other side of the dot
        product (rot(g x) . k = x . (g rot^T k)), so the large tensor is read once by the scores."""
        P, B, S, D = d.shape
        H, KV = _need(c.q_rot).shape[2], _need(c.k_rot).shape[2]
        x, inv2, dinv = _moved_scale(heads, x, d)
        q_rot, k_rot, S0, A0, M = self._clean(c, bs, gz, scale, G, cap, window)
        ci, si = _rotary(c, bs, B)
        cos, sin = _need(ci).permute(1, 0, 2, 3)[None], _need(si).permute(1, 0, 2, 3)[None]  # [1, P, B, 1, e]
        Wq, Wk = Wc[:H], Wc[H : H + KV]
        qn, kn = norms
        # Query side, [H, i, B, S, j]: row i's new scores when sender s moves every query.
        u = rotate_t(k_rot.repeat_interleave(G, 2).permute(2, 0, 1, 3)[:, None], cos, sin)  # [H, i, B, j, e]
        T = _moved_scores(x, d, inv2, dinv, Wq, _need(c.q)[bs].float(), qn, u)
        s0, a0, m = (t.permute(1, 2, 0, 3)[:, :, :, None] for t in (S0, A0, M))  # [H, i, B, 1, j]
        eq = _settle(T.mul_(scale).add_(s0), s0, a0, m, dim=4, cap=cap, over=(1, 4))  # [H, B, S]
        del T
        # Key side, [KV, j, B, S, G, i]: every row's new scores when sender s moves every key.
        w = rotate_t(q_rot.view(B, P, KV, G, -1).permute(2, 3, 0, 1, 4)[:, None], cos[:, :, None], sin[:, :, None])  # [KV, j, G, B, i, e]
        w = w.permute(0, 1, 3, 2, 4, 5).reshape(KV, P, B, G * P, -1)  # [KV, j, B, (G, i), e]
        T = _moved_scores(x, d, inv2, dinv, Wk, _need(c.k)[bs].float(), kn, w).view(KV, P, B, S, G, P)
        s0, a0, m = (t.view(B, KV, G, P, P).permute(1, 4, 0, 2, 3)[:, :, :, None] for t in (S0, A0, M))  # [KV, j, B, 1, G, i]
        ek = _settle(T.mul_(scale).add_(s0), s0, a0, m, dim=1, cap=cap, over=(1, 5))  # [KV, B, S, G]
        return eq.permute(2, 1, 0), ek.sum(-1).permute(2, 1, 0)


@dataclass
class HeadNorm:
    """A per-head query or key norm in its fitted form, y = scale * base(x) (base: RMS or layer
    normalisation over d_head), as ``models.norms.fit_norm`` reads residual norms."""

    kind: str
    scale: torch.Tensor  # [e]
    eps: float

    @staticmethod
    def fit(module, e: int, device) -> HeadNorm | None:
        """The module's form over one head's e dimensions; None where it is not one of those
        (a norm spanning all heads, as OLMo-2's, has a weight longer than e)."""
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.shape != (e,):
            return None
        try:
            kind, scale, eps = fit_norm(module, e, device)
        except (RuntimeError, ValueError):
            return None
        return HeadNorm(kind, scale.float(), eps) if kind in ("rms", "ln") else None

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "ln":
            t = t - t.mean(-1, keepdim=True)
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale

    def frozen(self, parts: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
        """The norm applied to each row of ``parts`` [n, e] at the scale of ``whole`` [e] (their
        sum, the clean pre-norm vector): linear, so the rows still add up to ``self(whole)``."""
        if self.kind == "ln":
            parts, whole = parts - parts.mean(-1, keepdim=True), whole - whole.mean()
        return parts * torch.rsqrt(whole.pow(2).mean() + self.eps) * self.scale


def _norm(t: torch.Tensor, norm: HeadNorm | None) -> torch.Tensor:
    return t if norm is None else norm(t)


def _moved_scale(heads, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_c [B, P, D] (centred for layer norm), 1 / rms of every moved input inv' [P, B, S] and
    inv' - inv, from x [B, P, D] and the deltas d [P, B, S, D]."""
    D = d.shape[-1]
    if heads.kind == "ln":
        x = x - x.mean(-1, keepdim=True)
        dsq = torch.linalg.vector_norm(d, dim=-1).square() - d.sum(-1).square() / D  # |d_c|^2
    else:
        dsq = torch.linalg.vector_norm(d, dim=-1).square()
    xt = x.transpose(0, 1)  # [P, B, D]
    inv = torch.rsqrt(xt.pow(2).mean(-1) + heads.eps)  # [P, B]
    xd = torch.matmul(d, xt[..., None])[..., 0]  # [P, B, S]: x_c . d = x_c . d_c
    inv2 = torch.rsqrt((xt.pow(2).sum(-1)[..., None] + 2 * xd + dsq) / D + heads.eps)  # [P, B, S]
    return x, inv2, inv2 - inv[..., None]


def _rotary(c: LayerCapture, bs: slice, B: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """cos and sin of the examples ``bs`` as [B, P, 1, e] (None without rotary)."""
    if c.cos is None:
        return None, None
    cos, sin = (t.float().expand(B, -1, -1) if t.shape[0] == 1 else t.float()[bs] for t in (c.cos, _need(c.sin)))
    return cos[:, :, None], sin[:, :, None]


def _moved_scores(x, d, inv2, dinv, W, pre, norm: HeadNorm | None, u) -> torch.Tensor:
    """Score changes when each sender's delta moves every query (key): [n, P, B, S, N] from x_c
    [B, P, D], d [P, B, S, D], W [n, D, e], the clean pre-norm projections ``pre`` [B, P, n, e]
    and ``u`` [n, P, B, N, e], the rotated other side for each moved position (N = the positions
    it meets). Before the attention scale; the clean scores are subtracted, so no delta gives 0."""
    n, e = W.shape[0], W.shape[-1]
    P, B, S, D = d.shape
    y0 = torch.einsum("bpd,nde->npbe", x, W)  # x_c W'
    clean = pre.permute(2, 1, 0, 3)[:, :, :, None]  # [n, P, B, 1, e]
    new = torch.matmul(d.reshape(1, P * B * S, D), W).view(n, P, B, S, e)  # d W', head first
    new.mul_(inv2[..., None]).addcmul_(dinv[..., None], y0[:, :, :, None]).add_(clean)
    if norm is not None:
        u = u * norm.scale
    if norm is not None and norm.kind == "ln":
        new.sub_(new.mean(-1, keepdim=True))
        clean = clean - clean.mean(-1, keepdim=True)
    ut = u.transpose(-1, -2)  # [n, P, B, e, N]
    T = torch.matmul(new.view(n * P * B, S, e), ut.reshape(n * P * B, e, -1)).view(n, P, B, S, -1)
    base = torch.matmul(clean, ut)  # [n, P, B, 1, N]
    if norm is not None:
        T.mul_(torch.rsqrt(torch.linalg.vector_norm(new, dim=-1).square_().div_(e).add_(norm.eps))[..., None])
        base.mul_(torch.rsqrt(clean.pow(2).mean(-1, keepdim=True) + norm.eps))
    return T.sub_(base)


def _settle(T: torch.Tensor, S0: torch.Tensor, A0: torch.Tensor, M: torch.Tensor, dim: int, cap: float,
            over: tuple[int, int] = (0, 4)) -> torch.Tensor:
    """(softmax(cap(T)) - A0) M summed over the two position axes ``over``, in place on the new
    scores T (``dim`` the key axis; S0, A0, M broadcast to T, S0 the clean scores before the cap,
    -inf where masked). ``_side``'s layout [P1, B, S, H, P2] gives [B, S, H]."""
    if cap > 0:  # c * tanh(s / c) turns the mask's -inf into -c: mask again
        T.div_(cap).tanh_().mul_(cap).masked_fill_(torch.isneginf(S0), float("-inf"))
    A = torch.softmax(T, dim)
    A.sub_(A0).nan_to_num_().mul_(M)
    return A.sum(over)


def declared_window(attn, l: int) -> int | None:
    """Layer ``l``'s sliding window as its Hugging Face attention module declares it: the
    module's ``sliding_window`` where it has the attribute (Gemma 2/3, Qwen2: None on full
    layers), else the config's for a layer whose ``layer_types`` entry is sliding or that has
    no ``layer_types`` (Mistral). None: no window."""
    if hasattr(attn, "sliding_window"):
        w = attn.sliding_window
    else:
        cfg = getattr(attn, "config", None)
        types = getattr(cfg, "layer_types", None)
        sliding = types is None or (l < len(types) and types[l] == "sliding_attention")
        w = getattr(cfg, "sliding_window", None) if sliding else None
    return int(w) if isinstance(w, int) and not isinstance(w, bool) and w > 0 else None


def soft_cap(s: torch.Tensor, cap: float) -> torch.Tensor:
    """Attention scores soft-capped as Gemma 2 does, ``cap * tanh(s / cap)`` (masked -inf kept);
    ``cap`` 0: unchanged."""
    if cap <= 0:
        return s
    return torch.where(torch.isneginf(s), s, torch.tanh(s / cap) * cap)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    a, b = a.float(), b.float()
    return a.shape == b.shape and bool((a - b).abs().max() <= tol * b.abs().max().clamp(min=1.0))


def _attend(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """z [B, P, H, e] from pattern [B, H, P, P] and values [B, P, KV, e]."""
    H, KV = A.shape[1], v.shape[2]
    return torch.einsum("bhij,bjhe->bihe", A, v.float().repeat_interleave(H // KV, 2))
