"""Text corpora as sequences of documents: the embedded one, or the user's.

``get_corpus(spec)`` accepts:

- ``None`` / ``"embedded"``: Austen's six novels and *Moby-Dick*, one document per chapter
  (see ``mechscope.activations.embedded``);
- a ``.txt`` file: consecutive passages of about ``passage_chars`` characters, cut at blank
  lines (one long book still gives many documents, so a held-out split is possible);
- a ``.jsonl`` file: one document per line, from the field ``text`` (a malformed line is a
  ``MechscopeError`` naming the file and line);
- a folder: every ``.txt`` and ``.jsonl`` file under it, in sorted path order;
- ``"hf:NAME[:SPLIT]"``: a Hugging Face dataset's ``text`` column, where ``datasets`` is
  installed and the dataset is reachable.

Documents are indexed in a first pass (file, byte range), so a corpus holds offsets, never
texts: memory stays small for big corpora and any order can be read back. The order is
deterministic; ``seed`` shuffles documents. ``split="train"`` / ``"heldout"`` partitions them:
every ``heldout_every``-th document (5% by default) is held out, spread over the whole corpus,
so SAE evaluation can use text the SAE was not trained on. A corpus with fewer than
``heldout_every`` documents is refused for either split: one it trained on whole could never
be evaluated. ``describe_corpus`` counts what a
corpus holds (``mechscope corpus``).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from mechscope.brief import brief_repr
from mechscope.errors import MechscopeError

Split = Literal["all", "train", "heldout"]


@dataclass(frozen=True)
class _Ref:
    """Where one document lives: a byte range of a file (txt passage or JSONL line) or a row index."""

    path: str
    start: int
    end: int
    kind: Literal["txt", "jsonl", "hf"]


@dataclass
class Corpus:
    """An indexed, ordered collection of documents; iterate it for the texts (str)."""

    spec: str
    refs: list[_Ref]
    licence: str = "unknown (user corpus)"
    description: str = ""
    split: Split = "all"
    seed: int | None = None
    _hf: Any = field(default=None, repr=False)
    _digest: str | None = field(default=None, repr=False)

    def __repr__(self) -> str:  # a notebook's last line: one short line, not every tensor
        return brief_repr(self)

    def __len__(self) -> int:
        return len(self.refs)

    def __iter__(self) -> Iterator[str]:
        handles: dict[str, Any] = {}
        try:
            for ref in self.refs:
                yield self._read(ref, handles)
        finally:
            for h in handles.values():
                h.close()

    def __getitem__(self, i: int) -> str:
        return self._read(self.refs[i], {})

    def _read(self, ref: _Ref, handles: dict[str, Any]) -> str:
        if ref.kind == "hf":
            return self._hf[ref.start]["text"]
        # checked strictly at indexing; "-sig": a file's byte-order mark is not text (json.loads refuses it in a str)
        raw = self._bytes(ref, handles).decode("utf-8-sig", errors="replace")
        # a text file's Windows line ends read as "\n": the same text tokenises the same, whichever system saved it
        return json.loads(raw)["text"] if ref.kind == "jsonl" else raw.replace("\r\n", "\n")

    @staticmethod
    def _bytes(ref: _Ref, handles: dict[str, Any]) -> bytes:
        """A file document's bytes, through ``handles`` (path -> open file, one per file)."""
        f = handles.get(ref.path)
        if f is None:
            f = handles[ref.path] = open(ref.path, "rb")
        f.seek(ref.start)
        return f.read(ref.end - ref.start)

    def digest(self) -> str | None:
        """A digest of the documents this corpus serves, in its order (their bytes, each with its
        length), so that a checkpoint can tell an edited corpus file from the one it was made on
        (the spec string names a path, not what is in it). Moving or renaming the files keeps it;
        ``split`` and ``seed`` change it. Reads the corpus once (the embedded one: 5 MB, ~15 ms).
        A Hugging Face dataset gives its own fingerprint; None when it has none."""
        if self._digest is None:
            if self._hf is not None:
                fp = getattr(self._hf, "_fingerprint", None)
                self._digest = f"hf:{fp}:{len(self.refs)}" if fp else ""
            else:
                h = hashlib.blake2b(digest_size=16)
                handles: dict[str, Any] = {}
                try:
                    for ref in self.refs:
                        raw = self._bytes(ref, handles)
                        h.update(len(raw).to_bytes(8, "little"))
                        h.update(raw)
                except OSError as exc:
                    raise MechscopeError(f"cannot read the corpus '{self.spec}' ({exc.strerror or exc}); it was moved or "
                                         "removed while in use.") from None
                finally:
                    for fh in handles.values():
                        fh.close()
                self._digest = h.hexdigest()
        return self._digest or None

    def info(self) -> dict[str, Any]:
        return {"spec": self.spec, "split": self.split, "seed": self.seed, "documents": len(self),
                "licence": self.licence, "description": self.description}


