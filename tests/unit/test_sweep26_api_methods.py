"""API sweep 26, method packages: bad input to the public Python API of recall, SAEs, heads,
lens, features, vision, explain and probes gives one MechscopeError sentence, never a deep
traceback or a silently wrong result."""

from __future__ import annotations

import math

import pytest
import torch

from mechscope.errors import MechscopeError

HOOK = "blocks.0.hook_resid_post"
PROMPT = "The Eiffel Tower is in the city of"


def _sae(model, **kw):
    from mechscope.sae import SAE, SAEConfig

    cfg = dict(d_in=model.summary.d_model, d_sae=32, architecture="topk", k=4, hook_name=HOOK)
    return SAE(SAEConfig(**{**cfg, **kw}))


# --- (A) silently wrong results ------------------------------------------------------------


def test_recall_refuses_unknown_parts_and_bad_noise(tiny_gpt2):
    from mechscope.recall import recall

    with pytest.raises(MechscopeError, match="'tracee'.*choose from trace, knockout"):
        recall(tiny_gpt2, PROMPT, "Eiffel Tower", parts=("tracee",))
    for bad in (math.nan, -1.0, math.inf):
        with pytest.raises(MechscopeError, match="noise_std must be a finite number >= 0"):
            recall(tiny_gpt2, PROMPT, "Eiffel Tower", parts=("trace",), noise_std=bad)


def test_evaluate_sae_refuses_negative_skip_first(tiny_gpt2):
    from mechscope.sae.evaluate import evaluate_sae

    toks = torch.randint(1, 300, (2, 16))
    with pytest.raises(MechscopeError, match="skip_first must be a whole number of at least 0"):
        evaluate_sae(tiny_gpt2, _sae(tiny_gpt2), toks, skip_first=-1)


def test_empty_corpus_spec_is_not_the_current_folder():
    from mechscope.activations import get_corpus
    from mechscope.heads import HeadsConfig

    for spec in ("", "  "):
        with pytest.raises(MechscopeError, match="corpus spec is empty"):
            get_corpus(spec)
    with pytest.raises(MechscopeError, match="HeadsConfig.text is empty"):
        HeadsConfig(text="")


