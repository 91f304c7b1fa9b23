"""`mechscope` entry point: registers the command groups, one module each.

    model.py      info, graph, hooks            heads.py    heads, train-toy, dynamics
    binding.py    interchange (and train-toy / dynamics --setting binding)
    tasks.py      tasks, task-eval              lens.py     lens
    tuned_lens.py tuned-lens train | eval | convert
    circuits.py   discover, evaluate            recall.py   recall
    corpus.py     corpus                        steer.py    steer
    icl.py        icl (few-shot knockout)
    confusion.py  confusion (language confusion, Nie et al. 2025)
    probe.py      probe
    sae.py        sae harvest | train | eval | dashboard
    features.py   attribute, transcoders train | eval
    explain.py    search, export (unit descriptions)
    vision.py     vision train | circuit | compose | attack | eap
    serve.py      serve (the local web UI)

Option defaults come from the methods' config dataclasses (``DiscoverConfig.n``, ...), whose
modules import no torch, so the CLI starts without it; a command imports what it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import typer
from typer.core import TyperGroup

from mechscope.cli import (
    binding,
    circuits,
    confusion,
    corpus,
    explain,
    features,
    heads,
    icl,
    lens,
    model,
    probe,
    recall,
    sae,
    serve,
    steer,
    tasks,
    tuned_lens,
    vision,
)
from mechscope.cli.common import STATE, emit_error_json

_USAGE_ERROR: Any = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
"""click's UsageError (an unknown option or command, a bad or missing value: exit 2), which typer,
now carrying its own copy of click, names only as a base of ``BadParameter``."""


@contextlib.contextmanager
def _usage_errors_as_json(args: Sequence[str]) -> Iterator[None]:
    """Where ``args`` ask for ``--json`` (before any ``--``), print a usage error on stdout as JSON
    too (``emit_error_json``); typer still prints it on stderr and exits 2."""
    try:
        yield
    except _USAGE_ERROR as exc:
        given = list(args)
        if "--json" in given[:given.index("--") if "--" in given else None]:
            emit_error_json(exc.format_message(), exc.exit_code)
        raise


class _Mechscope(TyperGroup):
    """The root command. Usage errors arise while the command line is parsed, before any command
    (``handles_errors``) runs, so only the root sees them all, however typer is run (``main()``,
    ``CliRunner``): errors in its own options in ``make_context``, in a subcommand's in ``invoke``."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        argv = list(args)  # parsing consumes ``args``
        with _usage_errors_as_json(argv):
            ctx = super().make_context(info_name, args, parent, **extra)
        ctx.meta["mechscope.argv"] = argv
        return ctx

    def invoke(self, ctx: Any) -> Any:
        with _usage_errors_as_json(ctx.meta.get("mechscope.argv", ())):
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Mechscope,
    name="mechscope",
    help="mechscope: find how a transformer computes something (circuits, heads, recall, SAEs).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(ctx: typer.Context,
          debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or status lines on stderr "
                                     "(results and errors still print; --json implies it).")) -> None:
    # Both hold for this command only: one process may run several (a notebook, CliRunner).
    STATE["debug"] = debug
    if quiet:
        import os

        from mechscope.progress import QUIET_ENV

        before = os.environ.get(QUIET_ENV)
        os.environ[QUIET_ENV] = "1"

        def restore() -> None:
            if before is None:
                os.environ.pop(QUIET_ENV, None)
            else:
                os.environ[QUIET_ENV] = before

        ctx.call_on_close(restore)


# One module per command group, named after it; `mechscope --help` lists the commands in this order.
for group in (model, tasks, circuits, corpus, heads, binding, lens, tuned_lens, probe, recall, icl, confusion, steer, sae, features, explain, vision, serve):
    group.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
