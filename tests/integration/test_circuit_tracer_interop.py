"""mechscope's attribution graphs equal circuit-tracer's, computed by circuit-tracer itself.

circuit-tracer 0.5.0 pins transformers <= 4.57.3, so ``./setup.sh --test`` installs it into a
third environment ``.venv-ct``; this test saves a tiny Llama (random norm gains, so the input
hook's convention matters) and a transcoder set with ``save_transcoders(..., model)``, lets
circuit-tracer load both from their folders with its own loaders (nnsight backend, the one that
takes models outside TransformerLens's list) and compute the graph for the same tokens and
logit targets, and compares node lists, activations, every edge and the two scores here.
Marked ``circuit_tracer``: skipped without that environment, except under CI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechscope.features.attribute import attribute
from mechscope.features.prune import scores
from mechscope.features.transcoder_set import random_transcoders, save_transcoders

ROOT = Path(__file__).resolve().parents[2]
CT_PY = Path(os.environ.get("MECHSCOPE_CIRCUIT_TRACER_PYTHON", ROOT / ".venv-ct" / "bin" / "python"))

pytestmark = pytest.mark.circuit_tracer


@pytest.fixture(scope="module")
def normed_llama(tiny_llama_dir, tmp_path_factory):
    import transformers

    from mechscope.models import load_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.5)
    out = tmp_path_factory.mktemp("normed_llama")
    hf.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):  # the side script adapts them to transformers 4.57
        shutil.copy(Path(tiny_llama_dir) / f, out)
    return out, load_model(str(out), device="cpu")


@pytest.mark.parametrize("arch,skip", [("relu", True), ("jumprelu", False)])
def test_circuit_tracer_computes_the_same_graph(normed_llama, tmp_path, arch, skip):
    model_dir, model = normed_llama
    tset = random_transcoders(model, d_sae=40, architecture=arch, k=None, seed=1, skip=skip)
    if arch == "jumprelu":
        with torch.no_grad():
            for tc in tset.layers:
                tc.threshold.uniform_(0.0, 0.3)
    save_transcoders(tset, tmp_path / "tc", model)
    toks = torch.randint(1, model.summary.d_vocab, (9,), generator=torch.Generator().manual_seed(2))
    toks[0] = model.tokenizer.bos_token_id
    ours = attribute(model, tset, toks, max_features=10_000, batch_size=16)
    save_file({"tokens": toks, "logit_tokens": ours.logit_tokens}, str(tmp_path / "inputs.safetensors"))
    proc = subprocess.run([str(CT_PY), str(ROOT / "tests" / "helpers" / "circuit_tracer_side.py"), str(tmp_path / "tc"),
                           str(model_dir), str(tmp_path / "inputs.safetensors"), str(tmp_path / "ct.safetensors"), "16"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = load_file(str(tmp_path / "ct.safetensors"))
    their_scores = json.loads(proc.stdout.strip().splitlines()[-1])
    assert torch.equal(theirs["tokens"], toks)
    feats = theirs["active_features"][theirs["selected_features"]]
    assert ours.n_features > 20 and torch.equal(feats, ours.features)  # the same features, in the same order
    their_act = theirs["activation_values"][theirs["selected_features"]]  # its values cover every active feature
    assert torch.allclose(their_act, ours.activations, atol=1e-5)
    A, B = ours.adjacency, theirs["adjacency"]
    assert A.shape == B.shape  # features, L x P errors, P tokens, K logits on both sides
    scale = float(B.abs().max())
    assert scale > 0.5 and float((A - B).abs().max()) < 1e-4 * scale
    s = scores(ours)
    assert abs(s["replacement"] - their_scores["replacement"]) < 1e-4
    assert abs(s["completeness"] - their_scores["completeness"]) < 1e-4
