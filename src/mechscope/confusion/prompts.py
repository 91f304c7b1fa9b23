"""Prompts with their expected language: the shipped set (``data/prompts.jsonl``: 30 short
instructions and questions each in German, Spanish, French and Italian, written for mechscope)
or a user JSONL file, one ``{"prompt": ..., "lang": ...}`` object per line."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from mechscope.confusion.config import check_langs
from mechscope.errors import MechscopeError

BUILTIN = "builtin"


@dataclass(frozen=True)
class LangPrompt:
    """One prompt and the language its answer should be in."""

    prompt: str
    lang: str


def builtin_text() -> str:
    return resources.files("mechscope.confusion").joinpath("data/prompts.jsonl").read_text(encoding="utf-8")


def parse_prompts(text: str, where: str) -> list[LangPrompt]:
    """Prompts from JSONL text; one sentence naming the line for a bad one."""
    out: list[LangPrompt] = []
    # lines end at "\n" only: JSON strings may hold U+2028 / U+0085, which str.splitlines() also breaks at
    for n, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise MechscopeError(f"{where}:{n} is not a JSON object; write one {{\"prompt\": ..., \"lang\": ...}} per line.") from None
        if not isinstance(obj, dict) or "prompt" not in obj or "lang" not in obj:
            raise MechscopeError(f"{where}:{n} lacks a \"prompt\" or a \"lang\" field; write {{\"prompt\": ..., \"lang\": ...}}.")
        prompt, lang = obj["prompt"], obj["lang"]
        if not isinstance(prompt, str):
            raise MechscopeError(f"{where}:{n} has a \"prompt\" that is not a string ({type(prompt).__name__}); give the text to answer.")
        if not prompt.strip():
            raise MechscopeError(f"{where}:{n} has an empty prompt; give the text to answer.")
        if not isinstance(lang, str):
            raise MechscopeError(f"{where}:{n} has a \"lang\" that is not a string; give a code such as \"de\".")
        try:
            (lang,) = check_langs((lang,))
        except MechscopeError as exc:
            raise MechscopeError(f"{where}:{n}: {exc}") from None
        out.append(LangPrompt(prompt.strip(), lang))
    if not out:
        raise MechscopeError(f"{where} holds no prompts; write one {{\"prompt\": ..., \"lang\": ...}} object per line.")
    return out


def load_prompts(source: str | Path = BUILTIN, langs: tuple[str, ...] | None = None, max_per_lang: int = 0) -> list[LangPrompt]:
    """The prompts of ``source`` (``"builtin"`` or a JSONL path) in ``langs`` (default: all),
    at most ``max_per_lang`` per language (0: all), in file order."""
    if str(source) == BUILTIN:
        items = parse_prompts(builtin_text(), "the shipped prompt set")
    else:
        p = Path(source)
        if not p.is_file():
            raise MechscopeError(f"Prompt file '{p}' does not exist; pass a JSONL file or 'builtin'.")
        try:
            text = p.read_text(encoding="utf-8-sig")  # a byte-order mark is allowed
        except UnicodeDecodeError:
            raise MechscopeError(f"Prompt file '{p}' is not UTF-8 text; save it as UTF-8 JSONL.") from None
        items = parse_prompts(text, str(p))
    if langs is not None:
        langs = check_langs(langs)
        items = [x for x in items if x.lang in langs]
        if not items:
            raise MechscopeError(f"No prompt in {source} is in {', '.join(langs)}; pass languages the file has.")
    if max_per_lang:
        seen: dict[str, int] = {}
        kept = []
        for x in items:
            seen[x.lang] = seen.get(x.lang, 0) + 1
            if seen[x.lang] <= max_per_lang:
                kept.append(x)
        items = kept
    return items
