"""Model commands: info (summary), graph (node and edge counts), hooks (hook names)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from mechscope.cli.common import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    console,
    emit_json,
    handles_errors,
    load,
)


def register(app: typer.Typer) -> None:
    app.command("info")(info)
    app.command("graph")(graph)
    app.command("hooks")(hooks)


@handles_errors
def info(model: Optional[str] = ModelOpt, device: Optional[str] = DeviceOpt, json: bool = JsonOpt) -> None:
    """Load a model and print its summary (layers, heads, KV heads, widths, vocab)."""
    m = load(model, device)
    if json:
        return emit_json(m.summary.to_dict())
    t = Table(title=m.summary.name, show_header=False)
    for k, v in m.summary.to_dict().items():
        t.add_row(k, str(v))
    console.print(t)


@handles_errors
def graph(model: Optional[str] = ModelOpt, device: Optional[str] = DeviceOpt, json: bool = JsonOpt) -> None:
    """Print the computational graph's node, receiver and edge counts."""
    from mechscope.graph import build_graph

    g = build_graph(load(model, device))
    s = g.summary()
    if json:
        return emit_json(s)
    t = Table(title="computational graph", show_header=False)
    for k, v in s.items():
        t.add_row(k, ("yes" if v else "no") if isinstance(v, bool) else f"{v:,}")
    console.print(t)


@handles_errors
def hooks(
    model: Optional[str] = ModelOpt,
    check: Optional[str] = typer.Option(None, "--check", help="Validate one hook name."),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """List the model's TransformerLens hook names (or check one)."""
    from mechscope.models import check_hook_name

    m = load(model, device)
    if check is not None:
        from mechscope.models.load import check_hook_fires

        name = check_hook_name(m, check)
        check_hook_fires(m, name, "a reader of it")  # listed is not enough: some bridges never feed a hook
        return emit_json({"hook": name, "ok": True}) if json else console.print(f"{name}: ok")
    names = sorted(m.bridge.hook_dict.keys())
    if json:
        return emit_json(names)
    for n in names:
        console.print(n, highlight=False)
