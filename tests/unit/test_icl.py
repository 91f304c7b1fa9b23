"""Few-shot prompts and the position-group attention knockout (``mechscope.icl``) on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.errors import MechscopeError
from mechscope.icl import FewShotConfig, fewshot_knockout, load_task, make_prompt, sample_prompts, task_names
from mechscope.icl import run as icl_run
from mechscope.icl.fewshot import DATA, fewshot_accuracy
from mechscope.icl.knockout import block_edges, group_edges, group_positions, matched_edges, random_edges, sweep_edges
from mechscope.models.hooks import attn_pattern

EXAMPLES = [("hot", "cold"), ("big", "small"), ("<script>", "x\"y")]
QUERY = ("up", "down")


def _prompt(model):
    return make_prompt(model.tokenizer, EXAMPLES, QUERY)


def test_groups_are_the_token_spans_of_a_hand_made_prompt(tiny_gpt2):
    p = _prompt(tiny_gpt2)
    assert p.text == "\nhot -> cold\nbig -> small\n<script> -> x\"y\nup ->"
    dec = lambda pos: tiny_gpt2.tokenizer.decode([p.ids[i] for i in pos])  # noqa: E731
    want = {"sink": "\n", "xq": "up", "final": " ->" if not p.groups["aq"] else ">"}
    for i, (x, y) in enumerate(EXAMPLES, 1):
        want |= {f"x{i}": x, f"a{i}": " ->", f"y{i}": " " + y, f"n{i}": "\n"}
    for name, text in want.items():
        assert dec(p.groups[name]) == text, (name, dec(p.groups[name]))
    everything = sorted(q for v in p.groups.values() for q in v)
    assert everything == list(range(len(p.ids)))  # a partition of the prompt
    assert p.groups["final"] == [len(p.ids) - 1] and p.groups["sink"] == [0]
    assert p.target_id == tiny_gpt2.tokenizer(" down")["input_ids"][0]


def test_sweep_edges_are_the_papers_edge_sets(tiny_gpt2):
    p = _prompt(tiny_gpt2)
    g = p.groups
    within = {(q, k) for i in (1, 2, 3) for q in g[f"y{i}"] for k in g[f"x{i}"]}
    assert set(sweep_edges(p, "within")) == within
    cross = {(q, k) for i in (2, 3) for j in range(1, i) for q in g[f"y{i}"] for k in g[f"x{j}"] + g[f"y{j}"]}
    assert set(sweep_edges(p, "cross")) == cross
    assert set(sweep_edges(p, "aggregation")) == {(g["final"][0], k) for i in (1, 2, 3) for k in g[f"y{i}"]}
    assert all(k < q for q, k in sweep_edges(p, "cross"))


def test_random_control_blocks_exactly_as_many_other_edges(tiny_gpt2):
    p = _prompt(tiny_gpt2)
    n = len(p.ids)
    for s in ("within", "cross", "aggregation"):
        e = sweep_edges(p, s)
        c = random_edges(n, len(e), e, seed=3)
        assert len(c) == len(set(c)) == len(e)
        assert not set(c) & set(e)
        assert all(1 <= k < q < n for q, k in c)
        assert c == random_edges(n, len(e), e, seed=3) and c != random_edges(n, len(e), e, seed=4)
        m = matched_edges(e, seed=3)
        assert {q for q, _ in m} <= {q for q, _ in e} and not set(m) & set(e) and all(1 <= k < q for q, k in m)
        pool = {(q, k) for q in {q for q, _ in e} for k in range(1, q)} - set(e)
        assert len(m) == len(set(m)) == min(len(e), len(pool))
    with pytest.raises(MechscopeError, match="random control edges"):
        random_edges(4, 10)


def test_bad_groups_and_sweeps_are_one_sentence(tiny_gpt2):
    p = _prompt(tiny_gpt2)
    with pytest.raises(MechscopeError, match="Unknown position group"):
        group_positions(p, "z9")
    p.groups["aq"] = []
    with pytest.raises(MechscopeError, match="is empty"):
        group_positions(p, "aq")
    with pytest.raises(MechscopeError, match="No edge"):
        group_edges(p, "x1", "final")  # keys after the queries
    one = make_prompt(tiny_gpt2.tokenizer, EXAMPLES[:1], QUERY)
    with pytest.raises(MechscopeError, match="2 or more"):
        sweep_edges(one, "cross")
    with pytest.raises(MechscopeError, match="earlier key"):
        block_edges(tiny_gpt2, p.ids, p.target_id, [{0: [(2, 5)]}])


@torch.no_grad()
def _last_probs(model, ids, target, pattern_hook=None):
    """p(target) at the last position by a plain full forward pass (no stop hook), with
    ``pattern_hook`` on every layer's attention pattern (after the softmax)."""
    x = torch.tensor([ids])
    fwd = [(attn_pattern(lay), pattern_hook) for lay in range(model.summary.n_layers)] if pattern_hook else []
    logits = model.bridge.run_with_hooks(x, fwd_hooks=fwd)
    return logits[0, -1].float().softmax(-1)[target]


