"""Label sets for probing: labelled token positions in token sequences, each with its word type.

A ``LabelSet`` holds token sequences and items ``(sequence, position, label, word type)``. The
word type is what Hewitt and Liang's control task ties its random labels to: a probe that does
as well on the control task as on the real one has memorised word types, not read a property.

Sources:

- built-in, on the embedded corpus (no download): ``capitalised`` (a token that starts a word:
  capitalised or not) and ``ioi-names`` (a word-start token: one of the IOI task's first names or
  not). The word type is the token itself.
- built-in, from ``mechscope confusion``'s shipped prompts: ``language`` (the token starting each word of a
  prompt labelled with the prompt's language: de, es, fr or it; 30 prompts each). The word type
  is the token, so the control task exposes a probe that only knows which words belong to
  which language.
- a JSONL file, one object per line, either ``{"text": ..., "label": ...}`` (the item is the
  text's last token: sequence classification, e.g. the language of a prompt; the word type is
  the last token) or ``{"words": [...], "labels": [...]}`` (the words joined by spaces; each word's
  item is its last token; the word type is the word). A label is a non-empty string or an
  integer (read as its decimal string: 1 and "1" are one class); anything else is refused. A
  file may start with a UTF-8 byte-order mark. A text longer than the model's learned positions
  is refused by ``run_probe`` (the ``language`` set's prompts are cut to them instead).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechscope.brief import brief_repr
from mechscope.errors import MechscopeError
from mechscope.models.tokens import token_texts
from mechscope.probes.config import BUILTIN_LABELS, ProbeConfig

if TYPE_CHECKING:
    from mechscope.models import Model


@dataclass
class LabelSet:
    """Token sequences and the labelled positions in them (parallel lists ``seq``/``pos``/``label``/``word``)."""

    name: str
    classes: list[str]
    sequences: list[list[int]]
    seq: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    word: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What reading the labels left out or changed (repeated lines, trailing whitespace), one line each."""

    def __repr__(self) -> str:  # a notebook's last line: one short line, not every tensor
        return brief_repr(self)

    def __len__(self) -> int:
        return len(self.seq)

    def add(self, seq: int, pos: int, label: str, word: str) -> None:
        if label not in self.classes:
            self.classes.append(label)
        self.seq.append(seq)
        self.pos.append(pos)
        self.label.append(self.classes.index(label))
        self.word.append(word)

    def counts(self) -> dict[str, int]:
        out = {c: 0 for c in self.classes}
        for y in self.label:
            out[self.classes[y]] += 1
        return out

    def check(self) -> "LabelSet":
        """Raise a one-sentence error unless there are at least two classes with items."""
        present = [c for c, n in self.counts().items() if n > 0]
        if len(present) < 2:
            raise MechscopeError(
                f"The label set '{self.name}' has {len(self)} labelled tokens in {len(present)} class(es) "
                f"({', '.join(present) or 'none'}); a probe needs at least two classes: give more, or more varied, data."
            )
        return self

    def subset(self, keep: list[int]) -> "LabelSet":
        """The items at indices ``keep`` (sequences are shared)."""
        return LabelSet(self.name, list(self.classes), self.sequences, [self.seq[i] for i in keep],
                        [self.pos[i] for i in keep], [self.label[i] for i in keep], [self.word[i] for i in keep],
                        list(self.notes))


def _word_start(tok: str) -> str | None:
    """The word a token starts (leading space then a letter), else None. ``tok`` is the token's
    text from ``token_texts`` (a SentencePiece '▁Mary' is ' Mary'; ``decode([i])`` gives 'Mary')."""
    if len(tok) >= 2 and tok[0] == " " and tok[1].isalpha():
        return tok[1:]
    return None


