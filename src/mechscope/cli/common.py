"""Shared CLI plumbing: clear one-sentence errors (exit 2), --json output, model (and SAE) loading."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import typer
from rich.markup import escape

from mechscope import lock
from mechscope.errors import MechscopeError, refuse_file_as_folder
from mechscope.terminal import TerminalConsole, visible

console = TerminalConsole()  # markup off, control characters escaped: what is printed is text (mechscope.terminal)
err_console = TerminalConsole(stderr=True)
STATE = {"debug": bool(os.environ.get("MECHSCOPE_DEBUG"))}

ModelOpt = typer.Option(None, "--model", "-m", help="Alias, local HF directory, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct).")
RecordedModelOpt = typer.Option(None, "--model", "-m", help="Alias, local HF directory, .gguf file or hub id (default: the "
                                "model the folder records).")
"""``--model`` of a command that reads a saved result: it defaults to the model that made it."""
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON to stdout.")
CorpusOpt = typer.Option(None, "--corpus", help="Text corpus: 'embedded' (default), a .txt/.jsonl file, a folder, or hf:NAME[:split].")
DeviceOpt = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available).")


def fail(message: str) -> None:
    """Print one sentence to stderr and exit with code 2; under a command given ``--json``, print
    it on stdout too, as ``emit_error_json``'s object, so that a script reading stdout learns why."""
    sys.stderr.write(f"error: {visible(message)}\n")  # plain and unwrapped: one sentence, one line (a path's ESC shown, not run)
    sys.stderr.flush()
    if _JSON_ERRORS.get():
        _JSON_ERRORS.set(False)  # one object: a second fail() in the same command prints none
        emit_error_json(message, 2)
    raise typer.Exit(code=2)


def emit_error_json(message: str, code: int) -> None:
    """The one JSON object a refused ``--json`` run prints on stdout (the stderr sentence, without
    its ``error:``, and the exit code), in place of the result a script would parse."""
    sys.stdout.write(json.dumps({"error": message, "exit_code": code}) + "\n")
    sys.stdout.flush()


_JSON_ERRORS: contextvars.ContextVar[bool | None] = contextvars.ContextVar("_JSON_ERRORS", default=None)
"""Whether ``fail`` also prints its sentence as JSON: the outermost ``handles_errors`` command's
``json`` keyword (None outside a command; an inner command leaves the outer one's value)."""


