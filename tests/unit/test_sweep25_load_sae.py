"""SAE loading matches SAELens: JumpReLU below-zero thresholds, pre-6 scaling factors, unknown
and non-finite tensors, a missing architecture key; and `sae eval`'s undefined-CE note."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mechscope.cli.sae import undefined_recovered_note
from mechscope.errors import MechscopeError
from mechscope.sae import SAE, SAEConfig, load_sae, save_sae
from mechscope.sae.archs.jumprelu import _JumpSTE
from mechscope.sae.gemma_scope import gemma_scope_sae

D, N = 16, 24


def _base(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D, N, generator=g) / 4, "W_dec": torch.randn(N, D, generator=g) / 4,
            "b_enc": torch.randn(N, generator=g) * 0.1, "b_dec": torch.randn(D, generator=g) * 0.1}


def _pre6(**kw) -> dict:
    c = {"architecture": "standard", "d_in": D, "d_sae": N, "dtype": "torch.float32", "device": "cpu", "model_name": "m",
         "hook_name": "blocks.1.hook_resid_post", "hook_layer": 1, "activation_fn_str": "relu", "apply_b_dec_to_input": True,
         "finetuning_scaling_factor": False, "sae_lens_training_version": "3.13.0", "normalize_activations": "none"}
    return c | kw


def _write(path, cfg: dict, tensors: dict):
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(path / "sae_weights.safetensors"))
    return path


def _pre(W, x):
    return (x - W["b_dec"]) @ W["W_enc"] + W["b_enc"]


# ------------------------------------------------------------------ finding 3: JumpReLU as SAELens
@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk"])
def test_jumprelu_negative_threshold_matches_saelens(arch, tmp_path):
    W = _base()
    thr = torch.linspace(-0.3, 0.2, N)
    cfg = {"architecture": "jumprelu", "d_in": D, "d_sae": N, "dtype": "float32", "apply_b_dec_to_input": True,
           "metadata": {"hook_name": "blocks.1.hook_resid_post", "mechscope_architecture": arch, "k": 4}}
    sae = load_sae(_write(tmp_path / arch, cfg, W | {"threshold": thr}))
    assert sae.cfg.architecture == arch
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(2))
    pre = _pre(W, x)
    assert ((pre < 0) & (pre > thr)).any()  # the case that differs
    with torch.no_grad():
        f = sae.encode(x)
    assert torch.equal(f, torch.relu(pre) * (pre > thr))
    assert (f >= 0).all()


def test_jumprelu_training_path_unchanged_for_positive_thresholds():
    """mechscope's thresholds are >= 1e-4: the straight-through forward equals the inference activation."""
    sae = SAE(SAEConfig(d_in=D, d_sae=N, architecture="jumprelu"))
    with torch.no_grad():
        sae.threshold.copy_(torch.linspace(1e-4, 0.3, N))
    pre = torch.randn(40, N, generator=torch.Generator().manual_seed(3))
    assert torch.equal(_JumpSTE.apply(pre, sae.threshold, 0.05), sae.arch.activate(sae, pre))
    assert torch.equal(sae.arch.activate(sae, pre), pre * (pre > sae.threshold))


# ------------------------------------------------------------------ finding 4: pre-6 scaling factor, unknown tensors
def test_pre6_scaling_factor_is_folded_into_the_decoder(tmp_path):
    W = _base()
    sf = torch.rand(N, generator=torch.Generator().manual_seed(4)) + 0.5
    sae = load_sae(_write(tmp_path / "sf", _pre6(finetuning_scaling_factor=True), W | {"scaling_factor": sf}))
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        f, x_hat = sae.encode(x), sae(x)
    want_f = torch.relu(_pre(W, x))
    assert torch.allclose(f, want_f)  # the unscaled features, SAELens's encode
    assert torch.allclose(x_hat, (want_f * sf) @ W["W_dec"] + W["b_dec"], atol=1e-5)
    # it saves and reloads with the factor folded in, no scaling tensor left
    save_sae(sae, tmp_path / "again")
    with torch.no_grad():
        assert torch.allclose(load_sae(tmp_path / "again")(x), x_hat, atol=1e-6)


def test_scaling_factor_of_ones_is_dropped_and_unflagged_one_refused(tmp_path):
    W = _base()
    sae = load_sae(_write(tmp_path / "ones", _pre6(), W | {"scaling_factor": torch.ones(N)}))
    assert torch.equal(sae.W_dec, W["W_dec"])
    with pytest.raises(MechscopeError, match="finetuning_scaling_factor"):
        load_sae(_write(tmp_path / "unflagged", _pre6(), W | {"scaling_factor": torch.full((N,), 2.0)}))


def test_unknown_tensors_are_refused_by_name(tmp_path):
    with pytest.raises(MechscopeError, match=r"tensors mechscope does not know \(junk;"):
        load_sae(_write(tmp_path / "junk", _pre6(), _base() | {"junk": torch.zeros(3)}))


# ------------------------------------------------------------------ finding 5: non-finite weights
@pytest.mark.parametrize("name", ["W_dec", "b_enc", "threshold"])
def test_non_finite_weights_are_refused_by_name(name, tmp_path):
    cfg = {"architecture": "jumprelu", "d_in": D, "d_sae": N, "dtype": "float32", "metadata": {"hook_name": "blocks.1.hook_resid_post"}}
    W = _base() | {"threshold": torch.full((N,), 0.1)}
    W[name].view(-1)[3] = float("nan") if name != "b_enc" else float("inf")
    with pytest.raises(MechscopeError, match=rf"{name} holds NaN or infinite values"):
        load_sae(_write(tmp_path / name, cfg, W))


def test_gemma_scope_non_finite_arrays_are_refused(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / "width_16k" / "average_l0_5"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(folder / "params.npz", W_enc=rng.standard_normal((D, N)).astype(np.float32),
             W_dec=rng.standard_normal((N, D)).astype(np.float32), b_enc=np.zeros(N, np.float32),
             b_dec=np.full(D, np.nan, np.float32), threshold=-np.ones(N, np.float32))
    with pytest.raises(MechscopeError, match="b_dec holds NaN or infinite values"):
        gemma_scope_sae(folder / "params.npz")


def test_undefined_ce_recovered_note_only_claims_what_is_true():
    nan = undefined_recovered_note(3.2, math.nan, 3.5, "blocks.1.hook_resid_post")
    assert "where it was" not in nan and "ce_sae" in nan and "not a number" in nan
    same = undefined_recovered_note(3.2, 3.3, 3.2, "blocks.1.hook_resid_post")
    assert "zeroing blocks.1.hook_resid_post leaves the loss where it was" in same


# ------------------------------------------------------------------ finding 8: missing architecture key
def test_missing_architecture_uses_mechscope_metadata(tmp_path):
    cfg = {"d_in": D, "d_sae": N, "dtype": "float32", "k": 3,
           "metadata": {"hook_name": "blocks.1.hook_resid_post", "mechscope_architecture": "topk"}}
    sae = load_sae(_write(tmp_path / "topk", cfg, _base()))
    assert (sae.cfg.architecture, sae.cfg.k) == ("topk", 3)
    with torch.no_grad():
        assert int((sae.encode(torch.randn(5, D)) > 0).sum(-1).max()) <= 3


def test_k_without_any_architecture_is_refused(tmp_path):
    cfg = {"d_in": D, "d_sae": N, "dtype": "float32", "k": 3, "metadata": {"hook_name": "blocks.1.hook_resid_post"}}
    with pytest.raises(MechscopeError, match="sets k but names no architecture"):
        load_sae(_write(tmp_path / "k", cfg, _base()))
