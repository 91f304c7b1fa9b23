"""Linear probes with control tasks: a planted linear label is read, random labels and the
control task are not, items sit at the right tokens, bad label files get one sentence."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.probes import LabelSet, ProbeConfig, fit_logistic, labels_from_file, run_probe
from mechscope.probes.run import control_labels, harvest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from cli_inprocess import run_cli  # noqa: E402


def run(*args):  # in this process (a subprocess spends 8-12 s on imports); the working-folder test runs a real one
    return run_cli(*args)


def assert_clear_error(r, needle):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr


def test_fit_logistic_separable_and_random():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1200, 16, generator=g) * 3 + 5
    w = torch.randn(16, generator=g)
    y = ((x - 5) @ w > 0).long()
    p = fit_logistic(x[:1000], y[:1000], 2)
    assert p.accuracy(x[1000:], y[1000:]) > 0.95
    yr = torch.randint(0, 2, (1200,), generator=g)
    pr = fit_logistic(x[:1000], yr[:1000], 2, l2=1e-2)
    assert abs(pr.accuracy(x[1000:], yr[1000:]) - 0.5) < 0.12


def _random_sequences(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n)]


def _planted(model, layer: int) -> LabelSet:
    """Items at every position >= 1; label = the sign of layer ``layer``'s resid_post along a random
    direction (split at the median), computed here independently; each item its own word type."""
    seqs = _random_sequences(40, 24, 500, seed=1)
    toks = torch.tensor(seqs)
    _, cache = model.bridge.run_with_cache(toks, names_filter=lambda n: n == f"blocks.{layer}.hook_resid_post")
    a = cache[f"blocks.{layer}.hook_resid_post"]  # [40, 24, d]
    d = torch.randn(a.shape[-1], generator=torch.Generator().manual_seed(3))
    proj = (a @ d)[:, 1:]
    med = proj.median()
    data = LabelSet("planted", ["hi", "lo"], seqs)
    for s in range(len(seqs)):
        for p in range(1, 24):
            data.add(s, p, "hi" if float(proj[s, p - 1]) > float(med) else "lo", f"{s}:{p}")
    return data


def test_harvest_matches_run_with_cache(tiny_model):
    data = _planted(tiny_model, 1)
    sub = data.subset(list(range(0, len(data), 7)))
    got = harvest(tiny_model, sub, ["blocks.1.hook_resid_post"], batch_size=3)["blocks.1.hook_resid_post"]
    _, cache = tiny_model.bridge.run_with_cache(torch.tensor(data.sequences), names_filter=lambda n: n == "blocks.1.hook_resid_post")
    ref = cache["blocks.1.hook_resid_post"][torch.tensor(sub.seq), torch.tensor(sub.pos)]
    assert torch.allclose(got, ref, atol=1e-4)


def test_planted_label_is_read_and_control_is_not(tiny_model):
    res = run_probe(tiny_model, _planted(tiny_model, 1), ProbeConfig(hook="resid_post", layers=[1], max_items=900, seed=0))
    assert res.accuracy[0] > 0.9
    assert res.control_accuracy[0] < 0.65  # every item its own type: nothing to memorise
    assert res.selectivity[0] > 0.3
    assert res.n_test > 0 and res.n_train > res.n_test


def test_random_labels_have_selectivity_near_zero(tiny_model):
    data = _planted(tiny_model, 1)
    rng = random.Random(5)
    data.label = [rng.randrange(2) for _ in data.label]
    data.word = [str(data.sequences[s][p]) for s, p in zip(data.seq, data.pos)]  # word type = token
    res = run_probe(tiny_model, data, ProbeConfig(hook="resid_post", max_items=900, l2=1e-2))
    assert len(res.layers) == tiny_model.summary.n_layers
    for a, s in zip(res.accuracy, res.selectivity):
        assert abs(a - 0.5) < 0.12
        assert abs(s) < 0.15


def test_control_labels_are_tied_to_word_types():
    words = [f"w{i % 50}" for i in range(1000)]
    labels = [0] * 700 + [1] * 300
    m = control_labels(words, labels, 2, seed=0)
    assert set(m) == set(words)
    ones = sum(m.values()) / len(m)
    assert 0.1 < ones < 0.5  # drawn from the 70/30 training distribution
    assert m == control_labels(words, labels, 2, seed=0)


def test_words_file_puts_items_on_each_words_last_token(tmp_path, tiny_gpt2):
    f = tmp_path / "pos.jsonl"
    rows = [{"words": ["Mary", "went", "to", "the", "store"], "labels": ["N", "V", "P", "D", "N"]},
            {"text": "John gave a drink", "label": "sentence"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = labels_from_file(tiny_gpt2.tokenizer, f)
    assert data.classes == ["N", "V", "P", "D", "sentence"]
    assert data.word[:5] == ["Mary", "went", "to", "the", "store"]
    for i in range(5):
        tok = tiny_gpt2.tokenizer.decode([data.sequences[0][data.pos[i]]])
        assert data.word[i].endswith(tok.strip()) and tok.strip()
    assert data.pos[5] == len(data.sequences[1]) - 1


@pytest.mark.parametrize("line, needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"words": ["a", "b"], "labels": ["x"]}', "equal"),
    ('{"foo": 1}', "neither"),
])
def test_bad_label_lines(tmp_path, tiny_gpt2, line, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "a b", "label": "x"}\n' + line + "\n")
    with pytest.raises(MechscopeError, match=needle) as e:
        labels_from_file(tiny_gpt2.tokenizer, f)
    assert "bad.jsonl:2" in str(e.value)


def test_one_class_is_refused(tmp_path, tiny_gpt2):
    f = tmp_path / "one.jsonl"
    f.write_text('{"text": "a b", "label": "x"}\n{"text": "c d", "label": "x"}\n')
    with pytest.raises(MechscopeError, match="at least two classes"):
        labels_from_file(tiny_gpt2.tokenizer, f)


def test_bad_hook_and_layer(tiny_gpt2):
    data = _planted(tiny_gpt2, 1)
    with pytest.raises(MechscopeError, match="out of range"):
        run_probe(tiny_gpt2, data, ProbeConfig(layers=[7]))
    with pytest.raises(MechscopeError, match="no hook named"):
        run_probe(tiny_gpt2, data, ProbeConfig(hook="blocks.{L}.hook_resid_psot"))


def _capitals_file(f):
    """A label file of 60 eight-word texts, each word labelled by whether it is capitalised."""
    rng = random.Random(0)
    words = ["Mary", "John", "store", "drink", "park", "ball", "went", "gave"]
    f.write_text("\n".join(json.dumps({"words": ws, "labels": ["cap" if w[0].isupper() else "low" for w in ws]})
                           for ws in ([rng.choice(words) for _ in range(8)] for _ in range(60))) + "\n")
    return f


@pytest.mark.slow
def test_cli_probe_file_and_errors(tmp_path, tiny_gpt2_dir):
    f = _capitals_file(tmp_path / "lab.jsonl")
    r = run("probe", "--labels", str(f), "--model", tiny_gpt2_dir, "--out", str(tmp_path / "out"), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert len(d["accuracy"]) == 2 and (tmp_path / "out" / "report.html").is_file()
    assert not (tmp_path / "out" / "probe-partial").exists()  # the per-hook pieces go once probe.json is written
    assert_clear_error(run("probe", "--labels", "nonsense", "--model", tiny_gpt2_dir), "neither a file nor a built-in")
    assert_clear_error(run("probe", "--labels", str(f), "--layers", "x", "--model", tiny_gpt2_dir), "--layers")


def test_language_builtin_labels_word_starts_of_the_shipped_prompts(tiny_gpt2):
    from mechscope.confusion import LANGS, load_prompts
    from mechscope.probes import builtin_labels

    data = builtin_labels(tiny_gpt2, "language")
    assert sorted(data.classes) == sorted(LANGS) and len(data.sequences) == len(load_prompts())
    counts = data.counts()
    assert all(counts[lang] > 30 for lang in LANGS)  # several word starts per prompt
    for i in range(0, len(data), 37):  # each item is a word-start token of a prompt in its language
        tok = tiny_gpt2.tokenizer.decode([data.sequences[data.seq[i]][data.pos[i]]])
        before = tiny_gpt2.tokenizer.decode(data.sequences[data.seq[i]][:data.pos[i]])
        assert tok == data.word[i] and (tok.startswith(" ") or before.endswith(" "))


def test_builtin_labels_pack_contexts_a_short_model_takes(tmp_path):
    """Corpus-based built-in labels read contexts of min(64, the model's context) tokens: a
    hand-built GPT-2 of 32 learned positions can be probed."""
    from pathlib import Path

    from mechscope.models import load_model
    from mechscope.probes import builtin_labels

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
    from short_context import save_short

    m = load_model(save_short("gpt2", tmp_path / "short"), device="cpu")
    docs = ["Then, Alice and Bob went to the park. Bob gave a ball to Alice. The Eiffel Tower is in Paris."] * 60
    data = builtin_labels(m, "capitalised", ProbeConfig(max_items=200), corpus=docs)
    assert data.sequences and {len(s) for s in data.sequences} == {32}


def test_texts_longer_than_the_learned_positions_are_refused_before_any_forward(tmp_path, tiny_gpt2):
    f = tmp_path / "long.jsonl"
    rng = random.Random(0)
    f.write_text("".join(json.dumps({"text": " ".join(rng.choice(["red", "blue", "green"]) for _ in range(200)),
                                     "label": lab}) + "\n" for lab in ["a", "b"] * 10))
    data = labels_from_file(tiny_gpt2.tokenizer, f)
    assert max(len(s) for s in data.sequences) > 64  # the premise: longer than tiny GPT-2's 64 positions
    with pytest.raises(MechscopeError, match="more than the model's context of 64"):
        run_probe(tiny_gpt2, data)


def test_language_builtin_is_cut_to_the_learned_positions_and_probed(tiny_gpt2):
    from mechscope.confusion import load_prompts
    from mechscope.probes import builtin_labels

    longest = max(len(tiny_gpt2.tokenizer(p.prompt)["input_ids"]) for p in load_prompts())
    assert longest > 64  # the premise: some shipped prompts overrun tiny GPT-2
    data = builtin_labels(tiny_gpt2, "language")
    assert max(len(s) for s in data.sequences) == 64 and max(data.pos) < 64
    res = run_probe(tiny_gpt2, data, ProbeConfig(layers=[0], max_items=200, control=False))
    assert len(res.accuracy) == 1


def test_label_file_with_a_byte_order_mark_is_read(tmp_path, tiny_gpt2):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a b", "label": "x"}\n{"text": "c d", "label": "y"}\n')
    assert labels_from_file(tiny_gpt2.tokenizer, f).classes == ["x", "y"]


def test_labels_must_be_strings_or_integers(tmp_path, tiny_gpt2):
    f = tmp_path / "lab.jsonl"
    f.write_text('{"text": "a b", "label": "x"}\n{"text": "c d", "label": null}\n')
    with pytest.raises(MechscopeError, match="lab.jsonl:2: the label null is not"):
        labels_from_file(tiny_gpt2.tokenizer, f)
    f.write_text('{"words": ["a", "b"], "labels": ["x", [1]]}\n')
    with pytest.raises(MechscopeError, match=r"the label \[1\] is not"):
        labels_from_file(tiny_gpt2.tokenizer, f)
    f.write_text('{"text": "a b", "label": 1}\n{"text": "c d", "label": "1"}\n{"text": "e f", "label": 2}\n')
    assert labels_from_file(tiny_gpt2.tokenizer, f).label == [0, 0, 1]  # documented: 1 and "1" are one class


def test_table_names_a_non_block_hook_instead_of_layer_minus_one(tiny_gpt2):
    data = _planted(tiny_gpt2, 1)
    res = run_probe(tiny_gpt2, data, ProbeConfig(hook="hook_embed", control=False, max_items=200))
    assert res.layers == [-1]
    table = res.table()
    assert "hook_embed" in table and "-1" not in table.split("\n")[1].split()[0]


def test_a_checkpointed_probe_run_resumes_only_the_missing_hooks(tiny_gpt2, tmp_path, monkeypatch):
    import mechscope.probes.run as run_mod
    from mechscope.progress import Recorder

    data = _planted(tiny_gpt2, 1)
    cfg = ProbeConfig(hook="resid_post", max_items=600, seed=0)
    straight = run_probe(tiny_gpt2, data, cfg)
    first = run_probe(tiny_gpt2, data, cfg, checkpoint=tmp_path)
    assert first.to_dict() == straight.to_dict()
    pieces = tmp_path / "probe-partial"
    assert sorted(p.name for p in pieces.iterdir()) == ["hook-0.json", "hook-1.json", "key.json"]
    (pieces / "hook-1.json").unlink()  # a kill before the last hook finished
    harvested: list[list[str]] = []
    fits = [0]
    real_harvest, real_fit = run_mod.harvest, run_mod.fit_logistic
    monkeypatch.setattr(run_mod, "harvest", lambda m, d, hooks, b: harvested.append(list(hooks)) or real_harvest(m, d, hooks, b))
    monkeypatch.setattr(run_mod, "fit_logistic", lambda *a: fits.__setitem__(0, fits[0] + 1) or real_fit(*a))
    rec = Recorder()
    resumed = run_probe(tiny_gpt2, data, cfg, checkpoint=tmp_path, progress=rec)
    assert harvested == [["blocks.1.hook_resid_post"]] and fits[0] == 2  # layer 1 only: its probe and its control
    assert any("resuming: 1 of 2 hooks" in n for n in rec.notes)  # said, not saved in the result
    assert resumed.to_dict() == straight.to_dict()
    # other labels: the pieces are another run's
    data.label = [1 - y for y in data.label]
    rec = Recorder()
    run_probe(tiny_gpt2, data, cfg, checkpoint=tmp_path, progress=rec)
    assert any("discarded" in n for n in rec.notes) and len(harvested) == 2 and harvested[1] == ["blocks.0.hook_resid_post",
                                                                                                   "blocks.1.hook_resid_post"]


def test_a_label_set_built_from_tensors_is_probed(tiny_gpt2, tmp_path):
    """Library callers may build a LabelSet from tensors and numpy ints; the checkpoint's digest reads them as ints."""
    import numpy as np

    data = _planted(tiny_gpt2, 1)
    data.sequences = [torch.tensor(s) for s in data.sequences]
    data.pos = [np.int64(x) for x in data.pos]
    cfg = ProbeConfig(hook="resid_post", layers=[1], max_items=300)
    assert run_probe(tiny_gpt2, data, cfg).accuracy == run_probe(tiny_gpt2, data, cfg, checkpoint=tmp_path).accuracy


@pytest.mark.slow  # a real subprocess (its own working folder): 10 s
def test_a_run_without_out_names_its_folder_and_how_to_resume(tmp_path, tiny_gpt2_dir):
    f = _capitals_file(tmp_path / "lab.jsonl")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "mechscope.cli.main", "probe", "--labels", str(f), "--model", tiny_gpt2_dir,
                        "--layers", "0", "--json"], capture_output=True, text=True, env=env, timeout=300, cwd=work)
    assert r.returncode == 0, r.stderr
    made = [p for p in work.iterdir() if p.name.startswith("mechscope-probe-")]
    assert len(made) == 1 and (made[0] / "probe.json").is_file()
    assert f"note: writing to {made[0].name}; if this run is stopped, the same command with --out {made[0].name} resumes it." in r.stderr
    assert json.loads(r.stdout)["out"] == made[0].name  # stdout stays the JSON