def builtin_labels(model: Model, name: str, cfg: ProbeConfig | None = None, corpus: Any = None) -> LabelSet:
    """A built-in label set: ``capitalised`` or ``ioi-names`` from packed contexts of the corpus
    (default: the embedded one), collected until the rarest class has enough items for ``cfg.max_items``
    after balancing, or 4,000 contexts were read; ``language`` from the shipped multilingual prompts."""
    from mechscope.activations.corpus import get_corpus
    from mechscope.activations.store import pack_contexts
    from mechscope.tasks.ioi import NAMES

    cfg = cfg or ProbeConfig()
    if name not in BUILTIN_LABELS:
        raise MechscopeError(f"Unknown built-in label set '{name}'; use one of {', '.join(BUILTIN_LABELS)} or a JSONL file.")
    if name == "language":
        return _language_labels(model)
    names = set(NAMES)
    classes = ["capitalised", "lowercase"] if name == "capitalised" else ["name", "other"]
    data = LabelSet(name, classes, [])
    tok = model.tokenizer
    cache: dict[int, str] = {}
    need = cfg.max_items // len(classes) + 1
    docs = get_corpus(corpus, seed=cfg.seed) if not isinstance(corpus, list) else corpus
    seen = [0] * len(classes)  # items per class so far, counted as they come (not recounted per context)
    from mechscope.models.load import default_length

    for ids in pack_contexts(tok, docs, default_length(model, cfg.context_len)):  # no longer than the model's context
        s, first = len(data.sequences), len(data)
        data.sequences.append(ids)
        new = sorted({i for i in ids[1:] if i not in cache})
        cache.update(zip(new, token_texts(tok, new)))  # each token's text with its leading space (SentencePiece too)
        for p in range(1, len(ids)):  # position 0 has no context (and is an attention sink)
            t = cache[ids[p]]
            w = _word_start(t)
            if w is None:
                continue
            if name == "capitalised":
                data.add(s, p, "capitalised" if w[0].isupper() else "lowercase", t)
            else:
                data.add(s, p, "name" if w in names else "other", t)
        for y in data.label[first:]:
            seen[y] += 1
        if min(seen) >= need or len(data.sequences) >= 4000:
            break
    return data.check()


def _language_labels(model: Model) -> LabelSet:
    """The ``language`` set: word-start tokens of the shipped multilingual prompts, labelled by language."""
    from mechscope.confusion.prompts import load_prompts
    from mechscope.models.load import context_overrun

    items = load_prompts()
    data = LabelSet("language", sorted({p.lang for p in items}), [])
    tok = model.tokenizer
    for p in items:
        ids = list(tok(p.prompt)["input_ids"])
        if (n_ctx := context_overrun(model, len(ids))) is not None:
            ids = ids[:n_ctx]  # cut to the model's learned positions (a causal model's earlier tokens are unchanged)
        s = len(data.sequences)
        data.sequences.append(ids)
        texts = token_texts(tok, ids)  # each with its leading space (decode([i]) drops a SentencePiece one)
        prev = texts[0]
        for pos in range(1, len(ids)):
            t = texts[pos]
            if _word_start(t) is not None or (t[:1].isalpha() and prev.endswith(" ")):  # " word", or "word" after a lone space
                data.add(s, pos, p.lang, t)
            prev += t
    return data.check()


