"""A folder laid out as the `tuned-lens` package saves a lens (config.json + params.pt), for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def write_package(folder: Path, L: int, D: int, name: str = "llama", **config) -> dict[str, torch.Tensor]:
    """``folder/config.json`` (the package's keys, ``config`` overriding them) and ``folder/params.pt``
    (the package's own format, a pickle, written here as a fixture) of L random translators of
    width D; returns the state dict so a test can damage it and save it again."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(L):
        state[f"{i}.weight"] = torch.randn(D, D, generator=g) * 0.01
        state[f"{i}.bias"] = torch.randn(D, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "base_model_name_or_path": name, "d_model": D, "num_hidden_layers": L, "bias": True,
        "base_model_revision": None, "unembed_hash": None, "lens_type": "linear_tuned_lens", **config}))
    torch.save(state, folder / "params.pt")
    return state
