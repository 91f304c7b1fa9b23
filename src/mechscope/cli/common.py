"""Shared CLI plumbing: clear one-sentence errors (exit 2), --json output, model (and SAE) loading."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import typer
from rich.console import Console

from mechscope.errors import MechscopeError

console = Console()
err_console = Console(stderr=True)
STATE = {"debug": bool(os.environ.get("MECHSCOPE_DEBUG"))}

ModelOpt = typer.Option(None, "--model", "-m", help="Alias, local HF directory, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct).")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON to stdout.")
CorpusOpt = typer.Option(None, "--corpus", help="Text corpus: 'embedded' (default), a .txt/.jsonl file, a folder, or hf:NAME[:split].")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available).")


def fail(message: str) -> None:
    """Print one sentence to stderr and exit with code 2."""
    sys.stderr.write(f"error: {message}\n")  # plain and unwrapped: one sentence, one line
    sys.stderr.flush()
    raise typer.Exit(code=2)


def handles_errors(fn: Callable) -> Callable:
    """Turn MechscopeError (and a few predictable OS errors) into one sentence + exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            fail("interrupted.")
        except Exception as exc:  # noqa: BLE001 - only the errors _sentence knows become a sentence
            message = _sentence(exc)
            if message is None:
                raise
            if STATE["debug"]:
                traceback.print_exc()
            fail(message)

    return wrapper


def _sentence(exc: Exception) -> str | None:
    """The one sentence for a user's error (ours, or a predictable OS, encoding or safetensors
    error), or None for a bug (which keeps its traceback)."""
    if isinstance(exc, MechscopeError):
        return str(exc)
    if isinstance(exc, FileExistsError):
        return f"cannot make {exc.filename}: something of that name is in the way (a file where a folder goes?); give another path."
    if isinstance(exc, NotADirectoryError):
        return f"{exc.filename}: part of this path is a file, not a folder; give another path."
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return f"{exc.strerror or exc}: {exc.filename}"
    if isinstance(exc, UnicodeDecodeError):
        return f"a file given is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 and run again."
    if type(exc).__name__ == "SafetensorError":
        return f"a .safetensors file is damaged or not a safetensors file ({str(exc).splitlines()[0]}); write it again."
    return None


def check_out_folder(out: Path | None) -> None:
    """Refuse an ``--out`` that names an existing file, before any work."""
    if out is not None and Path(out).is_file():
        raise MechscopeError(f"{out} is a file; --out must name a folder.")


def print_pair_notes(dropped: dict[str, int] | None, notes: list[str] | None) -> None:
    """The task's dropped pairs (count and reason) and its notes on kept pairs, in yellow."""
    if dropped:
        console.print("[yellow]dropped pairs[/]: " + ", ".join(f"{v} ({k})" for k, v in dropped.items()), highlight=False)
    for note in notes or []:
        console.print(f"[yellow]note[/]: {note}", highlight=False)


def fresh_dir(stem: str) -> Path:
    """A new folder name under the current directory: mechscope-STEM-YYYYmmdd-HHMMSS[-i]."""
    base = f"mechscope-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    p, i = Path(base), 1
    while p.exists():
        p, i = Path(f"{base}-{i}"), i + 1
    return p


def emit_json(obj: Any) -> None:
    """Print ``obj`` as strict JSON (an undefined figure, NaN, is null)."""
    from mechscope.results import json_safe

    sys.stdout.write(json.dumps(json_safe(obj), indent=2, default=_default) + "\n")
    sys.stdout.flush()


def _default(o: Any) -> Any:
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


def load(model: str | None, device: str | None = None):
    from mechscope.models import load_model

    return load_model(model, device=device)


def load_sae_and_model(sae_dir: Path, model: str | None, device: str | None):
    """The SAE and its model (``--model``, else where the SAE was trained from, ``metadata.model_path``
    as ``sae train`` records it, else its model_name), checked to fit."""
    from mechscope.sae import check_sae_fits, load_sae

    sae = load_sae(sae_dir)
    m = load(model or sae.cfg.metadata.get("model_path") or sae.cfg.model_name or None, device)
    sae = sae.to(m.device)
    check_sae_fits(sae, m)
    return sae, m


def context_len_for(model: Any, given: int | None, default: int, option: str = "--context-len") -> int:
    """A context-length option's value on ``model``: ``given``, or ``min(default, the model's
    context)`` when it was not given. A given length beyond what a model with learned positions
    takes (``models.load.position_limit``) is refused in one sentence, before any work starts."""
    from mechscope.models.load import default_length, position_limit

    if given is None:
        return default_length(model, default)
    limit = position_limit(model)
    if limit is not None and given > limit:
        raise MechscopeError(f"{option} {given} is longer than {model.summary.name} reads ({limit} positions); "
                             f"give {option} {limit} or less.")
    return given


def check_early(make: Callable[[int], Any], given: int | None, default: int) -> None:
    """Build a command's settings (``make(context_len)``) before the model loads, so that a bad one
    is refused before the wait: with the context length ``given``, or, where none was given, with
    its ``default``. A refusal under the default that a shorter context (the model's, which
    ``context_len_for`` takes) would lift waits for the build after the model loads; one that no
    length from 2 to the default lifts is refused now, in the words of the shortest length (where
    the limits that longer contexts tighten, such as tokens per batch, are met)."""
    if given is not None:
        make(given)
        return
    try:
        make(default)
        return
    except MechscopeError:
        pass
    shortest: MechscopeError | None = None
    for n in range(2, default):
        try:
            make(n)
            return
        except MechscopeError as exc:
            shortest = shortest or exc
    if shortest is not None:
        raise shortest


def parse_layers(spec: str | None, n_layers: int | None = None) -> list[int] | None:
    """Block indices of a ``--layers`` value: comma-separated layers and ranges (``0,3,5-7``),
    sorted. ``all``, empty or None: every layer (``range(n_layers)``), or None when the model's
    layer count is not known yet. With ``n_layers``, each layer must be in ``[0, n_layers)``."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None if n_layers is None else list(range(n_layers))
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if part.startswith("-"):
            raise MechscopeError(f"--layers {spec!r}: {part!r} is negative; layers count from 0 (give 'all' or e.g. 0,3,5-7).")
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise MechscopeError(f"--layers {spec!r}: {part!r} is not a layer number or range; give 'all' or e.g. 0,3,5-7.") from None
        if b < a:
            raise MechscopeError(f"--layers {spec!r}: the range {part!r} runs backwards; write it low-high.")
        out.extend(range(a, b + 1))
    bad = [x for x in out if x < 0 or (n_layers is not None and x >= n_layers)]
    if bad:
        have = f"the model has layers 0-{n_layers - 1}" if n_layers is not None else "layers count from 0"
        raise MechscopeError(f"--layers {spec!r}: layer {bad[0]} does not exist; {have}.")
    if len(set(out)) != len(out):
        raise MechscopeError(f"--layers {spec!r} names a layer twice; give each layer once.")
    return sorted(out)
