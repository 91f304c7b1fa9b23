"""Generated bad input for the CLI (hypothesis): each case is one sentence on stderr, exit
code 2, no traceback, and no output folder left half-written.

The commands run in process (``typer.testing.CliRunner`` on the real app), so hundreds of
cases fit in a few seconds; the models they need are the tiny ones from conftest. Strategies:
numeric flags out of range, unknown names (tasks, methods, ablations, hooks), malformed JSONL
task files, run folders whose JSON is corrupt or of another kind, and SAE folders with broken
config or weights.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mechscope.cli.main import app

RUNNER = CliRunner()
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
COUNT = {"cases": 0}


def check(args: list[str], out: Path | None = None) -> None:
    res = RUNNER.invoke(app, args)
    COUNT["cases"] += 1
    err = res.stderr if hasattr(res, "stderr") else res.output
    assert res.exit_code == 2, (args, res.exit_code, res.output, err, res.exception)
    assert "Traceback" not in err, (args, err)
    assert res.exception is None or isinstance(res.exception, SystemExit), (args, repr(res.exception))
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), (args, err)
    assert len([ln for ln in lines if ln.startswith("error: ")]) == 1, (args, err)
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), (args, sorted(p.name for p in out.iterdir()))


words = st.text(alphabet=string.ascii_letters + string.digits + "-_.", min_size=1, max_size=20)


@SETTINGS
@given(n=st.integers(max_value=3), edges=st.integers(max_value=0), steps=st.integers(max_value=0),
       which=st.sampled_from(["n", "edges", "ig", "folds", "seeds"]), seeds=st.integers(min_value=51, max_value=10**6))
@pytest.mark.slow
def test_discover_numeric_flags(n, edges, steps, which, seeds, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "run"
    flag = {"n": ["--n", str(n)], "edges": ["--edges", str(edges)], "ig": ["--ig-steps", str(steps)],
            "folds": ["--folds", str(steps)], "seeds": ["--seeds", str(seeds)]}[which]
    model = [] if which in ("n", "folds", "seeds") else ["--model", _TINY["gpt2"]]
    check(["discover", "--task", "ioi", *model, *flag, "--out", str(out)], out)


@SETTINGS
@given(name=words, kind=st.sampled_from(["task", "method", "ablation", "level", "rank", "qk", "metric"]))
def test_discover_unknown_names(name, kind):
    valid = {"task": {"ioi", "greater-than", "induction", "facts", "docstring"},
             "method": {"eap", "eap-ig", "eap-ig-act", "acdc"}, "ablation": {"patching", "mean", "zero"},
             "level": {"edge", "node"}, "rank": {"auto", "signed", "abs"}, "qk": {"exact", "linear"},
             "metric": {"kl", "task"}}[kind]
    if name in valid or (kind == "task" and name.endswith(".jsonl")):
        return
    check(["discover", f"--{kind}", name])


jsonl_line = st.one_of(
    st.text(max_size=40),  # not JSON
    st.builds(json.dumps, st.lists(st.integers(), max_size=3)),  # JSON, not an object
    st.builds(json.dumps, st.fixed_dictionaries({"clean": st.text(max_size=10)})),  # keys missing
    st.builds(json.dumps, st.fixed_dictionaries({"clean": st.integers(), "corrupt": st.none(),
                                                 "answer": st.booleans(), "wrong": st.integers()})),  # wrong types
    st.builds(json.dumps, st.fixed_dictionaries({"clean": st.just("When Mary and John went"),
                                                 "corrupt": st.just("When Mary and John went to the store"),
                                                 "answer": st.just(" Mary"), "wrong": st.just(" John")})),  # lengths differ
)


@pytest.mark.slow
@SETTINGS
@given(lines=st.lists(jsonl_line, min_size=1, max_size=4))
def test_malformed_task_files(lines, tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    f = d / "pairs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    out = d / "run"
    check(["discover", "--task", str(f), "--model", _TINY["gpt2"], "--n", "4", "--out", str(out)], out)


@SETTINGS
@given(content=st.one_of(st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
                         st.builds(json.dumps, st.dictionaries(words, st.integers(), max_size=3)),
                         st.builds(lambda v: json.dumps({"schema_version": v}), st.integers(min_value=2))),
       command=st.sampled_from(["evaluate", "dynamics", "sae-eval"]))
def test_corrupt_run_folders(content, command, tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    name = {"evaluate": "circuit.json", "dynamics": "dynamics.json", "sae-eval": "cfg.json"}[command]
    (d / name).write_text(content)
    args = {"evaluate": ["evaluate", str(d)], "dynamics": ["dynamics", str(d)], "sae-eval": ["sae", "eval", str(d)]}[command]
    check(args)


@pytest.mark.slow
@SETTINGS
@given(hook=words)
def test_unknown_hook_names(hook):
    check(["hooks", "--model", _TINY["llama"], "--check", f"blocks.{hook}"])


@SETTINGS
@given(shape=st.lists(st.integers(min_value=0, max_value=9), min_size=1, max_size=4),
       k=st.integers(min_value=-2, max_value=40), concept=words, which=st.sampled_from(["array", "k", "concept", "config"]))
def test_vision_bad_concepts_sizes_and_folders(shape, k, concept, which, tmp_path_factory):
    d = tmp_path_factory.mktemp("vision")
    out = d / "run"
    args = ["vision", "circuit", "--model", _TINY["vision"], "--out", str(out)]
    if which == "array":
        if len(shape) >= 2 and shape[-2:] == [8, 8] and all(shape):
            return  # a valid image array
        import numpy as np

        np.save(d / "c.npy", np.zeros(shape, dtype=np.float32))
        check([*args, "--concept", str(d / "c.npy"), "--k", "2"], out)
    elif which == "k":
        if 1 <= k <= 4:
            return
        check([*args, "--concept", "dot", "--k", str(k)], out)
    elif which == "concept":
        if concept in ("hbar", "vbar", "box", "dot", "diag") or (concept.isdigit() and int(concept) < 5):
            return
        check([*args, "--concept", concept, "--k", "2"], out)
    else:
        bad = d / "model"
        bad.mkdir()
        (bad / "model.safetensors").write_bytes(concept.encode())
        (bad / "config.json").write_text(json.dumps({"kind": "mechscope-vision-model", "train": {"arch": concept}}))
        check(["vision", "circuit", "--model", str(bad), "--concept", "dot", "--k", "2", "--out", str(out)], out)


@given(shots=st.integers(max_value=0), n=st.integers(max_value=1), task=words, which=st.sampled_from(["shots", "n", "task", "sweeps"]))
def test_icl_bad_values(shots, n, task, which, tmp_path_factory):
    if which == "task" and task in {"capital", "language", "continent", "currency", "city_country", "landmark_city",
                                    "company_country", "birth_country", "sport", "antonyms", "uppercase"}:
        return
    if which == "sweeps" and task in {"within", "cross", "aggregation"}:
        return
    out = tmp_path_factory.mktemp("icl") / "run"
    flag = {"shots": ["--shots", str(shots)], "n": ["--n", str(n)], "task": ["--task", task], "sweeps": ["--sweeps", task]}[which]
    check(["icl", *flag, "--model", _TINY["gpt2"], "--out", str(out)], out)


@SETTINGS
@given(lines=st.lists(jsonl_line, min_size=1, max_size=4))
def test_icl_malformed_task_files(lines, tmp_path_factory):
    d = tmp_path_factory.mktemp("icltask")
    f = d / "pairs.jsonl"
    f.write_text("\n".join(lines) + "\n")
    out = d / "run"
    check(["icl", "--task", str(f), "--model", _TINY["gpt2"], "--out", str(out)], out)


@SETTINGS
@given(lines=st.integers(min_value=-3, max_value=40), hops=st.integers(min_value=-3, max_value=40),
       content=st.one_of(st.text(max_size=30), st.builds(json.dumps, st.dictionaries(words, st.integers(), max_size=3)),
                         st.builds(lambda n: json.dumps({"setting": "binding", "data": {"lines": n, "hops": n + 1}}),
                                   st.integers(min_value=1, max_value=30))))
@pytest.mark.slow
def test_binding_settings_and_folders(lines, hops, content, tmp_path_factory):
    if 1 <= hops <= lines <= 26:
        hops = lines + 1  # the strategy is for settings with no solution
    out = tmp_path_factory.mktemp("binding") / "run"
    check(["train-toy", "--setting", "binding", "--lines", str(lines), "--hops", str(hops), "--out", str(out)], out)
    d = tmp_path_factory.mktemp("ckpt")
    (d / "binding.json").write_text(content)
    check(["interchange", "--model", str(d), "--out", str(d / "ic")], d / "ic")


_TINY: dict[str, str] = {}


@pytest.fixture(scope="module")
def tiny_vision_dir(tmp_path_factory):
    from mechscope.vision.config import DataConfig, TrainConfig
    from mechscope.vision.models import VisionModel, build_model

    cfg = TrainConfig(arch="cnn", width=8, data=DataConfig(dataset="shapes", size=8, per_class=10))
    d = tmp_path_factory.mktemp("vision-model") / "m"
    VisionModel(build_model(cfg, cfg.data.n_classes), cfg, cfg.data.class_names(), {}).save(d)
    return str(d)


@pytest.fixture(autouse=True, scope="module")
def _tiny_paths(tiny_gpt2_dir, tiny_llama_dir, tiny_vision_dir, request):
    _TINY.update(gpt2=tiny_gpt2_dir, llama=tiny_llama_dir, vision=tiny_vision_dir)
    yield
    mine = [it for it in request.session.items if it.module is request.module]
    strategies = [name for name in globals() if name.startswith("test_")]
    if len(mine) == len(strategies):  # the whole module ran (not a -k selection): 50 examples per strategy
        assert COUNT["cases"] >= 40 * len(strategies), COUNT


@SETTINGS
@given(flag=st.sampled_from(["--tasks", "--labels", "--classes", "--context", "--steps", "--batch"]),
       value=st.integers(max_value=0), optimizer=st.one_of(st.none(), words.filter(lambda w: w not in ("adam", "sgd"))))
def test_icml_training_flags(flag, value, optimizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("icml") / "run"
    args = ["train-toy", "--setting", "icml", flag, str(value), "--out", str(out)]
    check(args + (["--optimizer", optimizer] if optimizer else []), out)


@SETTINGS
@given(settings_=st.one_of(st.dictionaries(words, st.integers(), max_size=3), st.builds(lambda k, v: {k: v}, words, st.integers())),
       checkpoints=st.one_of(st.just([]), st.lists(st.dictionaries(words, st.integers(), max_size=2), max_size=2)))
def test_corrupt_icml_runs(settings_, checkpoints, tmp_path_factory):
    d = tmp_path_factory.mktemp("icmlrun")
    (d / "train.json").write_text(json.dumps({"settings": {**settings_, "setting": "icml"}, "checkpoints": checkpoints}))
    check(["dynamics", str(d)])


bad_prompt_line = st.one_of(
    st.text(alphabet=string.ascii_letters + "{[", min_size=1, max_size=20),  # not JSON
    st.builds(lambda w: json.dumps({"prompt": w}), words),  # no lang
    st.builds(lambda w: json.dumps({"lang": "de", "text": w}), words),  # no prompt
    st.builds(lambda s: json.dumps({"prompt": s, "lang": "de"}), st.text(alphabet=" \t", max_size=4)),  # empty prompt
    st.builds(lambda w: json.dumps({"prompt": "Wie geht es dir?", "lang": "en" if w == "de" else w + "0"}), words),  # bad code
)


@SETTINGS
@given(lines=st.lists(bad_prompt_line, min_size=1, max_size=3), which=st.sampled_from(["file", "langs", "n_tokens", "top_n"]),
       code=words, n=st.integers(min_value=-10, max_value=10**6))
@pytest.mark.slow
def test_confusion_bad_prompts_and_values(lines, which, code, n, tmp_path_factory):
    d = tmp_path_factory.mktemp("confusion")
    out = d / "run"
    if which == "file":
        f = d / "prompts.jsonl"
        f.write_text("\n".join(lines) + "\n")
        args = ["--prompts", str(f)]
    elif which == "langs":
        args = ["--langs", "en" if code.lower() in ("de", "es", "fr", "it") else code + "0"]
    elif which == "n_tokens":
        args = ["--n-tokens", str(n if not 4 <= n <= 512 else 513)]
    else:  # the tiny Llama has 3 layers x 128 neurons
        f = d / "prompts.jsonl"
        f.write_text(json.dumps({"prompt": "Hallo", "lang": "de"}) + "\n")
        args = ["--prompts", str(f), "--top-n", str(max(n, 385)), "--model", _TINY["llama"]]
    check(["confusion", *args, "--out", str(out)], out)
