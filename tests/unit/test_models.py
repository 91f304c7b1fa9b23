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


def test_folders_that_hold_no_language_model_are_named(tmp_path, tiny_gpt2_dir):
    """A mechscope vision model, a config without model_type, unreadable JSON and a training
    run's folder: one sentence each, not transformers' first error line."""
    import json
    import shutil

    vision = tmp_path / "cnn"
    vision.mkdir()
    (vision / "config.json").write_text(json.dumps({"schema_version": 1, "kind": "mechscope-vision-model"}))
    (vision / "model.safetensors").write_bytes(b"")
    with pytest.raises(MechscopeError, match="is a mechscope vision model"):
        load_model(str(vision))
    (vision / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(MechscopeError, match="names no model_type"):
        load_model(str(vision))
    (vision / "config.json").write_text("{oops")
    with pytest.raises(MechscopeError, match="not readable JSON"):
        load_model(str(vision))
    run = tmp_path / "run"
    for step in ("ckpt_000000", "ckpt_000060"):
        shutil.copytree(tiny_gpt2_dir, run / step)
    with pytest.raises(MechscopeError, match=r"training run folder.*ckpt_000060 \(the last\)"):
        load_model(str(run))


def test_unreachable_hub_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MechscopeError, match="Hugging Face Hub did not provide it"):
        load_model("nobody/no-such-model-xyz")


def test_hook_name_suggestions(tiny_gpt2):
    assert check_hook_name(tiny_gpt2, "blocks.1.hook_resid_post") == "blocks.1.hook_resid_post"
    with pytest.raises(MechscopeError, match="Did you mean: blocks.1.hook_resid_post"):
        check_hook_name(tiny_gpt2, "blocks.1.hook_resid_pots")


def test_hook_builders_give_transformer_lens_names_and_parse_back(tiny_llama):
    from mechscope.models import hooks

    built = {
        hooks.resid_pre(2): "blocks.2.hook_resid_pre", hooks.resid_mid(2): "blocks.2.hook_resid_mid",
        hooks.resid_post(2): "blocks.2.hook_resid_post", hooks.attn_out(1): "blocks.1.hook_attn_out",
        hooks.mlp_in(0): "blocks.0.hook_mlp_in", hooks.mlp_out(0): "blocks.0.hook_mlp_out",
        hooks.q_input(1): "blocks.1.hook_q_input", hooks.k_input(1): "blocks.1.hook_k_input",
        hooks.v_input(1): "blocks.1.hook_v_input", hooks.attn_z(2): "blocks.2.attn.hook_z",
        hooks.attn_result(2): "blocks.2.attn.hook_result", hooks.attn_pattern(0): "blocks.0.attn.hook_pattern",
        hooks.attn_scores(0): "blocks.0.attn.hook_attn_scores", hooks.attn_hook(0, "rot_q"): "blocks.0.attn.hook_rot_q",
        hooks.ln_normalized(1, 2): "blocks.1.ln2.hook_normalized", hooks.EMBED: "hook_embed",
        hooks.FINAL_NORM_IN: "ln_final.hook_in", hooks.FINAL_NORM_OUT: "ln_final.hook_out", hooks.UNEMBED_IN: "unembed.hook_in",
        hooks.resid_into(1, 3): "blocks.1.hook_resid_pre", hooks.resid_into(3, 3): "ln_final.hook_in",
    }
    for name, expected in built.items():
        assert name == expected
        assert name in tiny_llama.bridge.hook_dict, name
    assert hooks.parse_hook("blocks.12.attn.hook_z") == (12, "attn.hook_z")
    assert hooks.parse_hook("blocks.1.ln2.hook_normalized") == (1, "ln2.hook_normalized")
    assert hooks.parse_hook("hook_embed") == (None, "hook_embed")
    assert hooks.parse_hook("blocks.x.hook_z").layer is None
    assert hooks.hook_layer("blocks.7.hook_mlp_out") == 7
    with pytest.raises(MechscopeError, match="not a hook inside a block"):
        hooks.hook_layer("ln_final.hook_in")
    assert hooks.needs_split_attention("blocks.0.hook_q_input") and hooks.needs_split_attention("blocks.0.attn.hook_result")
    assert not hooks.needs_split_attention("blocks.0.attn.hook_z")


def test_plain_attention_restores_the_modes_it_found(tiny_gpt2):
    from mechscope.models import plain_attention

    cfg = tiny_gpt2.bridge.cfg
    modes = lambda: (cfg.use_split_qkv_input, cfg.use_attn_result)  # noqa: E731
    assert modes() == (True, True)
    with plain_attention(tiny_gpt2):
        assert modes() == (False, False)
        with plain_attention(tiny_gpt2):  # nested: the inner exit must not switch the modes back on
            assert modes() == (False, False)
        assert modes() == (False, False)
    assert modes() == (True, True)
    with pytest.raises(RuntimeError), plain_attention(tiny_gpt2):
        raise RuntimeError
    assert modes() == (True, True)


def test_quiet_loading_silences_the_gguf_bar(monkeypatch):
    """--quiet: the GGUF de-quantising bar (a plain tqdm in transformers' GGUF module) and
    transformers' own bars are off while loading, and both are back afterwards."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from mechscope.models.load import _quiet_loading
    from mechscope.progress import QUIET_ENV

    before = gguf_utils.tqdm
    monkeypatch.setenv(QUIET_ENV, "1")
    with _quiet_loading():
        assert gguf_utils.tqdm([1, 2]).disable and not hf_logging.is_progress_bar_enabled()
    assert gguf_utils.tqdm is before and hf_logging.is_progress_bar_enabled()
    monkeypatch.setenv(QUIET_ENV, "0")
    with _quiet_loading():
        assert gguf_utils.tqdm is before
