"""Few-shot tasks, prompts and accuracy.

Prompt format (one example a line, position 0 a newline):

    "\\n" + "x1 -> y1\\n" + "x2 -> y2\\n" + ... + "xq ->"

The model should continue with " yq"; the target is the first token " yq" adds after the
prompt (see ``first_token``). The leading newline gives every prompt a first position outside all groups: models without a BOS token
(SmolLM2, GPT-2) park most attention on position 0 (an attention sink), and a knockout that
blocked it would measure that instead of the flow between examples.

Position groups of a prompt, found by tokenizing each prefix that ends at a group boundary
(a token that straddles two groups is refused): ``sink`` (position 0), ``x{i}``, ``a{i}`` (the
" ->" tokens), ``y{i}`` (the tokens of " y_i"), ``n{i}`` (the newline after it) for examples
i = 1..K, ``xq`` (the query), ``aq`` (the query's " ->" tokens but the last) and ``final``
(the last position, where the target is read).

Built-in tasks: the relations of the shipped facts list (``capital``, ``language``, ...;
x = subject, y = attribute), ``antonyms`` and ``uppercase`` (``icl/data``), or a JSONL file of
``{"x": ..., "y": ...}`` lines. Ambiguous prompts (``capital`` only): the examples are
countries whose capital is also their largest city, except one that is not (it shows the task
is the capital); the query is a country whose capital is not its largest city
(``icl/data/capital_largest_city.jsonl``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import MechscopeError

DATA = Path(__file__).parent / "data"
OWN_TASKS = {"antonyms": "antonyms.jsonl", "uppercase": "uppercase.jsonl"}
AMBIGUOUS_FILE = DATA / "capital_largest_city.jsonl"
ARROW, NEWLINE = " ->", "\n"


@dataclass
class FewShotTask:
    """(x, y) pairs of one task; ``alternative`` {x: the other task's y} for ambiguous prompts."""

    name: str
    source: str
    pairs: list[tuple[str, str]]
    alternative: dict[str, str] = field(default_factory=dict)


@dataclass
class FewShotPrompt:
    """One few-shot prompt: ``ids`` [pos] and the positions of each group."""

    text: str
    ids: list[int]
    examples: list[tuple[str, str]]
    query: str
    answer: str
    target_id: int
    groups: dict[str, list[int]]
    alt_answer: str | None = None
    alt_id: int | None = None

    @property
    def shots(self) -> int:
        return len(self.examples)


def task_names() -> list[str]:
    """The built-in task names: the facts relations, then ``antonyms`` and ``uppercase``."""
    from mechscope.tasks.facts import load_facts

    rel = sorted({f.relation for f in load_facts()})
    return rel + sorted(OWN_TASKS)


def _read_xy(path: Path) -> list[tuple[str, str]]:
    """The (x, y) pairs of a JSONL file, each line checked."""
    if not path.is_file():
        raise MechscopeError(f"No task file at '{path}'; pass a built-in task ({', '.join(task_names())}) or a JSONL file.")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a byte-order mark is allowed
    except UnicodeDecodeError as exc:
        raise MechscopeError(f"{path} is not UTF-8 text (byte {exc.start}); save the task file as UTF-8.") from None
    out = []
    first: dict[str, tuple[str, int]] = {}  # x -> (y, line)
    # lines end at "\n" only: JSON strings may hold U+2028 / U+0085, which str.splitlines() also breaks at
    for i, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MechscopeError(f"{path}, line {i}: not valid JSON ({exc.msg}).") from exc
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip() for k in ("x", "y")):
            raise MechscopeError(f"{path}, line {i}: expected an object with non-empty strings \"x\" and \"y\".")
        x, y = row["x"].strip(), row["y"].strip()
        if "\n" in x + y or ARROW in x + y:
            raise MechscopeError(f"{path}, line {i}: x and y may not contain a newline or '{ARROW.strip()}' (the prompt's separators).")
        if x in first and first[x][0] != y:  # which answer would count? (one was dropped without a word)
            raise MechscopeError(f"{path}, line {i}: x {x!r} is on line {first[x][1]} with another y ({first[x][0]!r} vs {y!r}); "
                                 "give each input one answer.")
        first.setdefault(x, (y, i))
        out.append((x, y))
    return out