def handles_errors(fn: Callable) -> Callable:
    """Turn MechscopeError (and a few predictable OS errors) into one sentence + exit 2. The
    outermost wrapped command also holds back ``check_out_folder``'s replace notes until it ends,
    and prints those whose result it really rewrote (``_flush_replace_notes``), and, given
    ``json=True``, has ``fail`` print its refusal on stdout as JSON too (``_JSON_ERRORS``)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        locks_before = lock.held() if _REPLACE_NOTES.get() is None else None  # the outermost command releases its locks
        token = _REPLACE_NOTES.set([]) if _REPLACE_NOTES.get() is None else None  # None: an inner call
        json_token = _JSON_ERRORS.set(kwargs.get("json") is True) if _JSON_ERRORS.get() is None else None

        def flush() -> None:
            nonlocal token
            _flush_replace_notes(token)
            token = None

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            flush()
            fail("interrupted.")
        except Exception as exc:  # noqa: BLE001 - only the errors _sentence knows become a sentence
            message = _sentence(exc)
            if message is None:
                raise
            if STATE["debug"]:
                traceback.print_exc()
            flush()  # before the error: a run that wrote, then failed, did replace it
            fail(message)
        finally:
            flush()
            if json_token is not None:
                _JSON_ERRORS.reset(json_token)
            if locks_before is not None:
                lock.release(lock.held() - locks_before)

    return wrapper


@dataclass
class _ReplaceNote:
    """A note ``check_out_folder`` holds back: the line, and the state of the earlier result's
    marker files when the run began (``_marker_state``)."""

    line: str
    markers: tuple[Path, ...]
    state: tuple[tuple[int, int, int] | None, ...]


_REPLACE_NOTES: contextvars.ContextVar[list[_ReplaceNote] | None] = contextvars.ContextVar("_REPLACE_NOTES", default=None)
"""The replace notes of the command running now (None outside ``handles_errors``: printed at once)."""


def _marker_state(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int] | None, ...]:
    """Each file's (inode, mtime in ns, size), None where it is missing: a result written again
    (``results.write_json`` renames a new file into place) or removed changes it."""
    out: list[tuple[int, int, int] | None] = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def _flush_replace_notes(token: contextvars.Token | None) -> None:
    """End the outermost command's deferral (``token`` from ``handles_errors``; None: an inner
    call, which leaves it to the outer one) and print, once, the note of each earlier result the
    run really rewrote or removed: a run refused before it wrote keeps the old result, so saying
    that it replaced it would be false."""
    if token is None:
        return
    notes = _REPLACE_NOTES.get() or []
    _REPLACE_NOTES.reset(token)
    for note in notes:
        if _marker_state(note.markers) != note.state:
            err_console.print(note.line, highlight=False, markup=False)


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


@dataclass(frozen=True)
class _Artefact:
    """One kind of folder a mechscope command writes, recognised by its marker files, so that no
    command mixes its files into (or replaces) another command's results."""

    kind: str
    """The key a command passes to ``check_out_folder`` as ``writes``."""
    what: str
    """How a message names it ("an SAE")."""
    markers: tuple[str, ...]
    """Files (relative to the folder) that must all be there; one with ``*`` matches any file of that pattern."""
    test: Callable[[Any], bool] | None = None
    """Where another artefact (or an ordinary file) shares the first marker's name: what its JSON
    must satisfy to be this one."""
    finished: bool = True
    """A finished result, which a re-run of its command replaces, rather than a state it resumes."""


def _kind_is(kind: str, same: bool = True) -> Callable[[Any], bool]:
    """A ``_Artefact.test``: the JSON's ``kind`` is ``kind`` (``same=False``: is not)."""
    return lambda doc: isinstance(doc, dict) and (doc.get("kind") == kind) == same


def _has_keys(*keys: str) -> Callable[[Any], bool]:
    """A ``_Artefact.test``: the JSON is an object with all of ``keys``."""
    return lambda doc: isinstance(doc, dict) and all(k in doc for k in keys)


