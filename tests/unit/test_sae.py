"""SAE module, SAELens-layout IO and the trainer, on synthetic data with a planted dictionary."""

from __future__ import annotations

import json

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.sae import SAE, SAEConfig, load_sae, save_sae
from mechscope.sae.sources import TensorSource
from mechscope.sae.train import CKPT_DIR, TrainConfig, Trainer

ARCHS = ["relu", "topk", "batchtopk", "jumprelu"]


def _planted(n=20_000, d=32, m=128, active=4, seed=0):
    """x = sparse codes @ D + offset, with m unit-norm true directions D [m, d]."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    codes = (torch.rand(n, m, generator=g) < active / m).float() * (0.5 + 2.5 * torch.rand(n, m, generator=g))
    return codes @ D + 0.3, D


def _cfg(arch, **kw):
    base = dict(architecture=arch, d_sae=128, k=4, tokens=60_000, batch_tokens=500, lr=3e-3,
                checkpoint_every=10_000, dead_tokens=10_000, l1=0.5, l0=0.05, log_every=10)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_in_saelens_layout(tmp_path, arch):
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture=arch, k=3 if "topk" in arch else None,
                        hook_name="blocks.1.hook_resid_post", model_name="tiny"))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[arch]
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post" and cfg["d_in"] == 8 and cfg["d_sae"] == 16
    back = load_sae(tmp_path)
    x = torch.randn(5, 8)
    assert back.cfg.architecture == arch
    assert torch.equal(back(x), sae(x))


def test_topk_and_jumprelu_activations_follow_their_definitions():
    torch.manual_seed(0)
    topk = SAE(SAEConfig(d_in=6, d_sae=10, architecture="topk", k=3))
    x = torch.randn(4, 6)
    f, pre = topk.encode(x), topk.pre_acts(x)
    assert ((f > 0).sum(-1) <= 3).all()
    kept = pre.topk(3, dim=-1).values.relu()
    assert torch.allclose(f.sort(-1, descending=True).values[:, :3], kept)
    jr = SAE(SAEConfig(d_in=6, d_sae=10, architecture="jumprelu"))
    with torch.no_grad():
        jr.threshold.fill_(0.3)
    pre = jr.pre_acts(x)
    assert torch.equal(jr.encode(x), pre * (pre > 0.3))


def test_bad_sae_files_get_one_clear_sentence(tmp_path):
    sae = SAE(SAEConfig(d_in=8, d_sae=16, architecture="relu"))
    save_sae(sae, tmp_path / "ok")
    with pytest.raises(MechscopeError, match="no cfg.json"):
        load_sae(tmp_path)
    bad = tmp_path / "ok" / "cfg.json"
    cfg = json.loads(bad.read_text())
    cfg["d_in"] = 9
    bad.write_text(json.dumps(cfg))
    with pytest.raises(MechscopeError, match="W_enc has shape \\[8, 16\\]"):
        load_sae(tmp_path / "ok")
    bad.write_text("{not json")
    with pytest.raises(MechscopeError, match="not valid JSON"):
        load_sae(tmp_path / "ok")
    (tmp_path / "pk").mkdir()
    (tmp_path / "pk" / "cfg.json").write_text(json.dumps({"d_in": 8, "d_sae": 16, "architecture": "standard"}))
    (tmp_path / "pk" / "sae_weights.pt").write_bytes(b"\x80\x04")
    with pytest.raises(MechscopeError, match="never loads"):
        load_sae(tmp_path / "pk")
    cfg = {"d_in": 8, "d_sae": 16, "architecture": "jumprelu"}
    (tmp_path / "jr").mkdir()
    (tmp_path / "jr" / "cfg.json").write_text(json.dumps(cfg))
    save_sae(SAE(SAEConfig(d_in=8, d_sae=16, architecture="relu")), tmp_path / "relu")
    (tmp_path / "jr" / "sae_weights.safetensors").write_bytes((tmp_path / "relu" / "sae_weights.safetensors").read_bytes())
    with pytest.raises(MechscopeError, match="lacks the tensor 'threshold'"):
        load_sae(tmp_path / "jr")
    with pytest.raises(MechscopeError, match="unknown SAE architecture"):
        SAEConfig(d_in=8, d_sae=16, architecture="gated")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_trainer_recovers_a_planted_dictionary(tmp_path, arch):
    """A wrong encoder, decoder constraint or sparsity mechanism fails to find the directions."""
    torch.manual_seed(0)
    x, D = _planted()
    sae = Trainer(TensorSource(x), _cfg(arch), tmp_path, d_in=32, hook_name="h", model_name="m").run()
    with torch.no_grad():
        f = sae.encode(x[:4000])
        fvu = ((sae.decode(f) - x[:4000]) ** 2).sum() / ((x[:4000] - x[:4000].mean(0)) ** 2).sum()
        w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
        recovered = ((D @ w.T).max(1).values > 0.9).float().mean()
    assert recovered >= 0.9, (arch, float(recovered))
    assert fvu < 0.35, (arch, float(fvu))
    assert (tmp_path / "cfg.json").exists() and not (tmp_path / CKPT_DIR).exists()


def test_saved_sae_reads_raw_activations_with_the_scale_folded_in(tmp_path):
    x, _ = _planted(n=4000)
    x = x * 37.0  # far from the normalised scale
    tr = Trainer(TensorSource(x), _cfg("topk", tokens=5000), tmp_path, d_in=32, hook_name="h", model_name="m")
    saved = tr.run()
    s = tr.scale_in
    assert abs(s - 32**0.5 / x.norm(dim=1).mean()) / s < 0.05
    with torch.no_grad():
        assert torch.allclose(saved(x[:50]), tr.sae(x[:50] * s) / s, atol=1e-4)
        assert torch.allclose(saved.encode(x[:50]), tr.sae.encode(x[:50] * s), atol=1e-5)
    assert torch.allclose(load_sae(tmp_path)(x[:50]), saved(x[:50]))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, arch):
    x, _ = _planted(n=6000)
    kw = dict(d_in=32, hook_name="h", model_name="m")
    full = Trainer(TensorSource(x, seed=1), _cfg(arch, tokens=30_000), tmp_path / "a", **kw).run()
    first = Trainer(TensorSource(x, seed=1), _cfg(arch, tokens=30_000), tmp_path / "b", **kw)
    first.run(stop_after_steps=35)  # dies after the checkpoint at 10,000 tokens (step 20) and 15 more steps
    assert (tmp_path / "b" / CKPT_DIR).exists()
    # What a SIGKILL mid-save leaves behind (another process's half-written checkpoint): swept.
    stale = tmp_path / "b" / f".{CKPT_DIR}.tmp99999"
    stale.mkdir()
    (stale / "state.json").write_text("{")
    second = Trainer(TensorSource(x, seed=1), _cfg(arch, tokens=30_000), tmp_path / "b", **kw)
    resumed = second.run(resume=True)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.allclose(getattr(full, name), getattr(resumed, name), atol=1e-5), name
    assert not stale.exists() and not list((tmp_path / "b").glob(f".{CKPT_DIR}*"))
    with pytest.raises(MechscopeError, match="nothing to resume"):
        Trainer(TensorSource(x), _cfg(arch, tokens=30_000), tmp_path / "b", **kw).run(resume=True)


@pytest.mark.slow
def test_transcoder_learns_a_sparse_map_between_two_spaces(tmp_path):
    x, D = _planted(n=20_000)
    g = torch.Generator().manual_seed(3)
    M = torch.randn(32, 24, generator=g) / 32**0.5
    y = torch.relu(x) @ M
    sae = Trainer(TensorSource(x, y), _cfg("topk", d_sae=256, k=16, tokens=80_000), tmp_path, d_in=32,
                  hook_name="blocks.0.ln2.hook_normalized", model_name="m", d_out=24,
                  hook_name_out="blocks.0.hook_mlp_out").run()
    assert sae.cfg.is_transcoder and sae.W_dec.shape == (256, 24)
    with torch.no_grad():
        fvu = ((sae(x[:4000]) - y[:4000]) ** 2).sum() / ((y[:4000] - y[:4000].mean(0)) ** 2).sum()
    assert fvu < 0.3, float(fvu)
    assert load_sae(tmp_path).cfg.hook_name_out == "blocks.0.hook_mlp_out"


def test_train_config_refuses_nonsense():
    with pytest.raises(MechscopeError, match="less than one batch"):
        TrainConfig(tokens=10, batch_tokens=4096)
    with pytest.raises(MechscopeError, match="k=99"):
        SAEConfig(d_in=8, d_sae=16, architecture="topk", k=99)


def test_sparse_topk_backward_equals_dense_autograd():
    """The fused TopK encoder's hand-written backward (sparse W_enc gradient, AuxK included)
    gives the gradients plain autograd gives through a dense encoder."""
    from mechscope.sae.archs.topk import _TopKEncode

    torch.manual_seed(0)
    x = torch.randn(64, 12)
    w = torch.randn(12, 40, requires_grad=True)
    b = torch.randn(40, requires_grad=True)
    bd = torch.randn(12, requires_grad=True)
    dead = torch.rand(40) < 0.4
    gv, ga = torch.randn(64, 5), torch.randn(64, 3)
    v, i, av, ai = _TopKEncode.apply(x, bd, w, b, 5, dead, 3)
    ((v * gv).sum() + (av * ga).sum()).backward()
    fused = [t.grad.clone() for t in (w, b, bd)]
    for t in (w, b, bd):
        t.grad = None
    pre = (x - bd) @ w + b
    v2, i2 = pre.topk(5, dim=-1, sorted=False)
    av2, ai2 = pre.masked_fill(~dead, float("-inf")).topk(3, dim=-1, sorted=False)
    assert torch.equal(i, i2) and torch.equal(ai, ai2) and torch.allclose(v, v2)
    ((v2 * gv).sum() + (av2 * ga).sum()).backward()
    for got, want in zip(fused, (w.grad, b.grad, bd.grad)):
        assert torch.allclose(got, want, atol=1e-5)


def test_architectures_save_under_their_saelens_names_and_load_back():
    """Each architecture's cfg.json name (SAE / transcoder) and the name it is read back from."""
    from mechscope.sae.archs import ARCHITECTURES, from_saelens, get_architecture, saelens_names
    from mechscope.sae.io import config_from_saelens, saelens_cfg

    want = {"relu": ("standard", "transcoder"), "topk": ("topk", "topk_transcoder"),
            "batchtopk": ("jumprelu", "jumprelu_transcoder"), "jumprelu": ("jumprelu", "jumprelu_transcoder")}
    assert ARCHITECTURES == tuple(want)
    assert saelens_names() == ["jumprelu", "jumprelu_skip_transcoder", "jumprelu_transcoder", "skip_transcoder", "standard",
                               "topk", "topk_skip_transcoder", "topk_transcoder", "transcoder"]
    for arch, names in want.items():
        for tc, saelens in zip((False, True), names):
            cfg = SAEConfig(d_in=8, d_sae=16, architecture=arch, k=3 if get_architecture(arch).uses_k else None,
                            d_out=6 if tc else None, hook_name_out="blocks.0.hook_mlp_out" if tc else None)
            raw = saelens_cfg(cfg)
            assert raw["architecture"] == saelens and ("d_out" in raw) == tc
            assert ("k" in raw, "k" in raw["metadata"]) == (arch == "topk", arch == "batchtopk")
            back = config_from_saelens(json.loads(json.dumps(raw)))
            assert (back.architecture, back.is_transcoder, back.k) == (arch, tc, cfg.k)
    assert from_saelens("jumprelu")[0].name == "jumprelu" and from_saelens("gated") is None
    with pytest.raises(MechscopeError, match="not supported; mechscope reads jumprelu, jumprelu_skip_transcoder, jumprelu_transcoder"):
        config_from_saelens({"d_in": 8, "d_sae": 16, "architecture": "gated"})


