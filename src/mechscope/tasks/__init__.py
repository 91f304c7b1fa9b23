"""Task registry: built-in tasks by name, user tasks from ``.jsonl`` files, and evaluation.

``get_task(name).build(tokenizer, n=..., seed=...)`` returns a ``TaskBatch``; builders are
deterministic given ``seed``. ``evaluate_task(model, batch)`` scores clean and corrupt prompts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from mechscope.errors import MechscopeError, near_matches
from mechscope.tasks import docstring, facts, greater_than, induction, ioi, jsonl
from mechscope.tasks.base import MetricName, Pair, TaskBatch, single_token, tokenize_pairs

__all__ = [
    "Pair", "Task", "TaskBatch", "TaskInfo", "check_batch_size", "check_fits", "evaluate_task", "get_task", "list_tasks", "task_spec",
    "single_token", "tokenize_pairs",
]


MAX_PAIRS = 100_000
"""The most pairs ``Task.build`` makes (--n): far above any run here (200 by default), far below a
request that would exhaust memory before the first forward pass."""


@dataclass(frozen=True)
class TaskInfo:
    name: str
    description: str
    metric: MetricName


@dataclass(frozen=True)
class Task:
    """A named task; ``build`` makes its batch for a tokenizer."""

    info: TaskInfo
    builder: Callable[..., TaskBatch]  # (tokenizer, n=..., seed=...) -> TaskBatch
    default_n: int | None = 50
    seeded: bool = True
    """Whether ``seed`` draws the pairs; False for a task file (the same pairs for every seed)."""

    @property
    def name(self) -> str:
        return self.info.name

    def build(self, tokenizer: Any, n: int | None = None, seed: int = 0) -> TaskBatch:
        if hasattr(tokenizer, "tokenizer") and hasattr(tokenizer, "summary"):
            raise MechscopeError(f"Task '{self.name}' is built with a tokenizer, not a model; pass model.tokenizer.")
        if not callable(tokenizer) or not hasattr(tokenizer, "encode"):
            raise MechscopeError(f"Task '{self.name}' needs a Hugging Face tokenizer (e.g. model.tokenizer), got a "
                                 f"{type(tokenizer).__name__}.")
        for name, value in (("n", n), ("seed", seed)):
            if value is not None and (isinstance(value, bool) or not hasattr(value, "__index__")):
                raise MechscopeError(f"Task '{self.name}': {name} must be a whole number, got {value!r}.")
        n, seed = (None if n is None else operator.index(n)), operator.index(seed)
        if n is not None and n < 1:
            raise MechscopeError(f"--n must be at least 1 pair; got {n}.")
        if n is not None and n > MAX_PAIRS:  # a generated task would build them all before running out of memory
            raise MechscopeError(f"--n {n:,} is more pairs than a task builds (at most {MAX_PAIRS:,}: every pair's tokens are "
                                 "held in memory and each patched pass runs over all of them); give a smaller --n.")
        return self.builder(tokenizer, n=self.default_n if n is None else n, seed=seed)


_TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task(TaskInfo("ioi", "Indirect object identification (Wang et al. 2022): IO vs S name; "
                      "ABC corruption.", "logit_diff"), ioi.build),
        Task(TaskInfo("greater-than", "Greater-than (Hanna et al. 2023): P(next year digit > start) "
                      "- P(<); '01' corruption.", "prob_diff"), greater_than.build),
        Task(TaskInfo("induction", "Repeated random tokens (Olsson et al. 2022): log p of the "
                      "repeated token; fresh-sequence corruption.", "logprob"), induction.build),
        Task(TaskInfo("facts", "Factual recall (subject -> attribute, ~300 facts); "
                      "subject-swap corruption.", "logit_diff"), facts.build, None),
        Task(TaskInfo("docstring", "Docstring argument completion (Heimersheim & Janiak 2023): "
                      "next :param name vs the def-line argument after it; random-names "
                      "corruption.", "logit_diff"), docstring.build),
    ]
}


def list_tasks() -> list[TaskInfo]:
    """The built-in tasks (a path to a ``.jsonl`` file is also accepted by ``get_task``)."""
    return [t.info for t in _TASKS.values()]


def get_task(name: str) -> Task:
    """A built-in task by name, or a JSONL task from a path ending in ``.jsonl``."""
    if isinstance(name, Path):
        name = str(name)
    if not isinstance(name, str):
        raise MechscopeError(f"get_task needs a task name ({', '.join(_TASKS)}) or a path to a .jsonl file, "
                             f"got a {type(name).__name__}.")
    if name in _TASKS:
        return _TASKS[name]
    if Path(name).suffix.lower() in (".json", ".txt", ".csv") and Path(name).is_file():
        raise MechscopeError(f"'{name}' is not a .jsonl file; a task file holds one JSON object per line and its name ends "
                             "in .jsonl (rename it, or convert a JSON list to one object per line).")
    if name.lower().endswith(".jsonl"):
        if not Path(name).is_file():
            raise MechscopeError(f"No task file at '{name}'; check the path.")
        info = TaskInfo(Path(name).stem, f"User task from {name}", "logit_diff")
        return Task(info, partial(jsonl.build, path=name), None, seeded=False)
    raise MechscopeError(
        f"Unknown task '{name}' (built-in: {', '.join(_TASKS)}; or a path to a .jsonl file)."
        + near_matches(name, list(_TASKS))
    )


def task_spec(name: str) -> str:
    """What a saved run records of its ``--task``: a built-in name as it is, a task file by its
    absolute path (so ``mechscope evaluate RUN`` reopens it from any folder)."""
    if name not in _TASKS and name.lower().endswith(".jsonl") and Path(name).is_file():
        return str(Path(name).resolve())
    return name


def check_fits(model: Any, batch: TaskBatch) -> None:
    """Refuse prompts longer than a model with learned positions takes (``models.load.context_overrun``)."""
    from mechscope.models.load import context_overrun

    if hasattr(model, "summary") and (n_ctx := context_overrun(model, batch.n_pos)) is not None:
        raise MechscopeError(f"Task '{batch.task}' has prompts of up to {batch.n_pos} tokens, more than {model.summary.name}'s "
                             f"context of {n_ctx}; shorten them.")


def check_batch_size(batch_size: Any, name: str = "batch_size") -> None:
    """Refuse a ``batch_size`` that is not a whole number of at least 1 (one sentence)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise MechscopeError(f"{name} must be a whole number of at least 1 (pairs per forward pass), got {batch_size!r}.")


