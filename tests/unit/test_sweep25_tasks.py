"""Task construction on a SentencePiece-style tokenizer (answers decided in context), notes on
prompts ending in a space and on a capped ``--n``, task-file pairs after duplicate removal,
distinct greater-than pairs, and what ``discover --seeds`` says about a task file."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from mechscope.errors import MechscopeError
from mechscope.tasks import docstring, facts, get_task, greater_than, ioi
from mechscope.tasks.base import single_token


def _corpus() -> list[str]:
    words = ioi.NAMES + ioi.PLACES + ioi.OBJECTS + docstring.NAMES + docstring.NOUNS + greater_than.NOUNS
    texts = [" ".join(words), "0 1 2 3 4 5 6 7 8 9", greater_than.TEMPLATE.format(noun="war", century=17, xx=32)]
    texts += [t.format(n1="Mary", n2="John", s2="John", place="store", obj="drink") for t in ioi.TEMPLATES]
    texts += [f.prompt + f.attribute for f in facts.load_facts()]
    texts += [docstring.prompt("port", "oil column piece", ["load", "size"], ["load"], ["crime population"])]
    return texts


@pytest.fixture(scope="module")
def spm():
    """A Llama-2-style tokenizer: the normalizer puts "▁" before the text and for every space
    (so " Mary" alone is ['▁', '▁Mary'] and after "to" the one token '▁Mary'), digits split,
    BOS added; BPE trained here on the tasks' own words so they are whole pieces."""
    from conftest import _spm_tokenizer

    return _spm_tokenizer(_corpus())


@pytest.fixture(scope="module")
def bpe():
    from conftest import _tiny_tokenizer

    return _tiny_tokenizer()