def get_corpus(
    spec: str | Path | None = None,
    split: Split = "all",
    seed: int | None = None,
    heldout_every: int = 20,
    passage_chars: int = 8000,
) -> Corpus:
    """Open a corpus (see the module docstring for ``spec``), optionally split and shuffled."""
    if split not in ("all", "train", "heldout"):
        raise MechscopeError(f"Unknown split '{split}'; use all, train or heldout.")
    licence, description, hf = "unknown (user corpus)", "", None
    if isinstance(spec, str) and not spec.strip():  # Path('') would be the current folder
        raise MechscopeError("The corpus spec is empty; give a .txt/.jsonl file or folder, 'hf:NAME', or leave it out "
                             "(None, or 'embedded') for the embedded corpus.")
    if spec is None or str(spec) == "embedded":
        from mechscope.activations import embedded

        path = embedded.embedded_path()
        refs = _index_jsonl(path)
        meta = embedded.manifest()
        licence, description = meta.get("licence", embedded.LICENCE), meta.get("description", "")
        spec = "embedded"
    elif str(spec).startswith("hf:"):
        hf, refs = _open_hf(str(spec))
        description = "Hugging Face dataset"
    else:
        refs = _index_path(Path(spec).expanduser(), passage_chars)
    if not refs:
        raise MechscopeError(f"The corpus '{spec}' holds no documents (empty files or no .txt/.jsonl files).")
    if split != "all":
        if heldout_every < 2:
            raise MechscopeError("heldout_every must be at least 2.")
        n_docs = len(refs)
        held = [r for i, r in enumerate(refs) if i % heldout_every == heldout_every - 1]
        refs = held if split == "heldout" else [r for i, r in enumerate(refs) if i % heldout_every != heldout_every - 1]
        if not refs or not held:  # refused for the train split too: a model trained on it could never be evaluated
            raise MechscopeError(
                f"The corpus '{spec}' has {n_docs} document{'s' if n_docs != 1 else ''}, too few to hold 1 in "
                f"{heldout_every} out: give it at least {heldout_every} (a .txt file is cut into passages of about "
                f"{passage_chars:,} characters at blank lines, a .jsonl file holds one document per line)."
            )
    if seed is not None:
        refs = list(refs)
        random.Random(seed).shuffle(refs)
    return Corpus(str(spec), refs, licence, description, split, seed, hf)


def corpus_digest(corpus: Any) -> str | None:
    """``Corpus.digest()`` for a ``Corpus``; None for any other iterable of texts (nothing to
    check a resume against)."""
    return corpus.digest() if isinstance(corpus, Corpus) else None


def changed_corpus(where: str, spec: Any) -> MechscopeError:
    """The one sentence for a resume whose corpus has other contents than its checkpoint's."""
    return MechscopeError(f"the checkpoint in {where} was made on other contents of the corpus {spec!r} (the file was "
                          "edited, or the path now holds other text); restore that text, or start over with a new --out.")


