"""Session 36: settings no machine here can run, refused before anything is allocated, and
counts that were accepted with a meaning nobody asked for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mechscope.errors import MechscopeError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from cli_inprocess import run_cli  # noqa: E402


def _huge(which: str):
    from mechscope.heads.config import DataConfig, ToyConfig
    from mechscope.icl.binding_config import BindingConfig
    from mechscope.icl.meta_config import MetaConfig, MetaDataConfig

    return {"seq_len": lambda: ToyConfig(data=DataConfig(seq_len=1_000_000)),
            "d_model": lambda: ToyConfig(d_model=400_000, heads=4),
            "batch": lambda: ToyConfig(batch=10**8),
            "binding": lambda: BindingConfig(d_model=200_000),
            "icml": lambda: MetaConfig(data=MetaDataConfig(n_classes=10**10))}[which]


@pytest.mark.parametrize("which", ["seq_len", "d_model", "batch", "binding", "icml"])
def test_toy_sizes_beyond_this_machines_memory_are_one_sentence(which):
    with pytest.raises(MechscopeError, match=r"would need about [\d,]+ GiB of memory and this machine has"):
        _huge(which)()


def test_the_default_toy_runs_pass_the_memory_check():
    from mechscope.heads.config import ToyConfig
    from mechscope.icl.binding_config import BindingConfig
    from mechscope.icl.meta_config import MetaConfig
    from mechscope.resources import gpt_training_bytes

    ToyConfig(), BindingConfig(), MetaConfig()  # noqa: B018
    small = gpt_training_bytes(vocab=65, positions=65, d_model=128, layers=2, heads=4, mlp=False, batch=32, seq=65)
    assert 2**20 < small < 2**30  # weights and activations of the default toy: megabytes
    # doubling the sequence more than doubles it (the attention pattern is quadratic)
    assert gpt_training_bytes(vocab=65, positions=130, d_model=128, layers=2, heads=4, mlp=False, batch=32, seq=130) > 2 * small


def test_cli_train_toy_huge_sequence_is_exit_2_and_leaves_nothing(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
    from cli_inprocess import run_cli

    r = run_cli("--quiet", "train-toy", "--seq-len", "1000000", "--steps", "2", "--out", str(tmp_path / "t"), "--json")
    assert r.returncode == 2 and "GiB of memory" in json.loads(r.stdout)["error"]
    assert "Traceback" not in r.stderr and not (tmp_path / "t").exists()


def test_exemplars_refuses_a_negative_checkpoint_interval():
    from mechscope.explain.config import ExemplarsConfig

    with pytest.raises(MechscopeError, match="--checkpoint-every counts contexts"):
        ExemplarsConfig(checkpoint_every=-1)
    assert ExemplarsConfig(checkpoint_every=0).checkpoint_every == 0  # 0: only when the pass ends


# -- helper sweep A (circuits, patching, heads through the Python API) --------------------------

def _task_file(tmp_path, rows, name="t.jsonl"):
    import json

    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def _pairs(n, words=3):
    names = ["Mary", "John", "Anna", "Paul", "Kate", "Tom", "Lisa", "Mark"]
    return [{"clean": " ".join(["the"] * words) + f" {names[i % 8]} and", "corrupt": " ".join(["the"] * words) + f" {names[(i + 1) % 8]} and",
             "answer": f" {names[i % 8]}", "wrong": f" {names[(i + 1) % 8]}"} for i in range(n)]


def test_prompts_longer_than_the_positions_are_one_sentence_everywhere(tiny_gpt2, tmp_path):
    """edge_scores, Evaluator, ACDC and source_activations raised IndexError from the embedding
    on prompts past a learned-position model's context; run_with_edge_mask already refused."""
    import mechscope as ms
    from mechscope.circuits import acdc, edge_scores
    from mechscope.circuits.evaluate import Evaluator
    from mechscope.patching import source_activations

    batch = ms.get_task(_task_file(tmp_path, _pairs(4, words=80))).build(tiny_gpt2.tokenizer)
    assert batch.n_pos > 64  # the tiny GPT-2 has 64 positions
    g = ms.build_graph(tiny_gpt2)
    for call in (lambda: edge_scores(tiny_gpt2, g, batch, "eap"), lambda: Evaluator(tiny_gpt2, g, batch),
                 lambda: acdc(tiny_gpt2, g, batch, tau=0.1),
                 lambda: source_activations(tiny_gpt2, g, batch.clean, batch.corrupt, "patching")):
        with pytest.raises(MechscopeError, match="context of 64"):
            call()
    short = ms.get_task(_task_file(tmp_path, _pairs(4), "s.jsonl")).build(tiny_gpt2.tokenizer)
    with pytest.raises(MechscopeError, match="outside the model's vocabulary"):
        source_activations(tiny_gpt2, g, short.clean, short.corrupt + 600, "patching")


