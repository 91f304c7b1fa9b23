"""Read character vectors out of an R package's lazy-load data base (``data/Rdata.rdb``).

The embedded corpus comes from Debian's R data packages, whose texts are stored the way R
stores package data: ``Rdata.rdx`` (a gzipped, serialised R list: object name -> (offset,
length) in ``Rdata.rdb``) and ``Rdata.rdb`` (for each object: a 4-byte big-endian length, then
a zlib stream of the serialised object). Serialisation is R's XDR format (version 2 or 3). This
module reads just enough of it for an index and for character vectors, so no R is needed.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

from mechscope.errors import MechscopeError

# SEXP types (R internals, "Serialization formats").
NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP = 255, 254
NA_INT = -(2**31)


class _Reader:
    """A cursor over one XDR-serialised R object."""

    def __init__(self, buf: bytes):
        if buf[:2] != b"X\n":
            raise ValueError("not an XDR-serialised R object")
        self.buf, self.p = buf, 2
        version = self.int()
        self.p += 8  # writer's R version, minimal reader version
        if version == 3:
            n = self.int()  # length of the native encoding's name, then the name
            self.p += n
        self.refs: list[Any] = []

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.buf, self.p)
        self.p += 4
        return v

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind == NILVALUE_SXP:
            return None
        if kind == REFSXP:
            return self.refs[(flags >> 8) - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None
            s = self.buf[self.p : self.p + n]
            self.p += n
            return s.decode("latin-1" if flags & (1 << 14) and not flags & (1 << 15) else "utf-8")
        if kind == LISTSXP:  # pairlist: (attr) (tag) car cdr
            out: dict[Any, Any] = {}
            while kind == LISTSXP:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else len(out)
                out[tag] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
            if kind != NILVALUE_SXP:
                raise ValueError(f"unexpected pairlist terminator {kind}")
            return out
        if kind in (INTSXP, LGLSXP):
            n = self.int()
            value: Any = list(struct.unpack_from(f">{n}i", self.buf, self.p))
            self.p += 4 * n
        elif kind == REALSXP:
            n = self.int()
            value = list(struct.unpack_from(f">{n}d", self.buf, self.p))
            self.p += 8 * n
        elif kind in (STRSXP, VECSXP):
            n = self.int()
            value = [self.item() for _ in range(n)]
        else:
            raise ValueError(f"unsupported R object type {kind}")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if kind == VECSXP and names:
                value = dict(zip(names, value))
        return value


def read_index(rdx: Path) -> dict[str, tuple[int, int]]:
    """Object name -> (offset, length) in the matching ``.rdb`` file."""
    index = _Reader(gzip.decompress(rdx.read_bytes())).item()
    return {name: (int(v[0]), int(v[1])) for name, v in index["variables"].items()}


def read_object(rdb: Path, offset: int, length: int) -> Any:
    with open(rdb, "rb") as f:
        f.seek(offset)
        chunk = f.read(length)
    (size,) = struct.unpack_from(">i", chunk, 0)
    buf = zlib.decompress(chunk[4:])
    if len(buf) != size:
        raise ValueError("truncated R object")
    return _Reader(buf).item()


def read_character_vectors(data_dir: Path) -> dict[str, list[str]]:
    """Every character vector in an R package's ``data/`` folder, by object name."""
    rdx, rdb = data_dir / "Rdata.rdx", data_dir / "Rdata.rdb"
    if not rdx.is_file() or not rdb.is_file():
        raise MechscopeError(f"No R data base (Rdata.rdx/Rdata.rdb) in '{data_dir}'.")
    out = {}
    try:
        for name, (off, n) in read_index(rdx).items():
            obj = read_object(rdb, off, n)
            if isinstance(obj, list) and all(isinstance(x, str) or x is None for x in obj):
                out[name] = [x or "" for x in obj]
    except (ValueError, KeyError, zlib.error, struct.error, OSError) as exc:
        raise MechscopeError(f"Could not read the R data base in '{data_dir}' ({exc}); reinstall the corpus with ./setup.sh.") from exc
    return out
