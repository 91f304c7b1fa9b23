"""`mechscope corpus`: what a text corpus holds (documents, characters, tokens, licence)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from mechscope.cli.common import JsonOpt, ModelOpt, console, emit_json, handles_errors


def register(app: typer.Typer) -> None:
    app.command("corpus")(corpus)


def _tokenizer(model: Optional[str]):
    """The model's tokenizer alone (no weights are loaded)."""
    from transformers import AutoTokenizer

    from mechscope.models.load import _quiet, _resolve

    _, target, gguf, local = _resolve(model)
    kwargs = {"local_files_only": local} | ({"gguf_file": gguf} if gguf else {})
    with _quiet():
        return AutoTokenizer.from_pretrained(target, **kwargs)


@handles_errors
def corpus(
    corpus: Optional[str] = typer.Option(None, "--corpus", "-c", help="embedded (default), a .txt/.jsonl file, a folder, or hf:NAME[:SPLIT]."),
    split: str = typer.Option("all", "--split", help="all, train or heldout (1 document in 20 is held out)."),
    tokens: bool = typer.Option(False, "--tokens", help="Also count tokens with the model's tokenizer (reads every document)."),
    model: Optional[str] = ModelOpt,
    json: bool = JsonOpt,
) -> None:
    """Describe a text corpus: documents, characters, licence; --tokens counts tokens too."""
    from mechscope.activations import get_corpus

    c = get_corpus(corpus, split=split)  # type: ignore[arg-type]
    info = c.info()
    if info["spec"] == "embedded":
        from mechscope.activations.embedded import embedded_path, manifest

        info["path"] = str(embedded_path())
        info["sources"] = manifest().get("sources", [])
    n_chars = n_tok = 0
    tok = _tokenizer(model) if tokens else None
    for doc in c:
        n_chars += len(doc)
        if tok is not None:
            n_tok += len(tok(doc, add_special_tokens=False, verbose=False)["input_ids"]) + 1  # + separator
    info["characters"] = n_chars
    if tok is not None:
        info["tokens"] = n_tok
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
