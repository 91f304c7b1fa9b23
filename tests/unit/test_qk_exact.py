"""Query/key edges scored through the attention softmax (circuits/qk.py, AtP*'s QK fix).

1. Head-local exactness: for every edge into a layer's queries or keys, the effect equals
   sum g_z . (z_patched - z_clean) with z_patched from the *real* patched model run (the
   patching engine, split inputs), for any cotangent g_z: LayerNorm + learned positions
   (GPT-2) and RMSNorm + rotary + GQA (Llama).
   Per-head query/key norms (Qwen3, Gemma 3) take the formed-and-normed path: the same
   equality holds there, where the layers used to fall back to plain gradients.
2. A sharp-attention model (the hand-built induction toy with its attention sharpened): the
   previous-token -> induction K-composition edge, which gradients score with the wrong
   sign, gets its true patching effect, and the default EAP-IG recovers the circuit (edge
   ROC AUC). Known limit, measured here: the value edge into the previous-token head acts
   *through* the saturated induction softmax downstream, which stays linearised (its score
   has the wrong sign, though a large magnitude).
"""

import pytest
import torch
from test_attribution import _batch

import mechscope.circuits.toy as toy
from mechscope.circuits import edge_scores, roc_auc
from mechscope.circuits.attribution import HeadInputGrads, frozen
from mechscope.circuits.qk import QKExact
from mechscope.graph import build_graph
from mechscope.models import load_model, plain_attention
from mechscope.patching import run_with_edge_mask, source_activations
from mechscope.patching.engine import attn_weights, sender_activations
from mechscope.tasks.base import TaskBatch


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["one row a block", "blocks, position first, one example a chunk"])
def test_exact_qk_effects_equal_patched_head_output(tiny_model, layout, monkeypatch, layer=None):
    """Both layouts: [S, B, P, D] deltas with one query row a block (7 positions); and the
    caller's position-first view sliced to the upstream senders, with 19 positions in blocks of
    three rows (a short last block) and one example per chunk. (``layer``: the last one unless
    a caller names another.)"""
    import mechscope.circuits.qk as qk

    P = 7 if layout == "one row a block" else 19
    if P == 19:
        monkeypatch.setattr(qk, "QK_BLOCKS", 7)  # ceil(19 / 7) = 3 rows a block, the last one short
        monkeypatch.setattr(qk, "MAX_ELEMS", 1)  # chunks of one example
    m, g, b = tiny_model, build_graph(tiny_model), _batch(B=3, P=P)
    l = g.n_layers - 1 if layer is None else layer
    resid = {}

    def keep(x, hook):
        resid["x"] = x.detach()
        return x

    ex = QKExact(g.n_layers)
    with torch.no_grad(), frozen(m), plain_attention(m):
        m.bridge.run_with_hooks(b.clean, fwd_hooks=ex.hooks(m, True) + [(f"blocks.{l}.hook_resid_pre", keep)])
        heads = HeadInputGrads(m.bridge.blocks[l].ln1.original_component,
                               {k: v.detach() for k, v in attn_weights(m, l).items()})
        assert ex.verify(m, l, heads)
        z0 = ex.layers[l].z.clone()
        gz = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
        ex.layers[l].gz = gz
        src = source_activations(m, g, b.clean, b.corrupt, "patching")
        delta = src - sender_activations(m, g, b.clean)
        up = g.sender_slice_before(l)
        if P == 7:
            eq, ek = ex.effects(l, heads, resid["x"], delta[:up], steps=1)
        else:  # as attribution._accumulate passes it: the whole [P, B, S, D] permuted once, then sliced
            eq, ek = ex.effects(l, heads, resid["x"], delta.permute(2, 1, 0, 3).contiguous()[:, :, :up], steps=1,
                                positions_first=True)
    rs = g.receiver_slices(l)
    H, KV = g.n_heads, g.n_kv_heads
    grab = {}

    def z_hook(x, hook):
        grab["z"] = x.detach()
        return x

    checked = 0
    with torch.no_grad():
        for s in range(up):
            for r, kind in [(rs["q"].start + h, ("q", h)) for h in range(H)] + [(rs["k"].start + k, ("k", k)) for k in range(KV)]:
                mk = g.empty_mask()
                mk[s, r] = 1.0
                run_with_edge_mask(m, g, b.clean, src, mk, extra_hooks=[(f"blocks.{l}.attn.hook_z", z_hook)])
                dz = (grab["z"] - z0) * gz  # [B, P, H, e]
                if kind[0] == "q":
                    true, got = dz[:, :, kind[1]].sum((1, 2)), eq[s, :, kind[1]]
                else:
                    group = H // KV
                    true, got = dz[:, :, kind[1] * group:(kind[1] + 1) * group].sum((1, 2, 3)), ek[s, :, kind[1]]
                assert torch.allclose(got, true, atol=1e-4, rtol=1e-3), (g.senders[s], g.receivers[r], got, true)
                checked += 1
    assert checked == up * (H + KV)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
