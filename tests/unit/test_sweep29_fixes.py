"""Fixes from session 29's sweep of circuits and attribution graphs on hand-built Qwen3, Gemma 3
and OLMo-2 models: each test fails on the code before its fix."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import MechscopeError


def test_the_sliding_window_is_the_one_the_layer_declares():
    """Exact q/k scoring tries only the window the layer declares: where every masked key's
    weight was tiny anyway, "no window" passed the pattern check too, was tried first, and the
    effects then let queries see keys the model masks (a sharpened Gemma 3 in the sweep: errors
    of 2.95 on effects of 6.3)."""
    import transformers as T

    from mechscope.circuits.qk import declared_window

    common = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    gemma2 = T.Gemma2ForCausalLM(T.Gemma2Config(num_hidden_layers=2, head_dim=16, sliding_window=4, **common))
    qwen2 = T.Qwen2ForCausalLM(T.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=4,
                                             max_window_layers=2, **common))
    mistral = T.MistralForCausalLM(T.MistralConfig(num_hidden_layers=2, sliding_window=4, **common))
    plain = T.Qwen2ForCausalLM(T.Qwen2Config(num_hidden_layers=2, **common))
    for model, want in ((gemma2, [4, None]), (qwen2, [None, None, 4, 4]), (mistral, [4, 4]), (plain, [None, None])):
        got = [declared_window(layer.self_attn, i) for i, layer in enumerate(model.model.layers)]
        assert got == want, (type(model).__name__, got)


def test_attribution_graphs_refuse_a_model_without_a_norm_before_the_mlp(tmp_path):
    """OLMo-2 has no norm before its MLP, so transcoders have no input to read: a set made for
    it is refused in one sentence when it is used or saved (it was a KeyError in the capture and
    an AttributeError in the save)."""
    import transformers as T
    from conftest import save_scaled

    from mechscope.features.replacement import capture
    from mechscope.features.transcoder_set import random_transcoders, save_transcoders
    from mechscope.models import load_model

    torch.manual_seed(0)
    cfg = T.Olmo2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=64, vocab_size=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    m = load_model(save_scaled(T.Olmo2ForCausalLM(cfg), tmp_path / "olmo2"), device="cpu")
    tset = random_transcoders(m, d_sae=40, architecture="topk", k=6, seed=1)
    for call in (lambda: capture(m, tset, torch.tensor([0, 5, 9, 3])), lambda: save_transcoders(tset, tmp_path / "tc", m)):
        with pytest.raises(MechscopeError, match="own input norm") as e:
            call()
        assert "\n" not in str(e.value) and "no norm before it" in str(e.value)


def test_qk_attribution_of_a_key_outside_the_sliding_window_says_so(tiny_gemma2):
    """A key the layer's sliding window hides gets no attention: QK attribution says that, where
    it blamed soft-capping or ALiBi; a key inside the window is split as before."""
    from mechscope.features.qk import qk_attribution
    from mechscope.features.transcoder_set import random_transcoders

    m = tiny_gemma2  # window 8 on its even (local) layers
    tset = random_transcoders(m, d_sae=40, architecture="topk", k=6, seed=1)
    toks = torch.randint(1, 512, (12,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(MechscopeError, match="outside layer 0's sliding window of 8 tokens for query position 11") as e:
        qk_attribution(m, tset, toks, 0, 1, 11, 2)
    assert "at most 7 positions before the query" in str(e.value)
    r = qk_attribution(m, tset, toks, 0, 1, 11, 4)
    assert abs(float(r.matrix.sum()) - r.score) < 1e-4 * max(1.0, abs(r.score))