def test_edge_mask_runs_refuse_empty_stacks_values_outside_0_1_and_unknown_hooks(tiny_gpt2, tmp_path):
    import mechscope as ms
    from mechscope.patching import run_with_edge_mask, source_activations

    b = ms.get_task(_task_file(tmp_path, _pairs(3))).build(tiny_gpt2.tokenizer)
    g = ms.build_graph(tiny_gpt2)
    src = source_activations(tiny_gpt2, g, b.clean, b.corrupt, "patching")
    with pytest.raises(MechscopeError, match="empty"):
        run_with_edge_mask(tiny_gpt2, g, b.clean, src, torch.zeros(0, g.n_senders, g.n_receivers))
    for v in (2.0, -1.0):
        with pytest.raises(MechscopeError, match=r"in \[0, 1\]"):
            run_with_edge_mask(tiny_gpt2, g, b.clean, src, g.full_mask().float() * v)
    with pytest.raises(MechscopeError, match="no hook named 'blocks.0.hook_nope'"):
        run_with_edge_mask(tiny_gpt2, g, b.clean, src, g.empty_mask(), extra_hooks=[("blocks.0.hook_nope", lambda x, hook: x)])
    with pytest.raises(MechscopeError, match="pairs"):
        run_with_edge_mask(tiny_gpt2, g, b.clean, src, g.empty_mask(), extra_hooks="blocks.0.hook_resid_pre")
    seen = []
    out = run_with_edge_mask(tiny_gpt2, g, b.clean, src, g.empty_mask(),
                             extra_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: seen.append(1) or x)])
    assert seen and torch.allclose(out, tiny_gpt2.bridge(b.clean), atol=1e-5)  # a valid hook still runs


def test_task_build_and_get_task_refuse_wrong_arguments_in_one_sentence(tiny_gpt2, tmp_path):
    import mechscope as ms

    t = ms.get_task(_task_file(tmp_path, _pairs(3)))
    with pytest.raises(MechscopeError, match="n must be a whole number"):
        t.build(tiny_gpt2.tokenizer, n="5")
    with pytest.raises(MechscopeError, match="needs a Hugging Face tokenizer"):
        t.build(None)
    with pytest.raises(MechscopeError, match="pass model.tokenizer"):
        t.build(tiny_gpt2)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"clean": "caf\xe9"}\n')
    with pytest.raises(MechscopeError, match="not UTF-8"):
        ms.get_task(str(bad)).build(tiny_gpt2.tokenizer)
    js = tmp_path / "t.json"
    js.write_text("[]")
    with pytest.raises(MechscopeError, match="not a .jsonl file"):
        ms.get_task(str(js))
    upper = tmp_path / "T.JSONL"
    upper.write_text((tmp_path / "t.jsonl").read_text())
    assert len(ms.get_task(str(upper)).build(tiny_gpt2.tokenizer)) == len(t.build(tiny_gpt2.tokenizer)) > 0


def test_edge_scores_and_configs_refuse_values_they_would_reinterpret(tiny_gpt2, tmp_path):
    import mechscope as ms
    from mechscope.circuits import DiscoverConfig, edge_scores

    b = ms.get_task(_task_file(tmp_path, _pairs(3))).build(tiny_gpt2.tokenizer)
    g = ms.build_graph(tiny_gpt2)
    for steps in (2.7, "2"):
        with pytest.raises(MechscopeError, match="whole number"):
            edge_scores(tiny_gpt2, g, b, "eap-ig", steps=steps)
    for field in ("force", "labels"):
        with pytest.raises(MechscopeError, match="must be True or False"):
            DiscoverConfig(**{field: "no"})


