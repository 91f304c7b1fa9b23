"""Word tokens read in context on a Llama-2-style SentencePiece tokenizer ("▁" before the text,
BOS by default, decode([i]) drops a word start's space): few-shot targets, `attribute --target`,
the recall noise std and related tokens, confusion points. Byte-level BPE keeps its old ids."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

GERMAN = "Das ist gut. Der Himmel ist blau."
ENGLISH = "Then the sky is blue because of light."


def _corpus() -> list[str]:
    from mechscope.icl.fewshot import load_task

    pairs = load_task("antonyms").pairs
    words = [w for p in pairs for w in p] + ["France", "Paris", "Germany", "Berlin", "Mary", "John", "The", "drink", "to"]
    return [" ".join(words), " -> ".join(words), "a \n b", GERMAN, ENGLISH,
            "The France The Germany The Mary"]


@pytest.fixture(scope="module")
def spm():
    """conftest._spm_tokenizer (Llama-2 style) trained on this file's words."""
    from conftest import _spm_tokenizer

    return _spm_tokenizer(_corpus())


@pytest.fixture(scope="module")
def bpe():
    from conftest import _tiny_tokenizer

    return _tiny_tokenizer()


# ---------------------------------------------------------------- 1. few-shot targets
def test_fewshot_targets_are_the_answers_first_token_after_the_prompt_on_spm(spm):
    from mechscope.icl.fewshot import chance_level, load_task, make_prompt, sample_prompts

    task = load_task("antonyms")
    (x1, y1), (xq, yq), (_, alt) = task.pairs[:3]
    p = make_prompt(spm, [(x1, y1)], (xq, yq), alt_answer=alt)
    assert p.target_id != spm.bos_token_id and p.target_id == spm.convert_tokens_to_ids("▁" + yq)
    assert p.alt_id == spm.convert_tokens_to_ids("▁" + alt)
    # the target is what the prompt + answer adds: the model is scored on the right token
    full = spm(p.text + " " + yq)["input_ids"]
    assert full[:len(p.ids)] == p.ids and full[len(p.ids)] == p.target_id
    prompts = sample_prompts(spm, task, shots=3, n=4)
    assert chance_level(spm, task, prompts) < 0.5  # was 1.0: every target the BOS


def test_fewshot_targets_unchanged_on_byte_level(bpe):
    from mechscope.icl.fewshot import chance_level, first_token, load_task, sample_prompts

    task = load_task("antonyms")
    prompts = sample_prompts(bpe, task, shots=3, n=4)
    for p in prompts:
        assert p.target_id == bpe(" " + p.answer)["input_ids"][0]
    assert all(first_token(bpe, y) == bpe(" " + y)["input_ids"][0] for _, y in task.pairs)
    assert chance_level(bpe, task, prompts) == 1.0 / len({bpe(" " + y)["input_ids"][0] for _, y in task.pairs})


# ---------------------------------------------------------------- 2. attribute --target
class _Captured(Exception):
    pass


def _attribute_targets(monkeypatch, tokenizer, targets: list[str], prompt: str = "a drink to") -> list[int]:
    import importlib

    cf = importlib.import_module("mechscope.cli.features")
    fa = importlib.import_module("mechscope.features.attribute")
    ue = importlib.import_module("mechscope.models.unembed")

    model = SimpleNamespace(tokenizer=tokenizer, to_tokens=lambda t: tokenizer(t)["input_ids"])
    ids = tokenizer(prompt)["input_ids"]
    monkeypatch.setattr(cf, "_model_set_prompt", lambda *a: (model, None, ids))
    monkeypatch.setattr(ue, "final_norm", lambda m, **k: None)
    seen: list[list[int]] = []

    def fake(m, tset, ids, targets=None, **kw):  # noqa: ANN001, ANN003
        seen.append(targets)
        raise _Captured

    monkeypatch.setattr(fa, "attribute", fake)
    with pytest.raises(_Captured):
        cf.attribute(prompt=prompt, transcoders=Path("tc"), target=targets, target_feature=None, max_features=16,
                     node_threshold=0.8, edge_threshold=0.98, batch_size=4, max_links=100, qk=None, contexts=0,
                     corpus=None, out=Path("out"), model=None, device=None, json=True)
    return seen[0]


