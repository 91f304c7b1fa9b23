"""Task construction, metrics and padding, on the embedded SmolLM2 tokenizer (no model)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.tasks import docstring, evaluate_task, get_task, greater_than, induction, ioi, jsonl, list_tasks
from mechscope.tasks import facts as facts_mod
from mechscope.tasks.base import TaskBatch, single_token


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from mechscope.models import embedded_gguf_path

    try:
        path = embedded_gguf_path()
    except MechscopeError as exc:
        pytest.skip(str(exc))
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def n_tokens(tok, text: str) -> int:
    return len(tok(text)["input_ids"])


def count_word(text: str, word: str) -> int:
    return len(re.findall(rf"\b{word}\b", text))


# ---- registry ---------------------------------------------------------------------------
def test_registry_lists_builtin_tasks():
    names = {t.name: t.metric for t in list_tasks()}
    assert names == {"ioi": "logit_diff", "greater-than": "prob_diff", "induction": "logprob",
                     "facts": "logit_diff", "docstring": "logit_diff"}


def test_unknown_task_suggests_near_match():
    with pytest.raises(MechscopeError, match="Did you mean: ioi"):
        get_task("iio")
    with pytest.raises(MechscopeError, match="No task file"):
        get_task("/nonexistent/tasks.jsonl")


@pytest.mark.parametrize("name", ["ioi", "greater-than", "induction", "facts", "docstring"])
def test_builders_are_deterministic(tok, name):
    a = get_task(name).build(tok, n=12, seed=3)
    b = get_task(name).build(tok, n=12, seed=3)
    c = get_task(name).build(tok, n=12, seed=4)
    assert torch.equal(a.clean, b.clean) and torch.equal(a.corrupt, b.corrupt)
    assert torch.equal(a.answers, b.answers)
    assert not torch.equal(a.clean, c.clean)
    assert len(a) == 12 - sum(a.dropped.values())
    assert a.clean.shape == a.corrupt.shape


# ---- IOI --------------------------------------------------------------------------------
def test_ioi_names_single_token(tok):
    names = ioi.single_token_names(tok)
    assert len(names) >= 80
    assert all(single_token(tok, " " + n) is not None for n in names)


def test_ioi_structure(tok):
    examples = ioi.make_examples(tok, n=40, seed=1)
    assert {e.order for e in examples} == {"BABA", "ABBA"}
    for e in examples:
        assert count_word(e.clean, e.io) == 1 and count_word(e.clean, e.s) == 2
        assert n_tokens(tok, e.clean) == n_tokens(tok, e.corrupt)
        # ABC: three distinct new names, none of them A or B, nothing repeated.
        assert len({*e.corrupt_names, e.io, e.s}) == 5
        assert count_word(e.corrupt, e.io) == 0 and count_word(e.corrupt, e.s) == 0
        first = e.clean.index(e.io) < e.clean.index(e.s)
        assert first == (e.order == "ABBA")
    batch = ioi.build(tok, n=40, seed=1)
    assert batch.dropped == {}
    for i, e in enumerate(examples):
        assert batch.answers[i, 0] == single_token(tok, " " + e.io)
        assert batch.wrongs[i, 0] == single_token(tok, " " + e.s)
        # The S2 slot of the corrupt prompt is neither A nor B: the clean prompt's S2 token
        # (S) sits at the same position as the corrupt's third name.
        clean, corrupt = batch.clean[i, : batch.lengths[i]], batch.corrupt[i, : batch.lengths[i]]
        s_id = single_token(tok, " " + e.s)
        s2 = (clean == s_id).nonzero()[-1].item()
        assert corrupt[s2].item() == single_token(tok, " " + e.corrupt_names[2])
        assert corrupt[s2].item() not in {s_id, batch.answers[i, 0].item()}


# ---- greater-than ----------------------------------------------------------------------
def test_greater_than_signs_hand_checked():
    assert greater_than.digit_signs(32) == [-1, -1, -1, 0, 1, 1, 1, 1, 1, 1]
    assert greater_than.digit_signs(10) == [-1, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    assert greater_than.digit_signs(89) == [-1] * 8 + [0, 1]
    assert greater_than.digit_signs(50) == [-1] * 5 + [0] + [1] * 4


def test_greater_than_batch(tok):
    batch = greater_than.build(tok, n=30, seed=2)
    digits = [single_token(tok, str(d)) for d in range(10)]
    assert batch.candidates.tolist() == [digits] * len(batch)
    for i, (clean, corrupt) in enumerate(zip(batch.clean_text, batch.corrupt_text)):
        start, end = re.search(r"year (\d{4}) to the year (\d\d)$", clean).groups()
        xx = int(start[2:])
        assert start[:2] == end and 10 <= xx <= 89
        assert corrupt == clean.replace(start, start[:2] + "01")
        assert batch.signs[i].tolist() == greater_than.digit_signs(xx)
        assert batch.answers[i, 0] == digits[xx // 10 + 1]
        assert batch.wrongs[i, 0] == digits[xx // 10 - 1]
        assert n_tokens(tok, clean) == n_tokens(tok, corrupt)
    last = batch.clean[torch.arange(len(batch)), batch.lengths - 1]
    assert all(t in digits for t in last.tolist())  # prompt ends before YY's first digit


# ---- induction ----------------------------------------------------------------------
def test_induction_halves(tok):
    L = 10
    batch = induction.build(tok, n=6, seed=0, length=L)
    p = 1 if tok.bos_token_id is not None else 0
    assert batch.clean.shape == (6, p + 2 * L)
    if p:
        assert (batch.clean[:, 0] == tok.bos_token_id).all()
    first, second = batch.clean[:, p : p + L], batch.clean[:, p + L :]
    assert torch.equal(first, second)
    assert torch.equal(batch.corrupt[:, : p + L], batch.clean[:, : p + L])
    for i in range(6):
        assert len(set(first[i].tolist())) == L  # distinct tokens
        assert not set(batch.corrupt[i, p + L :].tolist()) & set(first[i].tolist())
    # Each scored position is followed in the clean prompt by its answer, R[1..L-1].
    b = torch.arange(6)[:, None]
    assert torch.equal(batch.clean[b, batch.positions + 1], batch.answers)
    assert torch.equal(batch.answers, first[:, 1:])
    assert batch.positions.shape == (6, L - 1) and batch.metric_name == "logprob"
    special = set(tok.all_special_ids)
    assert not special & set(batch.clean[:, p:].flatten().tolist())


# ---- facts ----------------------------------------------------------------------------
def test_facts_data(tok):
    facts = facts_mod.load_facts()
    assert len(facts) >= 130
    assert len({(f.relation, f.subject) for f in facts}) == len(facts)
    for f in facts:
        assert single_token(tok, f.attribute) is not None, f
        assert not f.prompt.endswith(" ")


def test_facts_subject_swap(tok):
    batch = facts_mod.build(tok, seed=0)
    total = len(facts_mod.load_facts())
    assert len(batch) + sum(batch.dropped.values()) == total
    assert len(batch) >= 130
    assert (batch.answers != batch.wrongs).all()
    by_prompt = {f.prompt: f for f in facts_mod.load_facts()}
    for i, (clean, corrupt) in enumerate(zip(batch.clean_text, batch.corrupt_text)):
        f = by_prompt[clean]
        assert batch.answers[i, 0] == single_token(tok, f.attribute)
        # Corrupt = same template with another subject of the same relation.
        other = [o for o in by_prompt.values()
                 if o.relation == f.relation and f.with_subject(o.subject) == corrupt]
        assert other and other[0].subject != f.subject
        assert batch.wrongs[i, 0] == single_token(tok, other[0].attribute)
        assert n_tokens(tok, clean) == n_tokens(tok, corrupt)


# ---- docstring --------------------------------------------------------------------------
def test_docstring_names_single_token(tok):
    names = docstring.single_token_names(tok)
    nouns = docstring.single_token_names(tok, docstring.NOUNS)
    assert len(names) >= 100 and len(nouns) >= 100
    assert not set(docstring.NAMES) & set(docstring.NOUNS)
    assert "self" not in docstring.NAMES


def param_names(text: str) -> list[str]:
    return re.findall(r":param (\w+):", text)


def def_names(text: str) -> list[str]:
    return re.match(r"def \w+\(self, ([\w, ]+)\):", text).group(1).split(", ")


@pytest.mark.parametrize("layout", [{}, {"prefix_args": 2}, {"match_args": 4, "suffix_args": 2}])
def test_docstring_structure(tok, layout):
    pre, k, suf = (layout.get("prefix_args", 0), layout.get("match_args", 3),
                   layout.get("suffix_args", 1))
    examples = docstring.make_examples(tok, n=30, seed=1, **layout)
    batch = docstring.build(tok, n=30, seed=1, **layout)
    assert batch.dropped == {} and len(batch) == 30
    for i, e in enumerate(examples):
        assert e.clean == batch.clean_text[i] and e.corrupt == batch.corrupt_text[i]
        assert e.clean.endswith("\n    :param") and e.corrupt.endswith("\n    :param")
        assert def_names(e.clean) == e.def_args and param_names(e.clean) == e.doc_args
        assert def_names(e.corrupt) == e.corrupt_def_args
        assert param_names(e.corrupt) == e.corrupt_doc_args
        # Clean: the docstring documents def args pre .. pre+k-2 in order; the answer is the
        # next def arg and the wrong one the arg after it.
        assert len(set(e.def_args + [e.method])) == len(e.def_args) + 1 == pre + k + suf + 1
        assert e.doc_args == e.def_args[pre : pre + k - 1]
        assert e.answer == e.def_args[pre + k - 1] and e.wrong == e.def_args[pre + k]
        # Corrupt (random_random): the matching def args and the documented names are fresh
        # and disjoint; prefix/suffix args, method and descriptions stay.
        fresh_def, fresh_doc = e.corrupt_def_args[pre : pre + k], e.corrupt_doc_args
        assert e.corrupt_def_args[:pre] == e.def_args[:pre]
        assert e.corrupt_def_args[pre + k :] == e.def_args[pre + k :]
        assert not (set(fresh_def) | set(fresh_doc)) & set(e.def_args + [e.method])
        assert not set(fresh_def) & set(fresh_doc) and len(set(fresh_doc)) == k - 1
        assert count_word(e.corrupt, e.answer) == 0 and count_word(e.clean, e.answer) == 1
        assert count_word(e.corrupt, e.wrong) == 1
        strip = lambda t, names: re.sub(rf"\b({'|'.join(names)})\b", "X", t)
        assert strip(e.clean, e.def_args) == strip(e.corrupt, e.corrupt_def_args + fresh_doc)
        assert n_tokens(tok, e.clean) == n_tokens(tok, e.corrupt)
        assert batch.answers[i, 0] == single_token(tok, " " + e.answer)
        assert batch.wrongs[i, 0] == single_token(tok, " " + e.wrong)
        # Same positions for every name: the two prompts differ only at name tokens.
        L = batch.lengths[i]
        differ = (batch.clean[i, :L] != batch.corrupt[i, :L]).nonzero()[:, 0].tolist()
        assert len(differ) == k + (k - 1)


def test_docstring_deterministic_and_errors(tok):
    a, b = docstring.make_examples(tok, 5, seed=7), docstring.make_examples(tok, 5, seed=7)
    assert [e.clean for e in a] == [e.clean for e in b]
    first = docstring.make_examples(tok, 1, seed=0)[0]
    assert first.clean.startswith(f"def {first.method}(self, ")
    assert '    """' in first.clean and "\n\n    :param " in first.clean
    with pytest.raises(MechscopeError, match="match_args >= 2"):
        docstring.make_examples(tok, 1, match_args=1)

    class ByteTok:  # every name is several tokens
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": list(text.encode())}

    with pytest.raises(MechscopeError, match="single tokens"):
        docstring.build(ByteTok(), n=2)


