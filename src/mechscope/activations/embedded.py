"""The embedded text corpus: Jane Austen's six novels and Melville's *Moby-Dick*.

Real human-written English prose (~1.3M SmolLM2 tokens), public domain, taken from two Debian
packages of R data (``r-cran-janeaustenr``, MIT, Julia Silge; ``r-cran-tokenizers``, MIT,
Lincoln Mullen et al., whose ``mobydick`` object is Project Gutenberg eBook #2701). No PyPI
package ships this much public-domain prose; these two do, and need no R: ``install()`` runs
``apt-get download`` and ``dpkg-deb -x`` (or reads an R library already on the machine), reads
the texts with ``mechscope.activations.rdata``, cuts them into chapters (one document each)
and writes ``embedded.jsonl`` + ``corpus.json`` under ``<venv>/share/mechscope/corpus``.
``./setup.sh`` calls it (``python -m mechscope.activations.embedded``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mechscope.errors import MechscopeError

LICENCE = (
    "The texts are in the public domain (Austen, 1811-1818; Melville, 1851). They are taken "
    "from Debian's r-cran-janeaustenr (MIT, (c) 2016-2017 Julia Silge) and r-cran-tokenizers "
    "(MIT, (c) 2016-2018 Lincoln Mullen, Os Keyes, Dmitriy Selivanov, Jeffrey Arnold, Kenneth "
    "Benoit); Moby-Dick is Project Gutenberg eBook #2701, its Gutenberg header and licence "
    "footer removed."
)
# (Debian package, R package, {R object: title}, author)
SOURCES = [
    ("r-cran-janeaustenr", "janeaustenr", {
        "sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
        "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
        "persuasion": "Persuasion",
    }, "Jane Austen"),
    ("r-cran-tokenizers", "tokenizers", {"mobydick": "Moby-Dick"}, "Herman Melville"),
]
FILE = "embedded.jsonl"
MANIFEST = "corpus.json"
_CHAPTER = re.compile(r"^\s*chapter\s+([ivxlc]+|\d+)\b", re.MULTILINE | re.IGNORECASE)


def corpus_dir() -> Path:
    """Where the embedded corpus lives: ``$MECHSCOPE_CORPUS_DIR`` or ``<sys.prefix>/share/mechscope/corpus``."""
    env = os.environ.get("MECHSCOPE_CORPUS_DIR")
    return Path(env) if env else Path(sys.prefix) / "share" / "mechscope" / "corpus"


def embedded_path() -> Path:
    """The embedded corpus's JSONL file, or a clear error saying how to install it."""
    path = corpus_dir() / FILE
    if not path.is_file():
        raise MechscopeError(
            f"The embedded text corpus is not installed (no {path}); run ./setup.sh or "
            "`python -m mechscope.activations.embedded` (needs Debian's apt-get), or pass --corpus "
            "with your own .txt/.jsonl file or folder."
        )
    return path


def manifest() -> dict:
    """The installed corpus's manifest (sources, versions, licence, document count)."""
    path = embedded_path().parent / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def chapters(text: str, min_chars: int = 400) -> list[str]:
    """Cut a novel at its CHAPTER headings; pieces shorter than ``min_chars`` join the next."""
    starts = [m.start() for m in _CHAPTER.finditer(text)]
    pieces = [text[a:b] for a, b in zip([0] + starts, starts + [len(text)])]
    out: list[str] = []
    carry = ""
    for p in pieces:
        p = carry + p
        if len(p.strip()) < min_chars:
            carry = p
            continue
        out.append(p.strip())
        carry = ""
    if carry.strip():
        if out:
            out[-1] += "\n\n" + carry.strip()
        else:
            out.append(carry.strip())
    return out


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START and END markers (all of it when absent)."""
    start = re.search(r"\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG[^\n]*\n", text)
    end = re.search(r"\n[^\n]*\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG", text)
    text = text[start.end() if start else 0 : end.start() if end else len(text)]
    return re.sub(r"\n[^\n]*End of (the )?Project Gutenberg[^\n]*\s*$", "\n", text, flags=re.IGNORECASE)


def _r_data_dir(deb: str, rpkg: str, work: Path) -> tuple[Path, str]:
    """(R ``data/`` folder, package version): an installed R library first, else apt-get download."""
    for lib in ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library"):
        d = Path(lib) / rpkg
        if (d / "data" / "Rdata.rdb").is_file():
            desc = (d / "DESCRIPTION").read_text(encoding="utf-8", errors="replace")
            m = re.search(r"^Version:\s*(\S+)", desc, re.MULTILINE)
            return d / "data", m.group(1) if m else "?"
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise MechscopeError(
            f"Cannot install the embedded corpus: it comes from Debian's {deb} package and this "
            "machine has no apt-get/dpkg-deb; pass --corpus with your own text instead."
        )
    res = subprocess.run(["apt-get", "download", deb], cwd=work, capture_output=True, text=True)
    if res.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:  # stale package lists
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        res = subprocess.run(["apt-get", "download", deb], cwd=work, capture_output=True, text=True)
    debs = sorted(work.glob(f"{deb}_*.deb"))
    if not debs:
        raise MechscopeError(
            f"`apt-get download {deb}` failed ({(res.stderr.strip().splitlines() or ['no output'])[-1]}); "
            "run `apt-get update` first, or pass --corpus with your own text."
        )
    root = work / deb
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
    version = debs[0].name.split("_")[1]
    return root / "usr" / "lib" / "R" / "site-library" / rpkg / "data", version


def install(dest: Path | None = None) -> Path:
    """Fetch, convert and write the embedded corpus; returns the JSONL path. Idempotent."""
    from mechscope.activations.rdata import read_character_vectors

    dest = Path(dest) if dest else corpus_dir()
    dest.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    sources = []
    with tempfile.TemporaryDirectory() as tmp:
        for deb, rpkg, titles, author in SOURCES:
            data_dir, version = _r_data_dir(deb, rpkg, Path(tmp))
            vectors = read_character_vectors(data_dir)
            for obj, title in titles.items():
                if obj not in vectors:
                    raise MechscopeError(f"The package {deb} {version} has no text '{obj}'; the corpus cannot be built.")
                text = "\n".join(vectors[obj]).replace("\r\n", "\n").lstrip("\ufeff")
                for i, chap in enumerate(chapters(strip_gutenberg(text))):
                    rows.append({"text": chap, "title": title, "author": author, "part": i})
            sources.append({"debian_package": deb, "version": version, "licence": "MIT", "texts": list(titles.values())})
    tmp_file = dest / (FILE + ".tmp")
    with open(tmp_file, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp_file, dest / FILE)
    meta = {
        "name": "embedded", "description": "Jane Austen's six novels and Melville's Moby-Dick, one document per chapter",
        "documents": len(rows), "characters": sum(len(r["text"]) for r in rows),
        "sources": sources, "licence": LICENCE,
    }
    (dest / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return dest / FILE


if __name__ == "__main__":
    try:
        out = install()
    except MechscopeError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(2)
    m = json.loads((out.parent / MANIFEST).read_text())
    print(f"embedded corpus: {m['documents']} documents, {m['characters']:,} characters -> {out}")