def test_knockout_of_nothing_is_the_clean_run(tiny_model):
    p = _prompt(tiny_model)
    got = block_edges(tiny_model, p.ids, p.target_id, [{}, {0: []}])
    clean = _last_probs(tiny_model, p.ids, p.target_id)
    torch.testing.assert_close(got, clean.expand(2), atol=1e-5, rtol=1e-4)


def test_knockout_of_everything_equals_a_self_only_attention_run(tiny_model):
    p = _prompt(tiny_model)
    n, L = len(p.ids), tiny_model.summary.n_layers
    every = [(q, k) for q in range(n) for k in range(q)]
    got = block_edges(tiny_model, p.ids, p.target_id, [{lay: every for lay in range(L)}])

    def self_only(p, hook):  # pattern [batch, heads, q, k] replaced by the identity: each position reads itself
        return torch.eye(p.shape[-1], dtype=p.dtype, device=p.device).expand_as(p).clone()

    want = _last_probs(tiny_model, p.ids, p.target_id, self_only)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-4)
    assert abs(float(got[0]) - float(_last_probs(tiny_model, p.ids, p.target_id))) > 1e-6  # the blocking did something


def test_edges_of_an_earlier_query_in_the_last_layer_change_nothing(tiny_model):
    """In the last layer only the final position's attention reaches the readout: blocking an
    earlier query's edges there is a no-op, while the same edges in layer 0 are not."""
    p = _prompt(tiny_model)
    L = tiny_model.summary.n_layers
    q = len(p.ids) - 2
    edges = [(q, k) for k in range(q)]
    got = block_edges(tiny_model, p.ids, p.target_id, [{}, {L - 1: edges}, {0: edges}])
    assert float(got[1]) == pytest.approx(float(got[0]), abs=1e-6)
    assert abs(float(got[2]) - float(got[0])) > 1e-7


def test_batched_rows_equal_rows_run_one_by_one(tiny_llama):
    p = _prompt(tiny_llama)
    rows = [{}, {0: sweep_edges(p, "within")}, {1: sweep_edges(p, "aggregation"), 2: sweep_edges(p, "cross")}]
    together = block_edges(tiny_llama, p.ids, p.target_id, rows, max_rows=2)
    alone = torch.cat([block_edges(tiny_llama, p.ids, p.target_id, [r]) for r in rows])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_accuracy_with_padding_equals_one_prompt_at_a_time(tiny_gpt2):
    ps = sample_prompts(tiny_gpt2.tokenizer, load_task("antonyms"), 2, 5, seed=1)
    assert len({len(p.ids) for p in ps}) > 1  # the batch is padded
    probs, top = fewshot_accuracy(tiny_gpt2, ps)
    for i, p in enumerate(ps):
        assert float(probs[i]) == pytest.approx(float(_last_probs(tiny_gpt2, p.ids, p.target_id)), abs=1e-5)


def test_shipped_task_data_is_what_the_rule_says():
    up = [json.loads(s) for s in (DATA / "uppercase.jsonl").read_text().splitlines()]
    assert up and all(r["y"] == r["x"].upper() and r["x"].islower() for r in up)
    ant = [json.loads(s) for s in (DATA / "antonyms.jsonl").read_text().splitlines()]
    assert len({r["x"] for r in ant}) == len(ant) and all(r["x"] != r["y"] for r in ant)
    cap = dict(load_task("capital").pairs)
    for r in map(json.loads, (DATA / "capital_largest_city.jsonl").read_text().splitlines()):
        assert cap[r["x"]] == r["capital"]  # agrees with the shipped facts list where both hold the country
    assert {"capital", "language", "antonyms", "uppercase"} <= set(task_names())


