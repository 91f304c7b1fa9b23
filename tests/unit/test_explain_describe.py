"""Explainers, scorers and `describe`: properties a wrong implementation breaks.

Synthetic units: unit ``i`` fires (activation 2.0) exactly on the word ``WORDS[i]``, so the
right description is known, and an oracle simulator that reads quoted words from a
description predicts its own unit perfectly and a shuffled one badly.
"""

from __future__ import annotations

import math
import random
import re
import sys
from pathlib import Path

import pytest

from mechscope.errors import MechscopeError
from mechscope.explain.db import UnitDB, settings_key
from mechscope.explain.describe import DescribeConfig, describe
from mechscope.explain.explainers import BaselineExplainer, make_explainer, normalised, parse_description
from mechscope.explain.explainers.base import explain_prompt
from mechscope.explain.scoring import (
    ModelSimulator,
    balanced_accuracy,
    control_summary,
    detection_scores,
    fuzzing_scores,
    pearson,
    roc_auc,
    score,
    shuffle_partners,
    simulation_score,
)
from mechscope.explain.types import Description, Exemplar, UnitRecord, UnitRef

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from fake_chat_server import FakeChatServer  # noqa: E402
from short_context import save_short  # noqa: E402

WORDS = [" Paris", " river", " seven", " blue", " dog", " run", " king", " salt"]
FILLER = [" the", " a", " of", " and", " in", " to", " it", " was", " on", " for"]


def _window(rng: random.Random, word: str | None, n: int = 8) -> tuple[list[str], list[float]]:
    toks = [rng.choice(FILLER) for _ in range(n)]
    if word is not None:
        for i in rng.sample(range(n), 2):
            toks[i] = word
    return toks, [2.0 if t == word else 0.0 for t in toks]


def _unit_exemplars(i: int, seed: int = 0) -> list[Exemplar]:
    rng = random.Random(1000 * seed + i)
    out = []
    for split in ("train", "valid", "test"):
        for _ in range(3):
            toks, acts = _window(rng, WORDS[i])
            out.append(Exemplar(toks, acts, focus=acts.index(2.0), kind="top", split=split))
        for _ in range(3):
            toks, acts = _window(rng, None)
            out.append(Exemplar(toks, acts, focus=0, kind="random", split=split))
    return out


def _db(path, n_units: int = len(WORDS)) -> UnitDB:
    db = UnitDB(path, model_id="synthetic")
    refs = [UnitRef("mlp", 0, i) for i in range(n_units)]
    db.put_units([UnitRecord(unit=r, max_act=2.0, min_act=0.0, density=0.2) for r in refs])
    for r in refs:
        db.put_exemplars(r, _unit_exemplars(r.index))
    return db


class Oracle:
    """Predicts 1 where a token is the description's first quoted word (not the 'mostly after "x"' part)."""

    name = "oracle"

    @staticmethod
    def _words(description: str) -> set[str]:
        return {w.strip() for w in re.findall(r'"([^"]+)"', description)[:1]}

    def simulate(self, description, windows):
        words = self._words(description)
        return [[float(t.strip() in words) for t in w] for w in windows]

    def detect(self, description, windows):
        words = self._words(description)
        return [float(any(t.strip() in words for t in w)) for w in windows]

    def judge_marks(self, description, windows, marks):
        words = self._words(description)
        return [float(all(t.strip() in words for t, m in zip(w, ms) if m)) for w, ms in zip(windows, marks)]


class Constant(Oracle):
    name = "constant"

    def simulate(self, description, windows):
        return [[3.0] * len(w) for w in windows]

    def detect(self, description, windows):
        return [0.7] * len(windows)

    def judge_marks(self, description, windows, marks):
        return [0.7] * len(windows)


# ------------------------------------------------------------------ prompt pieces, baseline


def test_normalised_is_bills_scale():
    # floor(10 * relu(a) / max): hand values.
    assert normalised([-1.0, 0.0, 0.29, 1.5, 2.99, 3.0, 4.0], 3.0) == [0, 0, 0, 5, 9, 10, 10]
    assert normalised([1.0, 2.0], 0.0) == [0, 0]


