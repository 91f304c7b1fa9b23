"""Model folders whose weights transformers would read from a pickle are refused before any
load; a folder without tokenizer files or with only a .bin is named in one sentence."""

import contextlib
import importlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.models import load_model

load_mod = importlib.import_module("mechscope.models.load")


class _Hostile:
    """Unpickling this creates ``marker``: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _bin_via_index(src: str, dst: Path, hostile: Path | None = None) -> Path:
    """The reviewer's folder: pytorch_model.bin (the real weights, or a marker-creating pickle),
    an unrelated .safetensors file, and a safetensors index whose weight_map names the .bin."""
    from safetensors.torch import load_file, save_file

    p = _copy(src, dst)
    sd = load_file(str(p / "model.safetensors"))
    (p / "model.safetensors").unlink()
    if hostile is None:
        torch.save(sd, p / "pytorch_model.bin")
    else:
        (p / "pytorch_model.bin").write_bytes(pickle.dumps(_Hostile(hostile)))
    save_file({"x": torch.zeros(1)}, str(p / "unrelated.safetensors"))
    (p / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: "pytorch_model.bin" for k in sd}}))
    return p


def test_index_naming_a_pickle_is_refused_before_loading(tiny_llama_dir, tmp_path):
    p = _bin_via_index(tiny_llama_dir, tmp_path / "bin_via_index")
    with pytest.raises(MechscopeError, match=r"points at pytorch_model\.bin, which is not a safetensors file.*save_pretrained"):
        load_model(str(p), device="cpu")


def test_hostile_pickle_behind_an_index_never_runs(tiny_llama_dir, tmp_path):
    marker = tmp_path / "PWNED"
    p = _bin_via_index(tiny_llama_dir, tmp_path / "hostile", hostile=marker)
    with pytest.raises(MechscopeError, match="not a safetensors file"):
        load_model(str(p), device="cpu")
    assert not marker.exists()


def test_transformers_weights_naming_a_pickle_is_refused(tiny_llama_dir, tmp_path):
    p = _copy(tiny_llama_dir, tmp_path / "explicit")
    cfg = json.loads((p / "config.json").read_text())
    cfg["transformers_weights"] = "adapter_model.bin"  # transformers lets this one name through to torch.load
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MechscopeError, match="transformers_weights.*not a safetensors file"):
        load_model(str(p), device="cpu")


def test_torch_load_refuses_while_transformers_loads(tiny_llama_dir, tmp_path, monkeypatch):
    """The safety net behind the folder check (a hub repository's index is seen only once fetched)."""
    p = _bin_via_index(tiny_llama_dir, tmp_path / "net")
    monkeypatch.setattr(load_mod, "_check_weight_files", lambda folder, name: None)
    with pytest.raises(MechscopeError, match="about to unpickle"):
        load_model(str(p), device="cpu")
    assert torch.load is not None and torch.load.__name__ == "load"  # put back


def test_unpickling_error_is_one_sentence(tiny_llama_dir, tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"
    p = _bin_via_index(tiny_llama_dir, tmp_path / "net2", hostile=marker)
    monkeypatch.setattr(load_mod, "_check_weight_files", lambda folder, name: None)
    monkeypatch.setattr(load_mod, "_no_unpickling", contextlib.nullcontext)
    with pytest.raises(MechscopeError, match="pickle that mechscope will not unpickle"):
        load_model(str(p), device="cpu")
    assert not marker.exists()


def test_sharded_safetensors_still_load(tiny_llama_dir, tmp_path, tiny_llama):
    from safetensors.torch import load_file

    p = _copy(tiny_llama_dir, tmp_path / "sharded")
    sd = load_file(str(p / "model.safetensors"))
    (p / "model.safetensors").rename(p / "model-00001-of-00001.safetensors")
    (p / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in sd}}))
    m = load_model(str(p), device="cpu")
    toks = torch.randint(1, 512, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(m(toks), tiny_llama(toks), atol=1e-5)


def test_bin_plus_stray_safetensors_says_why_and_how(tiny_llama_dir, tmp_path):
    from safetensors.torch import save_file

    p = _copy(tiny_llama_dir, tmp_path / "stray")
    (p / "model.safetensors").unlink()
    (p / "pytorch_model.bin").write_bytes(b"not really")
    save_file({"x": torch.zeros(2)}, str(p / "scores.safetensors"))
    with pytest.raises(MechscopeError) as info:
        load_model(str(p), device="cpu")
    msg = str(info.value)
    assert "pytorch_model.bin" in msg and "reads only safetensors" in msg and "safe_serialization=True" in msg
    assert "scores.safetensors" in msg


def test_folder_without_tokenizer_files_is_named(tiny_llama_dir, tmp_path):
    from mechscope.models import load_tokenizer

    p = _copy(tiny_llama_dir, tmp_path / "notok")
    for f in p.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    with pytest.raises(MechscopeError, match=r"has no tokenizer files \(tokenizer\.json.*tokenizer\.save_pretrained"):
        load_model(str(p), device="cpu")
    with pytest.raises(MechscopeError, match="has no tokenizer files"):
        load_tokenizer(str(p))