def same_corpus(a: Any, b: Any) -> bool:
    """Whether two ``--corpus`` values name the same corpus: equal, or two spellings (relative,
    absolute, ``~``) of one existing file or folder. A checkpoint records the value its run was
    given, and a resume that spells the same path otherwise must still match it (a relative value
    recorded in another working folder no longer resolves here, so the strings decide)."""
    if a == b:
        return True
    if not isinstance(a, (str, Path)) or not isinstance(b, (str, Path)) or not str(a) or not str(b):
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def describe_corpus(spec: str | Path | None = None, split: Split = "all", tokenizer: Any = None) -> dict[str, Any]:
    """What a corpus holds: ``Corpus.info()`` plus its ``characters`` (and, for the embedded
    corpus, its ``path`` and ``sources``). With a Hugging Face ``tokenizer``, also ``tokens``:
    every document tokenised without special tokens, plus one separator each (reads them all)."""
    c = get_corpus(spec, split=split)
    info = c.info()
    if info["spec"] == "embedded":
        from mechscope.activations.embedded import embedded_path, manifest

        info["path"] = str(embedded_path())
        info["sources"] = manifest().get("sources", [])
    n_chars = n_tok = 0
    for doc in c:
        n_chars += len(doc)
        if tokenizer is not None:
            n_tok += len(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]) + 1  # + separator
    info["characters"] = n_chars
    if tokenizer is not None:
        info["tokens"] = n_tok
    return info


def _index_path(path: Path, passage_chars: int) -> list[_Ref]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".jsonl"))
        if not files:
            raise MechscopeError(f"The folder '{path}' holds no .txt or .jsonl files.")
        return [r for f in files for r in _index_file(f, passage_chars)]
    if not path.exists():
        raise MechscopeError(
            f"No corpus at '{path}'; pass 'embedded', a .txt or .jsonl file, a folder, or hf:NAME[:SPLIT]."
        )
    return _index_file(path, passage_chars)


def _index_file(path: Path, passage_chars: int) -> list[_Ref]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _index_jsonl(path)
    if suffix == ".txt":
        return _index_txt(path, passage_chars)
    raise MechscopeError(f"Cannot read '{path}' as a corpus: use a .txt or .jsonl file (or a folder of them).")


def _index_jsonl(path: Path) -> list[_Ref]:
    """One ref per non-blank line; every line is parsed once here so errors surface early."""
    refs, pos = [], 0
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            start, pos = pos, pos + len(line)
            if not line.strip():
                continue
            where = f"{path}, line {i}"
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise MechscopeError(f"{where}: not valid JSON ({getattr(exc, 'msg', exc)}).") from exc
            if not isinstance(row, dict) or "text" not in row:
                raise MechscopeError(f'{where}: expected an object with a "text" field.')
            if not isinstance(row["text"], str):
                raise MechscopeError(f'{where}: the "text" field must be a string.')
            if row["text"].strip():
                refs.append(_Ref(str(path), start, pos, "jsonl"))
    return refs


def _index_txt(path: Path, passage_chars: int) -> list[_Ref]:
    """Passages of about ``passage_chars`` characters (bytes, for UTF-8 text), cut at blank lines."""
    refs, start, pos, size = [], 0, 0, 0
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            try:  # strict: a binary or Latin-1 file would otherwise become text of U+FFFD
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise MechscopeError(f"{path}, line {i}: not UTF-8 text (byte {exc.start + 1} of the line); convert the file "
                                     "to UTF-8 (e.g. iconv -f latin1 -t utf-8) or leave it out of the corpus.") from exc
            pos += len(line)
            size += len(line)
            if size >= passage_chars and not line.strip():
                refs.append(_Ref(str(path), start, pos, "txt"))
                start, size = pos, 0
    if pos > start:
        refs.append(_Ref(str(path), start, pos, "txt"))
    # drop whitespace-only passages
    out = []
    with open(path, "rb") as f:
        for r in refs:
            f.seek(r.start)
            if f.read(r.end - r.start).strip():
                out.append(r)
    return out


def _open_hf(spec: str) -> tuple[Any, list[_Ref]]:
    parts = spec[3:].split(":")
    name, hf_split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else "train")
    try:
        import datasets  # noqa: F401
    except ImportError as exc:
        raise MechscopeError(
            f"'{spec}' needs the `datasets` package (pip install datasets); or pass a local .txt/.jsonl file or folder."
        ) from exc
    try:
        ds = datasets.load_dataset(name, split=hf_split)
    except Exception as exc:  # network, missing dataset, bad split: all one message
        raise MechscopeError(
            f"Could not load the Hugging Face dataset '{name}' (split '{hf_split}'): "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; offline machines need a local corpus."
        ) from exc
    if "text" not in ds.column_names:
        raise MechscopeError(f"The dataset '{name}' has no 'text' column (columns: {', '.join(ds.column_names)}).")
    return ds, [_Ref(name, i, i + 1, "hf") for i in range(len(ds))]
