"""Session 39's notebook-API sweep: what a researcher types in a notebook (a config of the wrong
kind, numpy scalars from a sweep, a Path, a list of ids, one prompt instead of a list) works
or is one sentence, low-level calls never wrap an index around, and results print short."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mechscope.errors import MechscopeError

# ------------------------------------------------------------------ configs of the wrong kind


def _calls(tiny_gpt2, tmp_path):
    from mechscope import features, heads, icl, sae, vision
    from mechscope.circuits.stability import discover_seeds
    from mechscope.explain.describe import describe
    from mechscope.explain.exemplars import harvest_exemplars

    out = tmp_path / "out"
    return {
        "train_sae": lambda c: sae.train_sae(tiny_gpt2, "blocks.0.hook_resid_post", c, out),
        "train_transcoders": lambda c: features.train_transcoders(tiny_gpt2, c, out),
        "feature_dashboards": lambda c: sae.feature_dashboards(tiny_gpt2, None, c),
        "train_toy": lambda c: heads.train_toy(c, out),
        "dynamics": lambda c: heads.dynamics(out, c),
        "train_binding": lambda c: icl.train_binding(c, out),
        "train_meta": lambda c: icl.train_meta(c, out),
        "binding_dynamics": lambda c: icl.binding_dynamics(out, c),
        "train_model": lambda c: vision.train_model(c, out),
        "discover_seeds": lambda c: discover_seeds(tiny_gpt2, c, 2),
        "harvest_exemplars": lambda c: harvest_exemplars(tiny_gpt2, c),
        "describe": lambda c: describe(None, [], None, None, c),
    }


@pytest.mark.parametrize("who", ["train_sae", "train_transcoders", "feature_dashboards", "train_toy", "dynamics",
                                 "train_binding", "train_meta", "binding_dynamics", "train_model", "discover_seeds",
                                 "harvest_exemplars", "describe"])
@pytest.mark.parametrize("bad", [{"k": 4}, "defaults", 3])
def test_a_config_of_the_wrong_kind_is_one_sentence(tiny_gpt2, tmp_path, who, bad):
    with pytest.raises(MechscopeError, match=rf"{who} takes a \w+Config"):
        _calls(tiny_gpt2, tmp_path)[who](bad)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_another_packages_config_of_the_same_name_is_refused(tiny_gpt2, tmp_path):
    from mechscope import vision
    from mechscope.sae import TrainConfig as SAETrain
    from mechscope.sae import train_sae

    with pytest.raises(MechscopeError, match="train_sae takes a TrainConfig .*mechscope.sae"):
        train_sae(tiny_gpt2, "blocks.0.hook_resid_post", vision.TrainConfig(), tmp_path / "o")
    with pytest.raises(MechscopeError, match="train_model takes a TrainConfig .*mechscope.vision"):
        vision.train_model(SAETrain(), tmp_path / "o")


def test_steer_and_vision_runs_check_their_config(tiny_gpt2):
    from mechscope.sae import steer_feature
    from mechscope.vision import run_attack, run_circuit, run_composition
    from mechscope.vision.config import DataConfig, TrainConfig
    from mechscope.vision.train import train_model

    with pytest.raises(MechscopeError, match="steer_feature takes a GenerationConfig"):
        steer_feature(tiny_gpt2, None, "Hi", 0, scale=1.0, gen={"max_new_tokens": 3})
    vm = train_model(TrainConfig(arch="cnn", epochs=1, width=8, data=DataConfig(dataset="shapes", size=8, per_class=10)))
    for fn, args in ((run_circuit, (vm, "1")), (run_attack, (vm,)), (run_composition, (vm,))):
        with pytest.raises(MechscopeError, match=f"{fn.__name__} takes a CircuitConfig"):
            fn(*args, {"k": 2})


# ------------------------------------------------------------------ numbers and paths from a notebook


def test_numpy_scalars_are_plain_numbers_in_every_config():
    from mechscope.circuits import DiscoverConfig
    from mechscope.heads import HeadsConfig
    from mechscope.sae import DashboardConfig, TrainConfig
    from mechscope.vision import CircuitConfig

    c = DiscoverConfig(n=np.int64(40), target=np.float32(0.75))
    assert type(c.n) is int and c.n == 40 and type(c.target) is float and abs(c.target - 0.75) < 1e-7
    json.dumps(dataclasses.asdict(c))  # what result files hold: plain JSON numbers
    assert type(HeadsConfig(n=np.int32(5)).n) is int and type(TrainConfig(k=np.int64(8)).k) is int
    assert type(CircuitConfig(k=np.int64(3)).k) is int
    assert DashboardConfig(features=np.arange(3)).features == [0, 1, 2] and DashboardConfig(features=7).features == [7]
    for bad in (dict(n=np.float64(8.5)), dict(n="8")):
        with pytest.raises(MechscopeError, match="DiscoverConfig.n must be a whole number"):
            DiscoverConfig(**bad)
    with pytest.raises(MechscopeError, match="CircuitConfig.k must be a whole number"):
        CircuitConfig(k="3")
    with pytest.raises(MechscopeError, match="not a feature index"):
        DashboardConfig(features=[1, -2])


def test_a_path_names_a_model_and_a_fewshot_task(tiny_gpt2_dir, tmp_path):
    from mechscope.icl import FewShotConfig
    from mechscope.models import load_model, load_tokenizer

    m = load_model(Path(tiny_gpt2_dir), device="cpu")
    assert m.summary.source == str(Path(tiny_gpt2_dir).resolve())
    assert load_tokenizer(Path(tiny_gpt2_dir))("a b")["input_ids"]
    with pytest.raises(MechscopeError, match="named by a string or a path.*not a Model; this one is loaded already"):
        load_model(m)
    with pytest.raises(MechscopeError, match="not an int"):
        load_model(3)
    assert FewShotConfig(task=tmp_path / "pairs.jsonl").task == str(tmp_path / "pairs.jsonl")
    with pytest.raises(MechscopeError, match="--task is a built-in task name .* not an int"):
        FewShotConfig(task=3)


# ------------------------------------------------------------------ low-level lens and recall calls


def test_dla_never_wraps_a_position_past_the_prompt(tiny_gpt2):
    from mechscope.lens import direct_logit_attribution

    ids = tiny_gpt2.to_tokens("When Mary and John went")
    P = len(ids)
    last = direct_logit_attribution(tiny_gpt2, torch.tensor([ids]), 5, 7, position=P - 1)
    assert direct_logit_attribution(tiny_gpt2, ids, 5, 7).actual == pytest.approx(last.actual)  # a list of ids, -1
    assert direct_logit_attribution(tiny_gpt2, torch.tensor(ids), 5, 7, position=-P).actual == pytest.approx(
        direct_logit_attribution(tiny_gpt2, ids, 5, 7, position=0).actual)
    for pos in (P, P + 3, -P - 1):
        with pytest.raises(MechscopeError, match=f"position {pos} is outside the prompt of {P} tokens"):
            direct_logit_attribution(tiny_gpt2, ids, 5, 7, position=pos)


def test_logit_lens_takes_one_prompt_and_token_ids(tiny_gpt2):
    from mechscope.lens import logit_lens

    ids = tiny_gpt2.to_tokens("When Mary and John went")
    a, b = logit_lens(tiny_gpt2, ids, 5), logit_lens(tiny_gpt2, torch.tensor([ids]), 5)
    assert torch.equal(a.rank, b.rank) and torch.equal(a.prob, b.prob)
    two = torch.tensor([ids, ids])
    for args, needle in (((two, 5), r"one prompt, tokens \[1, pos\]; got shape \(2, "),
                         ((ids, " went"), "target_id is a token id, not text"),
                         ((ids, 10_000), "target_id 10000 is outside the model's vocabulary"),
                         (([1.5, 2.0], 5), "the list holds something else"),
                         ((torch.tensor([[3, 99_999]]), 5), "outside the model's vocabulary")):
        with pytest.raises(MechscopeError, match=needle):
            logit_lens(tiny_gpt2, *args)
    with pytest.raises(MechscopeError, match="k is the number of top tokens"):
        logit_lens(tiny_gpt2, ids, 5, k=0)


def test_trace_and_knockout_check_the_subject_positions(tiny_gpt2):
    from mechscope.recall import RecallConfig
    from mechscope.recall.knockout import attention_knockout
    from mechscope.recall.tracing import causal_trace

    ids = tiny_gpt2.to_tokens("When Mary and John went to the store")
    cfg = RecallConfig(samples=2)
    for fn, extra in ((causal_trace, (0.1,)), (attention_knockout, ())):
        with pytest.raises(MechscopeError, match=f"{fn.__name__}: subject position 40 is not a token position"):
            fn(tiny_gpt2, ids, [1, 40], 5, *extra, cfg)
        with pytest.raises(MechscopeError, match="subject_pos is empty"):
            fn(tiny_gpt2, ids, [], 5, *extra, cfg)
        with pytest.raises(MechscopeError, match=f"{fn.__name__} takes a RecallConfig"):
            fn(tiny_gpt2, ids, [1], 5, *extra, {"samples": 2})
    k1 = attention_knockout(tiny_gpt2, ids, [2, 1], 5, cfg)  # any order: read as sorted
    k2 = attention_knockout(tiny_gpt2, torch.tensor([ids]), [1, 2], 5, cfg)
    assert k1.positions == k2.positions and all(torch.equal(k1.relative_change[g], k2.relative_change[g])
                                                for g in k1.relative_change)


def test_fewshot_accuracy_reads_one_prompt_as_a_list_of_one(tiny_gpt2):
    from mechscope.icl.fewshot import fewshot_accuracy, load_task, sample_prompts

    prompts = sample_prompts(tiny_gpt2.tokenizer, load_task("uppercase"), 2, 3)
    p_all, top_all = fewshot_accuracy(tiny_gpt2, prompts)
    p_one, top_one = fewshot_accuracy(tiny_gpt2, prompts[1])
    assert p_one.shape == (1,) and torch.allclose(p_one[0], p_all[1], atol=1e-6) and top_one[0] == top_all[1]
    for bad in ([], ["x ->"]):
        with pytest.raises(MechscopeError, match="takes a list of FewShotPrompt"):
            fewshot_accuracy(tiny_gpt2, bad)


def test_attribute_targets_are_token_ids(tiny_gpt2, tset_dir):
    from mechscope.features import attribute, load_transcoders

    tset = load_transcoders(tset_dir)
    ids = tiny_gpt2.to_tokens("When Mary and John went")
    for bad, needle in (([" Paris"], "targets holds ' Paris', not a token id"), (5, "targets is a list of token ids")):
        with pytest.raises(MechscopeError, match=needle):
            attribute(tiny_gpt2, tset, ids, targets=bad, max_features=4)
    g = attribute(tiny_gpt2, tset, ids, targets=(np.int64(5),), max_features=4)
    assert g.logit_tokens.tolist() == [5]  # a numpy id is read as the plain int


def test_vision_concepts_by_class_index_or_path(tmp_path):
    from mechscope.vision import CircuitConfig, run_circuit
    from mechscope.vision.config import DataConfig, TrainConfig
    from mechscope.vision.train import train_model

    vm = train_model(TrainConfig(arch="cnn", epochs=1, width=8, data=DataConfig(dataset="shapes", size=8, per_class=10)))
    cfg = CircuitConfig(k=1, n_concept=8, n_reference=16, random_draws=1, top_images=1)
    a, b = run_circuit(vm, 1, cfg), run_circuit(vm, "1", cfg)
    assert a.units == b.units
    with pytest.raises(MechscopeError, match="a concept is a class .* not a float"):
        run_circuit(vm, 1.0, cfg)
    assert "VisionModel(cnn on shapes 8x8" in repr(vm)


def test_unit_db_refuses_keys_and_unknown_kinds(tmp_path):
    from mechscope.explain.db import UnitDB

    db = UnitDB(tmp_path / "u.db", model_id="m")
    with pytest.raises(MechscopeError, match=r"UnitRef.parse\('mlp/5/3'\) reads a key"):
        db.exemplars("mlp/5/3")
    with pytest.raises(MechscopeError, match="unit kind 'neuron' is not one of mlp, sae, transcoder"):
        db.units("neuron")
    assert db.units("mlp") == []


def test_heads_dynamics_points_a_toy_setting_run_to_its_own_reader(tmp_path):
    from mechscope.heads import dynamics

    for setting, reader in (("binding", "icl.binding_dynamics"), ("icml", "icl.meta_dynamics")):
        run = tmp_path / setting
        run.mkdir()
        (run / "train.json").write_text(json.dumps({"settings": {"setting": setting}}))
        with pytest.raises(MechscopeError, match=f"--setting {setting} run; read it with mechscope.{reader}"):
            dynamics(run)


# ------------------------------------------------------------------ how results print


def test_results_print_one_short_line(tiny_gpt2):
    from mechscope.activations import get_corpus
    from mechscope.lens import run_lens
    from mechscope.lens.tuned import TunedLens
    from mechscope.tasks import get_task

    objs = [tiny_gpt2, run_lens(tiny_gpt2, "When Mary and John went"), get_task("induction").build(tiny_gpt2.tokenizer, n=20),
            get_corpus("embedded"), TunedLens.identity(tiny_gpt2)]
    for o in objs:
        text = repr(o)
        assert len(text) <= 500 and "\n" not in text and text.startswith(type(o).__name__ + "("), text[:200]
    assert "2 layers, 4 heads, d_model 64" in repr(tiny_gpt2)
    assert "rank=Tensor[" in repr(objs[1])  # tensors by shape, not by value


def test_brief_shortens_what_it_is_given():
    from mechscope.brief import brief, brief_repr

    @dataclasses.dataclass
    class R:
        a: torch.Tensor
        b: list
        c: str
        d: dict

    r = R(torch.zeros(3, 4), list(range(1000)), "x" * 500, {i: i for i in range(50)})
    text = brief_repr(r)
    assert text.startswith("R(a=Tensor[3, 4] float32, b=[0, 1, 2, 3, ... (1000 items)], c='xxx") and "(50 keys)" in text
    assert brief(np.zeros((2, 5), np.float32)) == "ndarray[2, 5] float32" and brief(0.1234567891) == "0.123457"


# ------------------------------------------------------------------ commands that read a result's recorded model


def test_tuned_lens_eval_reloads_a_local_model_it_recorded(tiny_gpt2_dir, corpus, tmp_path):
    """A tuned lens recorded only its model's name; for a local folder that name does not load
    (session 39). It records the folder, which eval loads without --model."""
    from tests.helpers.cli_inprocess import run_cli

    out = tmp_path / "tl"
    r = run_cli("--quiet", "tuned-lens", "train", "--model", tiny_gpt2_dir, "--corpus", corpus, "--tokens", "256", "--kl-steps", "0",
                "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "tuned_lens.json").read_text())["model"]["source"] == str(Path(tiny_gpt2_dir).resolve())
    r = run_cli("--quiet", "tuned-lens", "eval", str(out), "--corpus", corpus, "--tokens", "64", "--device", "cpu")
    assert r.returncode == 0 and (out / "eval.json").is_file(), r.stderr


def test_transcoders_weights_loads_the_model_its_set_records(tiny_llama, tiny_llama_dir, tmp_path):
    from mechscope.features.transcoder_set import random_transcoders, save_transcoders
    from tests.helpers.cli_inprocess import run_cli

    tset = random_transcoders(tiny_llama, d_sae=32, k=4, seed=15)
    for tc in tset.layers:
        tc.cfg.metadata["model_path"] = tiny_llama_dir
    save_transcoders(tset, tmp_path / "tc")
    args = ("transcoders", "weights", str(tmp_path / "tc"), "--feature", "2:3", "--top", "4", "--json")
    recorded, given = run_cli(*args), run_cli(*args, "--model", tiny_llama_dir)
    assert recorded.returncode == 0 and given.returncode == 0, recorded.stderr
    assert json.loads(recorded.stdout) == json.loads(given.stdout)


def test_a_saved_recall_loads_back_exactly(tiny_gpt2, tmp_path):
    from mechscope.recall import RecallConfig, recall
    from mechscope.recall.result import RecallResult

    res = recall(tiny_gpt2, "When Mary and John went to the", "Mary and John", cfg=RecallConfig(samples=2), parts=("trace", "knockout"))
    res.save(tmp_path / "r")
    back = RecallResult.load(tmp_path / "r")
    assert back.to_dict() == res.to_dict() and torch.equal(back.knockout.relative_change["subject"], res.knockout.relative_change["subject"])
    with pytest.raises(MechscopeError, match="No recall.json"):
        RecallResult.load(tmp_path)


# ------------------------------------------------------------------ user data files


def _jsonl(path: Path, rows: list, sep: str = "\n") -> Path:
    path.write_text(sep.join(json.dumps(r, ensure_ascii=False) for r in rows) + sep, encoding="utf-8")
    return path


def test_probe_labels_read_a_repeated_text_once_and_refuse_two_labels_for_it(tiny_gpt2, tmp_path):
    """Copies of one line sat in both the train and the test split: random labels scored 1.0
    held out (session 39)."""
    from mechscope.probes.labels import labels_from_file

    rows = [{"text": f"Mary went to the store number {i}", "label": i % 2} for i in range(10)]
    once = labels_from_file(tiny_gpt2.tokenizer, _jsonl(tmp_path / "a.jsonl", rows))
    four = labels_from_file(tiny_gpt2.tokenizer, _jsonl(tmp_path / "b.jsonl", rows * 4))
    assert len(four) == len(once) == 10 and four.sequences == once.sequences
    assert "30 lines of b.jsonl repeated an earlier line" in four.notes[0]
    clash = rows + [{"text": rows[0]["text"], "label": 1}]
    with pytest.raises(MechscopeError, match=r"c.jsonl:11 repeats the text of line .*c.jsonl:1 with other labels"):
        labels_from_file(tiny_gpt2.tokenizer, _jsonl(tmp_path / "c.jsonl", clash))


def test_probe_labels_read_the_texts_last_token_and_one_class_per_label(tiny_gpt2, tmp_path):
    from mechscope.probes.labels import labels_from_file

    rows = [{"text": f"Mary went to the store number {i}", "label": ["pos", "neg"][i % 2]} for i in range(6)]
    plain = labels_from_file(tiny_gpt2.tokenizer, _jsonl(tmp_path / "a.jsonl", rows))
    padded = labels_from_file(tiny_gpt2.tokenizer, _jsonl(tmp_path / "b.jsonl", [
        {"text": r["text"] + "  ", "label": r["label"] + " " if i % 3 else " " + r["label"]} for i, r in enumerate(rows)]))
    assert padded.sequences == plain.sequences and padded.word == plain.word  # not the trailing space's token
    assert sorted(padded.classes) == ["neg", "pos"] and padded.label == plain.label
    assert "6 texts of b.jsonl ended in whitespace" in padded.notes[0]


def test_jsonl_readers_keep_a_line_separator_inside_a_string(tiny_gpt2, tmp_path):
    """U+2028 and U+0085 are valid inside JSON strings (json.dumps writes them with
    ensure_ascii=False); str.splitlines() broke the line there."""
    from mechscope.confusion.prompts import parse_prompts
    from mechscope.icl.fewshot import _read_xy
    from mechscope.probes.labels import labels_from_file

    xy = _read_xy(_jsonl(tmp_path / "xy.jsonl", [{"x": "hot\u2028day", "y": "cold"}, {"x": "big", "y": "small"}]))
    assert xy == [("hot\u2028day", "cold"), ("big", "small")]
    lab = labels_from_file(tiny_gpt2.tokenizer, _jsonl(tmp_path / "l.jsonl", [
        {"text": "Mary\u0085went home", "label": 0}, {"text": "John went home", "label": 1}], sep="\r\n"))
    assert len(lab) == 2
    got = parse_prompts(json.dumps({"prompt": "Wie geht\u2028es dir?", "lang": "de"}, ensure_ascii=False), "p.jsonl")
    assert len(got) == 1 and "\u2028" in got[0].prompt


def test_fewshot_file_refuses_one_input_with_two_answers(tmp_path):
    from mechscope.icl.fewshot import load_task

    rows = [{"x": "hot", "y": "cold"}, {"x": "big", "y": "small"}, {"x": "up", "y": "down"}, {"x": "hot", "y": "cold"},
            {"x": " big ", "y": "large"}]
    with pytest.raises(MechscopeError, match=r"line 5: x 'big' is on line 2 with another y \('small' vs 'large'\)"):
        load_task(str(_jsonl(tmp_path / "t.jsonl", rows)))
    assert load_task(str(_jsonl(tmp_path / "u.jsonl", rows[:4]))).pairs == [("hot", "cold"), ("big", "small"), ("up", "down")]


def test_files_that_are_not_utf8_are_named_and_a_bom_is_read(tiny_gpt2, tmp_path):
    from mechscope.probes.labels import labels_from_file
    from mechscope.sae.io import _read_cfg

    f = tmp_path / "l.jsonl"
    f.write_text('{"text": "a b", "label": 0}\n', encoding="utf-16")
    with pytest.raises(MechscopeError, match=f"Label file '{f}' is not UTF-8"):
        labels_from_file(tiny_gpt2.tokenizer, f)
    sae = tmp_path / "sae"
    sae.mkdir()
    (sae / "cfg.json").write_bytes(b"\xef\xbb\xbf" + json.dumps({"d_in": 4, "d_sae": 8}).encode())
    assert _read_cfg(sae)["d_sae"] == 8
    (sae / "cfg.json").write_bytes(json.dumps({"d_in": 4}).encode("utf-16"))
    with pytest.raises(MechscopeError, match="cfg.json is not UTF-8"):
        _read_cfg(sae)


def test_concept_folders_read_npy_in_any_case_and_name_a_channel_last_array(tmp_path):
    from mechscope.vision.concept import read_image_folder

    d = tmp_path / "c"
    d.mkdir()
    np.save(d / "a.npy", np.random.rand(2, 8, 8))
    np.save(d / "b.npy", np.random.rand(8, 8))
    (d / "b.npy").rename(d / "b.NPY")
    assert read_image_folder(d, 8).shape == (3, 1, 8, 8)
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    np.save(rgb / "x.npy", np.random.rand(8, 8, 3))
    with pytest.raises(MechscopeError, match=r"shape \(8, 8, 3\).*channel-last"):
        read_image_folder(rgb, 8)
    other = tmp_path / "other"
    other.mkdir()
    np.savez(other / "x.npz", a=np.zeros((8, 8)))
    with pytest.raises(MechscopeError, match="holds no .npy images, only x.npz"):
        read_image_folder(other, 8)


def test_a_text_corpus_reads_the_same_whichever_line_ends_it_was_saved_with(tmp_path):
    from mechscope.activations import get_corpus

    text = "Mary went home.\nJohn stayed.\n\nThe end of a passage.\n"
    (tmp_path / "unix.txt").write_bytes(text.encode())
    (tmp_path / "win.txt").write_bytes(text.replace("\n", "\r\n").encode())
    assert list(get_corpus(str(tmp_path / "win.txt"))) == list(get_corpus(str(tmp_path / "unix.txt")))


def test_a_pair_whose_prompts_are_equal_is_dropped_and_a_trailing_space_is_named():
    from mechscope.tasks.base import Pair, tokenize_pairs
    from tests.conftest import _tiny_tokenizer

    clean = "When Mary and John went to the store, John gave a drink to"
    other = "When Alice and Bob went to the store, Bob gave a drink to"
    b = tokenize_pairs(_tiny_tokenizer(), [Pair(clean, clean, " Mary", " John"), Pair(clean, other, " Mary ", " John"),
                                           Pair(clean, other, " Mary", " John")], "t")
    assert len(b) == 1
    assert b.dropped == {"clean and corrupt are the same prompt": 1,
                         "answer is not a single token (it ends in whitespace; without it, it is one)": 1}
