"""`mechscope corpus`: what a text corpus holds (documents, characters, tokens, licence)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from mechscope.cli.common import JsonOpt, ModelOpt, console, emit_json, handles_errors


def register(app: typer.Typer) -> None:
    app.command("corpus")(corpus)


@handles_errors
def corpus(
    corpus: Optional[str] = typer.Option(None, "--corpus", "-c", help="embedded (default), a .txt/.jsonl file, a folder, or hf:NAME[:SPLIT]."),
    split: str = typer.Option("all", "--split", help="all, train or heldout (1 document in 20 is held out)."),
    tokens: bool = typer.Option(False, "--tokens", help="Also count tokens with the model's tokenizer (reads every document)."),
    model: Optional[str] = ModelOpt,
    json: bool = JsonOpt,
) -> None:
    """Describe a text corpus: documents, characters, licence; --tokens counts tokens too."""
    from mechscope.activations import describe_corpus

    tok = None
    if model is not None and not tokens:
        from mechscope.errors import MechscopeError

        raise MechscopeError("--model names the tokenizer that --tokens counts with; add --tokens, or drop --model.")
    if tokens:  # the tokenizer alone (no weights); torch only loads here
        from mechscope.models import load_tokenizer

        tok = load_tokenizer(model)
    info = describe_corpus(corpus, split=split, tokenizer=tok)
    if tok is not None:
        info["tokenizer"] = model or "smollm2-135m"
    if json:
        return emit_json(info)
    t = Table(title=f"corpus {info['spec']} ({split})", show_header=False)
    for k in ("documents", "characters", "tokens", "description", "licence", "path"):
        if info.get(k) not in (None, ""):
            v = info[k]
            t.add_row(k, f"{v:,}" if isinstance(v, int) else str(v))
    for s in info.get("sources", []):
        t.add_row("source", f"Debian {s['debian_package']} {s['version']} ({s['licence']}): {', '.join(s['texts'])}")
    console.print(t)