_ARTEFACTS: tuple[_Artefact, ...] = (
    # models, dictionaries and lenses: sae/io.py, features/transcoder_set.py, lens/tuned.py, vision/models.py
    _Artefact("transcoders", "a transcoder set", ("config.yaml",)),
    _Artefact("transcoders", "an unfinished transcoder training run", ("checkpoint/latest.json",), finished=False),
    _Artefact("tuned-lens", "a tuned lens", ("tuned_lens.json",)),
    _Artefact("tuned-lens", "an unfinished tuned-lens training run", ("checkpoint/stage1.safetensors",), finished=False),
    _Artefact("sae", "an SAE", ("cfg.json", "sae_weights.safetensors")),
    _Artefact("sae", "an unfinished SAE training run", ("checkpoint/state.json",), test=_has_keys("sae_config"), finished=False),
    _Artefact("vision-model", "a vision model", ("config.json", "model.safetensors"), test=_kind_is("mechscope-vision-model")),
    # resumable states: heads/train.py, explain/exemplars.py, activations/shards.py, icl/run.py, partial.py
    _Artefact("train-toy", "a training run", ("train.json",), finished=False),
    _Artefact("exemplars", "an exemplars checkpoint", ("state.safetensors",)),
    _Artefact("shards", "harvested activation shards", ("manifest.json",),
              test=_has_keys("shards", "hooks"), finished=False),
    _Artefact("icl", "an unfinished few-shot ICL run", ("icl-partial.json",), finished=False),
    _Artefact("probe", "an unfinished probe run", ("probe-partial/key.json",), finished=False),
    _Artefact("heads", "an unfinished head-scoring run", ("heads-partial/key.json",), finished=False),
    _Artefact("circuit", "an unfinished circuit discovery", ("discover-s*-partial/key.json",), finished=False),
    _Artefact("confusion", "an unfinished language-confusion run", ("confusion-partial/key.json",), finished=False),
    _Artefact("recall", "an unfinished recall dataset run", ("recall-partial/key.json",), finished=False),
    # results (the data files server/runs.py lists)
    _Artefact("vision-circuit", "a vision circuit", ("circuit.json",), test=_kind_is("vision-circuit")),
    _Artefact("circuit", "a circuit", ("circuit.json",), test=_kind_is("vision-circuit", same=False)),
    _Artefact("graph", "an attribution graph", ("graph.json",)),
    _Artefact("heads", "head results", ("heads.json",)),
    _Artefact("dynamics", "training dynamics", ("dynamics.json",)),
    _Artefact("binding-dynamics", "binding dynamics", ("binding_dynamics.json",)),
    _Artefact("interchange", "interchange interventions", ("interchange.json",)),
    _Artefact("lens", "a logit lens", ("lens.json",)),
    _Artefact("recall", "recall results", ("recall.json",)),
    _Artefact("probe", "probe results", ("probe.json",)),
    _Artefact("icl", "a few-shot ICL run", ("icl.json",)),
    _Artefact("confusion", "language-confusion results", ("confusion.json",)),
    _Artefact("dashboard", "SAE dashboards", ("dashboard.json",)),
    _Artefact("eval", "an evaluation", ("eval.json",)),
    _Artefact("steer", "steering results", ("steer.json",)),
    _Artefact("compose", "a vision composition", ("compose.json",)),
    _Artefact("eap", "a vision EAP run", ("eap.json",)),
)
ARTEFACT_KINDS = frozenset(a.kind for a in _ARTEFACTS)


def check_out_folder(out: Path | None, writes: str | None = None, *, beside: tuple[str, ...] = (),
                     replaces: bool = True, file: bool = False, option: str = "--out") -> None:
    """Refuse a bad ``--out`` before any work, in one sentence: one that names an existing file
    (``file``: one that names a folder), one that cannot be created (its OS reason: a temporary
    file's name in a later error would say nothing), and, where the command says what it
    ``writes`` (an ``_ARTEFACTS`` kind), a folder that holds another command's artefacts (those of
    the kinds in ``beside`` are welcome: an evaluation written into its SAE's folder). A folder
    holding the same command's earlier finished result gets one line on stderr saying that this
    run replaced it, printed when the command (``handles_errors``) ends and only where the run
    did rewrite or remove that result: a run refused before it wrote keeps it, and says nothing
    of it; called outside a command, the line comes at once (``replaces=False``: the command
    resumes there and says so itself)."""
    if out is None:
        return
    out = Path(out)
    if file:
        if out.is_dir():
            raise MechscopeError(f"{option} {out} is a folder; give a file name, e.g. {out / 'out.jsonl'}.")
        _check_creatable(out.parent, option, out)
        hold_out(out, option)
        return
    refuse_file_as_folder(out, option)
    _check_creatable(out, option, out)
    hold_out(out, option)
    if writes is None:
        return
    if writes not in ARTEFACT_KINDS:  # a caller's typo must not switch the check off
        raise ValueError(f"unknown artefact kind {writes!r}")
    held = _held_artefacts(out)
    for art in held:
        if art.kind != writes and art.kind not in beside:
            raise MechscopeError(f"{option} {out} holds {art.what} ({', '.join(art.markers)}); choose another folder.")
    for art in held:
        if art.kind == writes and art.finished and replaces:
            made_by = _recorded_model(out / art.markers[0])
            of = f" (of {made_by})" if made_by else ""
            pending = _REPLACE_NOTES.get()
            if pending is None:  # called outside a command: say it now
                err_console.print(f"note: {option} {out} holds an earlier result, {art.what}{of}; this run replaces it.",
                                  highlight=False, markup=False)
                return
            markers = tuple(out / m for m in art.markers)
            pending.append(_ReplaceNote(f"note: {option} {out} held an earlier result, {art.what}{of}; this run replaced it.",
                                        markers, _marker_state(markers)))
            return


