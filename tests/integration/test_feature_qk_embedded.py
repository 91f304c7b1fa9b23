"""QK attribution on the embedded SmolLM2 (rotary, GQA with 3 KV heads, RMS norm): exact on
the real model, and it finds K-composition: the key side of induction head a17.h3 (README,
`mechscope heads`) is read mostly from layer 16's attention output at the key position, the
layer of the previous-token head a16.h0 that feeds it. The transcoders are random: the split
into attention outputs and (here) error nodes holds whatever their quality."""

from __future__ import annotations

import pytest
import torch

from mechscope.features.qk import qk_attribution
from mechscope.features.transcoder_set import random_transcoders

pytestmark = pytest.mark.embedded


@pytest.mark.parametrize("seed", [0, 1])
def test_induction_head_reads_the_previous_token_layer(embedded, seed):
    tset = random_transcoders(embedded, d_sae=64, architecture="topk", k=8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1000, 10000, (12,), generator=g)
    toks = torch.cat([torch.tensor([embedded.tokenizer.bos_token_id]), seq, seq])
    q = toks.numel() - 5  # the second occurrence of seq[7]
    k = q - 12 + 1  # the token after its first occurrence: where an induction head looks
    r = qk_attribution(embedded, tset, toks, 17, 3, q, k)
    assert abs(float(r.matrix.sum()) - r.score) < 1e-3 * max(1.0, abs(r.score))
    assert r.weight > 4 / (q + 1)  # the head attends there (uniform would be 1 / (q + 1))
    ks = r.key_side()
    top = int(ks.abs().argmax())
    assert r.key_ids[top] == f"attn16_{k}" and float(ks[top]) > 0.5 * r.score