def labels_from_file(tokenizer: Any, path: str | Path) -> LabelSet:
    """A label set from a JSONL file (see the module docstring for the two line formats)."""
    p = Path(path)
    if not p.is_file():
        raise MechscopeError(f"Label file '{p}' does not exist; give a JSONL file or one of {', '.join(BUILTIN_LABELS)}.")
    data = LabelSet(p.name, [], [])
    try:
        text_all = p.read_bytes().decode("utf-8-sig")  # a byte-order mark is allowed
    except UnicodeDecodeError as e:
        raise MechscopeError(f"Label file '{p}' is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8.") from None
    seen: dict[Any, tuple[Any, str]] = {}  # a repeated text would sit in both the train and the test split
    repeats = trailing = 0
    # lines end at "\n" only: JSON strings may hold U+2028 / U+0085, which str.splitlines() also breaks at
    for n, line in enumerate(text_all.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise MechscopeError(f"Line {where} is not valid JSON ({e.msg}); each line must be one JSON object.") from None
        if not isinstance(obj, dict):
            raise MechscopeError(f"Line {where} is not a JSON object; write {{\"text\": ..., \"label\": ...}} or {{\"words\": [...], \"labels\": [...]}}.")
        if "text" in obj and "label" in obj:
            text, label = obj["text"], obj["label"]
            if not isinstance(text, str) or not text.strip():
                raise MechscopeError(f"Line {where}: 'text' must be a non-empty string.")
            if text != text.rstrip():  # the label is read at the last token: the text's, not a trailing space's
                text, trailing = text.rstrip(), trailing + 1
            key: Any = ("text", text)
            lab = _label(label, where)
            if _repeated(seen, key, lab, where):
                repeats += 1
                continue
            ids = tokenizer(text)["input_ids"]
            data.sequences.append(ids)
            data.add(len(data.sequences) - 1, len(ids) - 1, lab, token_texts(tokenizer, ids[-1:])[0])
        elif "words" in obj and "labels" in obj:
            words, labels = obj["words"], obj["labels"]
            if (not isinstance(words, list) or not isinstance(labels, list) or len(words) != len(labels) or not words
                    or not all(isinstance(w, str) and w and not any(c.isspace() for c in w) for w in words)):
                raise MechscopeError(f"Line {where}: 'words' and 'labels' must be lists of equal, non-zero length, "
                                     "the words non-empty strings without spaces.")
            labs = [_label(x, where) for x in labels]
            if _repeated(seen, ("words", tuple(words)), tuple(labs), where):
                repeats += 1
                continue
            _add_words(tokenizer, data, words, labs, where)
        else:
            raise MechscopeError(f"Line {where} has neither 'text' + 'label' nor 'words' + 'labels'; see `mechscope probe --help`.")
    if repeats:
        data.notes.append(f"{repeats} line{'s' * (repeats != 1)} of {p.name} repeated an earlier line and "
                          f"{'were' if repeats != 1 else 'was'} read once (a copy would sit in both the train and the test split).")
    if trailing:
        data.notes.append(f"{trailing} text{'s' * (trailing != 1)} of {p.name} ended in whitespace, left out: the label is read "
                          "at the text's last token.")
    return data.check()


def _repeated(seen: dict[Any, tuple[Any, str]], key: Any, label: Any, where: str) -> bool:
    """Whether ``key`` (a text or a word list) was read before with the same ``label``; one
    sentence when it was read with another."""
    if key not in seen:
        seen[key] = (label, where)
        return False
    first_label, first = seen[key]
    if first_label != label:
        raise MechscopeError(f"Line {where} repeats the {key[0]} of line {first} with other labels ({label!r} vs "
                             f"{first_label!r}); give each text one label.")
    return True


def _label(label: Any, where: str) -> str:
    """A label as its class name: a string, or an integer written in decimal (so 1 and "1" are one class)."""
    if isinstance(label, str) and label.strip():
        return label.strip()  # "pos " and "pos" are one class
    if isinstance(label, int) and not isinstance(label, bool):
        return str(label)
    raise MechscopeError(f"Line {where}: the label {json.dumps(label)} is not a non-empty string or an integer; "
                         "write each label as a string (or an integer).")


def _add_words(tokenizer: Any, data: LabelSet, words: list[str], labels: list[str], where: str) -> None:
    """Join the words with spaces and label each word's last token (character offsets map words to tokens)."""
    text = " ".join(words)
    try:
        enc = tokenizer(text, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        raise MechscopeError("Word-level labels need a fast tokenizer (one that gives character offsets).") from None
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    s = len(data.sequences)
    data.sequences.append(ids)
    start = 0
    for w, lab in zip(words, labels):
        end = start + len(w)
        last = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if not last:
            raise MechscopeError(f"Line {where}: the word {w!r} maps to no token; check the text.")
        data.add(s, last[-1], lab, w)
        start = end + 1