def test_interchange_refuses_a_float_position_a_hook_name_for_a_site_and_float_answers(tiny_gpt2):
    from mechscope.patching import interchange_accuracy, patched_logits

    base = torch.randint(1, 500, (3, 6), generator=torch.Generator().manual_seed(0))
    src = torch.randint(1, 500, (3, 6), generator=torch.Generator().manual_seed(1))
    with pytest.raises(MechscopeError, match="answer_pos must be an integer"):
        interchange_accuracy(tiny_gpt2, base, src, base[:, 0], answer_pos=1.0)
    with pytest.raises(MechscopeError, match=r"wrap a hook name as Site\('blocks.0.hook_resid_pre'\)"):
        patched_logits(tiny_gpt2, base, src, "blocks.0.hook_resid_pre")
    with pytest.raises(MechscopeError, match="integer token ids"):
        interchange_accuracy(tiny_gpt2, base, src, base[:, 0].float())
    res = interchange_accuracy(tiny_gpt2, base, base, base[:, 0], answer_pos=torch.tensor(2))  # an integer tensor is an index
    assert res.answer_pos == 2


def test_saving_a_result_onto_a_file_is_one_sentence(tmp_path):
    from mechscope.results import write_result_json

    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(MechscopeError, match="is a file"):
        write_result_json(f, "circuit.json", {})
    assert f.read_text() == "x"


def test_discover_says_how_many_selected_edges_pruning_removed(tiny_llama_dir, tmp_path):
    """--edges K kept fewer than K edges without a word: the top K included edges on no path
    from the input to the logits. The result now records the K edges selected, and the note."""
    r = run_cli("--quiet", "discover", "--model", tiny_llama_dir, "--task", "induction", "--n", "12", "--method", "eap",
                "--force", "--no-labels", "--edges", "20", "--out", str(tmp_path / "c"), "--json")
    assert r.returncode == 0, r.stderr
    import json

    d = json.loads(r.stdout)
    assert d["edges_selected"] == 20 and d["edges_kept"] <= 20
    mt = json.loads((tmp_path / "c" / "circuit.json").read_text())["metrics"]
    assert mt["n_edges_selected"] == 20 and mt["n_edges_kept"] == d["edges_kept"]
    r = run_cli("--quiet", "discover", "--model", tiny_llama_dir, "--task", "induction", "--n", "12", "--method", "eap",
                "--force", "--no-labels", "--edges", "3", "--out", str(tmp_path / "c3"))
    kept = json.loads((tmp_path / "c3" / "circuit.json").read_text())["metrics"]["n_edges_kept"]
    assert r.returncode == 0 and ("lie on no path" in " ".join(r.stdout.split())) == (kept < 3)


def test_node_count_beyond_the_graph_is_refused_before_scoring(tiny_llama, tmp_path):
    from mechscope.circuits import DiscoverConfig, discover

    n_nodes = tiny_llama.summary.n_layers * (tiny_llama.summary.n_heads + 1)
    with pytest.raises(MechscopeError, match=f"Cannot keep {n_nodes + 1} nodes"):
        discover(tiny_llama, DiscoverConfig(task="induction", n=12, level="node", edges=n_nodes + 1, force=True, labels=False),
                 checkpoint=tmp_path / "c")
    assert not any((tmp_path / "c").glob("**/scores.safetensors"))  # refused before the scoring pass


def test_random_heads_of_the_ablation_control_exclude_the_top_heads(tiny_gpt2):
    from mechscope.heads import ablation, sequences

    L, H = tiny_gpt2.summary.n_layers, tiny_gpt2.summary.n_heads
    toks = sequences.repeated_random(tiny_gpt2, 4, 6, 0)
    ranking = [(layer, h) for layer in range(L) for h in range(H)]
    res = ablation.topk_vs_random(tiny_gpt2, toks, 6, ranking, 2, n_random=6)
    assert res["random_from"] == "other heads"
    top = ablation.topk_vs_random(tiny_gpt2, toks, 6, ranking, 2, n_random=0)["top_k_increase"]
    assert all(abs(x - top) > 1e-9 for x in res["random_increases"])  # never the top pair itself
    every = ablation.topk_vs_random(tiny_gpt2, toks, 6, ranking, L * H - 1, n_random=1)
    assert every["random_from"] == "all heads"  # fewer other heads than k: drawn from all


