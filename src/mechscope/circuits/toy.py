"""A hand-built 2-layer GPT-2 with a planted induction circuit: ground truth for circuit discovery.

Circuit-discovery methods (ACDC, edge attribution patching, ...) are usually judged on models
whose circuit is *known by construction* (Conmy et al. 2023, "Towards Automated Circuit
Discovery for Mechanistic Interpretability", use such models). ``save_induction_toy`` writes
one: a ``transformers.GPT2LMHeadModel`` whose weights are set by hand, never trained, plus a
word-level tokenizer, into one folder that ``mechscope.models.load_model`` reads like any
other model.

Shapes: vocabulary V = 64 (``<bos>`` = id 0, ``t0``..``t62`` = ids 1..63), n_positions = 64,
d_model = 256, 2 layers x 4 heads of d_head = 64, d_mlp = 16 (all zero), untied unembedding.

Construction, step by step
--------------------------
1. **Residual subspaces.** Every residual contribution lies in the 255-dimensional subspace
   orthogonal to the all-ones vector (an orthonormal basis ``B`` of it is built once), so
   every LayerNorm sees zero-mean input and its centring does nothing. Within ``B`` four
   disjoint blocks of coordinates are reserved:
   ``TOK`` (64, the token embedding), ``POS`` (62, the position code), ``PREV`` (64, written
   by the previous-token head) and ``OUT`` (64, written by the induction head, read by the
   unembedding). 254 of the 255 coordinates are used.

2. **LayerNorm = a known constant scale.** All LN gains are 1 and biases 0, so
   ``LN(x) = sqrt(d_model) * x / |x|`` (up to eps). Each block is written with a fixed norm
   ``U`` (token and position embeddings, the previous-token head's output, the induction
   head's output at positions where it fires), so at every position the residual norm is
   ``U*sqrt(2)`` before layer 0, ``U*sqrt(3)`` before layer 1 and ``~U*2`` before the final LN,
   and LN is a known rescaling; the weights below divide it out.

3. **Position code** (``wpe``). Position i is the unit vector with coordinates
   ``(cos w_f i, sin w_f i) / sqrt(31)`` for the 31 frequencies ``w_f = 2 pi f / 63``
   (f = 1..31). Then ``pos_i . pos_j = 1`` if i = j (mod 63) and exactly ``-1/62`` otherwise
   (a simplex code); the causal mask makes the period-63 alias harmless for n_positions = 64.

4. **a0.h0, previous-token head.** Query = position code rotated back by one step (each
   (cos, sin) pair rotated by ``-w_f``), key = position code, so ``q_i . k_j`` is large when
   j = i - 1 and ``-1/62`` of that otherwise: softmax score gap 15 (weight on i-1 >
   0.9999). Position 0 can only attend to itself. OV copies the token: ``TOK[t] -> PREV[t]``
   (value reads only the token embedding). Edges: ``input -> a0.h0<q>``, ``input -> a0.kv0<k>``
   (both read ``wpe``, which is part of ``input``), ``input -> a0.kv0<v>``.

5. **a1.h0, induction head.** Query reads the current token, ``TOK[t] -> e_t``; key reads the
   previous-token subspace, ``PREV[t] -> e_t`` (K-composition with a0.h0), so position i
   attends to j when ``token[j-1] == token[i]`` with score gap 12; with no match (first
   occurrence) every score is 0 and attention is uniform over the prefix. OV reads the token at
   the attended position, ``TOK[t] -> OUT[t]``. Edges: ``input -> a1.h0<q>``,
   ``a0.h0 -> a1.kv0<k>``, ``input -> a1.kv0<v>``.

6. **Unembedding** (``lm_head``, untied from ``wte``): row t is ``G * OUT[t]``, so only what
   a1.h0 writes moves the logits; at a matched position the answer gets logit ~16 and every
   other token ~0. Edge: ``a1.h0 -> logits``. ``input -> logits`` is *not* planted: the
   unembedding reads nothing the embeddings write, so the direct path only enters through the
   final LN's norm, which is the same for every token sequence (measured: patching it from the
   corrupted run changes the metric by < 1e-3).

7. **Everything else is inert.** Heads a0.h1-3 and a1.h1-3 have all-zero weights (uniform
   attention, zero output); both MLPs have zero weights and biases (output exactly 0); all
   attention biases are 0.

Which planted edges a *corrupted-run* patch can see: with ``clean = <bos> R R`` and
``corrupt = <bos> R R'`` the first half (where the induction head's keys and values live) is
identical in both runs, so only ``input -> a1.h0<q>`` (the query token) and
``a1.h0 -> logits`` change the metric when patched alone; the key/value/previous-token edges
are needed by the mechanism but invisible to this corruption (mean or zero ablation sees them).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mechscope.graph.names import INPUT, LOGITS, head_node, kv_receiver, q_receiver
from mechscope.tasks.base import TaskBatch
from mechscope.tasks.induction import repeated_tokens_batch

VOCAB = 64  # "<bos>" + t0..t62
N_POS = 64
D_MODEL = 256
N_HEAD = 4
D_HEAD = D_MODEL // N_HEAD  # 64
N_LAYER = 2
D_MLP = 16
BOS = "<bos>"

N_FREQ = 31  # position code: 31 frequencies 2*pi*f/63 -> 62 coordinates
PERIOD = 2 * N_FREQ + 1  # 63
U = 4.0  # norm of every residual block (token, position, prev-token, output)
PREV_SCORE = 15.0  # a0.h0: attention score (after 1/sqrt(d_head)) of the previous token
MATCH_SCORE = 12.0  # a1.h0: attention score of a matching key; non-matching keys score 0
UNEMBED_GAIN = 2.0  # lm_head row norm

TOK = slice(0, VOCAB)
POS = slice(VOCAB, VOCAB + 2 * N_FREQ)
PREV = slice(POS.stop, POS.stop + VOCAB)
OUT = slice(PREV.stop, PREV.stop + VOCAB)


def _zero_mean_basis(d: int) -> torch.Tensor:
    """Orthonormal [d, d-1] basis of the vectors with zero mean (Helmert-style, deterministic)."""
    m = torch.eye(d, dtype=torch.float64) - 1.0 / d
    q, _ = torch.linalg.qr(m[:, : d - 1])
    return q  # columns orthonormal and orthogonal to ones


def _position_code(n: int) -> torch.Tensor:
    """[n, 62] unit-norm position codes with pos_i . pos_j = 1 (i = j mod 63) else -1/62."""
    i = torch.arange(n, dtype=torch.float64)[:, None]
    w = 2 * math.pi * torch.arange(1, N_FREQ + 1, dtype=torch.float64)[None] / PERIOD
    code = torch.stack([torch.cos(w * i), torch.sin(w * i)], -1).reshape(n, 2 * N_FREQ)
    return code / math.sqrt(N_FREQ)


def _rotate_back() -> torch.Tensor:
    """[62, 62] R with R @ pos_i = pos_{i-1} (each (cos, sin) pair rotated by -w_f)."""
    r = torch.zeros(2 * N_FREQ, 2 * N_FREQ, dtype=torch.float64)
    for f in range(N_FREQ):
        w = 2 * math.pi * (f + 1) / PERIOD
        c, s = math.cos(w), math.sin(w)
        # [cos w(i-1), sin w(i-1)] = [[c, s], [-s, c]] @ [cos wi, sin wi]
        r[2 * f : 2 * f + 2, 2 * f : 2 * f + 2] = torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
    return r


def _ln_scale(n_blocks: int) -> float:
    """Factor LN applies to a zero-mean residual made of ``n_blocks`` orthogonal blocks of norm U."""
    return math.sqrt(D_MODEL) / (U * math.sqrt(n_blocks))


def build_state_dict() -> dict[str, torch.Tensor]:
    """Hand-set weights (float64, HF GPT-2 names and Conv1D layout: y = x @ W + b)."""
    B = _zero_mean_basis(D_MODEL)  # [d, 255]
    Bt, Bp, Bv, Bo = B[:, TOK], B[:, POS], B[:, PREV], B[:, OUT]  # residual directions
    d, dh = D_MODEL, D_HEAD
    sd: dict[str, torch.Tensor] = {}
    zeros = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731

    sd["transformer.wte.weight"] = U * Bt.T.clone()  # [V, d]: token t -> U * TOK[t]
    sd["transformer.wpe.weight"] = U * _position_code(N_POS) @ Bp.T  # [n_pos, d]
    for l in range(N_LAYER):
        p = f"transformer.h.{l}."
        for ln in ("ln_1", "ln_2"):
            sd[p + ln + ".weight"] = torch.ones(d, dtype=torch.float64)
            sd[p + ln + ".bias"] = zeros(d)
        sd[p + "attn.c_attn.weight"] = zeros(d, 3 * d)
        sd[p + "attn.c_attn.bias"] = zeros(3 * d)
        sd[p + "attn.c_proj.weight"] = zeros(d, d)
        sd[p + "attn.c_proj.bias"] = zeros(d)
        sd[p + "mlp.c_fc.weight"] = zeros(d, D_MLP)
        sd[p + "mlp.c_fc.bias"] = zeros(D_MLP)
        sd[p + "mlp.c_proj.weight"] = zeros(D_MLP, d)
        sd[p + "mlp.c_proj.bias"] = zeros(d)
    sd["transformer.ln_f.weight"] = torch.ones(d, dtype=torch.float64)
    sd["transformer.ln_f.bias"] = zeros(d)

    # Head h's q, k, v columns inside c_attn; head h's rows inside c_proj.
    q_cols, k_cols, v_cols = slice(0, dh), slice(d, d + dh), slice(2 * d, 2 * d + dh)  # head 0
    o_rows = slice(0, dh)

    # ---- layer 0, head 0: previous-token head ----------------------------------------------
    # After LN0 a block of norm U has norm U * s0. Want (q . k) / sqrt(dh) = PREV_SCORE *
    # (pos_{i-1} . pos_j), so q = a R pos_i, k = a pos_j with (a U s0)^2 / sqrt(dh) = PREV_SCORE.
    s0 = _ln_scale(2)
    a = math.sqrt(PREV_SCORE * math.sqrt(dh)) / (U * s0)
    w = sd["transformer.h.0.attn.c_attn.weight"]
    np_ = 2 * N_FREQ
    wq = zeros(d, dh)
    wq[:, :np_] = a * Bp @ _rotate_back().T  # x -> a R (Bp^T x)
    wk = zeros(d, dh)
    wk[:, :np_] = a * Bp
    wv = (1.0 / s0) * Bt  # LN0 token block (norm U s0) -> e_t with norm U
    w[:, q_cols], w[:, k_cols], w[:, v_cols] = wq, wk, wv
    sd["transformer.h.0.attn.c_proj.weight"][o_rows] = Bv.T  # e_t -> PREV[t]

    # ---- layer 1, head 0: induction head ---------------------------------------------------
    s1 = _ln_scale(3)
    b = math.sqrt(MATCH_SCORE * math.sqrt(dh)) / (U * s1)
    w = sd["transformer.h.1.attn.c_attn.weight"]
    w[:, q_cols] = b * Bt  # current token -> e_t
    w[:, k_cols] = b * Bv  # previous token (written by a0.h0) -> e_t
    w[:, v_cols] = (1.0 / s1) * Bt  # token at the attended position -> e_t (norm U)
    sd["transformer.h.1.attn.c_proj.weight"][o_rows] = Bo.T  # e_t -> OUT[t]

    # ---- unembedding: reads only OUT ----------------------------------------------------------
    sd["lm_head.weight"] = UNEMBED_GAIN * Bo.T.clone()  # [V, d]
    return {k: v.float().contiguous() for k, v in sd.items()}


def build_tokenizer():
    """Word-level tokenizer over ``<bos>, t0..t62`` splitting on whitespace."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {BOS: 0, **{f"t{i}": i + 1 for i in range(VOCAB - 1)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=BOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS, unk_token=BOS,
    )