def load_task(task: str) -> FewShotTask:
    """A built-in task by name, or a JSONL file of (x, y) pairs (duplicate x kept once)."""
    from mechscope.tasks.facts import load_facts

    if task in OWN_TASKS:
        pairs, source, name = _read_xy(DATA / OWN_TASKS[task]), f"icl/data/{OWN_TASKS[task]}", task
    elif task.endswith(".jsonl") or Path(task).is_file():
        pairs, source, name = _read_xy(Path(task)), str(task), Path(task).stem
    else:
        pairs = [(f.subject, f.attribute.strip()) for f in load_facts() if f.relation == task]
        source, name = "tasks/data/facts.jsonl", task
        if not pairs:
            raise MechscopeError(f"Unknown task '{task}'; choose from {', '.join(task_names())} or pass a JSONL file of {{\"x\", \"y\"}} pairs.")
    seen: dict[str, str] = {}
    for x, y in pairs:
        seen.setdefault(x, y)
    alternative = {}
    if task == "capital":
        source += " + icl/data/capital_largest_city.jsonl"
        rows = [json.loads(line) for line in AMBIGUOUS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
        alternative = {r["x"]: r["largest_city"] for r in rows}
        if not seen:  # pragma: no cover - the facts list always has capitals
            seen = {r["x"]: r["capital"] for r in rows}
        for r in rows:  # the ambiguity file's countries join the capital task
            seen.setdefault(r["x"], r["capital"])
    if len(seen) < 2:
        raise MechscopeError(f"The task '{task}' has {len(seen)} distinct input(s); a few-shot prompt needs at least 2.")
    return FewShotTask(name, source, list(seen.items()), alternative)


def check_task(task: str, shots: int, ambiguous: bool = False) -> FewShotTask:
    """The task (``load_task``), refused in one sentence when it cannot fill ``shots`` examples
    and a query, or has no second task for ``ambiguous`` prompts (no model needed)."""
    t = load_task(task)
    if ambiguous and not t.alternative:
        raise MechscopeError(f"--ambiguous has no second task for '{t.name}'; ambiguous prompts are built in for: capital.")
    if not ambiguous and len(t.pairs) < shots + 1:
        raise MechscopeError(f"--shots {shots} needs {shots + 1} distinct inputs; the task '{t.name}' has {len(t.pairs)}.")
    return t


def make_prompt(tokenizer: Any, examples: list[tuple[str, str]], query: tuple[str, str],
                alt_answer: str | None = None) -> FewShotPrompt:
    """The prompt of ``examples`` and ``query`` with its position groups (see the module doc)."""
    if not examples:
        raise MechscopeError("A few-shot prompt needs at least 1 example.")
    segments = [("sink", NEWLINE)]
    for i, (x, y) in enumerate(examples, 1):
        segments += [(f"x{i}", x), (f"a{i}", ARROW), (f"y{i}", " " + y), (f"n{i}", NEWLINE)]
    segments += [("xq", query[0]), ("aq", ARROW)]
    text = "".join(s for _, s in segments)
    ids = list(tokenizer(text)["input_ids"])
    groups: dict[str, list[int]] = {}
    start, end_char = 0, 0
    for name, s in segments:
        end_char += len(s)
        pre = list(tokenizer(text[:end_char])["input_ids"])
        if pre != ids[:len(pre)]:
            raise MechscopeError(f"A token of the prompt spans the end of group '{name}' ({s!r}); "
                                 "this tokenizer cannot split the prompt into groups.")
        groups[name] = list(range(start, len(pre)))
        start = len(pre)
    if not groups["aq"]:
        raise MechscopeError("The query's ' ->' tokenizes to nothing; this tokenizer cannot build the prompt.")
    groups["final"] = [groups["aq"].pop()]
    empty = [k for k, v in groups.items() if not v and k != "aq"]
    if empty:
        raise MechscopeError(f"Group(s) {', '.join(empty)} of the prompt hold no token; check the task's x and y strings.")
    target = first_token(tokenizer, query[1], text)
    alt = first_token(tokenizer, alt_answer, text) if alt_answer is not None else None
    return FewShotPrompt(text, ids, list(examples), query[0], query[1], target, groups, alt_answer, alt)


def first_token(tokenizer: Any, y: str, prompt: str = ARROW) -> int:
    """The first token " y" adds after ``prompt`` (what the model must predict after " ->";
    the default stands for any prompt's end). Decided in context, without special tokens: a
    SentencePiece tokenizer that marks word starts with "▁" (Llama-2, Mistral v0.1) adds a BOS
    and a lone '▁' to " y" encoded alone; byte-level BPE gives the same token either way."""
    from mechscope.models.tokens import continuation

    ids = continuation(tokenizer, prompt, " " + y)
    if ids is None:  # the answer merges into the prompt's last token: its own tokens decide
        ids = list(tokenizer(" " + y, add_special_tokens=False)["input_ids"])
    if not ids:
        raise MechscopeError(f"The answer {y!r} tokenizes to nothing.")
    return int(ids[0])


def sample_prompts(tokenizer: Any, task: FewShotTask, shots: int, n: int, seed: int = 0,
                   ambiguous: bool = False) -> list[FewShotPrompt]:
    """``n`` prompts of ``shots`` examples and a query, drawn with ``seed`` (distinct inputs)."""
    rng = random.Random(seed)
    if ambiguous:
        if not task.alternative:
            raise MechscopeError(f"--ambiguous has no second task for '{task.name}'; ambiguous prompts are built in for: capital.")
        y = dict(task.pairs)
        same = [(x, y[x]) for x in task.alternative if x in y and task.alternative[x] == y[x]]
        diff = [(x, y[x]) for x in task.alternative if x in y and task.alternative[x] != y[x]]
        if len(same) < shots - 1 or len(diff) < 2:
            raise MechscopeError(f"--shots {shots} is too many for ambiguous prompts: {len(same)} agreeing and {len(diff)} "
                                 "disagreeing inputs exist; use fewer shots.")
        out = []
        for _ in range(n):
            ex = rng.sample(same, shots - 1)
            clue, query = rng.sample(diff, 2)
            ex.insert(rng.randrange(shots), clue)
            out.append(make_prompt(tokenizer, ex, query, task.alternative[query[0]]))
        return out
    if len(task.pairs) < shots + 1:
        raise MechscopeError(f"--shots {shots} needs {shots + 1} distinct inputs; the task '{task.name}' has {len(task.pairs)}.")
    out = []
    for _ in range(n):
        drawn = rng.sample(task.pairs, shots + 1)
        out.append(make_prompt(tokenizer, drawn[:-1], drawn[-1]))
    return out


def chance_level(tokenizer: Any, task: FewShotTask, prompts: list[FewShotPrompt]) -> float:
    """Accuracy of a uniform guess among the distinct first tokens of the task's answers
    (the queries' answers and every y of the task)."""
    firsts = {first_token(tokenizer, y) for _, y in task.pairs} | {p.target_id for p in prompts}
    return 1.0 / len(firsts)


@torch.no_grad()
def fewshot_accuracy(model, prompts: list[FewShotPrompt], max_rows: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """p(target) [n] and whether the target is the top-1 token [n] at each prompt's last
    position. Prompts are batched right-padded (a causal model's positions before the padding
    are unaffected by it); the pass stops at the final norm's input. One ``FewShotPrompt`` is
    read as a list of one."""
    from mechscope.models import plain_attention

    if isinstance(prompts, FewShotPrompt):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, FewShotPrompt) for p in prompts):
        raise MechscopeError("fewshot_accuracy takes a list of FewShotPrompt (sample_prompts(...) makes them)"
                             + ("; the list is empty." if not prompts else "; the list holds something else."))
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise MechscopeError(f"fewshot_accuracy: max_rows must be a whole number of at least 1; got {max_rows!r}.")
    from mechscope.models.hooks import FINAL_NORM_IN
    from mechscope.models.unembed import final_norm, project

    probs = torch.zeros(len(prompts))
    top = torch.zeros(len(prompts), dtype=torch.bool)
    norm = final_norm(model)
    for s in range(0, len(prompts), max_rows):
        part = prompts[s:s + max_rows]
        width = max(len(p.ids) for p in part)
        x = torch.tensor([p.ids + [p.ids[-1]] * (width - len(p.ids)) for p in part])  # [rows, width]
        last = torch.tensor([len(p.ids) - 1 for p in part])
        got: list[torch.Tensor] = []

        def stop(h, hook):
            got.append(h[torch.arange(len(part), device=h.device), last.to(h.device)].detach())
            raise _Stop

        with plain_attention(model):
            try:
                model.bridge.run_with_hooks(x.to(model.device), fwd_hooks=[(FINAL_NORM_IN, stop)])
            except _Stop:
                pass
        logits = project(model, got[0], norm).float().cpu()  # [rows, d_vocab]
        tgt = torch.tensor([p.target_id for p in part])
        probs[s:s + len(part)] = logits.softmax(-1)[torch.arange(len(part)), tgt]
        top[s:s + len(part)] = logits.argmax(-1) == tgt
    return probs, top


class _Stop(Exception):
    """Ends the forward pass once the final norm's input is captured."""
