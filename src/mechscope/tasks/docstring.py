"""Docstring argument completion, after Heimersheim & Janiak 2023, "A circuit for Python
docstrings in a 4-layer attention-only transformer" (Alignment Forum), also one of the tasks of
Conmy et al. 2023, "Towards Automated Circuit Discovery for Mechanistic Interpretability"
(ACDC, arXiv:2304.14997).

Construction (one pair per example), Sphinx ("reST") docstring style::

    def port(self, load, size, files, last):
        \"\"\"oil column piece

        :param load: crime population
        :param size: unit dark
        :param

- The ``def`` line has ``prefix_args`` undocumented arguments, then ``match_args`` arguments
  of which the docstring documents all but the last, in order, then ``suffix_args`` more.
  The prompt ends with ``:param`` and the answer is the next argument (`` files`` above).
  Method name, argument names and the description words (3 for the method, 2 per
  parameter, random nouns as in the paper) are all distinct within an example.
- ``answer`` = the next argument; ``wrong`` = the argument right after it in the ``def`` line
  (`` last`` above), the strongest distractor (on the embedded SmolLM2-135M-Instruct it is the
  highest-scoring wrong argument of the ``def`` line in 88-93% of the examples of the default
  layout, seeds 0-2, n=100). Metric ``logit_diff`` at the last position. The paper scores
  the answer against the best of all wrong arguments; a ``TaskBatch`` has one contrast token
  per example, so it is this fixed one.
- Corrupt prompt: ACDC's ``random_random`` corruption: the ``match_args`` arguments in the
  ``def`` line and the documented names in the docstring are replaced by fresh names (the two
  sets disjoint, none of them in the clean prompt), so neither says which argument comes next;
  method name, descriptions and the prefix/suffix arguments stay. The answer appears nowhere
  in the corrupt prompt, the ``wrong`` argument stays where it was.
- Names come from a list of common Python identifiers; at build time only those that are a
  single token with a leading space after ``:param`` (``NAME_CONTEXT``) in the given tokenizer
  are kept, so clean and corrupt prompts always have the same token length.

Defaults (``prefix_args=0, match_args=3, suffix_args=1``) are the post's example layout: the
docstring documents the first arguments in order. ACDC's dataset uses ``prefix_args=2`` (the
docstring starts at the third argument, so counting lines does not find the answer; only
locating the last documented name in the ``def`` line does); pass it to ``build`` for that
variant. On the embedded SmolLM2-135M-Instruct (n=100, seeds 0/1/2) the default layout gives
clean accuracy 0.96/0.97/1.00, ACDC's 0.89/0.93/0.90.

The name and noun lists below are our own, in the spirit of the paper's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from mechscope.errors import MechscopeError
from mechscope.tasks.base import Pair, TaskBatch, single_token, tokenize_pairs

# Argument and method names: common Python identifiers.
NAMES: list[str] = [
    "data", "name", "file", "value", "result", "line", "user", "key", "default", "request",
    "path", "output", "node", "item", "url", "model", "response", "text", "version", "log",
    "string", "field", "start", "number", "values", "index", "error", "current", "context",
    "image", "message", "check", "size", "event", "state", "row", "obj", "parser", "end",
    "files", "form", "query", "fields", "instance", "label", "action", "target", "array",
    "code", "num", "table", "source", "msg", "config", "first", "options", "update", "module",
    "status", "group", "content", "client", "filename", "results", "last", "command", "val",
    "base", "format", "color", "settings", "count", "match", "tag", "title", "parent",
    "session", "token", "server", "host", "date", "mode", "project", "info", "page",
    "header", "option", "task", "shape", "load", "names", "port", "resource", "root",
    "buffer", "callback", "channel", "handler", "limit", "offset", "prefix", "timeout",
    "width", "height", "weight", "keys", "items", "args", "params", "method", "length",
]

# Description words: common nouns, none of them in NAMES.
NOUNS: list[str] = [
    "price", "control", "cost", "issue", "process", "position", "course", "minute", "research",
    "subject", "age", "force", "order", "matter", "health", "street", "class", "mind",
    "condition", "paper", "bank", "century", "section", "activity", "building", "sense",
    "staff", "team", "student", "language", "town", "plan", "morning", "product", "practice",
    "evidence", "ground", "letter", "foot", "game", "food", "union", "role", "land", "art",
    "support", "range", "stage", "trade", "voice", "history", "account", "material", "care",
    "manager", "record", "example", "training", "window", "air", "light", "quality", "rule",
    "story", "tax", "worker", "nature", "unit", "detail", "wall", "computer", "amount",
    "chapter", "property", "director", "board", "production", "operation", "share",
    "contract", "picture", "security", "colour", "future", "site", "loss", "shop", "heart",
    "purpose", "standard", "factor", "music", "charge", "pattern", "design", "piece",
    "population", "tree", "knowledge", "performance", "plant", "pressure", "fire",
    "environment", "analysis", "crime", "oil", "column", "dark", "garden", "river", "school",
]


@dataclass
class DocstringExample:
    """One docstring example: its names and prompts (for tests and reports)."""

    method: str
    def_args: list[str]  # clean def line, in order
    doc_args: list[str]  # documented names in the clean docstring, in order
    answer: str  # the next argument to document
    wrong: str  # the argument after it in the def line
    corrupt_def_args: list[str]
    corrupt_doc_args: list[str]
    clean: str
    corrupt: str


NAME_CONTEXT = "    :param"
"""A prompt the names are tried after (``single_token`` decides in context)."""


def single_token_names(tokenizer: Any, names: list[str] = NAMES, prompt: str = NAME_CONTEXT) -> list[str]:
    """The names that are one token with a leading space after ``prompt`` (order kept)."""
    return [n for n in names if single_token(tokenizer, " " + n, prompt) is not None]


def prompt(method: str, method_desc: str, def_args: list[str], doc_args: list[str],
           descs: list[str]) -> str:
    """A ``def`` line and a reST docstring documenting ``doc_args``, ending in ``:param``."""
    lines = [f"def {method}(self, {', '.join(def_args)}):", f'    """{method_desc}', ""]
    lines += [f"    :param {arg}: {desc}" for arg, desc in zip(doc_args, descs)]
    return "\n".join(lines + ["    :param"])