# ---- JSONL ----------------------------------------------------------------------------
def write(tmp_path, lines: list[str]):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"clean": "When Mary and John went out, John gave it to",
                   "corrupt": "When Alice and Bob went out, Carl gave it to",
                   "answer": " Mary", "wrong": " John"})


@pytest.mark.parametrize(
    "bad, match",
    [
        ("{not json", "line 3: not valid JSON"),
        (json.dumps({"clean": "a", "corrupt": "b", "answer": " c"}), "line 3: missing key.*wrong"),
        (json.dumps({"clean": "a", "corrupt": 5, "answer": " c", "wrong": " d"}), "line 3: corrupt must"),
        (json.dumps(["a", "b"]), "line 3: expected an object"),
    ],
)
def test_jsonl_errors_name_line(tmp_path, tok, bad, match):
    path = write(tmp_path, [GOOD, "", bad])
    with pytest.raises(MechscopeError, match=match) as err:
        get_task(str(path)).build(tok)
    assert str(path) in str(err.value)


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(MechscopeError, match="No task file"):
        jsonl.read_pairs(tmp_path / "nope.jsonl")


def test_jsonl_dropped_counts(tmp_path, tok):
    lines = [
        GOOD,
        json.dumps({"clean": "The cat sat on the", "corrupt": "The cat sat on the big", "answer": " mat", "wrong": " dog"}),
        json.dumps({"clean": "The cat sat on the", "corrupt": "The dog sat on the", "answer": " doormat mat", "wrong": " dog"}),
        json.dumps({"clean": "The cat sat on the", "corrupt": "The dog sat on the", "answer": " mat", "wrong": " dog"}),
    ]
    batch = get_task(str(write(tmp_path, lines))).build(tok)
    assert len(batch) == 2
    assert batch.dropped == {"clean and corrupt differ in token length": 1,
                             "answer is not a single token": 1}
    assert batch.lengths.tolist() == [n_tokens(tok, json.loads(GOOD)["clean"]), 5]