def test_explain_prompt_marks_activating_tokens_only():
    ex = Exemplar([" the", " Paris", "\n"], [0.0, 2.0, 0.1], focus=1, kind="top", split="train")
    p = explain_prompt(UnitRecord(UnitRef("mlp", 0, 0), 2.0, 0.0, 0.1), [ex])
    assert "<< Paris>>" in p and "<< the>>" not in p
    assert "Paris (10)" in p and "\\n" in p  # the newline token is escaped, not a line break inside the excerpt


def test_parse_description():
    assert parse_description('Explanation: "the word Paris"\nsecond line') == "the word Paris"
    assert parse_description("\n\n  - This neuron detects: rivers  ") == "rivers"
    assert parse_description("   \n") == ""


def test_baseline_names_the_focus_tokens():
    ex = _unit_exemplars(0)
    text = BaselineExplainer().explain(UnitRecord(UnitRef("mlp", 0, 0), 2.0, 0.0, 0.1), [e for e in ex if e.split == "train"])[0]
    assert text == 'the token "Paris"'


def test_baseline_finds_a_stable_previous_token():
    rng = random.Random(0)
    train = []
    for w in WORDS:  # the focus token varies, the token before it is always " of"
        toks = [rng.choice(FILLER[3:]) for _ in range(6)] + [" of", w, " and"]
        train.append(Exemplar(toks, [0.0] * 7 + [1.0, 0.0], focus=7, kind="top", split="train"))
    text = BaselineExplainer().explain(UnitRecord(UnitRef("mlp", 0, 0), 1.0, 0.0, 0.1), train)[0]
    assert text.startswith('the token right after "of"')


def test_settings_key_matches_the_store_and_changes_with_settings():
    a, b = BaselineExplainer(), BaselineExplainer(n_top=5)
    assert a.settings_key == settings_key(a.full_settings) == BaselineExplainer().settings_key
    assert a.settings_key != b.settings_key


# ------------------------------------------------------------------ statistics and scores


def test_statistics_against_hand_values():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [5, 5, 5]) == 0.0
    assert balanced_accuracy([True, True, False, False], [True, False, False, False]) == pytest.approx(0.75)
    assert roc_auc([True, False, False], [0.9, 0.9, 0.1]) == pytest.approx(0.75)  # tie counts 1/2


def test_simulation_is_one_for_the_truth_and_near_zero_shuffled():
    own, shuffled = [], []
    for i in range(len(WORDS)):
        held = [e for e in _unit_exemplars(i) if e.split != "train"]
        own.append(simulation_score(Oracle(), f'the token "{WORDS[i].strip()}"', held))
        shuffled.append(simulation_score(Oracle(), f'the token "{WORDS[(i + 1) % len(WORDS)].strip()}"', held))
    assert min(own) == pytest.approx(1.0)
    assert all(abs(s) < 0.05 for s in shuffled)


def test_detection_and_fuzzing_are_half_for_a_constant_simulator_and_one_for_the_oracle():
    held = [e for e in _unit_exemplars(2) if e.split != "train"]
    record = UnitRecord(UnitRef("mlp", 0, 2), 2.0, 0.0, 0.1)
    desc = f'the token "{WORDS[2].strip()}"'
    assert detection_scores(Constant(), desc, held, record) == {"detection": 0.5, "detection_auc": 0.5}
    assert fuzzing_scores(Constant(), desc, held, record) == {"fuzzing": 0.5, "fuzzing_auc": 0.5}
    assert detection_scores(Oracle(), desc, held, record) == {"detection": 1.0, "detection_auc": 1.0}
    assert fuzzing_scores(Oracle(), desc, held, record) == {"fuzzing": 1.0, "fuzzing_auc": 1.0}
    # Only activating contexts: detection is undefined, so it is left out (never NaN).
    assert score(Oracle(), desc, record, [e for e in held if e.kind == "top"], ["detection"]) == {}


def test_shuffle_partners_is_a_seeded_derangement_of_the_set():
    units = [UnitRef("mlp", 1, i) for i in range(9)]
    p = shuffle_partners(units, seed=3)
    assert set(p) == set(units) and sorted(p.values()) == sorted(units)
    assert all(u != v for u, v in p.items())
    assert p == shuffle_partners(list(reversed(units)), seed=3)  # order of the input does not matter
    assert p != shuffle_partners(units, seed=4)
    assert shuffle_partners(units[:1]) == {}


