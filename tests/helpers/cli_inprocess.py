"""Run a mechscope command in the test process and answer like ``subprocess.run``.

Each ``python -m mechscope.cli.main`` subprocess spends 8-12 s of a 2-core CI box importing torch,
transformers and transformer-lens before it does anything, and a CLI test file makes dozens of
them. ``run_cli`` invokes the same ``app`` object the console script calls, through Typer's
runner, so those imports are paid once per test session. What it returns has ``returncode``,
``stdout`` and ``stderr``, so a test written against ``subprocess.run`` reads the same. A command
that raised an exception the CLI did not turn into a sentence gets the traceback appended to
``stderr``, so a test's "no Traceback" check still fails on it, as it would on a real process.

The tests that need a real process (a working folder of their own, the console entry point
itself) keep ``subprocess.run``.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliResult:
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    res = CliRunner().invoke(app, [str(a) for a in args], env={"HF_HUB_OFFLINE": "1"})
    err = res.stderr
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        err += "".join(traceback.format_exception(res.exception))
    return CliResult(int(res.exit_code or 0), res.stdout, err)
