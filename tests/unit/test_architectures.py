"""Architectures beyond the suite's tiny GPT-2 and Llama, built here from configs: the bridge
serves them with plain transformers' logits; the circuit graph describes parallel blocks
(GPT-NeoX) and refuses, in one sentence, the ones whose blocks it does not describe (an MLP
sharing the attention's norm, a query norm across heads);
the logit lens reads them; Gemma 2's heads are their shares of the norm after attention; a model with no per-head hooks, or of an architecture the bridge
does not know, is refused when it loads."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.graph import build_graph
from mechscope.graph.graph import block_layout
from mechscope.models import load_model
from tests.helpers.cli_inprocess import run_cli

COMMON = dict(vocab_size=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _configs():
    import transformers as T

    return {
        "qwen2": (T.Qwen2ForCausalLM, lambda: T.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **COMMON)),
        "mistral": (T.MistralForCausalLM, lambda: T.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **COMMON)),
        "mistral_window": (T.MistralForCausalLM, lambda: T.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                                         num_attention_heads=4, num_key_value_heads=2,
                                                                         max_position_embeddings=64, sliding_window=4, **COMMON)),
        "mixtral": (T.MixtralForCausalLM, lambda: T.MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                                                  num_experts_per_tok=2, max_position_embeddings=64, **COMMON)),
        "neox": (T.GPTNeoXForCausalLM, lambda: T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                               max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True, **COMMON)),
        "phi": (T.PhiForCausalLM, lambda: T.PhiConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                      max_position_embeddings=64, partial_rotary_factor=0.5, **COMMON)),
        "gemma2": (T.Gemma2ForCausalLM, lambda: T.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                               num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=16,
                                                               final_logit_softcapping=3.0, attn_logit_softcapping=2.0, **COMMON)),
        "gemma": (T.GemmaForCausalLM, lambda: T.GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=1, head_dim=16, max_position_embeddings=64, **COMMON)),
        "olmo2": (T.Olmo2ForCausalLM, lambda: T.Olmo2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                            num_attention_heads=4, max_position_embeddings=64, **COMMON)),
        "cohere": (T.CohereForCausalLM, lambda: T.CohereConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                               num_attention_heads=4, max_position_embeddings=64, logit_scale=1.0, **COMMON)),
        "cohere_scaled": (T.CohereForCausalLM, lambda: T.CohereConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                                      num_attention_heads=4, max_position_embeddings=64, logit_scale=0.0625,
                                                                      **COMMON)),
        "persimmon": (T.PersimmonForCausalLM, lambda: T.PersimmonConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                                        num_attention_heads=4, max_position_embeddings=64, **COMMON)),
        "opt": (T.OPTForCausalLM, lambda: T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                                      max_position_embeddings=64, word_embed_proj_dim=64, **COMMON)),
        "opt_post_ln": (T.OPTForCausalLM, lambda: T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                                              max_position_embeddings=64, word_embed_proj_dim=32,
                                                              do_layer_norm_before=False, **COMMON)),
        "granite": (T.GraniteForCausalLM, lambda: T.GraniteConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                                                  logits_scaling=4.0, residual_multiplier=0.5, embedding_multiplier=2.0,
                                                                  attention_multiplier=0.1, **COMMON)),
        "olmo": (T.OlmoForCausalLM, lambda: T.OlmoConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                         num_attention_heads=4, max_position_embeddings=64, **COMMON)),
        "gptj": (T.GPTJForCausalLM, lambda: T.GPTJConfig(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=64, rotary_dim=8,
                                                         **COMMON)),
        "gptneo": (T.GPTNeoForCausalLM, lambda: T.GPTNeoConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                                               max_position_embeddings=64, window_size=8,
                                                               attention_types=[[["global", "local"], 1]], **COMMON)),
    }


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory) -> dict[str, str]:
    from conftest import _tiny_tokenizer

    tok = _tiny_tokenizer()
    out = {}
    for name, (cls, make) in _configs().items():
        torch.manual_seed(0)
        model = cls(make())
        with torch.no_grad():  # non-trivial weights, biases and norm gains, so every term shows
            for pname, p in model.named_parameters():
                if p.dim() > 1:
                    p.mul_(3.0)
                elif "bias" in pname:
                    p.normal_(0, 0.1)
                else:
                    p.add_(torch.randn_like(p) * 0.1)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        tok.save_pretrained(path)
        out[name] = str(path)
    return out


def assert_last_site_is_the_model(m, res, prompt: str, target: str = " Mary") -> None:
    """The lens's last site ranks ``target`` where the model's own logits do."""
    ids = m.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = m(ids)[0, -1]
    t = m.tokenizer(target, add_special_tokens=False)["input_ids"][0]
    assert int(res.rank[-1, -1]) == int((logits > logits[t]).sum())


def test_sequential_blocks_pass_and_the_others_are_refused_with_the_reason(arch_dirs):
    for name in ("qwen2", "mistral", "gemma", "gemma2", "olmo2"):  # Gemma 2, OLMo-2: heads as shares of the norm after attention
        ok = load_model(arch_dirs[name], device="cpu")
        assert block_layout(ok) == "sequential"
        assert build_graph(ok).n_layers == 2 and not build_graph(ok).parallel
    neox = load_model(arch_dirs["neox"], device="cpu")
    assert block_layout(neox) == "parallel" and build_graph(neox).parallel
    for name, reason in (("phi", "never fires"),):
        m = load_model(arch_dirs[name], device="cpu")
        ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(arch_dirs[name], attn_implementation="eager").eval()
        with torch.no_grad():
            torch.testing.assert_close(m(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)  # the bridge serves it right
        with pytest.raises(MechscopeError, match=reason) as e:
            build_graph(m)
        assert "\n" not in str(e.value) and "Circuit discovery needs" in str(e.value)


def test_transcoders_refuse_a_model_whose_mlp_has_no_norm_of_its_own(arch_dirs):
    from mechscope.features.config import TranscoderTrainConfig
    from mechscope.features.train import check_layers

    with pytest.raises(MechscopeError, match="shares the attention's norm"):
        check_layers(load_model(arch_dirs["phi"], device="cpu"), TranscoderTrainConfig(layers=[0]))
    assert check_layers(load_model(arch_dirs["neox"], device="cpu"), TranscoderTrainConfig(layers=[1])) == [1]  # its MLP has ln2


@pytest.mark.parametrize("name", ["neox", "phi", "gemma2"])
def test_heads_and_exemplars_run_on_the_models_beyond_the_sequential_shape(name, arch_dirs, tmp_path):
    import json

    from typer.testing import CliRunner

    from mechscope.cli.main import app

    corpus = tmp_path / "c.txt"
    corpus.write_text("When Mary and John went to the store, John gave a drink to Mary.\n\n" * 40)
    r = CliRunner().invoke(app, ["heads", "--model", arch_dirs[name], "--out", str(tmp_path / "heads"), "--json"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "heads" / "heads.json").is_file()
    r = CliRunner().invoke(app, ["exemplars", "--model", arch_dirs[name], "--db", str(tmp_path / "u.db"), "--corpus", str(corpus),
                                 "--tokens", "256", "--context-len", "32", "--batch-size", "4", "--k", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_units"] == 2 * 128


def test_circuit_command_refuses_a_shared_norm_model_in_one_sentence(arch_dirs):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    r = CliRunner().invoke(app, ["discover", "--model", arch_dirs["phi"], "--task", "induction", "--n", "4", "--method", "eap"])
    assert r.exit_code == 2 and "never fires" in r.stderr and "Traceback" not in r.output, r.output


def test_logit_lens_reads_a_parallel_model(arch_dirs):
    from mechscope.lens import run_lens

    m = load_model(arch_dirs["neox"], device="cpu")
    prompt = "When Mary and John went to the store, John gave a drink to"
    res = run_lens(m, prompt, target=" Mary")
    assert res.sites == ["L0.pre", "L0.post", "L1.pre", "L1.post"]  # no resid_mid in a parallel block
    assert_last_site_is_the_model(m, res, prompt)
    assert abs(res.dla.error) < 1e-4  # head and MLP contributions still add up in a parallel block


def test_logit_lens_reads_gemma_norm_and_soft_capped_logits(arch_dirs):
    """Gemma's RMSNorm scales by 1 + weight; Gemma 2 caps its logits (c * tanh(raw / c), c = 3
    here so the cap bends them): the lens, recall's last-position logits, the tuned lens's
    decoder and the confusion lens read probabilities through the cap, and DLA decomposes the
    logits before it (recovered from the model's own logits by atanh) and says so."""
    from mechscope.lens import run_lens

    prompt = "When Mary and John went to the store, John gave a drink to"
    m = load_model(arch_dirs["gemma"], device="cpu")
    block_layout(m)
    res = run_lens(m, prompt, target=" Mary")
    assert_last_site_is_the_model(m, res, prompt)
    assert abs(res.dla.error) < 1e-4 and abs(res.dla.actual) > 1e-3  # (1 + weight) read right: contributions add up
    assert res.dla.note() == ""

    g2 = load_model(arch_dirs["gemma2"], device="cpu")
    ids = g2.tokenizer(prompt, return_tensors="pt")["input_ids"]
    mary, john = (g2.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (" Mary", " John"))
    with torch.no_grad():
        logits = g2(ids)[0, -1]
    raw = 3.0 * torch.atanh(logits / 3.0)  # the logits before the cap
    assert float((raw - logits).abs().max()) > 0.05  # the cap bends this model's logits
    res = run_lens(g2, prompt, target=" Mary", distractor=" John")
    assert_last_site_is_the_model(g2, res, prompt)
    torch.testing.assert_close(float(res.prob[-1, -1]), float(logits.softmax(-1)[mary]), atol=1e-5, rtol=1e-4)
    assert abs(res.dla.actual - float(raw[mary] - raw[john])) < 1e-4
    assert "soft-caps its logits" in res.dla.note() and "before the cap" in res.dla.note()

    from mechscope.confusion.attribution import Prefix, lens_readout
    from mechscope.lens.tuned_train import _Decoder
    from mechscope.models.hooks import FINAL_NORM_IN
    from mechscope.recall.engine import last_logits

    torch.testing.assert_close(last_logits(g2, ids)[0], logits, atol=1e-5, rtol=1e-4)
    _, cache = g2.bridge.run_with_cache(ids, names_filter=lambda n: n == FINAL_NORM_IN)
    torch.testing.assert_close(_Decoder(g2, torch.float32, "cpu")(cache[FINAL_NORM_IN][0, -1:])[0], logits, atol=1e-5, rtol=1e-4)
    probs, _ = lens_readout(g2, [Prefix(ids=ids[0].tolist(), target=mary)])
    torch.testing.assert_close(float(probs[0, -1]), float(logits.softmax(-1)[mary]), atol=1e-5, rtol=1e-4)

    # A unit's top output tokens only need the logits' order, which the (monotonic) soft-cap keeps.
    from mechscope.explain.units import output_logits

    d = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    top, _ = output_logits(g2, d, k=3, vocab=[str(i) for i in range(512)])
    w = 1 + g2.bridge.ln_final._original_component.weight.detach()  # Gemma's RMSNorm: 1 + weight
    want = ((d * w) @ g2.bridge.W_U.detach()).topk(3, dim=-1).indices
    assert [[int(t) for t, _ in row] for row in top] == want.tolist()


def test_unembedding_is_checked_against_the_model_logits(arch_dirs):
    """Cohere's final norm centres without a bias (read as a LayerNorm: the lens then equals the
    model) and its logits are the unembedding's times ``logit_scale``, folded into W_U: the lens,
    DLA and recall read the scaled model exactly. A multiplier mechscope cannot read (here the
    same scale as a tensor) makes every reader of the unembedding refuse in one sentence
    instead of reporting shifted logits."""
    from mechscope.lens import run_lens
    from mechscope.models.unembed import final_norm, logit_scale, norm_kind
    from mechscope.recall import recall

    prompt = "When Mary and John went to the store, John gave a drink to"
    m = load_model(arch_dirs["cohere"], device="cpu")
    assert norm_kind(m.bridge.ln_final._original_component) == "layernorm"
    res = run_lens(m, prompt, target=" Mary")
    assert_last_site_is_the_model(m, res, prompt)
    scaled = load_model(arch_dirs["cohere_scaled"], device="cpu")
    assert logit_scale(scaled) == 0.0625
    ids = scaled.tokenizer(prompt, return_tensors="pt")["input_ids"]
    mary, john = (scaled.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (" Mary", " John"))
    with torch.no_grad():
        logits = scaled(ids)[0, -1]
    res = run_lens(scaled, prompt, target=" Mary", distractor=" John")
    torch.testing.assert_close(float(res.prob[-1, -1]), float(logits.softmax(-1)[mary]), atol=1e-6, rtol=1e-4)
    assert res.dla.exact and abs(res.dla.actual - float(logits[mary] - logits[john])) < 1e-5  # the scale is linear: DLA adds up
    recall(scaled, prompt, subject="Mary", target=" Mary")

    opaque = load_model(arch_dirs["cohere_scaled"], device="cpu")
    opaque.bridge.original_model.logit_scale = torch.tensor(0.0625)  # the model still scales, mechscope cannot read it
    final_norm(opaque, ranks_only=True)  # a positive scale keeps the logits' order: ranks may be read
    with pytest.raises(MechscopeError, match="differs from the model's logits by .*a logit scale") as e:
        final_norm(opaque)  # ... but a ranks-only check does not stand for the full one
    assert "\n" not in str(e.value)
    with pytest.raises(MechscopeError, match="a logit scale"):
        recall(opaque, prompt, subject="Mary", target=" Mary")


def test_direct_logit_attribution_adds_up_through_a_norm_after_attention_and_says_when_not(arch_dirs, monkeypatch):
    """OLMo-2 and Gemma 2 normalise attention's and the MLP's output before adding them: read
    as each head's share of that norm's output, the contributions add up to the logit
    difference; read as the raw head outputs (the old reading, forced here) they do not, and
    the lens says so instead of printing them as if they did."""
    import mechscope.lens.dla as dla
    from mechscope.lens import run_lens

    prompt = "When Mary and John went to the store, John gave a drink to"
    for name in ("olmo2", "gemma2"):
        res = run_lens(load_model(arch_dirs[name], device="cpu"), prompt, target=" Mary", distractor=" John")
        assert res.dla.exact and res.dla.error < 1e-3 and abs(res.dla.actual) > 1e-3, (name, res.dla.error)
    monkeypatch.setattr(dla, "head_shares", lambda model: [None] * model.summary.n_layers)
    olmo = run_lens(load_model(arch_dirs["olmo2"], device="cpu"), prompt, target=" Mary", distractor=" John")
    assert not olmo.dla.exact and "do not add up" in olmo.dla.note()
    assert olmo.to_dict()["dla"]["exact"] is False and olmo.to_dict()["dla"]["note"]
    qwen = run_lens(load_model(arch_dirs["qwen2"], device="cpu"), prompt, target=" Mary", distractor=" John")
    assert qwen.dla.exact and qwen.dla.note() == "" and abs(qwen.dla.actual) > 1e-3
    assert build_graph(load_model(arch_dirs["olmo2"], device="cpu")).n_layers == 2  # circuits too, since session 29


@pytest.mark.parametrize("name", ["opt", "gptj", "gptneo"])
def test_a_model_without_per_head_hooks_runs_all_but_the_circuit_commands(name, arch_dirs, tmp_path):
    """OPT, GPT-J and GPT-Neo: the bridge has no per-head q/k/v inputs or results for them, so
    they load in plain mode; the lens reads them (DLA from hook_z and W_O adds up to the
    logit difference), heads run, the circuit commands refuse in one sentence, and OPT's
    transcoders too (its bridge gives ln2's output flattened over positions)."""
    from typer.testing import CliRunner

    from mechscope.cli.main import app
    from mechscope.lens import run_lens
    from mechscope.models.load import per_head_hooks, plain_attention

    m = load_model(arch_dirs[name], device="cpu")
    assert not per_head_hooks(m)
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(arch_dirs[name], attn_implementation="eager").eval()
    with torch.no_grad(), plain_attention(m):
        torch.testing.assert_close(m(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    prompt = "When Mary and John went to the store, John gave a drink to"
    res = run_lens(m, prompt, target=" Mary", distractor=" John")
    assert_last_site_is_the_model(m, res, prompt)
    assert res.dla.exact and abs(res.dla.actual) > 1e-3
    with pytest.raises(MechscopeError, match="Circuit discovery needs each head's own") as e:
        build_graph(m)
    assert "\n" not in str(e.value)
    r = CliRunner().invoke(app, ["discover", "--model", arch_dirs[name], "--task", "ioi", "--n", "8", "--method", "eap"])
    assert r.exit_code == 2 and "Circuit discovery needs" in r.stderr and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(app, ["heads", "--model", arch_dirs[name], "--out", str(tmp_path / "heads"), "--json"])
    assert r.exit_code == 0, r.output
    if name == "opt":
        from mechscope.features.config import TranscoderTrainConfig
        from mechscope.features.train import check_layers

        with pytest.raises(MechscopeError, match="positions flattened"):
            check_layers(m, TranscoderTrainConfig(layers=[0]))


def test_an_architecture_the_bridge_does_not_know_is_one_sentence(arch_dirs):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    r = CliRunner().invoke(app, ["info", "--model", arch_dirs["persimmon"]])
    assert r.exit_code == 2 and "does not support PersimmonForCausalLM" in r.stderr and len(r.stderr) < 400, r.stderr
    # One the bridge serves but cannot run with its hooks (OPT-350m's layout): refused when it loads.
    r = CliRunner().invoke(app, ["info", "--model", arch_dirs["opt_post_ln"]])
    assert r.exit_code == 2 and "cannot run OPTForCausalLM with its hooks" in r.stderr and "Traceback" not in r.output, r.output


def test_causal_tracing_noise_is_measured_where_it_is_added(arch_dirs):
    """ROME's noise is 3 x the std of the subject's embeddings as the model adds them: Gemma
    scales its embedding table by sqrt(d_model) before hook_embed, so the table alone would give
    noise sqrt(64) = 8x too small."""
    from mechscope.recall.tracing import embedding_std

    for name, factor in (("gemma", 64 ** 0.5), ("qwen2", 1.0)):
        m = load_model(arch_dirs[name], device="cpu")
        subjects = ["The Eiffel Tower", "Mary", "the store"]
        ids = [i for s in subjects for i in m.tokenizer(" " + s, add_special_tokens=False)["input_ids"]]
        table = float(m.bridge.W_E.detach()[torch.tensor(ids)].float().std())
        assert embedding_std(m, subjects) == pytest.approx(factor * table, rel=1e-2), name


def test_exact_qk_scoring_says_which_layers_fall_back(arch_dirs):
    """A layer whose attention the exact q/k computation does not reproduce (NeoX's partial
    rotary) keeps the plain gradient score, and the scoring says so (``info``, a note; discover
    records ``qk_fallback_layers``), where before it said nothing. A sliding window shorter than
    the prompts is read since session 29, so Mistral with one falls back nowhere."""
    from mechscope.circuits.attribution import edge_score_folds
    from mechscope.progress import Recorder
    from mechscope.tasks.base import TaskBatch

    g = torch.Generator().manual_seed(0)
    B, P = 3, 9
    r = lambda *s: torch.randint(1, 512, s, generator=g)  # noqa: E731
    batch = TaskBatch(task="random", clean=r(B, P), corrupt=r(B, P), positions=torch.full((B, 1), P - 1),
                      answers=r(B, 1), wrongs=r(B, 1), lengths=torch.full((B,), P))
    for name, want in (("mistral", []), ("mistral_window", []), ("neox", [0, 1])):
        m = load_model(arch_dirs[name], device="cpu")
        info: dict = {}
        rec = Recorder()
        exact = edge_score_folds(m, build_graph(m), batch, method="eap", progress=rec, info=info)
        assert info["qk_fallback_layers"] == want, name
        assert any("plain gradient" in n for n in rec.notes) == bool(want)
        linear = edge_score_folds(m, build_graph(m), batch, method="eap", qk="linear")
        if want:  # the fallback is the plain gradient score: as --qk linear
            torch.testing.assert_close(exact, linear)
        else:
            assert not torch.allclose(exact, linear), name


def test_mlp_neurons_of_a_mixture_of_experts_are_refused_before_the_pass(arch_dirs):
    """A mixture of experts has no single output matrix per MLP: --units mlp is refused when the
    units are made (it was an AttributeError after the whole corpus pass)."""
    from mechscope.explain.units import unit_source

    with pytest.raises(MechscopeError, match="no single output matrix .*mixture of experts"):
        unit_source(load_model(arch_dirs["mixtral"], device="cpu"), "mlp")
    assert unit_source(load_model(arch_dirs["mistral"], device="cpu"), "mlp").n_units(0) == 128


def test_granite_and_olmo_unembeddings_are_read_and_granite_circuits_refused(arch_dirs):
    """Granite divides its logits by ``logits_scaling`` (folded into W_U like Cohere's scale) and
    OLMo's final LayerNorm has no parameters: the lens reads both exactly, and OLMo's DLA adds
    up. Granite's blocks pass the hook layout check, but patching every edge did not reproduce
    the corrupt run (off by ~0.15), so the circuit commands refuse it rather than report
    circuits that mean nothing."""
    from typer.testing import CliRunner

    from mechscope.cli.main import app
    from mechscope.lens import run_lens
    from mechscope.models.unembed import logit_scale

    prompt = "When Mary and John went to the store, John gave a drink to"
    granite, olmo = (load_model(arch_dirs[n], device="cpu") for n in ("granite", "olmo"))
    assert logit_scale(granite) == 0.25
    for m in (granite, olmo):
        ids = m.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            p = m(ids)[0, -1].softmax(-1)
        res = run_lens(m, prompt, target=" Mary", distractor=" John")
        mary = m.tokenizer(" Mary", add_special_tokens=False)["input_ids"][0]
        torch.testing.assert_close(float(res.prob[-1, -1]), float(p[mary]), atol=1e-6, rtol=1e-4)
    assert res.dla.exact and abs(res.dla.actual) > 1e-3  # OLMo
    assert build_graph(olmo).n_layers == 2
    r = CliRunner().invoke(app, ["discover", "--model", arch_dirs["granite"], "--task", "ioi", "--n", "8", "--method", "eap"])
    assert r.exit_code == 2 and "does not reproduce the corrupt run" in r.stderr and "Traceback" not in r.output, r.output


def test_head_weights_fold_the_attention_output_norm_and_read_blocks_without_an_input_norm(arch_dirs):
    """Gemma 2 normalises each attention output before the residual add: its ``diag(1 + w)``
    belongs in W_O, so the OV copying score equals one computed here from the HF weights with it
    (and differs without it). OLMo-2's blocks have no input norm: the heads read the residual."""
    import transformers

    from mechscope.heads import copying
    from mechscope.heads.weights import head_weights

    path = arch_dirs["gemma2"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    sd = {k: v.detach().double() for k, v in hf.state_dict().items()}
    H, G, e, D = 4, 2, 16, 64
    W_E = sd["model.embed_tokens.weight"]
    W_U = torch.diag(1 + sd["model.norm.weight"]) @ hf.get_output_embeddings().weight.detach().double().T
    lib = copying.eigen_copying(head_weights(load_model(path, device="cpu")))
    for with_post in (True, False):
        want = torch.zeros(2, H)
        for l in range(2):
            p = f"model.layers.{l}."
            V = torch.diag(1 + sd[p + "input_layernorm.weight"]) @ sd[p + "self_attn.v_proj.weight"].reshape(G, e, D).transpose(1, 2)
            O = sd[p + "self_attn.o_proj.weight"].T.reshape(H, e, D)
            if with_post:
                O = O @ torch.diag(1 + sd[p + "post_attention_layernorm.weight"])
            for h in range(H):
                ev = torch.linalg.eigvals(W_E @ V[h // (H // G)] @ O[h] @ W_U)
                want[l, h] = float(ev.real.sum() / ev.abs().sum())
        close = torch.allclose(lib.float(), want.float(), atol=1e-4)
        assert close if with_post else not close, (with_post, lib, want)
    w = head_weights(load_model(arch_dirs["olmo2"], device="cpu"))
    assert all(torch.isfinite(t).all() for t in w.W_Q + w.W_O)


@pytest.mark.parametrize("name", ["gemma2", "olmo2", "qwen2"])
def test_neuron_directions_include_a_norm_after_the_mlp(name, arch_dirs):
    """Gemma 2 and OLMo-2 scale the MLP's output by a norm before adding it to the residual
    stream; a neuron's output direction (read by the exemplars' top and bottom tokens) folds that
    norm's weight in (a sweep found 10% of the top-10 tokens wrong without it). Checked against
    the Hugging Face module's own weights; Qwen2 has no such norm: the plain rows of W_out."""
    from transformers import AutoModelForCausalLM

    from mechscope.explain.units import MlpNeurons

    m = load_model(arch_dirs[name], device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(arch_dirs[name]).eval()
    for layer in range(m.summary.n_layers):
        dec = hf.model.layers[layer]
        want = dec.mlp.down_proj.weight.detach().float().T  # [d_mlp, d_model]
        post = getattr(dec, "post_feedforward_layernorm", None)
        assert (post is None) == (name == "qwen2")
        if post is not None:
            want = want * (post.weight.detach().float() + (1.0 if name == "gemma2" else 0.0))
        torch.testing.assert_close(MlpNeurons(m).directions(layer), want, rtol=1e-5, atol=1e-6)


def test_a_layout_the_bridge_misreads_is_one_sentence(tmp_path):
    """Falcon's newer layout (Falcon-40B's: new_decoder_architecture, grouped KV heads) makes the
    bridge's weight split raise a RuntimeError at load, which escaped as a traceback in every
    command; it is refused in one sentence now."""
    import transformers
    from conftest import _tiny_tokenizer

    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                                    new_decoder_architecture=True, bos_token_id=0, eos_token_id=0)
    transformers.FalconForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    _tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(MechscopeError, match="FalconForCausalLM"):
        load_model(str(tmp_path), device="cpu")


def test_attention_edits_that_the_bridge_discards_are_refused_not_reported_as_zero(arch_dirs, tiny_gpt2):
    """OPT, GPT-J and GPT-Neo: the bridge fires the score and pattern hooks after the attention
    used them, so knockout reported exactly 0 and frozen patterns did not hold (session 39).
    recall leaves its knockout out with a note; the knockout alone, icl's sweep and attribution
    graphs are refused. GPT-2 and Llama-style models edit as before."""
    from mechscope.icl.knockout import block_edges
    from mechscope.models.check import attention_edits_reach_output
    from mechscope.recall import RecallConfig, recall
    from mechscope.recall.knockout import attention_knockout

    assert attention_edits_reach_output(tiny_gpt2)
    assert attention_edits_reach_output(load_model(arch_dirs["qwen2"], device="cpu"))
    for name in ("opt", "gptj", "gptneo"):
        m = load_model(arch_dirs[name], device="cpu")
        assert not attention_edits_reach_output(m), name
        ids = m.tokenizer("When Mary and John went to the store")["input_ids"]
        with pytest.raises(MechscopeError, match="attention_knockout edits attention scores or patterns.*change nothing"):
            attention_knockout(m, ids, [1, 2], 5, RecallConfig(samples=2))
        with pytest.raises(MechscopeError, match="block_edges .* change nothing"):
            block_edges(m, ids, 5, [{}])
        res = recall(m, "When Mary and John went to the", "Mary and John", cfg=RecallConfig(samples=2))
        assert res.knockout is None and "attention knockout was left out" in res.extras["attention_knockout_skipped"]
        assert res.trace is not None  # the other parts still run
        with pytest.raises(MechscopeError, match="recall's attention knockout edits"):
            recall(m, "When Mary and John went to the", "Mary and John", cfg=RecallConfig(samples=2), parts=("knockout",))
        every = recall(m, "When Mary and John went to the", "Mary and John", cfg=RecallConfig(samples=2),
                       parts=("enrichment", "extraction", "knockout", "trace"))  # every part, in any order
        assert every.knockout is None and every.extraction is not None


def test_granite_heads_are_scaled_by_the_residual_multiplier(arch_dirs):
    """Granite adds residual_multiplier x what attention writes; a head's z @ W_O does not hold
    it, so DLA's heads were 1/multiplier too large and did not add up (session 39)."""
    from mechscope.explain.units import MlpNeurons
    from mechscope.lens import direct_logit_attribution
    from mechscope.models.hooks import mlp_out, mlp_post
    from mechscope.models.norms import residual_multiplier

    m = load_model(arch_dirs["granite"], device="cpu")
    assert residual_multiplier(m) == 0.5
    ids = m.tokenizer("When Mary and John went to the store, John gave a drink to")["input_ids"]
    d = direct_logit_attribution(m, ids, 5, 9)
    assert d.exact and abs(d.total - d.actual) < 1e-4 * max(1.0, abs(d.actual))
    # a neuron's direction times its activation is what the block adds: summed, the MLP's output
    _, cache = m.bridge.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n in (mlp_post(1), mlp_out(1)))
    dirs = MlpNeurons(m).directions(1)
    b = getattr(m.bridge.blocks[1].mlp, "b_out", None)
    got = cache[mlp_post(1)][0] @ dirs + (0 if b is None else b.detach() * 0.5)
    assert torch.allclose(got, cache[mlp_out(1)][0], atol=1e-4)


@pytest.mark.parametrize("name", ["neox", "phi", "gemma2", "cohere", "opt", "granite", "gptj", "gptneo", "olmo2", "qwen2"])
def test_zeroing_a_neurons_weights_equals_zeroing_its_activation(arch_dirs, name):
    """confusion's edits found the output projection by two names (Llama's ``down_proj``,
    GPT-2's ``c_proj``) and crashed on every other layout (session 39); by structure now."""
    from mechscope.confusion.edit import zeroed_neurons
    from mechscope.models.hooks import mlp_post

    m = load_model(arch_dirs[name], device="cpu")
    ids = torch.tensor([m.tokenizer("When Mary and John went to the store")["input_ids"]])

    def zero(x, hook):
        x = x.clone()
        x[..., 3] = 0
        return x

    with torch.no_grad():
        clean = m.bridge(ids)
        with zeroed_neurons([m.bridge.original_model], [(1, 3)]):
            edited = m.bridge(ids)
        hooked = m.bridge.run_with_hooks(ids, fwd_hooks=[(mlp_post(1), zero)])
        assert torch.equal(m.bridge(ids), clean)  # undone
    assert torch.allclose(edited, hooked, atol=1e-5) and not torch.allclose(edited, clean)


def test_a_mixture_of_experts_is_refused_by_neuron_editing(arch_dirs):
    from mechscope.confusion.edit import down_projections

    m = load_model(arch_dirs["mixtral"], device="cpu")
    with pytest.raises(MechscopeError, match="no single MLP output projection .*mixture of experts"):
        down_projections(m.bridge.original_model)


@pytest.mark.parametrize("name", ["neox", "cohere", "phi"])
def test_neuron_gains_on_parallel_blocks_read_the_residual_without_the_mlp(arch_dirs, name):
    """Parallel blocks have no resid_mid (a KeyError before session 39): a neuron's gain adds its
    vector to everything but the MLP, resid_post - mlp_out, checked by hand here."""
    from mechscope.confusion.attribution import Prefix, neuron_gains
    from mechscope.models.hooks import FINAL_NORM_IN, mlp_out, mlp_post, resid_post
    from mechscope.models.norms import residual_multiplier
    from mechscope.models.unembed import final_norm, unembed_weights

    m = load_model(arch_dirs[name], device="cpu")
    ids = m.tokenizer("When Mary and John went to the store, John gave a drink to")["input_ids"]
    p = Prefix(ids=ids, target=5)
    L = m.summary.n_layers
    g = neuron_gains(m, [p], list(range(L)))
    l = L - 1
    n = int(g[0, l].abs().argmax())
    want = {FINAL_NORM_IN, resid_post(l), mlp_out(l), mlp_post(l)}
    _, cache = m.bridge.run_with_cache(torch.tensor([ids]), names_filter=lambda h: h in want)
    norm = final_norm(m)
    W_U, b_U = unembed_weights(m)
    s = norm.scale(cache[FINAL_NORM_IN][0, -1])
    r = (cache[resid_post(l)] - cache[mlp_out(l)])[0, -1].float()
    vec = cache[mlp_post(l)][0, -1, n].float() * m.bridge.W_out[l, n].detach().float() * residual_multiplier(m)

    def lp(x):
        z = norm(x, s) @ W_U + (b_U if b_U is not None else 0)
        return z.log_softmax(-1)[5]

    assert float(g[0, l, n]) == pytest.approx(float(lp(r + vec) - lp(r)), abs=1e-4) and float(g[0, l, n]) != 0.0


def test_a_hook_the_bridge_lists_but_never_feeds_is_refused_by_check_and_probe(arch_dirs, tiny_gpt2_dir, tmp_path):
    """Cohere's blocks compute attention and MLP from one norm: blocks.L.hook_mlp_in is listed
    but never fires. `hooks --check` said ok and `probe` died in a KeyError (session 39)."""
    import json

    labels = tmp_path / "labels.jsonl"
    labels.write_text("\n".join(json.dumps({"text": f"Mary and John went to the store {i}", "label": i % 2}) for i in range(8)))
    r = run_cli("hooks", "--check", "blocks.0.hook_mlp_in", "--model", arch_dirs["cohere"])
    assert r.returncode == 2 and "never fires on this model" in r.stderr, r.stderr
    r = run_cli("probe", "--hook", "blocks.0.hook_mlp_in", "--labels", str(labels), "--model", arch_dirs["cohere"],
                "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and "never fires on this model, so the probe would read nothing" in r.stderr, r.stderr
    assert run_cli("hooks", "--check", "blocks.0.hook_mlp_in", "--model", tiny_gpt2_dir).returncode == 0


def test_an_sae_on_bloom_attention_output_evaluates_in_the_mode_it_was_trained_in(tmp_path):
    """BLOOM feeds blocks.L.hook_attn_out only with plain attention: the store trained on it, and
    `sae eval` (split attention) died in a KeyError (session 39). Every reader now runs a hook
    in one mode (models.load.reading_mode)."""
    import transformers

    from mechscope.models.load import fired_shape
    from tests.conftest import save_scaled

    cfg = transformers.BloomConfig(vocab_size=512, hidden_size=64, n_layer=2, n_head=4, **{k: v for k, v in COMMON.items() if k != "vocab_size"})
    path = save_scaled(transformers.BloomForCausalLM(cfg), tmp_path / "bloom")
    m = load_model(path, device="cpu")
    assert fired_shape(m, "blocks.1.hook_attn_out") == (1, 2, 64)
    out = tmp_path / "sae"
    r = run_cli("--quiet", "sae", "train", "--hook", "blocks.1.hook_attn_out", "--arch", "topk", "--k", "4", "--tokens", "2048",
                "--context-len", "16", "--d-sae", "32", "--model", path, "--out", str(out))
    assert r.returncode == 0, r.stderr
    r = run_cli("--quiet", "sae", "eval", str(out), "--tokens", "128", "--context-len", "16", "--json")
    assert r.returncode == 0, r.stderr
