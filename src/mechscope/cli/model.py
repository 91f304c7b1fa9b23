"""Foundation commands: info, tasks, task-eval, graph, hooks."""

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
    app.command("tasks")(tasks)
    app.command("task-eval")(task_eval)
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
def tasks(json: bool = JsonOpt) -> None:
    """List the built-in tasks (any .jsonl file of pairs is a task too)."""
    from mechscope.tasks import list_tasks

    infos = list_tasks()
    if json:
        return emit_json([i.__dict__ for i in infos])
    t = Table("task", "metric", "description")
    for i in infos:
        t.add_row(i.name, i.metric, i.description)
    console.print(t)
    console.print("A user task: --task path/to/pairs.jsonl with lines {\"clean\", \"corrupt\", \"answer\", \"wrong\"}.")


@handles_errors
def task_eval(
    task: str = typer.Option(..., "--task", "-t", help="Task name or path to a .jsonl file."),
    model: Optional[str] = ModelOpt,
    n: int = typer.Option(50, "--n", help="Number of clean/corrupt pairs."),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = DeviceOpt,
    json: bool = JsonOpt,
) -> None:
    """Show the model really does a task: clean and corrupt metric and accuracy."""
    from mechscope.tasks import evaluate_task, get_task

    t = get_task(task)
    m = load(model, device)
    batch = t.build(m.tokenizer, n=n, seed=seed)
    res = evaluate_task(m, batch)
    res["model"] = m.summary.name
    if json:
        return emit_json(res)
    tab = Table(title=f"{res['task']} on {m.summary.name} ({res['n']} pairs, metric: {res['metric']})")
    tab.add_column("")
    tab.add_column("metric", justify="right")
    tab.add_column("accuracy", justify="right")
    tab.add_row("clean", f"{res['clean_metric']:.3f}", f"{res['clean_accuracy']:.1%}")
    tab.add_row("corrupt", f"{res['corrupt_metric']:.3f}", f"{res['corrupt_accuracy']:.1%}")
    tab.add_row("chance", "", f"{res['chance_accuracy']:.1%}")
    console.print(tab)
    if res.get("dropped"):
        console.print("dropped pairs: " + ", ".join(f"{v} ({k})" for k, v in res["dropped"].items()))


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
        t.add_row(k, f"{v:,}")
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
        name = check_hook_name(m, check)
        return emit_json({"hook": name, "ok": True}) if json else console.print(f"{name}: ok")
    names = sorted(m.bridge.hook_dict.keys())
    if json:
        return emit_json(names)
    for n in names:
        console.print(n, highlight=False)