def make_examples(
    tokenizer: Any,
    n: int = 50,
    seed: int = 0,
    prefix_args: int = 0,
    match_args: int = 3,
    suffix_args: int = 1,
) -> list[DocstringExample]:
    """``n`` docstring examples (see module docstring), deterministic given ``seed``."""
    if match_args < 2 or suffix_args < 1 or prefix_args < 0:
        raise MechscopeError(
            "Docstring prompts need match_args >= 2 (at least one documented argument), "
            f"suffix_args >= 1 (the wrong answer) and prefix_args >= 0; got {prefix_args}, "
            f"{match_args}, {suffix_args}."
        )
    names = single_token_names(tokenizer)
    nouns = single_token_names(tokenizer, NOUNS)
    # method + clean def args + fresh def names + fresh doc names
    need = 1 + prefix_args + match_args + suffix_args + match_args + (match_args - 1)
    if len(names) < need or len(nouns) < 3 + 2 * (match_args - 1):
        raise MechscopeError(
            f"The docstring task needs {need} argument names and {3 + 2 * (match_args - 1)} "
            "description nouns that are single tokens (with a leading space) in this "
            f"tokenizer; found {len(names)} and {len(nouns)}."
        )
    rng = random.Random(seed)
    out: list[DocstringExample] = []
    for _ in range(n):
        method, *drawn = rng.sample(names, need)
        prefix, drawn = drawn[:prefix_args], drawn[prefix_args:]
        match, drawn = drawn[:match_args], drawn[match_args:]
        suffix, drawn = drawn[:suffix_args], drawn[suffix_args:]
        fresh_def, fresh_doc = drawn[:match_args], drawn[match_args:]
        words = rng.sample(nouns, 3 + 2 * (match_args - 1))
        method_desc = " ".join(words[:3])
        descs = [" ".join(words[3 + 2 * i : 5 + 2 * i]) for i in range(match_args - 1)]
        def_args, doc_args = prefix + match + suffix, match[:-1]
        corrupt_def, corrupt_doc = prefix + fresh_def + suffix, fresh_doc
        out.append(DocstringExample(
            method, def_args, doc_args, match[-1], suffix[0], corrupt_def, corrupt_doc,
            prompt(method, method_desc, def_args, doc_args, descs),
            prompt(method, method_desc, corrupt_def, corrupt_doc, descs),
        ))
    return out


def build(tokenizer: Any, n: int = 50, seed: int = 0, **layout: int) -> TaskBatch:
    """Docstring batch: next argument vs the one after it; random_random corruption.

    ``layout``: ``prefix_args``, ``match_args``, ``suffix_args`` (see ``make_examples``).
    """
    examples = make_examples(tokenizer, n, seed, **layout)
    pairs = [Pair(ex.clean, ex.corrupt, " " + ex.answer, " " + ex.wrong) for ex in examples]
    return tokenize_pairs(tokenizer, pairs, "docstring", "logit_diff")
