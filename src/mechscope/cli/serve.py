"""`mechscope serve`: the local, read-only web UI over a unit database and the run folders under DIR."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from mechscope.cli.common import console, fail, handles_errors


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


@handles_errors
def serve(
    directory: Optional[Path] = typer.Argument(None, help="Folder whose run folders (discover, attribute, heads, recall, SAE eval, ...) to list (default: the current folder)."),
    db: Optional[Path] = typer.Option(None, "--db", help="Unit database (mechscope exemplars / describe) to search and show."),
    port: int = typer.Option(8000, "--port", help="TCP port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; the default keeps the server on this machine."),
    semantic: bool = typer.Option(False, "--semantic", help="Also answer semantic searches (the embeddings mechscope search --semantic stored in --db)."),
    embedder: str = typer.Option("minilm", "--embedder", help="The embedder those embeddings came from: minilm or embedded."),
) -> None:
    """A local web UI: search units by description, unit pages, run folders and their nodes (read-only)."""
    from mechscope.server.app import serve as run_server

    if not 0 <= port < 65536:
        fail(f"--port must be between 0 (any free port) and 65535, got {port}.")
    root = directory if directory is not None else Path(".")
    if not root.exists():
        fail(f"{root} does not exist; give the folder that holds your mechscope run folders.")
    emb = None
    if semantic:
        if db is None:
            fail("--semantic needs --db (the unit database holding the embeddings).")
        from mechscope.explain.semantic import get_embedder

        emb = get_embedder(embedder)
    def announce(url: str) -> None:  # called once the socket listens, so a bad --host is refused without the warning
        if host not in ("127.0.0.1", "::1", "localhost"):
            console.print(f"[yellow]listening on {escape(host)}: other machines on the network can read this database and these runs.[/]",
                          markup=True)
        console.print(f"mechscope serve: {url}  (runs under {root.resolve()}{f', units from {db}' if db else ''}; Ctrl-C stops)",
                      highlight=False, markup=False, soft_wrap=True)

    run_server(root, db, host=host, port=port, embedder=emb, announce=announce)