def test_control_summary():
    ds = [Description(UnitRef("mlp", 0, i), "x", "baseline", scores={"simulation": s, "simulation_shuffled": c})
          for i, (s, c) in enumerate([(0.9, 0.1), (0.2, 0.3), (0.6, 0.0)])]
    s = control_summary(ds)
    assert s["n"] == 3 and s["median"] == 0.6 and s["median_shuffled"] == 0.1
    assert s["above_control"] == pytest.approx(2 / 3) and s["mean"] == pytest.approx(1.7 / 3)


# ------------------------------------------------------------------ the in-process simulator


def test_expected_value_readout_equals_a_hand_computation(tiny_llama):
    import torch

    sim = ModelSimulator(tiny_llama, batch_size=8)
    windows = [[" Paris", " is", " big"], [" the", " dog"], [" a", " king", " of", " salt", " and"]]
    got = sim.simulate('the token "Paris"', windows)
    assert [len(g) for g in got] == [3, 2, 5]
    # By hand: the same prompt, one sequence at a time, unbatched; softmax over the digit logits.
    hf = tiny_llama.bridge.original_model
    tab = tiny_llama.tokenizer.encode("\t", add_special_tokens=False)[-1]
    for w, g in zip(windows, got):
        ids, slots = sim.sim_sequence('the token "Paris"', w)
        assert [ids[s] for s in slots] == [tab] * len(w)
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].double()
        for s, value in zip(slots, g):
            z = [float(logits[s, t]) for t in sim.number_ids]
            m = max(z)
            e = [math.exp(x - m) for x in z]
            assert value == pytest.approx(sum(k * x for k, x in enumerate(e)) / sum(e), abs=1e-4)
            assert 0.0 <= value <= sim.top
    assert sim._share_head  # the shared-head cache path ran (the hand computation above runs without it)
    # Whole sequences, one at a time (no cache, no padding) agree with the cached, batched path.
    whole = ModelSimulator(tiny_llama, batch_size=1, share_head=False)
    one = whole.simulate('the token "Paris"', windows)
    assert all(a == pytest.approx(b, abs=1e-4) for ga, gb in zip(got, one) for a, b in zip(ga, gb))
    marks = [[True] + [False] * (len(w) - 1) for w in windows]
    p = sim.detect("x", windows) + sim.judge_marks("x", windows, marks)
    assert p == pytest.approx(whole.detect("x", windows) + whole.judge_marks("x", windows, marks), abs=1e-5)
    assert all(0.0 <= q <= 1.0 for q in p)


# ------------------------------------------------------------------ describe: resumable, idempotent


def _all_mine(db, explainer):
    key = explainer.settings_key
    return {u: [d for d in db.descriptions(u) if settings_key(d.settings) == key] for u in db.units()}


def test_describe_killed_midway_resumes_without_duplicates(tmp_path):
    db = _db(tmp_path / "u.db")
    ex = BaselineExplainer()
    cfg = DescribeConfig(scorers=("simulation", "detection", "fuzzing"), chunk=3)

    class Killed(Exception):
        pass

    def kill_after_first(n):
        if n >= 3:
            raise Killed

    with pytest.raises(Killed):
        describe(db, db.units(), ex, Oracle(), cfg, on_chunk=kill_after_first)
    assert len(db.described("baseline", ex.settings_key)) == 3  # the first chunk was stored
    res = describe(db, db.units(), ex, Oracle(), cfg)
    assert (res.described, res.already_described) == (5, 3)
    mine = _all_mine(db, ex)
    assert all(len(v) == 1 for v in mine.values())  # complete coverage, nothing twice
    for u, (d,) in mine.items():
        assert d.text.startswith(f'the token "{WORDS[u.index].strip()}"')  # maybe ', mostly after "of"'
        assert d.scores["simulation"] == pytest.approx(1.0) and d.scores["detection"] == 1.0
        assert abs(d.scores["simulation_shuffled"]) < 0.05 and d.scores["fuzzing_shuffled"] < 1.0
    assert res.summary["simulation"]["above_control"] == 1.0
    # Killed during scoring, then resumed: every description ends scored, none rescored twice.
    db2 = _db(tmp_path / "v.db")

    def kill_in_scoring(n):
        if n > len(WORDS):
            raise Killed

    with pytest.raises(Killed):
        describe(db2, db2.units(), ex, Oracle(), DescribeConfig(chunk=2), on_chunk=kill_in_scoring)
    again = describe(db2, db2.units(), ex, Oracle(), DescribeConfig(chunk=2))
    assert again.described == 0 and 0 < again.scored < len(WORDS)
    assert describe(db2, db2.units(), ex, Oracle(), DescribeConfig()).scored == 0
    assert all(len(v) == 1 and "simulation_shuffled" in v[0].scores for v in _all_mine(db2, ex).values())


