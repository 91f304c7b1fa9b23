"""Sweep 27 leftovers: a mixture of experts' summary (one expert's width, the number of experts),
interchange_accuracy's batch, recall's noise_std=0.0 (no noise, not the default) and
``transcoders train``'s resume hint on Ctrl-C."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.errors import MechscopeError

COMMON = dict(vocab_size=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)


# ------------------------------------------------------------------ 1. a mixture of experts' d_mlp
@pytest.fixture(scope="module")
def qwen2_moe_dir(tmp_path_factory) -> str:
    """A tiny Qwen2-MoE whose experts (32 wide) differ from its dense width (intermediate_size 128)."""
    import transformers as T
    from conftest import _tiny_tokenizer

    torch.manual_seed(0)
    model = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        **COMMON))
    path = tmp_path_factory.mktemp("qwen2_moe")
    model.save_pretrained(path, safe_serialization=True)
    _tiny_tokenizer().save_pretrained(path)
    return str(path)


def test_a_mixture_of_experts_reports_one_experts_width_and_the_number_of_experts(qwen2_moe_dir, tiny_gpt2):
    from mechscope.explain.units import unit_source
    from mechscope.models import load_model

    m = load_model(qwen2_moe_dir, device="cpu")
    assert m.summary.d_mlp == 32  # was 128, the dense layers' intermediate_size
    assert m.summary.n_experts == 4
    assert m.summary.to_dict()["n_experts"] == 4
    with pytest.raises(MechscopeError, match="mixture of experts"):  # the neuron readers still refuse it
        unit_source(m, "mlp")
    # a dense model: no n_experts, and its summary dict reads as before
    assert tiny_gpt2.summary.n_experts is None and "n_experts" not in tiny_gpt2.summary.to_dict()
    assert tiny_gpt2.summary.d_mlp == 128

    r = CliRunner().invoke(app, ["info", "--model", qwen2_moe_dir, "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert (got["d_mlp"], got["n_experts"]) == (32, 4)
    r = CliRunner().invoke(app, ["info", "--model", qwen2_moe_dir, "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "n_experts" in r.stdout


@pytest.mark.parametrize("name", ["mixtral", "olmoe", "qwen3_moe", "llama"])
def test_expert_count_and_width_are_read_from_each_config(name):
    import transformers as T

    from mechscope.models.load import _experts

    cfg, want = {
        "mixtral": (T.MixtralConfig(intermediate_size=96, num_local_experts=8), (8, 96)),  # intermediate_size is per expert
        "olmoe": (T.OlmoeConfig(intermediate_size=96, num_experts=16), (16, 96)),
        "qwen3_moe": (T.Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=24, num_experts=8), (8, 24)),
        "llama": (T.LlamaConfig(intermediate_size=96), (None, None)),
    }[name]
    assert _experts(cfg) == want


# ------------------------------------------------------------------ 2. interchange_accuracy's batch
@pytest.mark.parametrize("batch", [0, -3, 2.5, True, "8"])
def test_interchange_refuses_a_batch_that_is_not_a_positive_whole_number(tiny_gpt2, batch):
    from mechscope.patching.interchange import interchange_accuracy

    base = torch.tensor([[1, 2, 3, 4]])
    source = torch.tensor([[5, 6, 7, 8]])
    with pytest.raises(MechscopeError, match="batch must be a whole number of at least 1") as e:
        interchange_accuracy(tiny_gpt2, base, source, torch.tensor([9]), batch=batch)
    assert "\n" not in str(e.value) and repr(batch) in str(e.value)
    assert interchange_accuracy(tiny_gpt2, base, source, torch.tensor([9]), batch=1).accuracy.shape[1] == 4


# ------------------------------------------------------------------ 3. recall's noise_std=0.0
def test_recall_with_noise_std_zero_adds_no_noise(tiny_model):
    from mechscope.recall import RecallConfig, recall
    from mechscope.recall.run import facts_noise_std

    prompt, subject = "Then, Alice and Bob went to the park. Bob gave a ball to", "Bob gave"
    cfg = RecallConfig(samples=1, kinds=("resid",))
    t = recall(tiny_model, prompt, subject, cfg=cfg, parts=("trace",), noise_std=0.0).trace
    assert t.noise_std == 0.0  # was the default noise (0.0 read as "not given")
    assert abs(t.corrupt_prob - t.clean_prob) < 1e-5  # the corrupt run is the clean run
    assert float(t.indirect_effect("resid").abs().max()) < 1e-5
    d = recall(tiny_model, prompt, subject, cfg=cfg, parts=("trace",), noise_std=None).trace
    assert d.noise_std == pytest.approx(facts_noise_std(tiny_model, cfg)) and d.noise_std > 0


# ------------------------------------------------------------------ 4. transcoders train: Ctrl-C
TC = ["--tokens", "1000", "--context-len", "32", "--batch-contexts", "4", "--shuffle-contexts", "16", "--expansion", "2",
      "--k", "4", "--device", "cpu", "--layers", "0"]


def test_an_interrupted_transcoders_train_says_how_to_resume(tiny_gpt2_dir, corpus, tmp_path, monkeypatch):
    import mechscope.features.train as ft

    def interrupted(model, cfg, out, *, checkpoint: bool = True, **kw):  # noqa: ANN001
        if checkpoint:  # as a run stopped after its first checkpoint
            (Path(out) / "checkpoint").mkdir(parents=True, exist_ok=True)
            (Path(out) / "checkpoint" / ft.LATEST).write_text(json.dumps({"generation": "step_00000001"}))
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "train_transcoders", interrupted)
    out = tmp_path / "tc"
    base = ["transcoders", "train", "--model", tiny_gpt2_dir, "--corpus", corpus, "--out", str(out), *TC]
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert f"error: interrupted; rerun the same command with --resume (and --out {out}) to continue from the last checkpoint." \
        in r.stderr, r.stderr
    r = CliRunner().invoke(app, [*base, "--resume"])  # resumed and interrupted again
    assert r.exit_code == 2, r.output
    assert "error: interrupted; rerun the same command to continue from the last checkpoint." in r.stderr, r.stderr
    # interrupted before any checkpoint: nothing to resume, so no hint
    monkeypatch.setattr(ft, "train_transcoders", lambda *a, **kw: interrupted(*a, checkpoint=False, **kw))
    r = CliRunner().invoke(app, ["transcoders", "train", "--model", tiny_gpt2_dir, "--corpus", corpus, "--out",
                                 str(tmp_path / "tc2"), *TC])
    assert r.exit_code == 2, r.output
    assert "error: interrupted." in r.stderr and "--resume" not in r.stderr, r.stderr