def test_heads_says_when_a_sliding_window_hides_the_first_copy(tiny_gemma2):
    from mechscope.heads import HeadsConfig, head_scores

    res = head_scores(tiny_gemma2, HeadsConfig(n=3, seq_len=10, n_text=2, text_len=20, text="pydoc", copy_tokens=20,
                                               ablate=1, top_k=1, n_random=1, composition=False))
    assert "sliding window of 8 tokens" in res.extra["note"] and "--seq-len below 8" in res.extra["note"]
    res = head_scores(tiny_gemma2, HeadsConfig(n=3, seq_len=6, n_text=2, text_len=20, text="pydoc", copy_tokens=20,
                                               ablate=1, top_k=1, n_random=1, composition=False))
    assert "note" not in res.extra


# -- helper sweep B (lens, recall, confusion, probes, icl) -----------------------------------------

def test_neuron_attribution_goes_through_the_norm_after_the_mlp(tiny_gemma2):
    """Gemma 2 normalises the MLP's output before adding it; the neurons' gains added the raw
    vector, so each layer was scored on its own pre-norm scale (6.7-18x apart on a tiny Gemma 2)."""
    from mechscope.confusion.attribution import Prefix, logit_decomposition, neuron_gains
    from mechscope.models.hooks import FINAL_NORM_IN, mlp_post, resid_mid
    from mechscope.models.unembed import final_norm, unembed_weights

    m = tiny_gemma2
    p = Prefix(m.to_tokens("When Mary and John went to the store, John gave"), 7)
    dec = logit_decomposition(m, p)
    assert dec.total == pytest.approx(dec.actual, abs=1e-4 * max(1.0, abs(dec.actual)))
    assert float(dec.mlp_bias.abs().max()) < 1e-5  # Gemma 2's MLP has no bias: the neurons are all of it
    L = m.summary.n_layers
    g = neuron_gains(m, [p], list(range(L)))
    for l in range(L):  # each layer's neuron, by hand through the HF post-feedforward norm
        n = int(g[0, l].abs().argmax())
        o_name = f"blocks.{l}.ln2_post.hook_in"
        _, cache = m.bridge.run_with_cache(torch.tensor([p.ids]), names_filter=lambda h: h in {FINAL_NORM_IN, resid_mid(l), mlp_post(l), o_name})
        post = m.bridge.original_model.model.layers[l].post_feedforward_layernorm
        o = cache[o_name][0, -1].float()
        vec = cache[mlp_post(l)][0, -1, n].float() * m.bridge.W_out[l, n].detach().float()
        vec = vec * (1 + post.weight.detach().float()) / torch.sqrt(o.pow(2).mean() + post.eps)
        norm = final_norm(m)
        W_U, _ = unembed_weights(m)
        s = norm.scale(cache[FINAL_NORM_IN][0, -1])
        r = cache[resid_mid(l)][0, -1].float()

        def lp(x):
            z = norm.cap(norm.linear(x, s) @ W_U)
            return z.log_softmax(-1)[p.target]

        assert float(g[0, l, n]) == pytest.approx(float(lp(r + vec) - lp(r)), abs=1e-5)


def test_confusion_random_control_is_as_large_as_the_top_or_smaller_only_where_a_layer_runs_out():
    from mechscope.confusion.run import random_like

    top = [(1, n) for n in range(100)] + [(0, 5)]
    rand = random_like(top, 128, seed=0)
    assert not set(rand) & set(top)
    assert sum(layer == 0 for layer, _ in rand) == 1 and sum(layer == 1 for layer, _ in rand) == 28  # layer 1: only 28 left
    even = random_like([(1, n) for n in range(10)] + [(2, 3)], 128, seed=0)
    assert sorted(layer for layer, _ in even) == [1] * 10 + [2]


def test_probe_refuses_attention_patterns_even_when_heads_equal_positions(tiny_gpt2):
    """A pattern is [batch, heads, query, key]: with as many heads as positions its first two
    sizes matched [batch, position] and the probe read heads as positions."""
    from mechscope.probes import LabelSet, ProbeConfig, run_probe

    H = tiny_gpt2.summary.n_heads
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 500, (H,), generator=g).tolist() for _ in range(60)]
    data = LabelSet("p", ["a", "b"], seqs)
    for s in range(len(seqs)):
        for p in range(1, H):
            data.add(s, p, "a" if (s + p) % 2 else "b", f"{s}:{p}")
    with pytest.raises(MechscopeError, match="not attention patterns"):
        run_probe(tiny_gpt2, data, ProbeConfig(hook="blocks.0.attn.hook_pattern"))


