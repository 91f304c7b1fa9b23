"""Interchange interventions (mechscope.patching.interchange) on tiny GPT-2 and Llama models."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.models.hooks import FINAL_NORM_IN, attn_out, attn_z, resid_pre
from mechscope.patching.interchange import Site, interchange_accuracy, patched_logits, sites_for


def _pair(model, n=4, pos=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(1, model.summary.d_vocab, (n, pos), generator=g)
    src = base.clone()
    src[:, 2] = torch.randint(1, model.summary.d_vocab, (n,), generator=g)  # differ in one token
    return base, src


def test_interchange_with_the_base_itself_changes_nothing(tiny_model):
    base, _ = _pair(tiny_model)
    clean = tiny_model(base)
    for site in sites_for(tiny_model, "resid") + sites_for(tiny_model, "head"):
        torch.testing.assert_close(patched_logits(tiny_model, base, base, site, [2, 5]), clean)
    expected = clean[:, -1].argmax(-1)
    res = interchange_accuracy(tiny_model, base, base, expected, site="resid")
    assert res.accuracy.shape == (tiny_model.summary.n_layers + 1, base.shape[1])
    assert bool((res.accuracy == 1).all()) and res.base_accuracy == 1


def test_source_everywhere_gives_the_source_run(tiny_model):
    base, src = _pair(tiny_model)
    want = tiny_model(src)
    assert not torch.allclose(tiny_model(base), want)
    # the whole residual stream entering block 0, or leaving the last one, is the source run's
    torch.testing.assert_close(patched_logits(tiny_model, base, src, Site(resid_pre(0))), want)
    torch.testing.assert_close(patched_logits(tiny_model, base, src, Site(FINAL_NORM_IN))[:, -1], want[:, -1])
    # at the embedding, the differing position alone carries the whole difference
    torch.testing.assert_close(patched_logits(tiny_model, base, src, Site(resid_pre(0)), [2]), want)
    # one block later the other positions have read it too: the same patch is no longer the source run
    assert not torch.allclose(patched_logits(tiny_model, base, src, Site(resid_pre(1)), [2]), want)


def test_positions_before_the_difference_do_nothing_and_the_final_site_decides(tiny_model):
    base, src = _pair(tiny_model)
    expected = tiny_model(src)[:, -1].argmax(-1)
    res = interchange_accuracy(tiny_model, base, src, expected, site="resid")
    clean_hit = float((tiny_model(base)[:, -1].argmax(-1) == expected).float().mean())
    # positions 0 and 1 hold the same activations in both runs (causal attention)
    assert torch.allclose(res.accuracy[:, :2], torch.full_like(res.accuracy[:, :2], clean_hit))
    assert res.accuracy[0, 2] == 1  # the differing token itself, at the embedding
    assert res.accuracy[-1, -1] == 1  # the final residual at the answer position
    assert res.base_accuracy == clean_hit


def test_all_heads_of_a_layer_equal_the_attention_output(tiny_gpt2):
    base, src = _pair(tiny_gpt2)
    H = tiny_gpt2.summary.n_heads
    # patch every head's z at layer 0 by applying the head sites one after another as one hook list
    from mechscope.patching.interchange import source_cache

    z = source_cache(tiny_gpt2, src, [Site(attn_z(0))])[attn_z(0)]

    def all_heads(act, hook=None):
        return z.clone()

    with torch.no_grad():
        via_z = tiny_gpt2.bridge.run_with_hooks(base, fwd_hooks=[(attn_z(0), all_heads)])
    via_out = patched_logits(tiny_gpt2, base, src, Site(attn_out(0)))
    torch.testing.assert_close(via_z, via_out, rtol=1e-4, atol=1e-4)
    one = patched_logits(tiny_gpt2, base, src, Site(attn_z(0), 1), [3])
    assert not torch.allclose(one, tiny_gpt2(base))  # a single head's output matters
    assert len(sites_for(tiny_gpt2, "head")) == tiny_gpt2.summary.n_layers * H


def test_bad_input_is_one_sentence(tiny_gpt2):
    base, src = _pair(tiny_gpt2)
    with pytest.raises(MechscopeError, match="one shape"):
        interchange_accuracy(tiny_gpt2, base, src[:, :-1], base[:, 0])
    with pytest.raises(MechscopeError, match="no hook named"):
        patched_logits(tiny_gpt2, base, src, Site("blocks.9.hook_resid_pre"))
    with pytest.raises(MechscopeError, match="no head"):
        patched_logits(tiny_gpt2, base, src, Site(resid_pre(0), 0))
    with pytest.raises(MechscopeError, match="--head between"):
        sites_for(tiny_gpt2, "head", head=99)
    with pytest.raises(MechscopeError, match="Positions"):
        patched_logits(tiny_gpt2, base, src, Site(resid_pre(0)), [50])
    with pytest.raises(MechscopeError, match="one expected answer"):
        interchange_accuracy(tiny_gpt2, base, src, base[:2, 0])
    with pytest.raises(MechscopeError, match="answer_pos"):
        interchange_accuracy(tiny_gpt2, base, src, base[:, 0], answer_pos=999)
    V = tiny_gpt2.summary.d_vocab
    with pytest.raises(MechscopeError, match="vocabulary"):
        interchange_accuracy(tiny_gpt2, base, src + V, base[:, 0])
    with pytest.raises(MechscopeError, match="expected token ids"):
        interchange_accuracy(tiny_gpt2, base, src, base[:, 0] + V)
    with pytest.raises(MechscopeError, match="integer token ids"):
        interchange_accuracy(tiny_gpt2, base.float(), src.float(), base[:, 0])
    with pytest.raises(MechscopeError, match="torch tensors"):
        interchange_accuracy(tiny_gpt2, base.tolist(), src.tolist(), base[:, 0])
