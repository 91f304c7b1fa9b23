"""Saved result JSON files (circuit.json, heads.json, lens.json, dynamics.json,
dashboard.json, ...): one place that writes them (atomically, so a killed job never leaves half a
file) and one that reads them (the folder-or-file lookup, the JSON check and the schema-version
check, each failing with one sentence)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator

from mechscope.errors import MechscopeError


def json_safe(doc: Any) -> Any:
    """``doc`` with every non-finite float (NaN, an undefined figure; infinities) replaced by
    ``None``, so that it is strict JSON (``null``) that browsers and other tools read."""
    if isinstance(doc, float):
        return doc if math.isfinite(doc) else None
    if isinstance(doc, dict):
        return {k: json_safe(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [json_safe(v) for v in doc]
    return doc


def temporary_path(path: Path) -> Path:
    """Where an atomic write of ``path`` puts its bytes before the rename: a hidden name in the
    same folder, tagged with this process's pid (two writers never share one)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


_TEMPORARY = re.compile(r"^\..+\.tmp\d+$")


def sweep_temporaries(folder: Path) -> None:
    """Delete, anywhere under ``folder``, the temporary files of atomic writes (``temporary_path``)
    that a killed process left: a SIGKILL skips the writer's own cleanup. Only for a folder that
    one job writes, which the caller is about to write again, so no live write is caught."""
    for p in folder.rglob(".*.tmp*"):
        if p.is_file() and _TEMPORARY.match(p.name):
            p.unlink(missing_ok=True)


def write_json(path: str | Path, doc: Any, *, indent: int | None = 1, ensure_ascii: bool = True) -> Path:
    """Write ``doc`` as JSON to ``path`` through a temporary file in the same folder, then rename
    it into place: a reader sees the old file or the new one, never a partial one, and a write
    that fails removes its temporary file. ``ensure_ascii=False`` keeps non-ASCII text as UTF-8
    instead of ``\\uXXXX`` escapes (the multilingual confusion results)."""
    path = Path(path)
    text = json.dumps(doc, indent=indent, ensure_ascii=ensure_ascii)  # a document that cannot be written fails here
    tmp = temporary_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_result_json(out_dir: str | Path, filename: str, doc: Any, *, indent: int | None = 1,
                      ensure_ascii: bool = True) -> Path:
    """Create ``out_dir`` if needed and write ``doc`` to ``out_dir/filename`` (see ``write_json``)."""
    out = _result_folder(out_dir)
    return write_json(out / filename, doc, indent=indent, ensure_ascii=ensure_ascii)


def _result_folder(out_dir: str | Path) -> Path:
    """``out_dir``, created if needed; one sentence where it is a file or cannot be made."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MechscopeError(f"'{out}' is a file; results are saved into a folder, so give a folder's path.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MechscopeError(f"Cannot create the folder '{out}' ({exc.strerror or exc}); give a folder you can write to.") from None
    return out


@contextlib.contextmanager
def whole_folder(folder: str | Path) -> Iterator[Path]:
    """Write ``folder`` whole: the block writes into a hidden temporary folder beside it, which
    replaces ``folder`` when the block ends without an error, so a reader (``dynamics`` beside a
    training run) or a killed run never sees half of it. A leftover temporary folder of a killed
    run is removed first; an existing ``folder`` (a resumed run saving its last step again) is
    replaced."""
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def tensors_digest(tensors: dict[str, Any]) -> str:
    """A 16-hex digest of ``tensors`` (names, dtypes, shapes and bytes): what a result's JSON and
    its safetensors file both record, so a pair from two saves is told apart (``save_with_json``).
    Derived from the content, so an equal result writes equal files."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_with_json(out_dir: str | Path, json_name: str, doc: dict[str, Any], tensors_name: str,
                   tensors: dict[str, Any]) -> Path:
    """Save a result that is a JSON document and a safetensors file as one: the tensors first
    (through a temporary file, renamed into place), then the JSON (``write_result_json``), each
    recording ``tensors_digest``. A run killed between the two leaves new tensors beside the old
    JSON, which ``check_tensors_match`` refuses instead of mixing two results (session 39:
    ``evaluate`` read a new run's JSON with an old run's circuit mask)."""
    from safetensors.torch import save_file

    out = _result_folder(out_dir)
    digest = tensors_digest(tensors)
    target = out / tensors_name
    tmp = temporary_path(target)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"digest": digest})
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return write_result_json(out, json_name, {**doc, "tensors_digest": digest})


def check_tensors_match(doc: dict[str, Any], tensors_path: Path, where: str) -> None:
    """Refuse (one sentence) a safetensors file that records another save's digest than the JSON
    ``doc`` beside it (``save_with_json``); files written before digests were recorded pass."""
    want = doc.get("tensors_digest")
    if not tensors_path.is_file():
        return
    try:
        from safetensors import safe_open

        with safe_open(str(tensors_path), framework="pt") as f:
            got = (f.metadata() or {}).get("digest")
    except Exception:  # noqa: BLE001 - a damaged file: the reader that loads it says so
        return
    if got is not None and got != want:  # also new tensors beside a JSON from before digests (a killed first re-save)
        raise MechscopeError(f"{where} holds {tensors_path.name} from another save than its JSON (a run was stopped "
                             "between writing the two, or two runs wrote the folder); run the command again to rewrite it.")


def read_result_json(path: str | Path, filename: str, schema_version: int, made_by: str) -> tuple[dict[str, Any], Path]:
    """The parsed ``filename`` in folder ``path`` (or ``path`` itself if it is a file), and the
    file's path. ``made_by`` names the command that writes it, for the error message."""
    p = Path(path)
    if p.is_dir():
        p = p / filename
    if not p.is_file():
        raise MechscopeError(f"No {filename} at '{path}'; pass the folder `{made_by}` wrote.")
    other = p.name != filename  # a file the user named that is not ``filename``
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        if other:
            raise MechscopeError(f"'{p}' is not a {filename} (not JSON); pass the folder `{made_by}` wrote.") from exc
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else " (not UTF-8 text)"
        raise MechscopeError(f"'{p}' is not valid JSON{where}.") from exc
    if other and (not isinstance(d, dict) or "schema_version" not in d):
        raise MechscopeError(f"'{p}' is not a {filename}; pass the folder `{made_by}` wrote.")
    if not isinstance(d, dict) or d.get("schema_version") != schema_version:
        got = d.get("schema_version") if isinstance(d, dict) else None
        raise MechscopeError(f"'{p}' has schema_version {got}, this mechscope reads {schema_version}.")
    return d, p


def library_versions() -> dict[str, str]:
    """Python and the versions of the libraries a saved result depends on (for provenance)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for pkg in ("mechscope", "torch", "transformers", "transformer-lens"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
