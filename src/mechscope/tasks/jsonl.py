"""User tasks from a JSONL file.

Each non-blank line is one object ``{"clean": str, "corrupt": str, "answer": str, "wrong": str}``
(extra keys are ignored). ``answer`` and ``wrong`` are the texts of single tokens, usually with
a leading space (" Mary"); the metric is ``logit_diff`` (answer minus wrong) at the last
position of each prompt. ``wrong`` is required: logit_diff has no meaning without a contrast
token. A malformed line raises ``MechscopeError`` naming the file, the line and the problem;
valid lines whose prompts differ in token length, or whose answer/wrong is not one token after
the clean prompt, are dropped and counted in ``TaskBatch.dropped``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mechscope.errors import MechscopeError
from mechscope.tasks.base import Pair, TaskBatch, capped_note, tokenize_pairs

KEYS = ("clean", "corrupt", "answer", "wrong")


def read_pairs(path: str | Path) -> list[Pair]:
    """Parse and validate every line of ``path``."""
    path = Path(path)
    if not path.is_file():
        raise MechscopeError(f"No task file at '{path}'; check the path.")
    pairs: list[Pair] = []
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first line
    except UnicodeDecodeError as exc:
        raise MechscopeError(f"The task file '{path}' is not UTF-8 text (byte {exc.start} cannot be decoded); save it as UTF-8.") from None
    except OSError as exc:
        raise MechscopeError(f"Cannot read the task file '{path}': {exc.strerror or exc}.") from None
    # lines end at "\n" only: JSON strings may hold U+2028 / U+0085, which str.splitlines() also breaks at
    for i, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path}, line {i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = ("; the file must hold one JSON object per line (JSONL), not one JSON document spread over lines"
                    if line.strip() in ("[", "{") or line.lstrip().startswith("[") else "")
            raise MechscopeError(f"{where}: not valid JSON ({exc.msg}){hint}.") from exc
        if not isinstance(row, dict):
            raise MechscopeError(f"{where}: expected an object with keys {', '.join(KEYS)}.")
        missing = [k for k in KEYS if k not in row]
        if missing:
            raise MechscopeError(f"{where}: missing key(s) {', '.join(missing)}.")
        bad = [k for k in KEYS if not isinstance(row[k], str) or not row[k]]
        if bad:
            raise MechscopeError(f"{where}: {', '.join(bad)} must be non-empty string(s).")
        pairs.append(Pair(row["clean"], row["corrupt"], row["answer"], row["wrong"]))
    if not pairs:
        raise MechscopeError(f"The task file '{path}' holds no pairs.")
    return pairs


def build(tokenizer: Any, path: str | Path, n: int | None = None, seed: int = 0) -> TaskBatch:
    """Batch of the file's pairs: the first ``n`` different ones when given, all otherwise.

    A pair that repeats an earlier one is dropped and counted: a copy of a scoring pair in the
    held-out split would make the held-out figures a second look at the scoring pairs. ``seed``
    is unused: every seed gets the same pairs (``discover --seeds`` then varies only the
    held-out split, and says so). An ``n`` above the file's different pairs gets a note.
    """
    pairs = read_pairs(path)
    seen: dict[tuple[str, str, str, str | None], Pair] = {}  # first-seen order
    repeats = 0
    for p in pairs:
        if n is not None and len(seen) >= n:
            break
        key = (p.clean, p.corrupt, p.answer, p.wrong)
        if key in seen:
            repeats += 1
        else:
            seen[key] = p
    batch = tokenize_pairs(tokenizer, list(seen.values()), Path(path).stem, "logit_diff")
    if repeats:
        batch.dropped["repeats an earlier pair"] = repeats
    if n is not None and n > len(seen):
        batch.notes.append(capped_note(n, len(seen), "different pairs in the file", len(batch)))
    return batch