def test_sae_train_config_refuses_bad_device_and_fractions():
    from mechscope.sae import TrainConfig

    base = dict(k=4, tokens=4096, batch_tokens=512, d_sae=64)
    with pytest.raises(MechscopeError, match="'banana' is not a device"):
        TrainConfig(**base, device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(MechscopeError, match="no CUDA device"):
            TrainConfig(**base, device="cuda")
    for option, value in (("lr_warmup", 2.0), ("lr_decay", -0.5), ("l1_warmup", math.nan)):
        with pytest.raises(MechscopeError, match=f"{option} is a fraction .* \\[0, 1\\]"):
            TrainConfig(**base, **{option: value})
    assert TrainConfig(**base, lr_warmup=0.0, lr_decay=1.0).lr_decay == 1.0


def test_sae_trainer_refuses_a_device_other_than_the_models(tiny_gpt2, tmp_path):
    from mechscope.sae.train import check_train_device

    check_train_device("cpu", tiny_gpt2)  # the default names nothing
    with pytest.raises(MechscopeError, match="training runs on the model's device"):
        check_train_device("meta", tiny_gpt2)


def test_sae_of_another_model_family_is_refused(tiny_gpt2, tiny_llama):
    from mechscope.sae import check_sae_fits

    assert tiny_gpt2.summary.d_model == tiny_llama.summary.d_model  # same width: only the name tells them apart
    with pytest.raises(MechscopeError, match="trained on 'gpt2', a gpt2 model.*LlamaForCausalLM"):
        check_sae_fits(_sae(tiny_llama, model_name="gpt2"), tiny_llama)
    with pytest.raises(MechscopeError, match="a llama model"):
        check_sae_fits(_sae(tiny_gpt2, model_name="meta-llama/Llama-3.2-1B"), tiny_gpt2)
    # a hub id of the same family, a name without a family, or a recorded fingerprint: accepted
    for name in ("gpt2", "gpt2-small", "openai-community/gpt2", "my-sae-run", ""):
        check_sae_fits(_sae(tiny_gpt2, model_name=name), tiny_gpt2)
    check_sae_fits(_sae(tiny_llama, model_name="TinyLlama/TinyLlama-1.1B"), tiny_llama)


# --- (B) deep tracebacks -------------------------------------------------------------------


def test_heads_config_refuses_non_positive_counts_and_strings():
    from mechscope.heads import HeadsConfig

    for option in ("copy_tokens", "n_random", "example_len", "seq_len"):
        for value in (0, -1):
            with pytest.raises(MechscopeError, match=f"HeadsConfig.{option} must be at least 1"):
                HeadsConfig(**{option: value})
    with pytest.raises(MechscopeError, match="HeadsConfig.n must be an integer; got '5'"):
        HeadsConfig(n="5")  # type: ignore[arg-type]


def test_head_scores_refuses_zero_copy_tokens(tiny_gpt2):
    from mechscope.heads import HeadsConfig, head_scores

    with pytest.raises(MechscopeError, match="copy_tokens"):
        head_scores(tiny_gpt2, HeadsConfig(n=4, n_text=1, copy_tokens=0))


def test_run_lens_refuses_wrong_argument_types(tiny_gpt2):
    from mechscope.lens import run_lens

    for prompt in ([PROMPT, PROMPT], torch.tensor([[1, 2, 3]])):
        with pytest.raises(MechscopeError, match="prompt must be a str"):
            run_lens(tiny_gpt2, prompt)
    with pytest.raises(MechscopeError, match="target must be a str"):
        run_lens(tiny_gpt2, PROMPT, target=5)  # type: ignore[arg-type]
    with pytest.raises(MechscopeError, match="tuned must be a TunedLens"):
        run_lens(tiny_gpt2, PROMPT, tuned=3.0)
    with pytest.raises(MechscopeError, match="No tuned lens at"):
        run_lens(tiny_gpt2, PROMPT, tuned="no-such-tuned-lens-folder")


def test_attribute_refuses_bad_prompts_and_max_features(tiny_gpt2):
    from mechscope.features import attribute, random_transcoders

    ts = random_transcoders(tiny_gpt2, 32, k=4)
    with pytest.raises(MechscopeError, match="outside gpt2's vocabulary|outside .*vocabulary"):
        attribute(tiny_gpt2, ts, [1000, 2])
    with pytest.raises(MechscopeError, match="max_features must be a whole number of at least 0"):
        attribute(tiny_gpt2, ts, [1, 2, 3], max_features=-1)
    with pytest.raises(MechscopeError, match="token ids, not its text"):
        attribute(tiny_gpt2, ts, "some text")  # type: ignore[arg-type]
    with pytest.raises(MechscopeError, match="attributes one prompt"):
        attribute(tiny_gpt2, ts, torch.tensor([[1, 2, 3], [4, 5, 6]]))


def test_sae_config_checks_widths_dtype_and_types():
    from mechscope.sae import SAE, SAEConfig, TrainConfig

    with pytest.raises(MechscopeError, match="dtype must be a float type"):
        SAE(SAEConfig(d_in=64, d_sae=10, k=2, dtype="int8"))
    with pytest.raises(MechscopeError, match="widths must be positive.*d_sae=-1"):
        SAEConfig(d_in=64, d_sae=-1, k=2)
    with pytest.raises(MechscopeError, match="SAEConfig.d_in must be an integer; got '64'"):
        SAEConfig(d_in="64", d_sae=10, k=2)  # type: ignore[arg-type]
    with pytest.raises(MechscopeError, match="aux_k must be at least 1"):
        TrainConfig(k=4, tokens=4096, batch_tokens=512, aux_k=-3)


def test_sae_encode_decode_check_the_last_dimension(tiny_gpt2):
    sae = _sae(tiny_gpt2)
    with pytest.raises(MechscopeError, match="last dimension 64.*\\[3, 50\\]"):
        sae.encode(torch.randn(3, 50))
    with pytest.raises(MechscopeError, match="last dimension 64"):
        sae(torch.randn(3, 50))
    with pytest.raises(MechscopeError, match="last dimension 32"):
        sae.decode(torch.randn(3, 31))
    assert sae(torch.randn(3, 64)).shape == (3, 64)


def test_evaluate_sae_checks_the_tokens(tiny_gpt2):
    from mechscope.sae.evaluate import evaluate_on_corpus, evaluate_sae

    sae, toks = _sae(tiny_gpt2), torch.randint(1, 300, (2, 16))
    with pytest.raises(MechscopeError, match="integer token ids"):
        evaluate_sae(tiny_gpt2, sae, toks.float())
    with pytest.raises(MechscopeError, match="outside .*vocabulary"):
        evaluate_sae(tiny_gpt2, sae, toks + 1000)
    with pytest.raises(MechscopeError, match="longer than .* takes \\(64 positions\\)"):
        evaluate_sae(tiny_gpt2, sae, torch.randint(1, 300, (1, 100)))
    with pytest.raises(MechscopeError, match="contexts of 1000 tokens are longer"):
        evaluate_on_corpus(tiny_gpt2, sae, n_tokens=200, context_len=1000)


def test_load_sae_checks_the_device(tiny_gpt2, tmp_path):
    from mechscope.sae import load_sae, save_sae

    save_sae(_sae(tiny_gpt2), tmp_path / "sae")
    with pytest.raises(MechscopeError, match="not a device"):
        load_sae(tmp_path / "sae", device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(MechscopeError, match="no CUDA device"):
            load_sae(tmp_path / "sae", device="cuda")
    assert load_sae(tmp_path / "sae").cfg.d_sae == 32


def test_vision_refuses_a_file_as_out_and_a_non_vision_model(tmp_path, tiny_gpt2):
    from mechscope.vision import CircuitConfig, run_circuit, train_model
    from mechscope.vision import TrainConfig as VisionTrainConfig

    f = tmp_path / "file.txt"
    f.write_text("x")
    for out in (f, f / "sub"):
        with pytest.raises(MechscopeError, match="which is a file|is a file"):
            train_model(VisionTrainConfig(arch="cnn", epochs=1), out=out)
    with pytest.raises(MechscopeError, match="needs a vision model.*load_vision_model"):
        run_circuit(str(tmp_path / "cnn"), "3", CircuitConfig(k=3))  # type: ignore[arg-type]
    with pytest.raises(MechscopeError, match="needs a vision model, got a Model"):
        run_circuit(tiny_gpt2, "3", CircuitConfig(k=3))


def test_unit_db_refuses_a_folder(tmp_path):
    from mechscope.explain import UnitDB

    with pytest.raises(MechscopeError, match="is a folder, not a unit database file"):
        UnitDB(tmp_path)
    with pytest.raises(MechscopeError, match="does not exist"):
        UnitDB(tmp_path / "no" / "such" / "units.db")


def test_run_probe_takes_a_builtin_name_and_refuses_other_things(tiny_gpt2):
    from mechscope.probes import ProbeConfig, run_probe

    with pytest.raises(MechscopeError, match="data must be a LabelSet, the name of a built-in one"):
        run_probe(tiny_gpt2, 42)  # type: ignore[arg-type]
    with pytest.raises(MechscopeError, match="data must be a LabelSet"):
        run_probe(tiny_gpt2, "capitalisd")
    res = run_probe(tiny_gpt2, "capitalised", ProbeConfig(layers=[0], max_items=200))
    assert res.label_set == "capitalised"


@pytest.mark.parametrize("call", [
    lambda m: __import__("mechscope.heads", fromlist=["x"]).head_scores(m),
    lambda m: __import__("mechscope.lens", fromlist=["x"]).run_lens(m, PROMPT),
    lambda m: __import__("mechscope.recall", fromlist=["x"]).recall(m, PROMPT, "Eiffel Tower"),
    lambda m: __import__("mechscope.sae", fromlist=["x"]).train_sae(
        m, HOOK, __import__("mechscope.sae", fromlist=["x"]).TrainConfig(k=4, tokens=4096, batch_tokens=512), "/nonexistent-out"),
    lambda m: __import__("mechscope.sae.evaluate", fromlist=["x"]).evaluate_sae(m, None, torch.zeros(1, 4, dtype=torch.long)),
    lambda m: __import__("mechscope.sae.evaluate", fromlist=["x"]).evaluate_on_corpus(m, None),
    lambda m: __import__("mechscope.features", fromlist=["x"]).attribute(m, None, [1, 2]),
    lambda m: __import__("mechscope.icl", fromlist=["x"]).fewshot_knockout(m),
    lambda m: __import__("mechscope.probes", fromlist=["x"]).run_probe(m, "capitalised"),
    lambda m: __import__("mechscope.explain.exemplars", fromlist=["x"]).harvest_exemplars(
        m, __import__("mechscope.explain.config", fromlist=["x"]).ExemplarsConfig()),
], ids=["head_scores", "run_lens", "recall", "train_sae", "evaluate_sae", "evaluate_on_corpus", "attribute",
        "fewshot_knockout", "run_probe", "harvest_exemplars"])
def test_entry_points_require_a_loaded_model(call):
    with pytest.raises(MechscopeError, match="needs a model loaded by mechscope.load_model, got a str"):
        call("gpt2")