def given(ctx: Any, name: str, *, env: bool = True) -> bool:
    """Whether the option ``name`` (a ``typer.Context`` parameter) was given, not left at its default;
    with ``env=False`` only a value typed on the command line counts, not one from an environment
    variable (``--api-key`` from OPENAI_API_KEY)."""
    source = ctx.get_parameter_source(name)
    if source is None:
        return False
    if not env:
        return source.name == "COMMANDLINE"
    return source.name not in ("DEFAULT", "DEFAULT_MAP")


def holds_finished(out: Path | None, kind: str) -> bool:
    """Whether ``out`` holds a finished ``kind`` artefact (an ``_ARTEFACTS`` kind): what a training
    command that never overwrites its result refuses."""
    return out is not None and any(a.kind == kind and a.finished for a in _held_artefacts(Path(out)))


def _check_creatable(folder: Path, option: str, out: Path) -> None:
    """Make ``folder`` (and any missing parents) to see that it can be made, then remove what was
    made: a command that is refused later leaves nothing behind."""
    missing: list[Path] = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    made: list[Path] = []
    try:
        if p.exists() and not p.is_dir():
            raise NotADirectoryError(20, "part of the path is a file", str(p))
        for d in reversed(missing):
            d.mkdir()
            made.append(d)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(folder))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = "" if exc.filename in (None, str(out)) else f" at {exc.filename}"
        raise MechscopeError(f"{option} {out} cannot be written ({reason}{where}); give a folder you can write to.") from None
    finally:
        for d in reversed(made):
            with contextlib.suppress(OSError):
                d.rmdir()


def _held_artefacts(folder: Path) -> list[_Artefact]:
    """The ``_ARTEFACTS`` that ``folder`` holds, in table order."""
    if not folder.is_dir():
        return []
    def there(marker: str) -> bool:  # a marker with '*' matches any file of that pattern
        return any(p.is_file() for p in folder.glob(marker)) if "*" in marker else (folder / marker).is_file()

    return [a for a in _ARTEFACTS if all(there(m) for m in a.markers)
            and (a.test is None or a.test(_read_json(folder / a.markers[0])))]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _recorded_model(path: Path) -> str | None:
    """The model a result file records (its ``model``'s name or source, or ``model_name``), if any."""
    doc = _read_json(path) if path.suffix == ".json" else None
    if not isinstance(doc, dict):
        return None
    m = doc.get("model", doc.get("model_name"))
    if isinstance(m, dict):
        m = m.get("name") or m.get("source")
    return str(m) if isinstance(m, str) and m else None


def print_pair_notes(dropped: dict[str, int] | None, notes: list[str] | None) -> None:
    """The task's dropped pairs (count and reason) and its notes on kept pairs, in yellow."""
    if dropped:
        console.print("[yellow]dropped pairs[/]: " + escape(", ".join(f"{v} ({k})" for k, v in dropped.items())), highlight=False,
                      markup=True)
    for note in notes or []:
        console.print(f"[yellow]note[/]: {escape(note)}", highlight=False, markup=True)


def hold_out(path: Path, option: str = "--out") -> None:
    """Inside a command (``handles_errors``), hold the lock on ``path`` (``mechscope.lock``) until
    the command ends: a second command writing there at the same time is refused in one sentence.
    Outside one (a notebook calling a CLI helper) nothing is locked."""
    if _REPLACE_NOTES.get() is not None:
        lock.hold(path, option)


def hold_shared(path: Path) -> None:
    """Inside a command, hold a shared lock on ``path`` (a unit database several passes write at
    once) until the command ends; ``lock.sole_holder`` then tells whether another holds it too."""
    if _REPLACE_NOTES.get() is not None and (who := lock.try_lock(path, shared=True)) is not None:
        raise MechscopeError(f"another mechscope run ({who}) is removing {path}; run this one again when it has finished.")