def test_recall_confusion_icl_and_tuned_lens_refuse_a_config_of_the_wrong_type(tiny_gpt2):
    from mechscope.confusion.run import run_confusion
    from mechscope.icl import fewshot_knockout
    from mechscope.lens import train_tuned_lens
    from mechscope.recall import recall
    from mechscope.recall.config import RecallConfig

    with pytest.raises(MechscopeError, match=r"takes a RecallConfig .* got a dict \(RecallConfig\(\*\*d\)"):
        recall(tiny_gpt2, "The Eiffel Tower is in the city of", "Eiffel Tower", cfg={"samples": 1})
    with pytest.raises(MechscopeError, match="takes a FewShotConfig"):
        fewshot_knockout(tiny_gpt2, "capital")
    with pytest.raises(MechscopeError, match="LangPrompt"):
        run_confusion(tiny_gpt2, ["Wie geht es?"])
    with pytest.raises(MechscopeError, match="takes a TunedLensTrainConfig"):
        train_tuned_lens(tiny_gpt2, "embedded", {"tokens": 10})
    for bad in ({"trace_window": -1}, {"knockout_window": 0}, {"trace_window": 2.5}):
        with pytest.raises(MechscopeError, match="must be a whole number of layers"):
            RecallConfig(**bad)
    with pytest.raises(MechscopeError, match="'bogus'"):
        RecallConfig(kinds=("bogus",))
    assert RecallConfig(kinds="mlp").kinds == ("mlp",)


# -- helper sweep C (SAEs, transcoders, attribution, vision) ----------------------------------------

def test_frozen_intervention_at_bos_moves_from_the_features_real_value(tiny_gpt2, tset_dir):
    """A BOS feature is no graph node, so the run's active list held no value for it and the
    frozen mode moved it from 0: its own value changed the logits and 0 changed nothing."""
    from mechscope.features.intervene import intervene
    from mechscope.features.transcoder_set import load_transcoders
    tset = load_transcoders(tset_dir, model=tiny_gpt2)
    bos = tiny_gpt2.tokenizer.bos_token_id
    ids = torch.tensor([bos] + [t for t in tiny_gpt2.to_tokens("When Mary and John went to the store") if t != bos])
    hook = tset.layers[0].cfg.hook_name
    _, cache = tiny_gpt2.bridge.run_with_cache(ids[None], names_filter=lambda n: n == hook)
    a = tset.layers[0].encode(cache[hook][0].to(tset.layers[0].W_enc.dtype))
    f = int(a[0].argmax())
    v = float(a[0, f].detach())
    assert v > 0
    own = intervene(tiny_gpt2, tset, ids, [(0, f, 0, v)], frozen=True)
    assert float((own["changed"] - own["base"]).abs().max()) < 1e-4  # its own value: nothing moves
    off = intervene(tiny_gpt2, tset, ids, [(0, f, 0, 0.0)], frozen=True)
    assert float((off["changed"] - off["base"]).abs().max()) > 1e-4  # off: the linear effect of -v W_dec at BOS
    from mechscope.features.attribute import attribute

    with pytest.raises(MechscopeError, match="BOS token, whose features are not graph nodes"):
        attribute(tiny_gpt2, tset, ids, target_feature=(0, f, 0))


def test_sae_training_and_evaluation_default_to_a_context_the_model_takes(tiny_gpt2, corpus, tmp_path):
    """train_sae and evaluate_on_corpus defaulted to 128-token contexts and refused any model
    with fewer positions (the tiny GPT-2 has 64); the CLI already used min(128, the context)."""
    from mechscope.sae import SAE, SAEConfig, TrainConfig, evaluate_on_corpus, train_sae

    hook = "blocks.0.hook_resid_post"
    sae = SAE(SAEConfig(d_in=tiny_gpt2.summary.d_model, d_sae=32, architecture="topk", k=4, hook_name=hook))
    r = evaluate_on_corpus(tiny_gpt2, sae, corpus, n_tokens=256)
    assert 0 < r.tokens <= 256
    trained = train_sae(tiny_gpt2, hook, TrainConfig(k=4, d_sae=32, tokens=512, batch_tokens=256), tmp_path / "s", corpus=corpus)
    assert trained.cfg.metadata["context_size"] == 64  # min(128, the model's 64 positions)