def test_attribute_target_with_a_leading_space_is_read_after_the_prompt_on_spm(monkeypatch, spm):
    mary = spm.convert_tokens_to_ids("▁Mary")
    assert spm(" Mary", add_special_tokens=False)["input_ids"] != [mary]  # alone: '▁', '▁Mary'
    assert _attribute_targets(monkeypatch, spm, [" Mary", "Mary"]) == [mary, mary]


def test_attribute_target_unchanged_on_byte_level(monkeypatch, bpe):
    # text that is one token as given keeps its id ("." has no spaced form here)
    assert _attribute_targets(monkeypatch, bpe, [" Mary", ".", " went"]) == [bpe(t)["input_ids"][0] for t in (" Mary", ".", " went")]
    import typer

    with pytest.raises(typer.Exit):
        _attribute_targets(monkeypatch, bpe, [" Mary and John"])


# ---------------------------------------------------------------- 3. recall noise std, related tokens
def _embed_model(tokenizer, table: torch.Tensor):
    def run_with_hooks(tokens, fwd_hooks):  # noqa: ANN001
        (_, grab), = fwd_hooks
        grab(table[tokens], None)

    return SimpleNamespace(tokenizer=tokenizer, summary=SimpleNamespace(n_ctx=64), device="cpu",
                           bridge=SimpleNamespace(run_with_hooks=run_with_hooks))


def test_embedding_std_leaves_out_the_stray_word_start_piece_on_spm(spm):
    from mechscope.recall.tracing import embedding_std, subject_ids

    g = torch.Generator().manual_seed(0)
    table = torch.randn(len(spm), 8, generator=g)
    lone = spm.convert_tokens_to_ids("▁")
    table[lone] = 100.0  # the stray piece, were it counted, would dominate the std
    subjects = ["France", "Germany"]
    assert lone in spm(" France", add_special_tokens=False)["input_ids"]
    ids = [i for s in subjects for i in subject_ids(spm, s)]
    assert ids == [spm.convert_tokens_to_ids("▁France"), spm.convert_tokens_to_ids("▁Germany")]
    assert embedding_std(_embed_model(spm, table), subjects) == pytest.approx(float(table[ids].std()))


def test_subject_ids_and_embedding_std_unchanged_on_byte_level(bpe):
    from mechscope.recall.tracing import embedding_std, subject_ids

    subjects = ["France", "Mary went", "John"]
    old = [i for s in subjects for i in bpe(" " + s, add_special_tokens=False)["input_ids"]]
    assert [i for s in subjects for i in subject_ids(bpe, s)] == old
    table = torch.randn(len(bpe), 8, generator=torch.Generator().manual_seed(1))
    assert embedding_std(_embed_model(bpe, table), subjects) == pytest.approx(float(table[old].std()))


def test_related_tokens_leave_out_the_subjects_own_tokens_on_spm(monkeypatch, spm):
    import mechscope.recall.enrichment as en

    cont = spm(" Paris Berlin France", add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(en, "greedy_continuations", lambda model, prompts, n: [cont] * len(prompts))
    (rel,) = en.related_tokens(SimpleNamespace(tokenizer=spm), ["France"])
    assert rel == {"paris", "berlin"}


# ---------------------------------------------------------------- 4. confusion points
def test_confusion_points_keep_the_spaces_on_spm(spm, bpe):
    from mechscope.confusion.points import confusion_point
    from mechscope.confusion.run import generation_points

    ids = spm(GERMAN + " " + ENGLISH, add_special_tokens=False)["input_ids"]
    assert confusion_point([spm.decode([i]) for i in ids]) is None  # the old per-token decode: no spaces, no point
    (point,) = generation_points(spm, [ids])
    assert point is not None and spm.convert_ids_to_tokens(ids[point]) == "▁Then"
    ids = bpe(GERMAN + " " + ENGLISH)["input_ids"]
    assert generation_points(bpe, [ids]) == [confusion_point([bpe.decode([i]) for i in ids])]
    assert generation_points(bpe, [ids])[0] is not None