def test_ambiguous_prompts_agree_but_one_and_ask_where_tasks_differ(tiny_gpt2):
    task = load_task("capital")
    for p in sample_prompts(tiny_gpt2.tokenizer, task, 4, 6, seed=2, ambiguous=True):
        differ = [x for x, y in p.examples if task.alternative[x] != y]
        assert len(differ) == 1 and task.alternative[p.query] != p.answer and p.alt_answer == task.alternative[p.query]
    with pytest.raises(MechscopeError, match="capital"):
        sample_prompts(tiny_gpt2.tokenizer, load_task("antonyms"), 3, 2, ambiguous=True)


@pytest.mark.parametrize("kw, needle", [
    ({"shots": 0}, "at least 1 example"), ({"n": 1}, "--n"), ({"sweeps": ("sideways",)}, "Unknown or no sweep"),
    ({"shots": 1}, "cross-example sweep"), ({"task": " "}, "empty"), ({"min_above_chance": 1.5}, "min-above-chance"),
])
def test_config_refuses_bad_values(kw, needle):
    with pytest.raises(MechscopeError, match=needle):
        FewShotConfig(**kw)


@pytest.mark.parametrize("text, needle", [
    ("not json\n", "not valid JSON"), ('{"x": "a"}\n', "non-empty strings"), ('["a", "b"]\n', "non-empty strings"),
    ('{"x": "a -> b", "y": "c"}\n', "separators"), ('{"x": "a", "y": "b"}\n', "at least 2"),
])
def test_malformed_task_files_are_one_sentence(tmp_path, text, needle):
    f = tmp_path / "t.jsonl"
    f.write_text(text)
    with pytest.raises(MechscopeError, match=needle):
        load_task(str(f))


def test_run_refuses_below_chance_then_runs_forced_and_resumes(tiny_gpt2, tmp_path, monkeypatch):
    f = tmp_path / "pairs.jsonl"
    # Answers the tiny tokenizer starts with different tokens (" b" would be "Ġ" + "b" for all).
    f.write_text("".join(json.dumps({"x": x, "y": y}) + "\n" for x, y in [("a", "Mary"), ("c", "John"), ("e", "Alice"), ("g", "Bob")]))
    cfg = FewShotConfig(task=str(f), shots=2, n=6, min_above_chance=0.9)
    with pytest.raises(MechscopeError, match="above chance"):
        fewshot_knockout(tiny_gpt2, cfg)
    cfg = FewShotConfig(task=str(f), shots=2, n=6, min_above_chance=0.9, force=True)
    _first_prompt_right(monkeypatch)  # a random model gets none right
    res = fewshot_knockout(tiny_gpt2, cfg, checkpoint=tmp_path / "run")
    d = res.to_dict()
    assert set(d["curves"]) == {"within", "cross", "aggregation"} and len(d["curves"]["cross"]["effect"]) == len(d["layers"])
    assert set(d["headline"]["checks"]) == {"cross_lower_at_least_2x_control", "cross_upper_near_0", "aggregation_peak_in_upper_half",
                                            "cross_lower_at_least_2x_matched_control"}
    assert len(d["curves"]["aggregation"]["matched"]) == len(d["layers"])
    json.dumps(d)
    monkeypatch.setattr(icl_run, "prompt_curves", lambda *a: pytest.fail("a finished prompt was run again"))
    again = fewshot_knockout(tiny_gpt2, cfg, checkpoint=tmp_path / "run")
    assert again.curves == res.curves
    # The same settings over an edited task file are other prompts: nothing is resumed.
    f.write_text("".join(json.dumps({"x": x, "y": y}) + "\n" for x, y in [("k", "l"), ("m", "n"), ("o", "p"), ("q", "r")]))
    with pytest.raises(pytest.fail.Exception, match="run again"):
        fewshot_knockout(tiny_gpt2, cfg, checkpoint=tmp_path / "run")


