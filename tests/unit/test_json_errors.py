"""A refused ``--json`` run prints its reason on stdout as one JSON object (``{"error", "exit_code"}``),
so that a script parsing stdout learns why instead of failing to decode an empty string; stderr and
the exit code stay as they were."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from mechscope.cli.common import _JSON_ERRORS, fail, handles_errors
from mechscope.cli.main import app
from mechscope.errors import MechscopeError

RUN = CliRunner().invoke


def _sentence(stderr: str) -> str:
    """The ``error: ...`` sentence on stderr, without its prefix."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0].removeprefix("error: ")


def _refused_both_ways(args: list[str]) -> dict:
    """Run ``args`` with and without ``--json``: both exit 2 with the same stderr; stdout is empty
    without it and one JSON object with it. The object."""
    plain, with_json = RUN(app, args), RUN(app, [*args, "--json"])
    assert plain.exit_code == 2 and with_json.exit_code == 2, (plain.output, with_json.output)
    assert plain.stdout == "" and with_json.stderr == plain.stderr, (plain.stdout, with_json.stderr)
    assert with_json.stdout.endswith("\n") and with_json.stdout.count("\n") == 1, with_json.stdout
    doc = json.loads(with_json.stdout)
    assert set(doc) == {"error", "exit_code"} and doc["exit_code"] == 2, doc
    return doc


@pytest.mark.parametrize("args", [
    ["discover", "--task", "nosuchtask"],  # a MechscopeError turned into a sentence by handles_errors
    ["search", "cities", "--db", "no.db", "--embedder", "nope"],  # fail() called by the command
    ["tuned-lens", "train", "--model", "./no-model", "--out", "x"],  # a nested command group
])
def test_refusal_without_a_model(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = RUN(app, [*args, "--json"])
    assert json.loads(r.stdout)["error"] == _sentence(r.stderr)
    _refused_both_ways(args)


def test_refusal_with_a_bad_model_path(tmp_path):
    r = RUN(app, ["info", "--model", str(tmp_path / "no-model"), "--json"])
    assert "No model file or directory" in json.loads(r.stdout)["error"] == _sentence(r.stderr)
    _refused_both_ways(["info", "--model", str(tmp_path / "no-model")])


def test_refusal_after_the_model_loaded(tiny_gpt2_dir, tmp_path):
    for args in (["lens", "Mary and John", "--model", tiny_gpt2_dir, "--out", str(tmp_path), "--distractor", ""],
                 ["hooks", "--model", tiny_gpt2_dir, "--check", "blocks.0.hook_resid_pots"]):
        doc = _refused_both_ways(args)
        assert doc["error"] == _sentence(RUN(app, args).stderr)


@pytest.mark.parametrize("args, needle", [
    (["discover", "--n", "abc"], "'--n'"),  # a bad value
    (["discover", "--bogus"], "No such option: --bogus"),  # an unknown option
    (["sae", "train"], "Missing option '--hook'"),  # a missing required option, in a sub-group
    (["tuned-lens", "train", "--out", "x", "--lr", "fast"], "'--lr'"),  # a bad number, in a sub-group
    (["--bogus", "discover"], "No such option: --bogus"),  # the root's own options
    (["nosuch"], "No such command 'nosuch'"),
])
def test_usage_errors(args, needle):
    """click's usage errors (before the command body runs) print click's message as the JSON's
    error, keeping click's stderr; without --json stdout stays empty."""
    doc = _refused_both_ways(args)
    assert needle in doc["error"], doc
    assert " ".join(doc["error"].split()[:3]) in " ".join(RUN(app, args).stderr.split())


def test_json_after_a_double_dash_asks_for_nothing():
    r = RUN(app, ["discover", "--bogus", "--", "--json"])
    assert r.exit_code == 2 and r.stdout == ""


def test_success_and_help_are_unchanged():
    r = RUN(app, ["tasks", "--json"])
    assert r.exit_code == 0 and "error" not in json.loads(r.stdout)
    for args in (["--help"], ["discover", "--help"], ["discover", "--help", "--json"]):
        r = RUN(app, args)
        assert r.exit_code == 0 and "Usage" in r.stdout and not r.stdout.lstrip().startswith("{"), r.stdout
    r = RUN(app, [])  # no command: help, exit 2, as before
    assert r.exit_code == 2 and "{" not in r.stdout


@handles_errors
def _inner(json: bool = False) -> None:
    raise MechscopeError("the inner command refused.")


@handles_errors
def _outer(json: bool = False, interrupt: bool = False) -> None:
    if interrupt:
        raise KeyboardInterrupt
    _inner(json=json)


@handles_errors
def _fails_twice(json: bool = False) -> None:
    try:
        fail("first refusal.")
    except typer.Exit:
        fail("second refusal.")


@pytest.mark.parametrize("call, error", [
    (lambda: _outer(json=True), "the inner command refused."),  # an inner handles_errors call
    (lambda: _outer(json=True, interrupt=True), "interrupted."),  # Ctrl-C
    (lambda: _fails_twice(json=True), "first refusal."),
])
def test_one_object_only(capsys, call, error):
    with pytest.raises(typer.Exit) as exc:
        call()
    out = capsys.readouterr().out
    assert exc.value.exit_code == 2 and out.count("\n") == 1 and json.loads(out) == {"error": error, "exit_code": 2}
    assert _JSON_ERRORS.get() is None  # the command's setting ends with it


def test_the_outermost_command_decides(capsys):
    """An inner call's json=True does not turn JSON on under an outer command run without it."""

    @handles_errors
    def plain_outer(json: bool = False) -> None:
        _inner(json=True)

    with pytest.raises(typer.Exit):
        plain_outer()
    with pytest.raises(typer.Exit):
        fail("outside any command.")
    assert capsys.readouterr().out == ""