def write(tmp_path, rows: list[dict], name: str = "t.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def next_token(tok, prompt: str, text: str) -> int:
    """The token that follows ``prompt``'s own tokens when ``prompt + text`` is tokenised."""
    base, full = tok(prompt)["input_ids"], tok(prompt + text)["input_ids"]
    assert full[: len(base)] == base
    return full[len(base)]


# ---- finding 1: answers decided in context ----------------------------------------------
def test_spm_single_token_in_context(spm):
    assert spm.convert_ids_to_tokens(spm(" Mary", add_special_tokens=False)["input_ids"]) == ["▁", "▁Mary"]
    mary = spm.convert_tokens_to_ids("▁Mary")
    assert single_token(spm, " Mary") == mary
    assert single_token(spm, " Mary", "a drink to") == mary
    assert single_token(spm, "5", "the year 17") == spm.convert_tokens_to_ids("5")
    assert single_token(spm, " Maryxq", "a drink to") is None


@pytest.mark.parametrize("task", ["ioi", "docstring", "greater-than", "facts"])
def test_spm_builtin_tasks_build_with_in_context_answers(spm, task):
    batch = get_task(task).build(spm, n=30, seed=0)
    assert len(batch) >= 20
    if task == "ioi":
        exs = {e.clean: (" " + e.io, " " + e.s) for e in ioi.make_examples(spm, 30, 0)}
    elif task == "docstring":
        exs = {e.clean: (" " + e.answer, " " + e.wrong) for e in docstring.make_examples(spm, 30, 0)}
    elif task == "facts":
        exs = {f.prompt: (f.attribute, None) for f in facts.load_facts()}
    else:
        exs = {}
        for clean in batch.clean_text:
            a = int(re.search(r"year \d\d(\d)\d to", clean).group(1))
            exs[clean] = (str(a + 1), str(a - 1))
    for i, clean in enumerate(batch.clean_text):
        answer, wrong = exs[clean]
        assert int(batch.answers[i, 0]) == next_token(spm, clean, answer)
        if wrong is not None:
            assert int(batch.wrongs[i, 0]) == next_token(spm, clean, wrong)
    if task == "greater-than":
        assert batch.candidates[0].tolist() == [next_token(spm, batch.clean_text[0], str(d)) for d in range(10)]
    assert batch.notes == []


def test_spm_jsonl_spaced_answer_kept_and_bare_one_named(spm, tmp_path):
    spaced = {"clean": "The capital city of France is", "corrupt": "The capital city of Italy is",
              "answer": " Paris", "wrong": " Rome"}
    batch = get_task(write(tmp_path, [spaced])).build(spm)
    assert len(batch) == 1 and batch.dropped == {} and batch.notes == []
    assert int(batch.answers[0, 0]) == spm.convert_tokens_to_ids("▁Paris")
    bare = dict(spaced, answer="Paris")  # "isParis": not the word " Paris", and not one token here
    batch = get_task(write(tmp_path, [spaced, bare])).build(spm)
    assert batch.dropped == {"answer is not a single token (but is one with a leading space)": 1}
    assert batch.notes == []


# ---- finding 2: a prompt ending in a space ----------------------------------------------
def test_prompt_ending_in_a_space_gets_a_note(spm, bpe, tmp_path):
    row = {"clean": "The capital city of France is ", "corrupt": "The capital city of Italy is ",
           "answer": "Paris", "wrong": "Rome"}
    batch = get_task(write(tmp_path, [row])).build(spm)
    assert len(batch) == 1
    assert len(batch.notes) == 1 and batch.notes[0].startswith("1 of 1 pairs have a prompt that ends in a space")
    assert "bare space token" in batch.notes[0] and "' Mary'" in batch.notes[0]
    # byte-level BPE: ['Ġto', 'Ġ'] then the answer ("Mary" is two tokens in this tiny vocabulary, "M" one)
    row = {"clean": "John gave a drink to ", "corrupt": "Bob gave a drink to ", "answer": "M", "wrong": "A"}
    batch = get_task(write(tmp_path, [row])).build(bpe)
    assert len(batch) == 1 and [n for n in batch.notes if "ends in a space" in n]
    newline = dict(row, clean="John gave a drink to\n", corrupt="Bob gave a drink to\n")
    assert not [n for n in get_task(write(tmp_path, [newline])).build(bpe).notes if "ends in a space" in n]


# ---- finding 3: --n above what the task supplies; task files after duplicate removal -----
def test_facts_n_above_supply_gets_a_note(spm):
    total = len(facts.load_facts())
    batch = get_task("facts").build(spm, n=total + 500, seed=0)
    assert len(batch) <= total
    assert len(batch.notes) == 1 and batch.notes[0].startswith(f"{total + 500} pairs were asked for")
    assert f"{total} facts" in batch.notes[0] and f"the batch has {len(batch)}" in batch.notes[0]
    assert get_task("facts").build(spm, n=total, seed=0).notes == []


def test_jsonl_n_counts_different_pairs(spm, tmp_path):
    rows = [{"clean": f"The capital city of {a} is", "corrupt": f"The capital city of {b} is",
             "answer": f" {x}", "wrong": f" {y}"}
            for a, b, x, y in [("France", "Italy", "Paris", "Rome"), ("Italy", "France", "Rome", "Paris"),
                               ("Spain", "France", "Madrid", "Paris")]]
    path = write(tmp_path, [rows[0], rows[0], rows[1], rows[2]])
    batch = get_task(path).build(spm, n=3)
    assert len(batch) == 3 and batch.dropped == {"repeats an earlier pair": 1} and batch.notes == []
    batch = get_task(path).build(spm, n=2)  # the repeat is met before the second different pair
    assert len(batch) == 2 and batch.dropped == {"repeats an earlier pair": 1}
    batch = get_task(path).build(spm, n=100)
    assert len(batch) == 3
    assert batch.notes == ["100 pairs were asked for (--n, or its default) but the task can supply 3 different pairs in the file, "
                           "so the batch has 3."]


# ---- finding 4: discover --seeds on a task file ------------------------------------------
def test_task_file_is_not_seeded_and_seeds_say_so(monkeypatch, tmp_path):
    from mechscope.circuits import stability
    from mechscope.circuits.config import DiscoverConfig
    from mechscope.cli.circuits import stability_line

    path = write(tmp_path, [{"clean": "a b", "corrupt": "c d", "answer": " e", "wrong": " f"}])
    assert get_task("ioi").seeded and not get_task(path).seeded
    seen: dict = {}
    monkeypatch.setattr(stability, "discover", lambda model, c, progress=None, checkpoint=None: SimpleNamespace(seed=c.seed))
    monkeypatch.setattr(stability, "stability_summary",
                        lambda runs, thr, same_pairs=False: seen.setdefault(len(seen), same_pairs))
    stability.discover_seeds(None, DiscoverConfig(task=path, method="eap"), 2, progress=False)
    stability.discover_seeds(None, DiscoverConfig(task="ioi", method="eap"), 2, progress=False)
    assert seen == {0: True, 1: False}
    st = {"n_seeds": 3, "faithfulness_min": 0.5, "faithfulness_max": 0.7, "faithfulness_mean": 0.6,
          "jaccard_circuit_mean": 0.4, "jaccard_top100_mean": 0.5, "stable_edges": [], "stable_threshold": 0.8}
    assert stability_line(st).startswith("across 3 draws of pairs:")
    assert stability_line({**st, "same_pairs": True}).startswith("across 3 held-out splits of the same pairs")


# ---- finding 5: greater-than pairs are all different -------------------------------------
def test_greater_than_pairs_are_distinct(spm):
    batch = greater_than.build(spm, n=500, seed=0)
    pairs = list(zip(batch.clean_text, batch.corrupt_text))
    assert len(batch) == 500 and len(set(pairs)) == 500
    assert greater_than.draw(500, 0)[1] > 0  # seed 0 draws some twice: drawn again, not dropped
    assert "repeats an earlier pair" not in batch.dropped
    first = greater_than.build(spm, n=50, seed=0)
    assert first.clean_text == batch.clean_text[:50]  # a redraw only changes what follows it


def test_greater_than_n_above_supply(spm, monkeypatch):
    every, repeats = greater_than.draw(10**6, 0)
    assert len(every) == len(set(every)) == len(greater_than.NOUNS) * len(greater_than.CENTURIES) * 80
    assert repeats == 0
    monkeypatch.setattr(greater_than, "NOUNS", ["war"])
    monkeypatch.setattr(greater_than, "CENTURIES", [17])
    batch = greater_than.build(spm, n=100, seed=0)
    assert len(batch) == 80 and len(set(batch.clean_text)) == 80
    assert batch.notes == ["100 pairs were asked for (--n, or its default) but the task can supply 80 different prompts, so the batch has 80."]


def test_the_report_names_held_out_splits_of_a_task_files_pairs():
    from mechscope.report.circuit import _stability_section

    st = {"n_seeds": 2, "seeds": [0, 1], "faithfulness_min": 0.5, "faithfulness_max": 0.7, "faithfulness_mean": 0.6,
          "jaccard_circuit_mean": 0.4, "jaccard_circuit_min": 0.3, "top": 100, "jaccard_top100_mean": 0.5,
          "stable_edges": [], "stable_threshold": 0.8, "per_seed": []}
    drawn = _stability_section({"stability": st})
    assert "Stability across draws of pairs" in drawn and "same pairs" not in drawn
    split = _stability_section({"stability": {**st, "same_pairs": True}})
    assert "Stability across held-out splits of the same pairs" in split and "draws of pairs" not in split


def test_lens_and_recall_targets_are_read_in_context_on_spm(spm):
    """`lens --target " Mary"` and the recall dataset's known facts use models.prompt.single_token:
    on a "▁" tokenizer " Mary" alone is two pieces and used to be refused; after the prompt it
    is the one piece '▁Mary'. A target that is one token alone keeps its old id."""
    from mechscope.models.prompt import single_token as target_token
    from mechscope.recall.dataset import _attribute_id
    from mechscope.tasks.facts import Fact

    model = SimpleNamespace(tokenizer=spm)
    mary = spm.convert_tokens_to_ids("▁Mary")
    with pytest.raises(MechscopeError, match="not a single token"):
        target_token(model, " Mary")  # no prompt: as before
    assert target_token(model, " Mary", prompt="a drink to") == mary
    assert target_token(model, "Mary", prompt="a drink to") == mary  # alone, "Mary" is '▁Mary' already
    fact = Fact(subject="x", relation="r", prompt="a drink to", attribute=" Mary")
    assert _attribute_id(model, fact) == mary


def test_token_texts_keep_word_starts_on_spm_and_equal_decode_on_byte_level(spm, bpe):
    from mechscope.models.tokens import token_texts

    ids = spm("a drink to Mary", add_special_tokens=False)["input_ids"]
    texts = token_texts(spm, ids)
    assert [spm.decode([i]) for i in ids][-1] == "Mary"  # decode alone drops the word start
    assert texts[-1] == " Mary" and "".join(texts).strip() == "a drink to Mary"
    ids = bpe("then Mary went", add_special_tokens=False)["input_ids"]
    assert token_texts(bpe, ids) == [bpe.decode([i]) for i in ids]