def resumable_out(out: Path | None, stem: str) -> Path:
    """``out``, or a fresh folder (``fresh_dir``) named on stderr with how to resume in it: a
    resumable job keeps its finished stages in its output folder, and a rerun without ``--out``
    would start afresh elsewhere."""
    if out is not None:
        return Path(out)
    d = fresh_dir(stem)
    err_console.print(f"note: writing to {d}; if this run is stopped, the same command with --out {d} resumes it.",
                      highlight=False, markup=False, soft_wrap=True)  # one line: the folder name stays whole to copy
    return d


def fresh_dir(stem: str) -> Path:
    """A new folder name under the current directory: mechscope-STEM-YYYYmmdd-HHMMSS[-i]."""
    base = f"mechscope-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    p, i = Path(base), 1
    # a name another run took this second (its lock; it may not have made the folder yet) is skipped too
    while p.exists() or (_REPLACE_NOTES.get() is not None and lock.try_lock(p) is not None):
        p, i = Path(f"{base}-{i}"), i + 1
    return p


def emit_json(obj: Any) -> None:
    """Print ``obj`` as strict JSON (an undefined figure, NaN, is null)."""
    from mechscope.results import json_safe

    # allow_nan=False: a non-finite value that got past json_safe is an error here, never a NaN literal on stdout
    sys.stdout.write(json.dumps(json_safe(obj), indent=2, default=_default, allow_nan=False) + "\n")
    sys.stdout.flush()


def _default(o: Any) -> Any:
    """What ``json`` cannot write itself, made JSON: tensors and numpy values as lists and numbers,
    objects with ``to_dict``; each passed through ``json_safe`` (a NaN in a tensor is null)."""
    from mechscope.results import json_safe

    if hasattr(o, "tolist") and callable(o.tolist):  # torch tensors, numpy arrays and numpy scalars
        return json_safe(o.tolist())
    if hasattr(o, "to_dict"):
        return json_safe(o.to_dict())
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
    ``context_len_for`` takes) would lift waits for the build after the model loads. One that no
    length from 2 to the default lifts is refused now, with the refusal that most lengths give
    (ties: the default's): an option wrong at any length (``--sink-ratio 0.5``, ``--k 100000``)
    says the same sentence at most of them, while a limit that depends on the length (tokens per
    batch, k against a batch of 2-token contexts) names each length differently or holds at a few."""
    if given is not None:
        make(given)
        return
    try:
        make(default)
        return
    except MechscopeError as exc:
        at_default = exc
    refusals: dict[str, list[MechscopeError]] = {str(at_default): [at_default]}
    for n in range(2, default):
        try:
            make(n)
            return
        except MechscopeError as exc:
            refusals.setdefault(str(exc), []).append(exc)
    most = max(len(v) for v in refusals.values())
    if len(refusals[str(at_default)]) == most:
        raise at_default
    raise next(v[0] for v in refusals.values() if len(v) == most)


MAX_LAYERS = 10_000
"""The bound on a ``--layers`` value read before the model (and its layer count) is known: far
above any model's depth, far below a range whose list would not fit in memory."""


def _check_layer_bound(spec: str, top: int, n_layers: int | None) -> None:
    """Refuse a layer ``top`` (the highest of a ``--layers`` part) past the model's last layer, or
    past ``MAX_LAYERS`` where the model is not known yet."""
    limit = n_layers if n_layers is not None else MAX_LAYERS
    if top >= limit:
        have = f"the model has layers 0-{n_layers - 1}" if n_layers is not None else f"no model has {MAX_LAYERS:,} layers"
        raise MechscopeError(f"--layers {spec!r}: layer {top} does not exist; {have}.")


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
        _check_layer_bound(spec, b, n_layers)  # before the range is expanded: 0-99999999999 would fill the memory
        out.extend(range(a, b + 1))
    if len(set(out)) != len(out):
        raise MechscopeError(f"--layers {spec!r} names a layer twice; give each layer once.")
    return sorted(out)
