"""Sweep 28 of bad CLI input: --layers ignored beside a full probe hook, ActAdd prompts longer
than the prompt or the context named --context-len, confusion messages that named internal
fields, a false "this run replaces it" note before a refusal, and an empty recall subject."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechscope.cli.common import check_out_folder
from mechscope.cli.main import app
from mechscope.confusion.config import ConfusionConfig
from mechscope.errors import MechscopeError

RUN = CliRunner().invoke


def _refused(r, needle: str) -> str:
    err = " ".join(r.stderr.split())
    assert r.exit_code == 2 and needle in err and "Traceback" not in r.output, r.output
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one sentence, one line, nothing before it
    return err


def _labels(path: Path) -> Path:
    words = ["Mary", "John", "store", "drink", "park", "ball", "went", "gave"]
    lines = [{"words": [words[(i + j) % 8] for j in range(6)], "labels": ["cap" if words[(i + j) % 8][0].isupper() else "low"
                                                                         for j in range(6)]} for i in range(24)]
    path.write_text("\n".join(json.dumps(d) for d in lines) + "\n")
    return path


# 1. probe: --layers beside one full hook name was ignored (layer 0 probed, exit 0)

def test_probe_refuses_layers_with_a_full_hook_name(tiny_gpt2, tiny_gpt2_dir, tmp_path):
    from mechscope.probes.run import layer_hooks

    r = RUN(app, ["probe", "--labels", str(_labels(tmp_path / "lab.jsonl")), "--hook", "blocks.0.hook_resid_post",
                  "--layers", "1", "--model", tiny_gpt2_dir, "--out", str(tmp_path / "p")])
    err = _refused(r, "--layers does not apply to the full hook name 'blocks.0.hook_resid_post'")
    assert "a site (e.g. resid_post) or a template with {L} (e.g. blocks.{L}.hook_resid_post)" in err
    assert not (tmp_path / "p").exists()
    assert layer_hooks(tiny_gpt2, "blocks.0.hook_resid_post", None) == [(0, "blocks.0.hook_resid_post")]
    assert layer_hooks(tiny_gpt2, "blocks.{L}.hook_mlp_out", [1]) == [(1, "blocks.1.hook_mlp_out")]
    assert layer_hooks(tiny_gpt2, "resid_pre", [0]) == [(0, "blocks.0.hook_resid_pre")]
    with pytest.raises(MechscopeError, match=r"template with \{L\} \(e\.g\. blocks\.\{L\}\.hook_mlp_out\)"):
        layer_hooks(tiny_gpt2, "blocks.1.hook_mlp_out", [0, 1])


# 2. steer: a long --plus/--minus named --context-len (no such option); one longer than the
#    prompt spilled onto the generated tokens without a word

def test_actadd_longer_than_the_context_names_plus_or_minus(tiny_gpt2, tiny_gpt2_dir):
    from mechscope.sae.steer import actadd_vector

    long = "Mary and John " * 40  # 120 tokens; the tiny GPT-2 reads 64
    r = RUN(app, ["steer", "The store", "--plus", long, "--minus", "John", "--layer", "1", "-n", "2", "--model", tiny_gpt2_dir])
    err = _refused(r, "shorten --plus")
    assert "--context-len" not in err
    r = RUN(app, ["steer", "The store", "--plus", "John", "--minus", long, "--layer", "1", "-n", "2", "--model", tiny_gpt2_dir])
    assert "--context-len" not in _refused(r, "shorten --minus")
    with pytest.raises(MechscopeError, match=r"^--plus is \d+ tokens long, more than .* \(64 positions\); shorten --plus\.$"):
        actadd_vector(tiny_gpt2, long, "John", "blocks.1.hook_resid_pre")


def test_actadd_longer_than_the_prompt_is_refused(tiny_gpt2, tiny_gpt2_dir, tmp_path):
    from mechscope.sae.steer import steer_actadd

    r = RUN(app, ["steer", "The store", "--plus", "Mary and John went to the park and the store", "--minus", "x",
                  "--layer", "1", "-n", "2", "--model", tiny_gpt2_dir, "--out", str(tmp_path / "s")])
    n_prompt = len(tiny_gpt2.to_tokens("The store"))
    _refused(r, f"but the prompt is only {n_prompt}, and ActAdd adds the steering vector to the prompt's first positions; "
                f"shorten --plus to at most {n_prompt} tokens or give a longer prompt.")
    assert not (tmp_path / "s").exists()
    fits = steer_actadd(tiny_gpt2, "When Mary and John went to the store,", "Love", "Hate", layer=1)  # still runs
    assert fits.settings["n_positions"] <= len(tiny_gpt2.to_tokens("When Mary and John went to the store,"))


# 3. confusion: messages named internal fields (n_tokens, top_n and per_prompt, ...)

@pytest.mark.parametrize(("args", "needle"), [
    (["--n-tokens", "0"], "--n-tokens must be between 4 and 512 (got 0)"),
    (["--top-n", "0"], "--top-n must be at least 1 (got 0)"),
    (["--max-per-lang", "-1"], "--max-per-lang must be 0 or more (got -1)"),
    (["--last-layers", "-1"], "--last-layers must be 0 or more (got -1)"),
    (["--ioi-n", "-1"], "--ioi-n must be 0 or more (got -1)"),
    (["--facts-n", "-1"], "--facts-n must be 0 or more (got -1)"),
    (["--ppl-contexts", "-2"], "--ppl-contexts must be 0 or more (got -2)"),
])
def test_confusion_messages_name_the_option(tmp_path, args, needle):
    err = _refused(RUN(app, ["confusion", *args, "--model", str(tmp_path / "no-model")]), needle)
    assert "per_prompt" not in err and "_" not in err.split("(got")[0]


def test_confusion_fields_without_an_option_are_named_alone():
    with pytest.raises(MechscopeError, match=r"^per_prompt must be at least 1 \(got 0\)"):
        ConfusionConfig(per_prompt=0)
    with pytest.raises(MechscopeError, match=r"^ppl_len must be at least 8 \(got 4\)\.$"):
        ConfusionConfig(ppl_len=4)
    with pytest.raises(MechscopeError, match=r"^--top-n must be at least 1"):
        ConfusionConfig(top_n=0, per_prompt=0)  # one value per sentence


# 4. a refused run printed "note: --out ... holds an earlier result ... this run replaces it."
#    and then kept that result

def _steer(model_dir: str, out: Path, *extra: str):
    return RUN(app, ["steer", "The store is", "--plus", "Love", "--minus", "Hate", "--layer", "1", "-n", "2",
                     "--model", model_dir, "--out", str(out), *extra])


def test_replace_note_only_when_the_run_writes(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "s"
    first = _steer(tiny_gpt2_dir, out)
    assert first.exit_code == 0 and "earlier result" not in first.stderr, first.output
    before = (out / "steer.json").read_bytes()
    refused = _steer(tiny_gpt2_dir, out, "--coef", "1e39")  # refused before anything is written
    _refused(refused, "--coef")
    assert "note" not in refused.stderr and (out / "steer.json").read_bytes() == before
    refused = RUN(app, ["steer", "The store is", "--plus", "Love", "--minus", "Hate", "--layer", "9", "-n", "2",
                        "--model", tiny_gpt2_dir, "--out", str(out)])  # refused after the model loaded
    _refused(refused, "out of range")
    assert "note" not in refused.stderr
    again = _steer(tiny_gpt2_dir, out)
    err = " ".join(again.stderr.split())
    assert again.exit_code == 0 and err.count("earlier result") == 1, again.output
    assert f"note: --out {out} held an earlier result, steering results (of " in err and "this run replaced it." in err


def test_refused_recall_keeps_the_earlier_result_without_a_note(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "recall.json").write_text(json.dumps({"schema_version": 1, "model": {"name": "gpt2"}}))
    r = RUN(app, ["recall", "", "--subject", "x", "--model", tiny_gpt2_dir, "--out", str(out)])
    _refused(r, "The prompt is empty")
    assert "note" not in r.stderr and json.loads((out / "recall.json").read_text())["model"] == {"name": "gpt2"}


def test_check_out_folder_outside_a_command_notes_at_once(tmp_path, capsys):
    (tmp_path / "probe.json").write_text("{}")
    check_out_folder(tmp_path, "probe")
    assert "holds an earlier result, probe results; this run replaces it." in " ".join(capsys.readouterr().err.split())


# 5. recall: an empty --subject was "the subject '' does not occur in the prompt"

@pytest.mark.parametrize("subject", ["", "   "])
def test_recall_empty_subject(tiny_gpt2, tiny_gpt2_dir, subject):
    from mechscope.recall import recall

    r = RUN(app, ["recall", "The Eiffel Tower is in", "--subject", subject, "--model", tiny_gpt2_dir])
    err = _refused(r, "--subject is empty")
    assert "does not occur" not in err and "give the subject's words" in err
    with pytest.raises(MechscopeError, match="--subject is empty"):
        recall(tiny_gpt2, "The Eiffel Tower is in", subject)
