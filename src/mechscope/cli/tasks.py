"""Task commands: tasks (the built-in tasks), task-eval (does the model do a task?)."""

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
    print_pair_notes,
)


def register(app: typer.Typer) -> None:
    app.command("tasks")(tasks)
    app.command("task-eval")(task_eval)


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
    n: Optional[int] = typer.Option(None, "--n", help="Number of clean/corrupt pairs (default: 50 for a generated task, all pairs of a .jsonl file and of facts)."),
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
    print_pair_notes(res.get("dropped"), res.get("notes"))
