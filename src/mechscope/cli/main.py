"""`mechscope` entry point: registers the command groups."""

from __future__ import annotations

import typer

from mechscope.cli import basic, circuits
from mechscope.cli import corpus as corpus_cli
from mechscope.cli import heads as heads_cli
from mechscope.cli import recall as recall_cli
from mechscope.cli import sae as sae_cli
from mechscope.cli.common import STATE

app = typer.Typer(
    name="mechscope",
    help="mechscope: find how a transformer computes something (circuits, heads, recall, SAEs).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    if debug:
        STATE["debug"] = True


basic.register(app)
circuits.register(app)
corpus_cli.register(app)
heads_cli.register(app)
recall_cli.register(app)
sae_cli.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