def test_jsonl_repeats_and_same_answer_dropped(tmp_path, tok):
    """A pair repeated in the file is kept once (a copy in the held-out split would be a second
    look at a scoring pair), and a pair whose answer and wrong token are one token (its logit
    difference is 0 whatever the model does) is dropped; both are counted."""
    same = json.dumps({"clean": "The cat sat on the", "corrupt": "The dog sat on the", "answer": " mat", "wrong": " mat"})
    other = json.dumps({"clean": "The cat sat on the", "corrupt": "The dog sat on the", "answer": " mat", "wrong": " dog"})
    batch = get_task(str(write(tmp_path, [GOOD, GOOD, other, same, GOOD]))).build(tok)
    assert len(batch) == 2 and batch.clean_text == [json.loads(GOOD)["clean"], "The cat sat on the"]
    assert batch.dropped == {"repeats an earlier pair": 2, "answer and wrong are the same token": 1}
    with pytest.raises(MechscopeError, match="1 answer and wrong are the same token"):
        get_task(str(write(tmp_path, [same]))).build(tok)


def test_jsonl_answers_without_a_leading_space_are_named(tmp_path, tok):
    """An answer written without its leading space: dropped with the hint when only the spaced
    form is one token (' kitchen'), kept with a note when both are ('Mary' continues the
    prompt's last word, which is not the token the model predicts for a new word)."""
    glued = json.dumps({"clean": "John gave a drink to", "corrupt": "Mary gave a drink to", "answer": "Mary", "wrong": " John"})
    split = json.dumps({"clean": "The cat sat in the", "corrupt": "The dog sat in the", "answer": "kitchen", "wrong": " garden"})
    batch = get_task(str(write(tmp_path, [GOOD, glued, split]))).build(tok)
    assert len(batch) == 2
    assert batch.dropped == {"answer is not a single token (but is one with a leading space)": 1}
    assert len(batch.notes) == 1 and batch.notes[0].startswith("1 of 2 pairs have an answer or wrong token")
    assert "leading space" in batch.notes[0] and batch.summary()["notes"] == batch.notes
    assert get_task(str(write(tmp_path, [GOOD]))).build(tok).notes == []  # spaced answers: no note
    digits = json.dumps({"clean": "The war lasted from 1752 to 175", "corrupt": "The war lasted from 1751 to 175",
                         "answer": "3", "wrong": "1"})
    assert get_task(str(write(tmp_path, [digits]))).build(tok).notes == []  # digits continuing digits are meant


