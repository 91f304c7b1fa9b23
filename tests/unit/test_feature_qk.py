"""QK attribution splits a head's score exactly into query-side x key-side node pairs.

Two independent checks: the matrix sums to the model's own pre-softmax score, and a row (or
column) sum equals the change of that score when the node's vector is taken out of the
residual stream at the query (or key) position in a real forward pass with the norm's scale
held at its clean value. A wrong norm form, a missed rotary, the wrong KV head of a GQA group
or the wrong score scale breaks them."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.features.qk import CONST, parse_qk_spec, qk_attribution
from mechscope.features.replacement import capture, quiet_norm_edits
from mechscope.features.transcoder_set import random_transcoders
from mechscope.models.hooks import attn_scores, ln_scale, resid_pre
from mechscope.models.load import plain_attention


def _prompt(model, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, model.summary.d_vocab, (n,), generator=g)
    toks[0] = model.tokenizer.bos_token_id
    return toks


def _edges(model):
    L, H = model.summary.n_layers, model.summary.n_heads
    return [(0, 0, 5, 2), (1, H - 1, 7, 3), (L - 1, 1, 6, 6), (L - 1, H - 2, 7, 1)]


@pytest.fixture(scope="module")
def tsets(tiny_gpt2, tiny_llama):
    return {id(m): random_transcoders(m, d_sae=40, architecture="topk", k=6, seed=1) for m in (tiny_gpt2, tiny_llama)}


def test_matrix_sums_to_the_models_score(tiny_model, tsets):
    tset = tsets[id(tiny_model)]
    toks = _prompt(tiny_model)
    run = capture(tiny_model, tset, toks)
    with torch.no_grad(), plain_attention(tiny_model):
        _, cache = tiny_model.bridge.run_with_cache(toks[None])
    for layer, head, q, k in _edges(tiny_model):
        r = qk_attribution(tiny_model, tset, toks, layer, head, q, k, run=run)
        want = float(cache[attn_scores(layer)][0, head, q, k])
        assert abs(float(r.matrix.sum()) - want) < 1e-4 * max(1.0, abs(want))
        assert r.score == pytest.approx(want, abs=1e-6)
        assert r.matrix.shape == (len(r.query_ids), len(r.key_ids))
        assert r.query_ids[-1] == CONST and r.key_ids[-1] == CONST
        # one node per graph feature active at the position in an earlier layer
        n_feat = sum(1 for i in r.query_ids if i.split("_")[0].isdigit() and i.split("_")[1] != "-1")
        act = run.active
        assert n_feat == int(((act[:, 0] < layer) & (act[:, 1] == q)).sum())


def _vector(run, tset, node: str) -> torch.Tensor:
    a, b, c = node.split("_")
    if a == "E":
        return run.embed[int(c)]
    layer, f, pos = int(a), int(b), int(c)
    if f == -1:
        return run.errors[layer, pos]
    i = ((run.active[:, 0] == layer) & (run.active[:, 1] == pos) & (run.active[:, 2] == f)).nonzero().item()
    return run.values[i] * tset.layers[layer].W_dec[f].detach().float()


def _score_without(model, toks, layer, head, q, k, pos, vec) -> float:
    """The score after removing ``vec`` from the residual stream entering ``layer`` at ``pos``,
    with that layer's attention norm scale held at its clean value."""
    with torch.no_grad(), plain_attention(model):
        _, clean = model.bridge.run_with_cache(toks[None], names_filter=lambda n: n == ln_scale(layer, 1))
        scale = clean[ln_scale(layer, 1)].clone()
        out = {}

        def edit(x, hook):
            x = x.clone()
            x[0, pos] -= vec.to(x)
            return x

        def keep(x, hook):
            return scale.to(x)

        def grab(x, hook):
            out["s"] = x.detach()
            return x

        with quiet_norm_edits():
            model.bridge.run_with_hooks(toks[None], fwd_hooks=[(resid_pre(layer), edit), (ln_scale(layer, 1), keep),
                                                               (attn_scores(layer), grab)])
    return float(out["s"][0, head, q, k])