def test_describe_limit_and_no_scorer(tmp_path):
    db = _db(tmp_path / "u.db")
    res = describe(db, db.units(), BaselineExplainer(), None, DescribeConfig(scorers=(), limit=2))
    assert (res.units, res.described, res.scored) == (2, 2, 0)
    assert db.described("baseline", BaselineExplainer().settings_key) == set(db.units()[:2])
    with pytest.raises(MechscopeError, match="simulator"):
        describe(db, db.units(), BaselineExplainer(), None, DescribeConfig())
    with pytest.raises(MechscopeError, match="Unknown scorer"):
        DescribeConfig(scorers=("simulaton",))


# ------------------------------------------------------------------ the server explainer, against a real HTTP server


def _one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.endswith(".") and len(msg) < 300


def test_server_explainer_parses_the_answer_and_sends_the_prompt():
    with FakeChatServer("ok") as srv:
        ex = make_explainer("server", server=srv.url, server_model="fake", concurrency=4)
        exemplars = [e for e in _unit_exemplars(0) if e.split == "train"]
        out = ex.explain_many([(UnitRecord(UnitRef("mlp", 0, i), 2.0, 0.0, 0.1), exemplars) for i in range(3)], n_samples=2)
        ex.close()
    assert out == [['the word "Paris"']] * 3  # two identical samples kept once
    assert len(srv.requests) == 6
    assert {r["model"] for r in srv.requests} == {"fake"}
    assert sorted(r["temperature"] for r in srv.requests)[:3] == [0.0, 0.0, 0.0]
    assert "<< Paris>>" in srv.requests[0]["messages"][1]["content"]


@pytest.mark.parametrize("mode,match", [("slow", "did not answer within"), ("garbage", "not a chat-completions JSON"),
                                        ("empty", "empty content")])
def test_server_failures_are_one_sentence_and_keep_what_is_stored(tmp_path, mode, match):
    db = _db(tmp_path / "u.db")
    with FakeChatServer("ok", delay=2.0) as srv:
        ex = make_explainer("server", server=srv.url, server_model="fake", timeout=0.5, retries=1)

        def break_server(n):
            srv.mode = mode

        with pytest.raises(MechscopeError, match=match) as err:
            describe(db, db.units(), ex, None, DescribeConfig(scorers=(), chunk=3), on_chunk=break_server)
        ex.close()
    assert _one_sentence(str(err.value))
    kept = db.described("server", ex.settings_key)
    assert len(kept) == 3 and all(db.descriptions(u)[0].text == 'the word "Paris"' for u in kept)


def test_a_prompt_too_long_for_the_servers_context_is_resent_with_fewer_exemplars():
    unit = UnitRecord(UnitRef("mlp", 0, 0), 2.0, 0.0, 0.1)
    train = [e for i in range(4) for e in _unit_exemplars(0, seed=i) if e.split == "train"]  # 24 windows
    with FakeChatServer("context") as srv:
        ex = make_explainer("server", server=srv.url, server_model="fake", retries=0)
        assert ex.explain(unit, train) == ['the word "Paris"']
        sent = [r["messages"][1]["content"].count("Excerpt ") for r in srv.requests]
        assert sent == [12, 6, 3]  # halved until it fits (the fake server takes at most 3)
        srv.requests.clear()
        assert ex.explain(unit, train) == ['the word "Paris"']
        assert [r["messages"][1]["content"].count("Excerpt ") for r in srv.requests] == [12, 6, 3]  # nothing learned across calls
        srv.max_excerpts = 0
        with pytest.raises(MechscopeError, match=r"cannot fit even 1 exemplar\(s\) of unit mlp/0/0 .*maximum context length is 2048 tokens\)") as err:
            ex.explain(unit, train)
        ex.close()
    assert _one_sentence(str(err.value))