def test_a_new_architecture_is_one_class(tmp_path, monkeypatch):
    """A skip transcoder (y_hat = ReLU code @ W_dec + b_dec + x @ W_skip), defined here and
    registered, trains with the unchanged trainer, folds its scales, saves W_skip and loads back
    (and a wrong-shaped W_skip in the file gets the usual one-sentence error)."""
    from mechscope.sae import archs
    from mechscope.sae.archs.relu import ReLU

    class SkipTranscoder(ReLU):
        name = "test_skip"
        saelens_name = "test_skip_sae"
        saelens_transcoder_name = "test_skip_transcoder"

        def extra_parameters(self, cfg):
            return {"W_skip": (cfg.d_in, cfg.out_dim)}

        def decode(self, sae, f, x=None):
            return super().decode(sae, f) + x.to(sae.W_skip.dtype) @ sae.W_skip

        @torch.no_grad()
        def fold_scales(self, sae, scale_in, scale_out):
            super().fold_scales(sae, scale_in, scale_out)
            sae.W_skip.mul_(scale_in / scale_out)

    monkeypatch.setitem(archs._REGISTRY, SkipTranscoder.name, SkipTranscoder)
    x, _ = _planted(n=8000)
    g = torch.Generator().manual_seed(4)
    lin = torch.randn(32, 24, generator=g) / 32**0.5
    y = 5.0 * (x @ lin) + torch.relu(x) @ (torch.randn(32, 24, generator=g) / 32**0.5)  # mostly linear
    tr = Trainer(TensorSource(x, y), _cfg("test_skip", tokens=20_000, l1=0.05, lr=1e-2), tmp_path, d_in=32,
                 hook_name="h", model_name="m", d_out=24, hook_name_out="o")
    sae = tr.run()
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "test_skip_transcoder"
    back = load_sae(tmp_path)
    assert isinstance(back.arch, SkipTranscoder) and back.W_skip.shape == (32, 24)
    with torch.no_grad():
        assert torch.equal(back(x[:100]), sae(x[:100]))
        assert torch.allclose(sae(x[:50]), tr.sae(x[:50] * tr.scale_in) / tr.scale_out, atol=1e-4)
        cos = torch.nn.functional.cosine_similarity(sae.W_skip.flatten(), lin.flatten(), 0)
    assert cos > 0.6, float(cos)  # W_skip (zeros at the start) learned the planted linear map
    from safetensors.torch import load_file, save_file

    w = load_file(str(tmp_path / "sae_weights.safetensors"))
    save_file({**w, "W_skip": torch.zeros(31, 24)}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(MechscopeError, match="W_skip has shape \\[31, 24\\]"):
        load_sae(tmp_path)


def test_transcoder_output_hook_is_the_blocks_mlp_output():
    from mechscope.sae import transcoder_output_hook

    assert transcoder_output_hook("blocks.6.ln2.hook_normalized") == "blocks.6.hook_mlp_out"
    with pytest.raises(MechscopeError, match="cannot tell which layer 'hook_embed' belongs to"):
        transcoder_output_hook("hook_embed")