def test_vision_api_refuses_bad_images_targets_k_and_units():
    from mechscope.vision import DataConfig, TrainConfig, train_model
    from mechscope.vision.causal import test_circuit as circuit_test
    from mechscope.vision.circuit import edge_attributions

    vm = train_model(TrainConfig(arch="cnn", epochs=1, width=8, data=DataConfig(dataset="shapes", size=8, per_class=10)))
    s = vm.cfg.data.size
    ok = torch.rand(4, 1, s, s)
    for images, needle in ((torch.rand(4, 1, s // 2, s // 2), "grey images"), (ok * 255, "divide 8-bit images by 255"),
                           (ok.clone().fill_(float("nan")), "NaN"), ([[0.0]], "torch tensor")):
        with pytest.raises(MechscopeError, match=needle):
            edge_attributions(vm, images, 0, 1)
    for target in (99, -1, 1.0, True):
        with pytest.raises(MechscopeError, match="target must be a class index"):
            edge_attributions(vm, ok, target, 1)
    with pytest.raises(MechscopeError, match="at least 1"):
        edge_attributions(vm, ok, 0, 0)
    site = next(iter(vm.sites))
    with pytest.raises(MechscopeError, match="site 'nope'"):
        circuit_test(vm, {"nope": [0]}, ok, 0, ok)
    with pytest.raises(MechscopeError, match="must be indices from 0"):
        circuit_test(vm, {site: [999]}, ok, 0, ok)
    units = edge_attributions(vm, ok, 0, 1)["units"]  # valid input still runs
    assert all(len(us) == 1 for us in units.values())
    assert isinstance(circuit_test(vm, units, ok, 0, ok, random_draws=1), dict)


def test_steering_refuses_a_feature_that_is_not_a_whole_number(tiny_gpt2):
    from mechscope.sae import SAE, SAEConfig
    from mechscope.sae.steer import steer_feature

    sae = SAE(SAEConfig(d_in=tiny_gpt2.summary.d_model, d_sae=8, architecture="topk", k=2, hook_name="blocks.0.hook_resid_post"))
    for feature in (True, 3.0, "3"):
        with pytest.raises(MechscopeError, match="whole-number index from 0 to 7"):
            steer_feature(tiny_gpt2, sae, "Hello", feature, scale=1.0)


def test_gemma_scope_files_without_features_or_a_matrix_are_said_plainly(tmp_path):
    import warnings

    import numpy as np

    from mechscope.sae.gemma_scope import gemma_scope_sae

    def write(name, **arrays):
        base = {"W_enc": np.zeros((8, 4), np.float32), "W_dec": np.zeros((4, 8), np.float32), "b_enc": np.zeros(4, np.float32),
                "b_dec": np.zeros(8, np.float32), "threshold": np.zeros(4, np.float32)}
        p = tmp_path / "gemma-scope-2b-pt-res" / "layer_1" / name / "params.npz"
        p.parent.mkdir(parents=True)
        np.savez(p, **{**base, **arrays})
        return p

    empty = write("s0", W_enc=np.zeros((8, 0), np.float32), W_dec=np.zeros((0, 8), np.float32), b_enc=np.zeros(0, np.float32),
                  threshold=np.zeros(0, np.float32))
    with pytest.raises(MechscopeError, match=r"no features \(d_sae 0\)"):
        gemma_scope_sae(empty)
    with pytest.raises(MechscopeError, match=r"an encoder is a matrix \[d_in, d_sae\]"):
        gemma_scope_sae(write("flat", W_enc=np.zeros(5, np.float32)))
    big = write("big", W_enc=np.full((8, 4), 1e300))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warning no longer precedes the sentence
        with pytest.raises(MechscopeError, match="NaN or infinite values"):
            gemma_scope_sae(big)


def test_an_sae_config_with_a_number_for_its_hook_is_refused(tmp_path):
    import json

    from mechscope.sae import SAE, SAEConfig, load_sae, save_sae

    save_sae(SAE(SAEConfig(d_in=8, d_sae=4, architecture="relu", hook_name="blocks.0.hook_resid_post")), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    cfg.setdefault("metadata", {})["hook_name"] = 5
    cfg.pop("hook_name", None)
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(MechscopeError, match="hook_name must be a hook name"):
        load_sae(tmp_path / "s")


def test_colour_images_are_told_their_channels_not_their_size():
    from mechscope.vision.data import check_images

    with pytest.raises(MechscopeError, match="3 channels"):
        check_images(torch.rand(2, 3, 16, 16), 16, "concept images")