def evaluate_task(model: Any, batch: TaskBatch, batch_size: int = 16) -> dict[str, Any]:
    """Metric and accuracy of ``model`` on the clean and corrupt prompts of ``batch``.

    ``model``: a ``mechscope.models.Model`` (its ``bridge`` is run) or any module mapping
    tokens [batch, pos] to logits [batch, pos, d_vocab] (or to an output with ``.logits``).
    """
    check_batch_size(batch_size)
    if not isinstance(batch, TaskBatch):
        raise MechscopeError(f"evaluate_task needs a TaskBatch, got a {type(batch).__name__}; build one with "
                             "get_task(name).build(model.tokenizer).")
    if not isinstance(model, torch.nn.Module):
        from mechscope.models import Model, require_model

        if not isinstance(model, Model):
            require_model(model, "evaluate_task")
    summary = getattr(model, "summary", None)
    batch.check(getattr(summary, "d_vocab", None))
    check_fits(model, batch)
    net = getattr(model, "bridge", model)
    device = next(net.parameters()).device
    sums = {"clean_metric": 0.0, "corrupt_metric": 0.0, "clean_accuracy": 0.0, "corrupt_accuracy": 0.0}
    vocab = 0
    with torch.no_grad():
        for start in range(0, len(batch), batch_size):
            part = batch.subset(slice(start, start + batch_size)).to(device)
            for kind in ("clean", "corrupt"):
                out = net(getattr(part, kind))
                logits = getattr(out, "logits", out)  # [b, pos, d_vocab]
                vocab = logits.shape[-1]
                sums[f"{kind}_metric"] += part.per_example_metric(logits).sum().item()
                sums[f"{kind}_accuracy"] += part.n_correct(logits)  # counts: 30 of 60 is 0.5 exactly
    return {
        "task": batch.task,
        "n": len(batch),
        **{k: v / len(batch) for k, v in sums.items()},
        # top-1 accuracy (logprob tasks) of a model that knows nothing: 1 / vocabulary
        "chance_accuracy": 1.0 / vocab if batch.metric_name == "logprob" and vocab else batch.chance_accuracy,
        "metric": batch.metric_name,
        "dropped": dict(batch.dropped),
        "notes": list(batch.notes),
    }