def build_model():
    """The hand-set ``GPT2LMHeadModel`` (float32, eval mode)."""
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=N_POS, n_embd=D_MODEL, n_layer=N_LAYER, n_head=N_HEAD,
        n_inner=D_MLP, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = transformers.GPT2LMHeadModel(cfg)
    sd = build_state_dict()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias"))]
    if missing or unexpected:
        raise RuntimeError(f"Toy weights do not match GPT-2: missing {missing}, unexpected {unexpected}")
    return model.eval()


def save_induction_toy(path: str | Path) -> str:
    """Write the hand-built induction toy (safetensors + tokenizer) to ``path``; return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_model().save_pretrained(path, safe_serialization=True)
    build_tokenizer().save_pretrained(path)
    return str(path)


def planted_edges() -> list[tuple[str, str]]:
    """Edges of the planted circuit, in ``mechscope.graph`` naming (see the module docstring).

    ``input -> logits`` is left out: the unembedding reads no direction the embeddings write.
    """
    return [
        (INPUT, q_receiver(0, 0)),  # input -> a0.h0<q>
        (INPUT, kv_receiver(0, 0, "k")),
        (INPUT, kv_receiver(0, 0, "v")),
        (INPUT, q_receiver(1, 0)),
        (head_node(0, 0), kv_receiver(1, 0, "k")),  # a0.h0 -> a1.kv0<k>: K-composition
        (INPUT, kv_receiver(1, 0, "v")),
        (head_node(1, 0), LOGITS),
    ]


def induction_task(tokenizer: Any, n: int = 16, seq_len: int = 10, seed: int = 0) -> TaskBatch:
    """Induction batch for the toy: clean ``<bos> R R``, corrupt ``<bos> R R'``.

    ``R`` holds ``seq_len`` distinct random non-special tokens, ``R'`` ``seq_len`` more, disjoint
    from ``R``. Scored: every position of the second copy whose next token is predictable,
    i.e. positions ``seq_len + 1 + j`` (token ``R[j]``) for j = 0..seq_len-2, answer
    ``R[j+1]``; metric ``logprob``.
    """
    bos = tokenizer.bos_token_id
    special = set(tokenizer.all_special_ids)
    vocab = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    if seq_len < 2 or 2 * seq_len > len(vocab) or 2 * seq_len + 1 > N_POS:
        raise ValueError(f"seq_len must be in 2..{min(len(vocab), N_POS - 1) // 2} for the toy, got {seq_len}.")
    prefix = torch.tensor([bos], dtype=torch.long)
    return repeated_tokens_batch(tokenizer, vocab, prefix, n, seq_len, seed, task="induction_toy")
