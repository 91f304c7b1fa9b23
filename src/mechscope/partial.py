"""Finished pieces of a long job, kept in its output folder so that a rerun resumes after them.

A job that runs for minutes as a sequence of independent pieces (the language-confusion run's
generations, one layer's neuron attribution, one fact's recall analyses) stores each piece as it
finishes. A rerun with the same ``key`` (the settings, the model's weights fingerprint, a digest
of the inputs) finds them and redoes only the rest; a rerun with another key discards them and
says so (``discarded``), since they describe another run.

Layout: ``OUT/<job>-partial/key.json`` and one file per piece, ``<name>.json`` (any JSON value)
or ``<name>.safetensors`` (named tensors), each committed by one ``os.replace``: a kill leaves a
piece whole or absent, never half written. ``key.json`` is written before any piece, and the
folder is emptied before a new key is written, so no piece outlives the key it was made under.
``clear`` removes the folder once the job's result is saved.

Pieces round-trip exactly: JSON floats are written by ``repr`` (Python's shortest round-trip
form) and tensors bit for bit, so a resumed job's result equals an uninterrupted one's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from mechscope.errors import MechscopeError
from mechscope.results import temporary_path

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _atomic(path: Path, write) -> None:
    tmp = temporary_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    _atomic(path, write)


FORMAT = 1
"""The pieces' layout; part of every key, so pieces of another layout are never read."""


def _canon(obj: Any) -> Any:
    """``obj`` as plain JSON for a key: dicts with text keys, lists for tuples, sorted lists for
    sets, tensors and arrays by a digest of their bytes (their text elides the middle), numbers
    and text as they are, anything else by its text (a ``Path``)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _canon(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canon(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_canon(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        obj = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bfloat16: its bits
    if hasattr(obj, "tobytes") and hasattr(obj, "shape") and hasattr(obj, "dtype"):  # numpy
        return {"array": str(obj.dtype), "shape": list(obj.shape), "sha1": hashlib.sha1(obj.tobytes()).hexdigest()[:16]}
    return str(obj)


def digest(obj: Any) -> str:
    """A short hash of ``obj`` read as a key reads it (``_canon``: tensors, arrays and numpy
    numbers by their bytes): for inputs too large to keep in ``key.json`` whole."""
    return hashlib.sha1(json.dumps(_canon(obj), sort_keys=True).encode()).hexdigest()[:16]


def model_key(model: Any) -> dict[str, Any]:
    """What a piece computed with ``model`` depends on: its name, its weights' fingerprint, and the
    dtype and device it ran in (a run killed on a GPU and resumed on the CPU, or in another
    dtype, starts afresh: its figures would differ in the last bits and a choice could flip)."""
    s = model.summary
    return {"name": getattr(s, "name", None), "fingerprint": model.fingerprint() if hasattr(model, "fingerprint") else None,
            "dtype": str(getattr(s, "dtype", "")), "device": str(getattr(model, "device", getattr(s, "device", "")))}


class Partial:
    """The finished pieces of job ``job`` under ``folder`` (None: nothing is kept or found)."""

    def __init__(self, folder: str | Path | None, job: str, key: dict[str, Any]):
        if not _NAME.fullmatch(job):
            raise ValueError(f"job name {job!r} must be letters, digits, '_', '.' or '-'")
        self.where = Path(folder) / f"{job}-partial" if folder is not None else None
        self.discarded = False
        """True when the folder held pieces of a run with another key (they are gone)."""
        self.found = 0
        """Pieces there at the start, made under this key."""
        if self.where is None:
            self.key: Any = None
            return
        self.key = _canon({"format": FORMAT, "mechscope": _version(), **key})  # as it reads back from key.json
        if not self.where.is_dir():
            return
        try:
            old = json.loads((self.where / "key.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old == self.key:
            self.found = sum(1 for p in self.where.iterdir() if p.suffix in (".json", ".safetensors") and p.name != "key.json")
        else:
            self.discarded = any(p.name != "key.json" for p in self.where.iterdir())
            shutil.rmtree(self.where)

    def _path(self, name: str, suffix: str) -> Path | None:
        if not _NAME.fullmatch(name) or name == "key":
            raise ValueError(f"piece name {name!r} must be letters, digits, '_', '.' or '-' (and not 'key')")
        return None if self.where is None else self.where / f"{name}{suffix}"

    def _ready(self) -> Path:
        """The folder, with this run's key in it; refused (one sentence) when another run has
        since put its own key there: two runs writing to one folder would mix their pieces."""
        assert self.where is not None  # callers return early without a folder
        key_file = self.where / "key.json"
        if not key_file.is_file():
            self.where.mkdir(parents=True, exist_ok=True)
            _write_text(key_file, json.dumps(self.key))
        else:
            try:
                there = json.loads(key_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                there = None
            if there != self.key:
                raise MechscopeError(f"Another run with other settings is writing to {self.where.parent}; give each run "
                                     "its own --out.")
        return self.where

    def get(self, name: str) -> Any | None:
        """The JSON piece ``name``, or None when it is not there."""
        p = self._path(name, ".json")
        if p is None or not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))["value"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # unreadable: done again

    def put(self, name: str, value: Any) -> Any:
        """Store ``value`` (JSON: dicts, lists, strings, numbers, None) as piece ``name``; returns it."""
        p = self._path(name, ".json")
        if p is not None:
            text = json.dumps({"value": value})  # a value that is not JSON fails here, before any file
            self._ready()
            _write_text(p, text)
        return value

    def get_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        """The tensor piece ``name`` (on the CPU), or None when it is not there."""
        p = self._path(name, ".safetensors")
        if p is None or not p.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (OSError, SafetensorError):
            return None

    def put_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Store ``tensors`` as piece ``name``; returns them."""
        p = self._path(name, ".safetensors")
        if p is not None:
            from safetensors.torch import save_file

            data = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}  # own storage each (safetensors refuses shared)
            self._ready()
            _atomic(p, lambda tmp: save_file(data, str(tmp)))
        return tensors

    def clear(self) -> None:
        """Remove every piece (the job's result is saved)."""
        if self.where is not None:
            clear(self.where.parent, self.where.name[:-len("-partial")])


def clear(folder: str | Path, job: str) -> None:
    """Remove job ``job``'s pieces from ``folder`` (its result is saved there)."""
    shutil.rmtree(Path(folder) / f"{job}-partial", ignore_errors=True)


def _version() -> str:
    from mechscope import __version__

    return __version__