def test_server_that_is_not_there():
    ex = make_explainer("server", server="http://127.0.0.1:9/v1", server_model="fake", timeout=1.0, retries=0)
    with pytest.raises(MechscopeError, match="Could not connect") as err:
        ex.explain(UnitRecord(UnitRef("mlp", 0, 0), 2.0, 0.0, 0.1), _unit_exemplars(0)[:3])
    assert _one_sentence(str(err.value))
    with pytest.raises(MechscopeError, match="--server URL"):
        make_explainer("server")
    with pytest.raises(MechscopeError, match="Did you mean: baseline"):
        make_explainer("baseln")


# ------------------------------------------------------------------ the command


@pytest.mark.slow
def test_cli_describe_baseline_then_bad_server_and_bad_units(tmp_path, tiny_llama_dir):
    import json

    from typer.testing import CliRunner

    from mechscope.cli.main import app

    db = _db(tmp_path / "u.db")
    db.close()
    r = CliRunner().invoke(app, ["describe", "--db", str(tmp_path / "u.db"), "--scorer", "none", "--limit", "5", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert (out["described"], out["units"]) == (5, 5)
    # Scoring with a (tiny, random) simulator model: every described unit gets its scores and controls.
    r = CliRunner().invoke(app, ["describe", "--db", str(tmp_path / "u.db"), "--limit", "2", "--layers", "0",
                                 "--simulator", tiny_llama_dir, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["scored"] == 2
    store = UnitDB(tmp_path / "u.db")
    assert all({"simulation", "simulation_shuffled", "simulation_n"} <= set(store.descriptions(u)[0].scores) for u in store.units()[:2])
    with FakeChatServer("garbage") as srv:
        r = CliRunner().invoke(app, ["describe", "--db", str(tmp_path / "u.db"), "--scorer", "none", "--explainer", "server",
                                     "--server", srv.url, "--model", "x"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "not a chat-completions JSON" in r.output
    assert len(store.described("baseline", BaselineExplainer().settings_key)) == 5  # nothing stored was lost
    for args, match in ((["--units", "sae:/x/set"], "has no sae:/x/set units; it holds mlp layer 0"),
                        (["--layers", "7"], "has no mlp units in layers 7"),
                        (["--explainer", "lokal"], "Did you mean: local"),
                        (["--scorer", "simulation,detect"], "Unknown scorer 'detect'")):
        r = CliRunner().invoke(app, ["describe", "--db", str(tmp_path / "u.db"), *args])
        assert r.exit_code == 2 and match in r.output, (args, r.output)
    r = CliRunner().invoke(app, ["describe", "--db", str(tmp_path / "missing.db")])
    assert r.exit_code == 2 and "run mechscope exemplars" in r.output and not (tmp_path / "missing.db").exists()


def test_cli_describe_refuses_a_simulator_whose_position_table_is_too_short(tmp_path, tiny_gpt2_dir):
    """GPT-2's learned positions end at n_positions; the simulation prompt is longer: one sentence
    and exit 2, not an IndexError from the position table, and before any unit is described. At
    64 positions the instructions alone do not fit; at 400 they do (339 tokens here) but the
    database's windows do not (over 430 with an empty description)."""
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    for n, simulator in ((64, tiny_gpt2_dir), (400, save_short("gpt2", tmp_path / "g400", n_ctx=400))):
        db = tmp_path / f"u{n}.db"
        _db(db).close()
        r = CliRunner().invoke(app, ["describe", "--db", str(db), "--layers", "0", "--simulator", simulator])
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.output, r.output
        need = re.search(r"reads at most (\d+) positions, but the scoring prompts here are at least (\d+) tokens", r.stderr)
        assert need and int(need[1]) == n and int(need[2]) > 430 and "--simulator" in r.stderr, r.stderr
        assert not UnitDB(db).described("baseline", BaselineExplainer().settings_key)  # nothing described first
    # Without scorers no simulator is read: the units are described (a --simulator there is refused: nothing reads it).
    r = CliRunner().invoke(app, ["describe", "--db", str(tmp_path / "u64.db"), "--scorer", "none"])
    assert r.exit_code == 0, r.output