def test_jsonl_bom_and_pretty_printed_file(tmp_path, tok):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD + "\n").encode())
    assert len(get_task(str(path)).build(tok)) == 1
    path.write_text(json.dumps([json.loads(GOOD)], indent=2))
    with pytest.raises(MechscopeError, match="line 1: not valid JSON.*one JSON object per line"):
        get_task(str(path)).build(tok)


@pytest.mark.parametrize("n", [0, -1])
def test_non_positive_n_refused(tmp_path, tok, n):
    with pytest.raises(MechscopeError, match=f"--n must be at least 1 pair; got {n}"):
        get_task(str(write(tmp_path, [GOOD]))).build(tok, n=n)
    with pytest.raises(MechscopeError, match="--n must be at least 1"):
        get_task("ioi").build(tok, n=n)


# ---- metrics --------------------------------------------------------------------------
def random_batch(metric: str, b=3, pos=6, k=2, vocab=11, seed=0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, pos), generator=g)
    batch = TaskBatch(
        task="t", clean=tokens, corrupt=tokens, lengths=torch.full((b,), pos),
        positions=torch.randint(0, pos, (b, k), generator=g),
        answers=torch.randint(0, vocab, (b, k), generator=g),
        wrongs=torch.randint(0, vocab, (b, k), generator=g), metric_name=metric,
    )
    if metric == "prob_diff":
        batch.candidates = torch.randint(0, vocab, (b, 4), generator=g)
        batch.signs = torch.tensor([1.0, -1.0, 0.0, 1.0]).expand(b, -1)
    return batch


