"""circuit-tracer's transcoder files: the input hook they read, and loading them back.

mechscope's transcoders read the pure normalised MLP input; circuit-tracer's nnsight backend
reads ``mlp.hook_in`` (gain and bias applied), so ``save_transcoders(..., model=)`` folds the
norm into the files. The check is independent of the folding code: the files' encoder and skip
applied to the model's own ``mlp.hook_in`` activations must give what mechscope's transcoder
gives on ``ln2.hook_normalized``. A missing bias term, a gain on the wrong axis or an unfolded
skip breaks it (norms here have random gains and, for GPT-2, biases)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechscope.errors import MechscopeError
from mechscope.features.transcoder_set import TranscoderSet, load_transcoders, random_transcoders, save_transcoders
from mechscope.models.hooks import ln_normalized


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def normed(request, tmp_path_factory):
    """A tiny model whose second norms have random gains (and biases where the norm has one)."""
    import transformers

    from mechscope.models import load_model

    src = request.getfixturevalue(f"tiny_{request.param}_dir")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1 and ("ln_2" in name or "post_attention_layernorm" in name):
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.5 if name.endswith("weight") else torch.randn(p.shape, generator=g) * 0.3)
    out = tmp_path_factory.mktemp(f"normed_{request.param}")
    hf.save_pretrained(out)
    shutil.copy(src + "/tokenizer.json", out)
    shutil.copy(src + "/tokenizer_config.json", out)
    return load_model(str(out), device="cpu")


def _hooks(model, toks):
    L = model.summary.n_layers
    names = [f"blocks.{i}.mlp.hook_in" for i in range(L)] + [ln_normalized(i, 2) for i in range(L)]
    _, cache = model.bridge.run_with_cache(toks, names_filter=lambda n: n in names)
    return [cache[f"blocks.{i}.mlp.hook_in"][0].float() for i in range(L)], [cache[ln_normalized(i, 2)][0].float() for i in range(L)]


def _drop_mechscope_layout(path):
    for p in path.glob("layer_*"):
        if p.is_dir():
            shutil.rmtree(p)


def test_circuit_tracer_files_read_the_mlp_input(normed, tmp_path):
    tset = random_transcoders(normed, d_sae=24, architecture="relu", k=None, seed=2, skip=True)
    save_transcoders(tset, tmp_path, normed)
    assert "feature_input_hook: mlp.hook_in" in (tmp_path / "config.yaml").read_text()
    toks = torch.tensor([[0, 7, 31, 100, 5, 44]])
    hook_in, pure = _hooks(normed, toks)
    assert max(float((a - b).abs().max()) for a, b in zip(hook_in, pure)) > 0.1  # the norms do change the input
    for i, tc in enumerate(tset.layers):
        t = load_file(str(tmp_path / f"layer_{i}.safetensors"))
        with torch.no_grad():
            want_pre = pure[i] @ tc.W_enc + tc.b_enc
            want_skip = pure[i] @ tc.W_skip.T + tc.b_dec
        assert torch.allclose(hook_in[i] @ t["W_enc"].T + t["b_enc"], want_pre, atol=1e-4)
        assert torch.allclose(hook_in[i] @ t["W_skip"].T + t["b_dec"], want_skip, atol=1e-4)
    # circuit-tracer's files alone load back to the same transcoders, given the model
    _drop_mechscope_layout(tmp_path)
    with pytest.raises(MechscopeError, match="needs the model"):
        load_transcoders(tmp_path)
    back = load_transcoders(tmp_path, "cpu", normed)
    x = torch.randn(3, normed.summary.d_model)
    for a, b in zip(tset.layers, back.layers):
        assert b.cfg.architecture == "skip_relu" and torch.allclose(a(x), b(x), atol=1e-4)


def test_without_a_model_the_files_read_the_pure_input(tiny_llama, tmp_path):
    tset = random_transcoders(tiny_llama, d_sae=16, architecture="relu", k=None, seed=4)
    save_transcoders(tset, tmp_path)
    assert "feature_input_hook: ln2.hook_normalized" in (tmp_path / "config.yaml").read_text()
    t = load_file(str(tmp_path / "layer_0.safetensors"))
    assert torch.equal(t["W_enc"], tset.layers[0].W_enc.detach().T)


def test_circuit_tracer_files_load_by_layer_number_and_refuse_other_hooks(tmp_path):
    """Twelve layer files without a ``transcoders`` list: layer_10 is layer 10, not the third."""
    d, d_sae = 8, 4
    for i in range(12):
        save_file({"W_enc": torch.randn(d_sae, d), "W_dec": torch.randn(d_sae, d), "b_enc": torch.full((d_sae,), float(i)),
                   "b_dec": torch.zeros(d)}, str(tmp_path / f"layer_{i}.safetensors"))
    cfg = "model_kind: transcoder_set\nfeature_input_hook: ln2.hook_normalized\nfeature_output_hook: mlp.hook_out\n"
    (tmp_path / "config.yaml").write_text(cfg)
    tset = load_transcoders(tmp_path)
    assert isinstance(tset, TranscoderSet) and [int(tc.b_enc[0]) for tc in tset.layers] == list(range(12))
    (tmp_path / "layer_5.safetensors").unlink()  # a gap: refused, not renumbered
    with pytest.raises(MechscopeError, match="lacks layer_5.safetensors"):
        load_transcoders(tmp_path)
    (tmp_path / "config.yaml").write_text(cfg.replace("ln2.hook_normalized", "hook_resid_mid"))
    with pytest.raises(MechscopeError, match="reads hook_resid_mid -> mlp.hook_out"):
        load_transcoders(tmp_path)
    (tmp_path / "config.yaml").write_text(cfg + "model_kind: [unclosed\n")
    with pytest.raises(MechscopeError, match=r"config.yaml is not valid YAML \(.* at line \d+\); fix") as err:
        load_transcoders(tmp_path)
    assert "\n" not in str(err.value)