def test_exact_qk_effects_through_per_head_query_key_norms(kind, tmp_path, monkeypatch):
    """Qwen3 and Gemma 3 norm each head's query and key over d_head before rotary: the score
    change is not linear in a sender's delta, so those layers form every moved query and key.
    Their effects equal the patched head's output change (both layouts, chunks of one example
    included), and no layer falls back where every layer used to."""
    from conftest import _save_tiny

    import mechscope.circuits.qk as qk
    from mechscope.circuits.attribution import edge_score_folds
    from mechscope.tasks.base import TaskBatch

    m = load_model(_save_tiny(kind, tmp_path / kind), device="cpu")
    for layout in ("one row a block", "blocks, position first, one example a chunk"):
        with monkeypatch.context() as mp:
            test_exact_qk_effects_equal_patched_head_output(m, layout, mp)
    with monkeypatch.context() as mp:  # a layer below the last: its effects pass through later layers' norms too
        test_exact_qk_effects_equal_patched_head_output(m, "one row a block", mp, layer=1)
    with monkeypatch.context() as mp:  # the check is sharp: 1% off in the score changes fails it
        moved = qk._moved_scores
        mp.setattr(qk, "_moved_scores", lambda *a: moved(*a).mul_(1.01))
        with pytest.raises(AssertionError):
            test_exact_qk_effects_equal_patched_head_output(m, "one row a block", mp)
    g, b = build_graph(m), _batch(B=3, P=9)
    batch = TaskBatch(task="random", clean=b.clean, corrupt=b.corrupt, positions=torch.full((3, 1), 8),
                      answers=b.clean[:, :1], wrongs=b.corrupt[:, :1], lengths=torch.full((3,), 9))
    info: dict = {}
    exact = edge_score_folds(m, g, batch, method="eap", info=info)
    assert info["qk_fallback_layers"] == []
    linear = edge_score_folds(m, g, batch, method="eap", qk="linear")
    qk_rows = torch.cat([torch.arange(g.receiver_slices(l)[x].start, g.receiver_slices(l)[x].stop)
                         for l in range(g.n_layers) for x in ("q", "k")])
    assert not torch.allclose(exact[..., qk_rows], linear[..., qk_rows])  # the q/k edges were rescored


def test_a_query_norm_over_all_heads_is_not_read_as_a_per_head_one():
    """OLMo-2 normalises the concatenated queries of all heads: its gain is longer than d_head,
    so it is not a per-head norm (the layer then falls back rather than scoring wrongly)."""
    from mechscope.circuits.qk import HeadNorm

    class AllHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(64))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight

    assert HeadNorm.fit(AllHeads(), 16, "cpu") is None
    norm = HeadNorm.fit(torch.nn.RMSNorm(16, eps=1e-6), 16, "cpu")
    assert norm is not None and norm.kind == "rms"
    x = torch.randn(5, 16)
    torch.testing.assert_close(norm(x), torch.nn.RMSNorm(16, eps=1e-6)(x))


def _sharp_toy(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "PREV_SCORE", 2 * toy.PREV_SCORE)
    monkeypatch.setattr(toy, "MATCH_SCORE", 2 * toy.MATCH_SCORE)
    return load_model(toy.save_induction_toy(tmp_path / "sharp"), device="cpu")


def _first_half_corrupted(n=8, L=8, seed=0) -> TaskBatch:
    """clean <bos> R R, corrupt <bos> R' R: the induction head's keys and values change; logit diff R vs R'."""
    gen = torch.Generator().manual_seed(seed)
    cl, co, ans, wr = [], [], [], []
    for _ in range(n):
        perm = torch.randperm(toy.VOCAB - 1, generator=gen)[: 2 * L] + 1
        R, R2 = perm[:L], perm[L:]
        cl.append(torch.cat([torch.tensor([0]), R, R]))
        co.append(torch.cat([torch.tensor([0]), R2, R]))
        ans.append(R[1:])
        wr.append(R2[1:])
    pos = torch.arange(L + 1, 2 * L).expand(n, -1)
    return TaskBatch(task="sharp", clean=torch.stack(cl), corrupt=torch.stack(co), positions=pos.clone(),
                     answers=torch.stack(ans), wrongs=torch.stack(wr), lengths=torch.full((n,), 2 * L + 1))


def test_default_eap_ig_sees_k_composition_at_saturated_attention(tmp_path, monkeypatch):
    m = _sharp_toy(tmp_path, monkeypatch)
    g, b = build_graph(m), _first_half_corrupted()
    planted = [("input", "a0.kv0<v>"), ("a0.h0", "a1.kv0<k>"), ("input", "a1.kv0<v>"), ("a1.h0", "logits")]
    kcomp = g.sender_index("a0.h0"), g.receiver_index("a1.kv0<k>")
    src = source_activations(m, g, b.clean, b.corrupt, "patching")
    with torch.no_grad():
        base = b.metric(run_with_edge_mask(m, g, b.clean, src, g.empty_mask()))
        true = b.metric(run_with_edge_mask(m, g, b.clean, src, g.mask_from_edges([planted[1]]))) - base
    assert true < -5  # the edge carries the behaviour
    sc = edge_scores(m, g, b, method="eap-ig", steps=5)  # the defaults
    assert abs(float(sc[kcomp]) - true) < 0.15 * abs(true), (float(sc[kcomp]), true)
    assert roc_auc(sc, g.mask_from_edges(planted).bool(), g.allowed) >= 0.95
    top3 = {g.edge_name(s, r) for s, r in g.edge_index[(-sc)[g.edge_index[:, 0], g.edge_index[:, 1]].topk(3).indices].tolist()}
    assert g.edge_name(*kcomp) in top3  # ranked among the edges that carry the behaviour
    lin = edge_scores(m, g, b, method="eap-ig", steps=5, qk="linear")
    assert float(lin[kcomp]) > true / 2  # the gradient alone misses most of it (here: wrong sign)