@pytest.mark.parametrize("metric", ["logit_diff", "logprob", "prob_diff"])
def test_metric_matches_manual(metric):
    batch = random_batch(metric)
    logits = torch.randn(3, 6, 11, generator=torch.Generator().manual_seed(1))
    got = batch.per_example_metric(logits)
    for i in range(3):
        vals = []
        for j in range(2):
            row = logits[i, batch.positions[i, j]]
            a, w = batch.answers[i, j], batch.wrongs[i, j]
            if metric == "logit_diff":
                vals.append(row[a] - row[w])
            elif metric == "logprob":
                vals.append(torch.log(torch.exp(row[a]) / torch.exp(row).sum()))
        if metric == "prob_diff":
            p = torch.exp(logits[i, batch.positions[i, 0]])
            p = p / p.sum()
            want = sum(float(s) * p[c] for s, c in zip(batch.signs[i], batch.candidates[i]))
        else:
            want = sum(vals) / len(vals)
        assert got[i].item() == pytest.approx(float(want), abs=1e-5)
    assert batch.metric(logits).item() == pytest.approx(got.mean().item())


# ---- padding and evaluation with a tiny random Llama ------------------------------------
@pytest.fixture(scope="module")
def tiny(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128)
    return LlamaForCausalLM(cfg).eval()


def test_padding_does_not_change_metric(tok, tiny):
    batch = facts_mod.build(tok, n=40, seed=0)
    assert len(set(batch.lengths.tolist())) > 1  # really mixed lengths
    with torch.no_grad():
        together = batch.per_example_metric(tiny(batch.clean).logits)
        for i in range(len(batch)):
            one = batch.subset([i])
            L = int(one.lengths[0])
            alone = one.per_example_metric(tiny(one.clean[:, :L]).logits)
            assert alone.item() == pytest.approx(together[i].item(), abs=1e-4)


def test_evaluate_task_minibatches(tok, tiny):
    batch = ioi.build(tok, n=10, seed=0)
    a = evaluate_task(tiny, batch, batch_size=3)
    b = evaluate_task(tiny, batch, batch_size=16)
    assert set(a) == {"task", "n", "clean_metric", "corrupt_metric", "clean_accuracy",
                      "corrupt_accuracy", "chance_accuracy", "metric", "dropped", "notes"}
    for k in ("clean_metric", "corrupt_metric", "clean_accuracy", "corrupt_accuracy"):
        assert a[k] == pytest.approx(b[k], abs=1e-4)
    with torch.no_grad():
        logits = tiny(batch.clean).logits
    assert a["clean_metric"] == pytest.approx(batch.metric(logits).item(), abs=1e-4)
    assert a["n"] == 10 and a["chance_accuracy"] == 0.5 and a["metric"] == "logit_diff"


def test_chance_of_a_top1_task_is_one_over_the_vocabulary(tok, tiny):
    """Induction is scored by top-1 accuracy: a model that knows nothing gets 1 / vocabulary
    right, not 0 (task-eval printed chance 0% beside a corrupt accuracy of 0.7%)."""
    res = evaluate_task(tiny, induction.build(tok, n=4, seed=0))
    with torch.no_grad():
        vocab = tiny(torch.tensor([[1, 2]])).logits.shape[-1]
    assert res["metric"] == "logprob" and res["chance_accuracy"] == pytest.approx(1.0 / vocab)


def test_task_eval_accuracies_are_exact_fractions(tiny_gpt2):
    """Accuracy is counted, not averaged in float32 per chunk and summed: 30 of 60 right is 0.5
    exactly, whatever the chunking (a sweep saw 0.4999999980131785)."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randint(1, 300, s, generator=g)  # noqa: E731
    n = 21
    batch = TaskBatch(task="random", clean=r(n, 7), corrupt=r(n, 7), positions=torch.full((n, 1), 6),
                      answers=r(n, 1), wrongs=r(n, 1), lengths=torch.full((n,), 7))
    with torch.no_grad():
        right = {kind: int((batch.per_example_metric(tiny_gpt2.bridge(getattr(batch, kind))) > 0).sum()) for kind in ("clean", "corrupt")}
    assert 0 < right["clean"] < n
    for bs in (1, 4, 7, 21):
        out = evaluate_task(tiny_gpt2, batch, batch_size=bs)
        for kind in ("clean", "corrupt"):
            assert out[f"{kind}_accuracy"] == right[kind] / n, (bs, kind)
