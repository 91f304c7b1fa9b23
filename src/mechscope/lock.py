"""One writer per output: an advisory lock that a command holds on the folder (or file) it
writes for as long as it runs, so that a second command into the same ``--out`` is refused in
one sentence instead of mixing two runs.

Session 39's concurrency sweep started two commands into one output at once: the runs' checks
at start all passed before either wrote, and then they deleted each other's temporary files,
wiped each other's finished stages (``mechscope.partial``), overwrote each other's results
with both reporting success, or removed a database the other still used.

How: ``fcntl.flock`` on a lock file named by a hash of the output's absolute path, in
``$MECHSCOPE_CACHE/locks`` (else ``$XDG_CACHE_HOME/mechscope/locks``, else
``~/.cache/mechscope/locks``), not in the output folder itself: the folder may not exist yet
(a refused command leaves nothing behind) and a database file has no folder of its own. The
kernel drops the lock when its process ends, however it ends (a SIGKILLed run leaves nothing to
clean, and its ``--resume`` takes the lock at once). The file holds the holder's pid, start time
and command line, for the refusal. Where no lock file can be made (a read-only home), commands
run unlocked, as before. POSIX only (``fcntl``); elsewhere locking is a no-op.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from mechscope.errors import MechscopeError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks here
    fcntl = None  # type: ignore[assignment]

_HELD: dict[str, Any] = {}  # absolute path -> open lock file, in this process
_UNLOCKED: set[str] = set()  # paths this process runs unlocked on (no lock file could be made, or no flock)


def lock_dir() -> Path:
    """Where the lock files live (module docstring)."""
    if os.environ.get("MECHSCOPE_CACHE"):
        return Path(os.environ["MECHSCOPE_CACHE"]).expanduser() / "locks"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mechscope" / "locks"


def _key(path: Path) -> str:
    # resolve() follows symlinks before folding "..", as the OS does when it writes there
    return str(Path(path).expanduser().resolve())


def _holder(f: Any) -> str:
    try:
        f.seek(0)
        info = json.loads(f.read() or "{}")
        when = time.strftime("%H:%M:%S", time.localtime(float(info["since"])))
        cmd = " ".join(info.get("argv", []))[:120]
        return f"pid {int(info['pid'])}, started {when}" + (f": {cmd}" if cmd else "")
    except (ValueError, KeyError, TypeError, OSError):
        return "another process"


def try_lock(path: str | Path, shared: bool = False) -> str | None:
    """Take the lock on ``path`` for this process (``shared``: a lock several processes hold at
    once, e.g. the writers of one unit database, which its exclusive holder waits out); None on
    success (or when this process holds it already, or locks are unavailable), else a
    description of the process holding it."""
    key = _key(Path(path))
    if fcntl is None or key in _HELD:
        return None
    try:
        d = lock_dir()
        d.mkdir(parents=True, exist_ok=True)
        f = open(d / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock"), "a+", encoding="utf-8")
    except (OSError, RuntimeError):  # no place for lock files (RuntimeError: no home folder): run unlocked
        _UNLOCKED.add(key)
        return None
    try:
        fcntl.flock(f.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # a filesystem without flock: run unlocked
            f.close()
            _UNLOCKED.add(key)
            return None
        who = _holder(f)
        f.close()
        return who
    if not shared:  # a shared lock's file keeps the first holder's line
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "since": time.time(), "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
                            "path": key}))
        f.flush()
    _HELD[key] = f
    _UNLOCKED.discard(key)
    return None


def sole_holder(path: str | Path) -> bool:
    """Whether this process, holding a shared lock on ``path``, is the only process holding
    any: the lock is turned exclusive (and stays so) when it is; when it is not, the shared lock
    is taken again (Linux drops it on a failed conversion) where it can be. True where locks are
    unavailable (nothing is known of others); False where this process holds none on ``path``."""
    key = _key(Path(path))
    f = _HELD.get(key)
    if fcntl is None or key in _UNLOCKED:
        return True
    if f is None:
        return False
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            _HELD.pop(key, None)
            f.close()
        return False
    return True


def hold(path: str | Path, option: str = "--out") -> str:
    """Take the lock on ``path`` (``try_lock``) or refuse in one sentence naming the holder;
    returns the key ``release`` takes."""
    who = try_lock(path)
    if who is not None:
        raise MechscopeError(f"another mechscope run ({who}) is writing to {option} {path}; wait for it to finish, "
                             f"or give this run its own {option}.")
    return _key(Path(path))


def held() -> set[str]:
    """The keys of the locks this process holds."""
    return set(_HELD)


def release(keys: set[str] | None = None) -> None:
    """Drop this process's locks (those in ``keys``; all when None)."""
    for key in list(_HELD if keys is None else keys):
        _UNLOCKED.discard(key)
        f = _HELD.pop(key, None)
        if f is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            finally:
                f.close()