def test_prompts_longer_than_the_context_are_one_sentence(tiny_gpt2, tmp_path):
    f = tmp_path / "long.jsonl"
    word = " word" * (tiny_gpt2.summary.n_ctx // 2)
    f.write_text("".join(json.dumps({"x": f"{x}{word}", "y": y}) + "\n" for x, y in [("a", "b"), ("c", "d"), ("e", "f")]))
    with pytest.raises(MechscopeError, match="more than the model's context"):
        fewshot_knockout(tiny_gpt2, FewShotConfig(task=str(f), shots=2, n=2, knockout=False))


def test_cli_errors_before_loading_a_model(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    for args, needle in [(["--task", "nope"], "Unknown task"), (["--shots", "0"], "at least 1"),
                         (["--task", str(bad)], "not valid JSON"), (["--task", "antonyms", "--ambiguous"], "capital"),
                         (["--sweeps", "x"], "Unknown or no sweep")]:
        r = CliRunner().invoke(app, ["icl", *args, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, (args, r.output)
    assert not (tmp_path / "o").exists()


def _first_prompt_right(monkeypatch):
    monkeypatch.setattr(icl_run, "fewshot_accuracy", lambda m, p, r: (torch.full((len(p),), 0.5), torch.arange(len(p)) == 0))


def test_cli_icl_json_and_report(tiny_gpt2_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    r = CliRunner().invoke(app, ["icl", "--task", "antonyms", "--shots", "2", "--n", "4", "--model", tiny_gpt2_dir,
                                 "--out", str(out)])
    assert r.exit_code == 2 and "above chance" in r.output and not (out / "icl.json").exists()
    r = CliRunner().invoke(app, ["icl", "--task", "antonyms", "--shots", "2", "--n", "4", "--model", tiny_gpt2_dir,
                                 "--out", str(tmp_path / "acc"), "--accuracy-only", "--json"])
    assert r.exit_code == 0, r.output
    acc = json.loads(r.stdout)
    assert acc["curves"] == {} and acc["well_above_chance"] is False and acc["n_prompts"] == 4
    _first_prompt_right(monkeypatch)
    r = CliRunner().invoke(app, ["icl", "--task", "antonyms", "--shots", "2", "--n", "4", "--force", "--max-knockout", "1",
                                 "--model", tiny_gpt2_dir, "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["kind"] == "icl-fewshot" and (out / "report.html").is_file() and (out / "icl.json").is_file()
    assert sum(p["knocked_out"] for p in d["prompts"]) == 1 and len(d["curves"]["within"]["n_edges"]) == 1


def test_task_files_with_a_bom_are_read_and_other_encodings_refused(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"x": x, "y": y}) + "\n" for x, y in [("a", "b"), ("c", "d")]).encode())
    assert load_task(str(f)).pairs == [("a", "b"), ("c", "d")]
    f.write_bytes('{"x": "caf\xe9", "y": "b"}\n{"x": "c", "y": "d"}\n'.encode("latin-1"))
    with pytest.raises(MechscopeError, match="not UTF-8"):
        load_task(str(f))


def test_answers_sharing_their_first_token_are_refused(tiny_gpt2, tmp_path):
    f = tmp_path / "same.jsonl"
    first = tiny_gpt2.tokenizer.decode([tiny_gpt2.tokenizer(" a")["input_ids"][0]]).strip()
    f.write_text("".join(json.dumps({"x": x, "y": first + y}) + "\n" for x, y in [("k", "bc"), ("m", "de"), ("o", "fg")]))
    prompts_share = len({tiny_gpt2.tokenizer(" " + first + y)["input_ids"][0] for y in ("bc", "de", "fg")}) == 1
    assert prompts_share  # the test's premise: one first token for every answer
    with pytest.raises(MechscopeError, match="starts with the same token"):
        fewshot_knockout(tiny_gpt2, FewShotConfig(task=str(f), shots=2, n=2))
    with pytest.raises(MechscopeError, match="starts with the same token"):  # --accuracy-only would score every prompt right
        fewshot_knockout(tiny_gpt2, FewShotConfig(task=str(f), shots=2, n=2, knockout=False))
    forced = FewShotConfig(task=str(f), shots=2, n=2, knockout=False, force=True)
    assert fewshot_knockout(tiny_gpt2, forced).to_dict()["chance"] == 1.0
