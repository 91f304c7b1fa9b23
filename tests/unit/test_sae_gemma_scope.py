"""Gemma Scope SAEs (params.npz) converted to SAE folders: the converted SAE encodes and decodes
as Gemma Scope's JumpReLU does (checked against the formula written out here, negative
thresholds included), its hook comes from the path, and bad files are one sentence each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.sae.gemma_scope import gemma_scope_sae, infer_hook
from mechscope.sae.io import load_sae

D, F = 64, 96  # the tiny Llama's width; features


def params(seed: int = 0, d: int = D) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    thr = np.abs(g.normal(0.3, 0.2, F)).astype(np.float32)
    thr[:5] = -0.2  # below 0: Gemma Scope's ReLU decides there
    return {"W_enc": g.normal(0, 0.3, (d, F)).astype(np.float32), "W_dec": g.normal(0, 0.3, (F, d)).astype(np.float32),
            "b_enc": g.normal(0, 0.3, F).astype(np.float32), "b_dec": g.normal(0, 0.3, d).astype(np.float32), "threshold": thr}


def write(tmp_path: Path, rel: str, arrays: dict) -> Path:
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def gemma_encode(p: dict, x: torch.Tensor) -> torch.Tensor:
    """Gemma Scope's JumpReLU, written from its description: pre = x W_enc + b_enc (no b_dec
    subtracted), then relu(pre) where pre > threshold."""
    pre = x @ torch.from_numpy(p["W_enc"]) + torch.from_numpy(p["b_enc"])
    return (pre > torch.from_numpy(p["threshold"])) * torch.relu(pre)


def test_converted_sae_is_gemma_scopes_jumprelu(tmp_path):
    p = params()
    npz = write(tmp_path, "models--google--gemma-scope-2b-pt-res/snapshots/abc/layer_1/width_16k/average_l0_9/params.npz", p)
    sae = gemma_scope_sae(npz)
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.cfg.architecture == "jumprelu"
    from mechscope.sae.io import save_sae

    out = save_sae(sae, tmp_path / "out")
    back = load_sae(out)
    assert json.loads((out / "cfg.json").read_text())["apply_b_dec_to_input"] is False
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(1))
    f = back.encode(x)
    want = gemma_encode(p, x)
    assert (want[:, :5] > 0).any()  # the negative thresholds matter on these inputs
    torch.testing.assert_close(f, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.decode(f), want @ torch.from_numpy(p["W_dec"]) + torch.from_numpy(p["b_dec"]), atol=1e-5, rtol=1e-5)


def test_hook_from_the_path():
    assert infer_hook(Path("/x/gemma-scope-9b-pt-mlp/layer_20/width_131k/average_l0_11/params.npz")) == "blocks.20.hook_mlp_out"
    assert infer_hook(Path("/x/gemma-scope-2b-pt-res-canonical/layer_3/width_16k/canonical/params.npz")) == "blocks.3.hook_resid_post"
    assert infer_hook(Path("/x/sae/params.npz")) is None
    with pytest.raises(MechscopeError, match="attention SAEs read each head's output"):
        infer_hook(Path("/x/gemma-scope-2b-pt-att/layer_3/width_16k/average_l0_9/params.npz"))


def test_bad_files_are_one_sentence(tmp_path):
    def refused(path: Path, match: str, **kw) -> None:
        with pytest.raises(MechscopeError, match=match) as e:
            gemma_scope_sae(path, **kw)
        assert "\n" not in str(e.value)

    hook = "blocks.1.hook_resid_post"
    refused(write(tmp_path, "h/params.npz", params()), "pass it with --hook")  # a readable file whose path names no hook
    refused(tmp_path / "missing.npz", "does not exist", hook=hook)
    refused(write(tmp_path, "a/params.npz", {k: v for k, v in params().items() if k != "threshold"}), "lacks threshold", hook=hook)
    refused(write(tmp_path, "b/params.npz", {**params(), "b_dec": np.zeros(D + 1, np.float32)}), "b_dec has shape", hook=hook)
    refused(write(tmp_path, "c/params.npz", {**params(), "threshold": np.zeros(F, np.int64)}), "must be float arrays", hook=hook)
    junk = tmp_path / "d" / "params.npz"
    junk.parent.mkdir()
    junk.write_bytes(b"not a zip file")
    refused(junk, "not a readable .npz", hook=hook)
    # an object array would need unpickling: refused, and its code never runs
    flag = tmp_path / "ran"
    evil = {**params(), "W_enc": np.array([_Boom(str(flag))], dtype=object)}
    evil_path = tmp_path / "e" / "params.npz"
    evil_path.parent.mkdir()
    np.savez(evil_path, **evil)  # object arrays are pickled inside the .npy
    refused(evil_path, "never unpickles", hook=hook)
    assert not flag.exists()


class _Boom:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.slow
def test_sae_convert_command_checks_the_model_and_sae_eval_runs(tmp_path, tiny_llama_dir, corpus):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    def run(*args: str):
        return CliRunner().invoke(app, list(args))

    npz = write(tmp_path, "gemma-scope-2b-pt-res/layer_1/width_16k/average_l0_9/params.npz", params())
    r = run("sae", "convert", str(npz), "--model", tiny_llama_dir, "--out", str(tmp_path / "sae"), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["hook"] == "blocks.1.hook_resid_post"
    r = run("sae", "eval", str(tmp_path / "sae"), "--corpus", corpus, "--tokens", "512", "--json")
    assert r.exit_code == 0, r.output  # found its model through metadata.model_path
    ev = json.loads(r.stdout)
    assert ev["tokens"] > 0 and 0 <= ev["l0"] <= F
    wide = write(tmp_path, "w/gemma-scope-2b-pt-res/layer_1/width_16k/average_l0_9/params.npz", params(d=D * 2))
    r = run("sae", "convert", str(wide), "--model", tiny_llama_dir, "--out", str(tmp_path / "wide"))
    assert r.exit_code == 2 and "expects width 128" in r.stderr and "Traceback" not in r.output
    assert not (tmp_path / "wide").exists()  # nothing written for an SAE that does not fit
    r = run("sae", "convert", str(npz), "--out", str(tmp_path / "sae"))
    assert r.exit_code == 2 and "is not empty" in r.stderr
