"""Model loading from local directories (tiny random models), errors, hook names."""

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.models import check_hook_name, load_model


def test_summary_gpt2(tiny_gpt2):
    s = tiny_gpt2.summary
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.d_model, s.d_mlp, s.d_vocab) == (2, 4, 4, 64, 128, 512)
    assert s.architecture == "GPT2LMHeadModel"


def test_summary_llama_gqa(tiny_llama):
    s = tiny_llama.summary
    assert (s.n_layers, s.n_heads, s.n_kv_heads, s.d_head) == (3, 4, 2, 16)


def test_bridge_matches_plain_transformers(tiny_llama_dir, tiny_llama):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager")
    toks = torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(hf(toks).logits, tiny_llama(toks), atol=1e-4)


def test_gqa_hooks_are_native(tiny_llama):
    toks = torch.randint(1, 512, (1, 5))
    _, cache = tiny_llama.bridge.run_with_cache(toks)
    assert cache["blocks.0.hook_q_input"].shape == (1, 5, 4, 64)
    assert cache["blocks.0.hook_k_input"].shape == (1, 5, 2, 64)  # one per KV head
    assert cache["blocks.0.attn.hook_result"].shape == (1, 5, 4, 64)


def test_missing_path_is_clear():
    with pytest.raises(MechscopeError, match="No model file or directory"):
        load_model("./no/such/model")


def test_pickle_only_dir_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(MechscopeError, match="never unpickles"):
        load_model(str(tmp_path))


def test_unreachable_hub_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MechscopeError, match="Hugging Face Hub did not provide it"):
        load_model("nobody/no-such-model-xyz")


def test_hook_name_suggestions(tiny_gpt2):
    assert check_hook_name(tiny_gpt2, "blocks.1.hook_resid_post") == "blocks.1.hook_resid_post"
    with pytest.raises(MechscopeError, match="Did you mean: blocks.1.hook_resid_post"):
        check_hook_name(tiny_gpt2, "blocks.1.hook_resid_pots")