def test_row_and_column_sums_match_removing_the_node(tiny_model, tsets):
    tset = tsets[id(tiny_model)]
    toks = _prompt(tiny_model, seed=3)
    run = capture(tiny_model, tset, toks)
    layer, head, q, k = tiny_model.summary.n_layers - 1, 1, 7, 3
    r = qk_attribution(tiny_model, tset, toks, layer, head, q, k, run=run)
    checked = 0
    for side, ids, sums, pos in (("q", r.query_ids, r.query_side(), q), ("k", r.key_ids, r.key_side(), k)):
        nodes = [i for i, n in enumerate(ids) if n.startswith("E_") or n.split("_")[0].isdigit()]
        assert nodes
        for i in nodes:
            got = _score_without(tiny_model, toks, layer, head, q, k, pos, _vector(run, tset, ids[i]))
            assert r.score - got == pytest.approx(float(sums[i]), abs=1e-4 * max(1.0, abs(r.score)))
            checked += 1
    assert checked >= 4


def test_bad_edges_say_what_is_wrong(tiny_gpt2, tsets):
    tset = tsets[id(tiny_gpt2)]
    toks = _prompt(tiny_gpt2)
    L, H = tiny_gpt2.summary.n_layers, tiny_gpt2.summary.n_heads
    for edge, words in (((L, 0, 3, 1), "layer"), ((0, H, 3, 1), "head"), ((0, 0, 2, 5), "key position"),
                        ((0, 0, 8, 1), "query position")):
        with pytest.raises(MechscopeError, match=words):
            qk_attribution(tiny_gpt2, tset, toks, *edge)
    assert parse_qk_spec("1:2:7:3") == (1, 2, 7, 3)
    for bad in ("1:2:7", "a:b:c:d", "1:2:-7:3", ""):
        with pytest.raises(MechscopeError, match="LAYER:HEAD"):
            parse_qk_spec(bad)


def test_per_head_query_key_norms_are_frozen_like_the_residual_norm(tmp_path):
    """Qwen3 norms each head's query and key after the projection: QK attribution freezes that
    norm's scale at its clean value too, so the matrix still sums to the model's score, and a
    row (column) sum equals the score change when the node leaves the residual stream with the
    residual norm's and the head norms' scales all held at their clean values."""
    from conftest import _save_tiny

    from mechscope.models import load_model

    m = load_model(_save_tiny("qwen3", tmp_path / "qwen3"), device="cpu")
    tset = random_transcoders(m, d_sae=40, architecture="topk", k=6, seed=1)
    toks = _prompt(m, seed=3)
    run = capture(m, tset, toks)
    layer, head, q, k = m.summary.n_layers - 1, 1, 7, 3
    r = qk_attribution(m, tset, toks, layer, head, q, k, run=run)
    with torch.no_grad(), plain_attention(m):
        _, cache = m.bridge.run_with_cache(toks[None])
    assert abs(float(r.matrix.sum()) - r.score) < 1e-4 * max(1.0, abs(r.score))
    assert r.score == pytest.approx(float(cache[attn_scores(layer)][0, head, q, k]), abs=1e-6)
    frozen = [f"blocks.{layer}.attn.{n}_norm.hook_scale" for n in ("q", "k")] + [ln_scale(layer, 1)]
    scales = {n: cache[n].clone() for n in frozen}
    checked = 0
    for ids, sums, pos in ((r.query_ids, r.query_side(), q), (r.key_ids, r.key_side(), k)):
        for i in [i for i, n in enumerate(ids) if n.startswith("E_") or n.split("_")[0].isdigit()]:
            vec, out = _vector(run, tset, ids[i]), {}

            def edit(x, hook, pos=pos, vec=vec):
                x = x.clone()
                x[0, pos] -= vec.to(x)
                return x

            def grab(x, hook):
                out["s"] = x.detach()
                return x

            hooks = [(resid_pre(layer), edit)] + [(n, lambda x, hook: scales[hook.name].to(x)) for n in frozen]
            with torch.no_grad(), plain_attention(m), quiet_norm_edits():
                m.bridge.run_with_hooks(toks[None], fwd_hooks=hooks + [(attn_scores(layer), grab)])
            got = float(out["s"][0, head, q, k])
            assert r.score - got == pytest.approx(float(sums[i]), abs=1e-4 * max(1.0, abs(r.score)))
            checked += 1
    assert checked >= 4
