"""Variable binding: program generator (labels checked by an independent resolver), training
with exact resume, per-checkpoint evaluation, interchange on a checkpoint, CLI and pages."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.icl import binding_data as bd
from mechscope.icl.binding_config import BindingConfig, BindingDataConfig, BindingEvalConfig, BindingInterchangeConfig
from mechscope.progress import Recorder


def resolve(text: str) -> tuple[str, int, str]:
    """Run the program text: (value of the queried variable, references followed, first line's constant)."""
    words = text.split()
    assert words[0] == "<bos>" and words[-2] == "?"
    body = words[1:-2]
    assert len(body) % 4 == 0
    env: dict[str, tuple[str, int]] = {}
    first = None
    for i in range(0, len(body), 4):
        lhs, eq, rhs, sep = body[i : i + 4]
        assert eq == "=" and sep == ";" and lhs.isalpha() and lhs not in env  # assigned once
        if rhs.isdigit():
            env[lhs] = (rhs, 1)
        else:
            assert rhs in env  # read only after its assignment
            env[lhs] = (env[rhs][0], env[rhs][1] + 1)
        first = first or rhs
    value, depth = env[words[-1]]
    return value, depth, first


def test_labels_follow_the_rule():
    cfg = BindingDataConfig(lines=8, hops=4, n_vars=12)
    progs = bd.sample(cfg, 400, random.Random(3))
    for p in progs:
        value, depth, first = resolve(p.text())
        assert (p.answer, p.depth, p.heuristic) == (value, depth, first)
        assert len(p.lines) == 8 and len(p.words()) == bd.seq_len(cfg)
        chain = p.chain_lines()
        assert len(chain) == p.depth and p.lines[chain[-1]][0] == p.query
    assert {p.depth for p in progs} == {1, 2, 3, 4}
    # distractors: other chains hold constants too, and the first line is not always the query's chain
    assert 0.1 < sum(p.heuristic == p.answer for p in progs) / len(progs) < 0.9
    assert bd.sample(cfg, 5, random.Random(7))[4].text() == bd.sample(cfg, 5, random.Random(7))[4].text()


def test_counterfactual_differs_in_one_token_and_changes_the_answer():
    cfg = BindingDataConfig(lines=6, hops=3)
    for p in bd.sample(cfg, 50, random.Random(1), depth=3):
        other = "7" if p.answer != "7" else "2"
        q = bd.with_root(cfg, p, other)
        diff = [i for i, (a, b) in enumerate(zip(p.words(), q.words())) if a != b]
        assert diff == [bd.rhs_position(p.chain_lines()[0])]
        assert resolve(q.text())[0] == other == q.answer


def test_encoding_matches_the_tokenizer():
    cfg = BindingDataConfig(lines=4, hops=2, n_vars=6, n_consts=5)
    progs = bd.sample(cfg, 6, random.Random(0))
    toks, ans = bd.encode(cfg, progs)
    tok = bd.make_tokenizer(cfg)
    assert toks.shape == (6, bd.seq_len(cfg))
    for row, a, p in zip(toks.tolist(), ans.tolist(), progs):
        assert tok(p.text())["input_ids"] == row
        assert tok.decode([a]) == p.answer


@pytest.mark.parametrize("kw, msg", [({"hops": 0}, "--hops"), ({"lines": 3, "hops": 4}, "--hops"),
                                     ({"lines": 30}, "--lines"), ({"n_consts": 1}, "constants")])
def test_bad_data_settings(kw, msg):
    with pytest.raises(MechscopeError, match=msg):
        BindingDataConfig(**kw)


def tiny(steps: int = 10) -> BindingConfig:
    return BindingConfig(layers=2, heads=2, d_model=16, steps=steps, batch=8, warmup=2, n_checkpoints=3,
                         linear_checkpoints=2, n_eval=8, data=BindingDataConfig(lines=3, hops=2, n_vars=4, n_consts=4))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from mechscope.icl.binding_train import train_binding

    out = tmp_path_factory.mktemp("binding_run")
    train_binding(tiny(), out)
    return out


def test_resume_gives_the_same_model(tmp_path):
    from safetensors.torch import load_file

    from mechscope.icl.binding_train import train_binding

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    train_binding(tiny(), whole)

    def crash():  # interrupted after step 8, before its checkpoint
        return Recorder(interrupt_at={"training": 8})

    with pytest.raises(KeyboardInterrupt):
        train_binding(tiny(), broken, progress=crash())
    assert (broken / "last" / "state.safetensors").is_file() and not (broken / "ckpt_000010").exists()
    train_binding(tiny(), broken)
    a = load_file(str(whole / "ckpt_000010" / "model.safetensors"))
    b = load_file(str(broken / "ckpt_000010" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((whole / "train.json").read_text())["train_loss"] == json.loads((broken / "train.json").read_text())["train_loss"]
    secs = [c["seconds"] for c in json.loads((broken / "train.json").read_text())["checkpoints"]]
    assert secs == sorted(secs)  # training time adds up across the two sessions
    with pytest.raises(MechscopeError, match="made with steps=10, not 11; pass a new --out"):
        train_binding(tiny(11), broken)


def test_checkpoints_evaluate_by_depth(tiny_run):
    from mechscope.icl.binding_eval import BindingDynamicsResult, binding_dynamics, evaluate, is_binding_run
    from mechscope.models import load_model

    assert is_binding_run(tiny_run)
    res = binding_dynamics(tiny_run, BindingEvalConfig(n_per_hop=20))
    log = json.loads((tiny_run / "train.json").read_text())
    assert [r["step"] for r in res.rows] == [c["step"] for c in log["checkpoints"]]
    for r in res.rows:
        assert set(r["accuracy_by_depth"]) == {"1", "2"} and 0 <= r["heuristic_agreement"] <= 1
    # the accuracy is the model's, recomputed here by hand for the last checkpoint
    m = load_model(str(tiny_run / res.rows[-1]["dir"]), device="cpu")
    data = BindingDataConfig(**res.settings["data"])
    progs = bd.BindingData(data).held_out(20, 20_000, 2)
    toks, ans = bd.encode(data, progs)
    with torch.no_grad():
        pred = m(toks)[:, -1].argmax(-1)
    assert res.rows[-1]["accuracy_by_depth"]["2"] == pytest.approx(float((pred == ans).float().mean()))
    heur = torch.tensor([bd.token_id(data, p.heuristic) for p in progs])
    e = evaluate(m, data, {2: progs})
    assert e["heuristic_agreement"] == pytest.approx(float((pred == heur).float().mean()))
    res.save(tiny_run / "dyn")
    assert BindingDynamicsResult.load(tiny_run / "dyn").rows == json.loads(json.dumps(res.rows))


def test_interchange_on_a_checkpoint(tiny_run):
    from mechscope.icl.binding_eval import binding_interchange, data_config, pairs
    from mechscope.models import load_model

    ck = tiny_run / "ckpt_000010"
    data = data_config(ck)
    m = load_model(str(ck), device="cpu")
    cfg = BindingInterchangeConfig(n=30, correct_only=False)
    res = binding_interchange(m, data, cfg)
    g = res.grid
    acc = torch.tensor(g["accuracy"])
    assert acc.shape == (m.summary.n_layers + 1, bd.seq_len(data))
    # patching the embedding where base and counterfactual differ is running the counterfactual
    base, cf = pairs(data, cfg)
    ct, ca = bd.encode(data, cf)
    with torch.no_grad():
        cf_hit = float((m(ct)[:, -1].argmax(-1) == ca).float().mean())
    root = res.chain[0]
    assert acc[0, root] == pytest.approx(cf_hit) and acc[-1, -1] == pytest.approx(cf_hit)
    assert res.roles[root].startswith(f"line {base[0].chain_lines()[0]} rhs")
    assert res.summary["chain"][0]["position"] == root and len(res.summary["trace"]) == m.summary.n_layers + 1
    heads = binding_interchange(m, data, BindingInterchangeConfig(n=10, correct_only=False, site="head", head=1))
    assert len(heads.grid["sites"]) == m.summary.n_layers


def test_cli_train_dynamics_interchange_and_bad_input(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mechscope.cli.main import app
    from mechscope.progress import QUIET_ENV

    monkeypatch.setenv(QUIET_ENV, "0")  # bars on, whatever the environment says

    run = tmp_path / "run"
    r = CliRunner().invoke(app, ["train-toy", "--setting", "binding", "--lines", "3", "--hops", "2", "--layers", "1",
                                 "--d-model", "16", "--heads", "2", "--steps", "4", "--batch", "4", "--checkpoints", "2",
                                 "--linear-checkpoints", "0", "--out", str(run), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["settings"]["setting"] == "binding" and s["settings"]["layers"] == 1 and s["settings"]["data"]["lines"] == 3
    r = CliRunner().invoke(app, ["dynamics", str(run), "--n", "5", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["setting"] == "binding" and set(d["final"]["accuracy_by_depth"]) == {"1", "2"}
    assert (run / "binding_dynamics.html").is_file() and (run / "binding_dynamics.svg").is_file()
    r = CliRunner().invoke(app, ["interchange", "--model", str(run / "ckpt_000004"), "--n", "6", "--all-pairs",
                                 "--out", str(tmp_path / "ic"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["pairs_used"] == 6 and (tmp_path / "ic" / "interchange.html").is_file()
    for args, msg in (
        (["train-toy", "--lines", "3", "--out", str(tmp_path / "x")], "--setting binding"),
        (["train-toy", "--setting", "binding", "--lines", "3", "--hops", "5", "--out", str(tmp_path / "x")], "--hops"),
        (["train-toy", "--setting", "binding", "--vocab", "9", "--out", str(tmp_path / "x")], "--vocab"),
        (["train-toy", "--setting", "nope", "--out", str(tmp_path / "x")], "--setting"),
        (["interchange", "--model", str(tmp_path)], "not a binding checkpoint"),
        (["interchange", "--model", str(run / "ckpt_000004"), "--depth", "3"], "--depth"),
        (["interchange", "--model", str(run / "ckpt_000004"), "--site", "mlp"], "--site"),
        (["dynamics", str(run), "--seq-len", "12"], "--seq-len does not apply to a --setting binding run; drop it."),
        (["dynamics", str(run), "--seq-len", "12", "--text", "pydoc"], "--seq-len and --text do not apply"),
        (["interchange", "--model", str(run / "ckpt_000004"), "--out", str(tmp_path / "run" / "train.json")], "is a file"),
    ):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["interchange", "--model", str(run / "ckpt_000004"), "--site", "head", "--head", "7"])
    assert r.exit_code == 2 and "--head between 0 and 1" in r.output and "patching every" not in r.output, r.output
    r = CliRunner().invoke(app, ["--quiet", "interchange", "--model", str(run / "ckpt_000004"), "--n", "4", "--all-pairs",
                                 "--out", str(tmp_path / "ic2")])
    assert r.exit_code == 0 and "patching every" not in r.output, r.output


def test_pages_escape_strings():
    from mechscope.report.binding import render_binding_dynamics, render_binding_interchange

    hostile = "<script>alert('x')</script>"
    row = {"step": 1, "dir": "c", "accuracy_by_depth": {"1": 0.5}, "heuristic_agreement": 0.2,
           "heuristic_agreement_discordant": 0.1}
    html = render_binding_dynamics({"run": hostile, "phases": {"chance": 0.1}, "checkpoints": [row], "train_loss": [[1, 2.0]]})
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    d = {"model": hostile, "settings": {"site": "resid", "depth": 1},
         "interchange": {"sites": [hostile], "positions": [0, 1], "accuracy": [[1.0, 0.0]], "n": 1, "answer_pos": -1,
                         "base_accuracy": 0.0},
         "roles": ["bos", hostile], "chain_positions": [1], "example": ["<bos>", hostile],
         "summary": {"pairs": 1, "pairs_used": 1, "min_chain_accuracy": 0.0, "trace_moves_forward": True,
                     "chain": [{"position": 1, "role": hostile, "best_site": hostile, "accuracy": 0.0}],
                     "trace": [{"site": hostile, "position": 1, "role": hostile, "accuracy": 0.0}]}}
    html = render_binding_interchange(d)
    assert "<script>alert" not in html and "<bos>" not in html.split("<main>")[1]
