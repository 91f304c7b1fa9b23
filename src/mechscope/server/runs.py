"""Run folders under a directory: which mechscope command wrote each, its page, and its nodes.

A run folder is recognised by the result file its command writes (no torch, nothing imported
from the method packages, so ``mechscope serve`` starts fast):

    circuit.json        mechscope discover             page report.html
    circuit.json        mechscope vision circuit       page report.html   (``"kind": "vision-circuit"``)
    graph.json          mechscope attribute            page report.html
    heads.json          mechscope heads                page heads.html
    dynamics.json       mechscope dynamics             page dynamics.html
    lens.json           mechscope lens                 page report.html
    recall.json         mechscope recall               page report.html
    dashboard.json      mechscope sae dashboard        page dashboard.html
    eval.json           mechscope sae eval / transcoders eval (a ``layers`` list)   page eval.html

A folder that holds several of them (a transcoder set evaluated in place) is listed once, under
the first match in this order. A ``circuit.json`` whose ``kind`` is ``vision-circuit`` is a
vision circuit (kind ``vision circuit``): its nodes are the chosen units of each site
(``vision_circuit_nodes``), not a language circuit's heads and MLPs. The walk skips hidden folders and stops ``MAX_DEPTH`` levels
below the root, so pointing ``serve`` at a home folder stays quick.

``safe_path`` is the one gate between a URL and the file system: the requested path is resolved
(symlinks included) and must stay inside the root, or it does not exist for the server.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechscope.explain.types import UnitRef

ROOT_RUN = "~"
"""The name of the root folder itself when it is a run folder ("." would vanish from URLs)."""
MAX_DEPTH = 4
"""Folder levels below the root that the run listing visits."""

_MARKERS: list[tuple[str, str, str]] = [
    ("circuit.json", "circuit", "report.html"),
    ("graph.json", "attribution graph", "report.html"),
    ("heads.json", "heads", "heads.html"),
    ("dynamics.json", "training dynamics", "dynamics.html"),
    ("lens.json", "lens", "report.html"),
    ("recall.json", "recall", "report.html"),
    ("dashboard.json", "SAE dashboards", "dashboard.html"),
    ("tuned_lens.json", "tuned lens", "eval.html"),  # before eval.json: a lens folder holds its evaluation
    ("eval.json", "SAE evaluation", "eval.html"),
    ("icl.json", "few-shot ICL knockout", "report.html"),
    ("confusion.json", "language confusion", "report.html"),
    ("binding_dynamics.json", "binding dynamics", "binding_dynamics.html"),
    ("interchange.json", "interchange interventions", "interchange.html"),
    ("eap.json", "vision EAP", "report.html"),
    ("compose.json", "vision composition", "report.html"),
]


@dataclass
class Run:
    """One run folder: ``name`` is its path relative to the root, with ``/`` separators
    (``ROOT_RUN`` for the root itself)."""

    name: str
    kind: str
    data_file: str
    page: str | None
    """The run's self-contained HTML page (relative to the root), when it exists."""
    files: list[str] = field(default_factory=list)

    @property
    def has_nodes(self) -> bool:
        return self.kind in ("circuit", VISION_CIRCUIT, "attribution graph", "SAE dashboards")


VISION_CIRCUIT = "vision circuit"
"""The kind of a ``circuit.json`` that ``mechscope vision circuit`` wrote."""
_HEAD_BYTES = 1 << 16
"""How much of a ``circuit.json`` is read to find its ``kind`` (a vision circuit's file holds
reference images and runs to megabytes; ``kind`` is written near its start)."""
_VISION_KIND = re.compile(r'"kind"\s*:\s*"vision-circuit"')


def _kind(folder: Path) -> tuple[str, str, str] | None:
    for data, kind, page in _MARKERS:
        if (folder / data).is_file():
            if data == "eval.json" and _is_transcoder_eval(folder / data):
                kind = "transcoder evaluation"
            elif data == "circuit.json" and _is_vision_circuit(folder / data):
                kind = VISION_CIRCUIT
            return data, kind, page
    return None


def _is_vision_circuit(path: Path) -> bool:
    """Whether the ``circuit.json`` at ``path`` is a vision circuit (top-level ``"kind":
    "vision-circuit"``, which ``VisionCircuit.to_dict`` writes right after ``schema_version``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return False
    return _VISION_KIND.search(head) is not None


def _is_transcoder_eval(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()).get("layers"), list)
    except (OSError, ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested past Python's limit
        return False


def find_runs(root: str | Path) -> list[Run]:
    """Every run folder under ``root`` (``root`` itself included), sorted by name."""
    root = Path(root).resolve()
    runs: list[Run] = []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        depth = len(here.relative_to(root).parts)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and depth < MAX_DEPTH)
        found = _kind(here)
        if found is None:
            continue
        data, kind, page = found
        rel = here.relative_to(root).as_posix()
        name = ROOT_RUN if rel == "." else rel
        prefix = "" if name == ROOT_RUN else name + "/"
        runs.append(Run(name=name, kind=kind, data_file=prefix + data,
                        page=prefix + page if (here / page).is_file() else None,
                        files=sorted(prefix + f for f in files if not f.startswith("."))))
    return sorted(runs, key=lambda r: r.name)


def safe_path(root: str | Path, rel: str, *, folder: bool = False) -> Path | None:
    """``root / rel`` if it is an existing file (a folder with ``folder``) inside ``root`` after
    resolving ``..`` and symlinks; ``None`` otherwise (the caller answers 404 either way, so
    nothing about the file system outside leaks)."""
    base = Path(root).resolve()
    if "\x00" in rel:
        return None
    try:
        p = (base / rel).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if p != base and base not in p.parents:
        return None
    return p if (p.is_dir() if folder else p.is_file()) else None


def listed_file(root: str | Path, path: Path) -> bool:
    """Whether ``path`` (resolved, inside ``root``: ``safe_path``'s answer) is a file that a run
    folder lists (``Run.files``: its own files, no dotfiles), so ``/files/`` serves nothing else."""
    base = Path(root).resolve()
    try:
        rel = path.relative_to(base)
    except ValueError:
        return False
    if any(part.startswith(".") for part in rel.parts):  # a run inside ~/.cache is not served either
        return False
    folder = rel.parent.as_posix()
    run = find_run(root, ROOT_RUN if folder == "." else folder)
    return run is not None and rel.as_posix() in run.files


def find_run(root: str | Path, name: str) -> Run | None:
    """The run folder called ``name`` (as ``find_runs`` names it), or ``None``; a hidden folder
    (a part starting with '.', which ``find_runs`` does not list) is ``None`` too."""
    if name != ROOT_RUN and any(part.startswith(".") for part in Path(name).parts):
        return None
    folder = safe_path(root, "." if name == ROOT_RUN else name, folder=True)
    found = _kind(folder) if folder is not None else None
    if folder is None or found is None:
        return None
    data, kind, page = found
    prefix = "" if name == ROOT_RUN else name + "/"
    return Run(name=name, kind=kind, data_file=prefix + data, page=prefix + page if (folder / page).is_file() else None,
               files=sorted(prefix + f.name for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")))


# ---- nodes ----------------------------------------------------------------------------------
@dataclass
class RunNode:
    """A node of a circuit, attribution graph or SAE dashboard, with what it maps to in the unit database.

    ``unit_key``: the unit page of an attribution-graph feature (``transcoder:<set>/<layer>/<f>``)
    or of a dashboard's SAE feature (``sae:<sae>/<layer>/<f>``);
    ``layer_kind``: for a circuit's MLP node, the unit kind of its layer listing (``mlp``)."""

    name: str
    node_type: str
    layer: int | None
    score: float | None
    unit_key: str | None = None
    layer_kind: str | None = None
    position: int | None = None
    note: str = ""


def load_data(root: str | Path, run: Run) -> dict[str, Any]:
    p = safe_path(root, run.data_file)
    if p is None:
        raise FileNotFoundError(run.data_file)
    try:
        return json.loads(p.read_text())
    except RecursionError:
        raise ValueError("its JSON is nested deeper than a mechscope file is") from None


def circuit_nodes(doc: dict[str, Any]) -> list[RunNode]:
    """The circuit's nodes (``in_circuit``, input and logits left out), strongest first; an MLP
    node ``m{L}`` points at the layer listing of MLP neurons of layer L."""
    out = []
    for n in doc.get("nodes", []):
        if not n.get("in_circuit") or n.get("type") in ("input", "logits"):
            continue
        layer = n.get("layer")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
            raise TypeError(f"node {n.get('name')!r} has layer {layer!r}, not a whole number")
        out.append(RunNode(name=str(n.get("name")), node_type=str(n.get("type")), layer=layer, score=n.get("score"),
                           layer_kind="mlp" if n.get("type") == "mlp" else None))
    return sorted(out, key=lambda r: -abs(r.score or 0.0))


def vision_circuit_nodes(doc: dict[str, Any]) -> list[RunNode]:
    """A vision circuit's chosen units (``units``: site -> unit indices, best first), site by
    site from the input up; the layer is the site's place among the model's sites, the score the
    unit's attribution score (``scores[site][unit]``). Vision units have no unit pages."""
    units = doc.get("units") or {}
    scores = doc.get("scores") or {}
    sites = (doc.get("model") or {}).get("sites") or {}
    order = list(sites) + [s for s in units if s not in sites]
    out = []
    for site in sorted(units, key=order.index):
        row = scores.get(site) or []
        kind = (sites.get(site) or {}).get("kind")
        for u in units[site]:
            u = int(u)
            score = row[u] if 0 <= u < len(row) else None
            out.append(RunNode(name=f"{site}:{u}", node_type=f"{kind} unit" if kind else "unit", layer=order.index(site),
                               score=float(score) if isinstance(score, (int, float)) else None))
    return out


def transcoder_source(doc: dict[str, Any], known: list[str]) -> str:
    """The transcoder set name a graph's feature keys use: the folder name of its ``scan``
    (the set's path, as ``mechscope attribute`` records it) when the database knows it, else the
    one set the database has, else that folder name anyway."""
    scan = str(doc.get("metadata", {}).get("scan", ""))
    name = Path(scan.rstrip("/")).name if scan else ""
    if name in known or len(known) != 1:
        return name
    return known[0]


def graph_nodes(doc: dict[str, Any], source: str) -> list[RunNode]:
    """The graph's nodes, most influential first; transcoder features carry the key of their unit."""
    out = []
    for n in doc.get("nodes", []):
        ftype = str(n.get("feature_type", ""))
        layer = n.get("layer")
        key = None
        if ftype == "cross layer transcoder":
            key = UnitRef("transcoder", int(layer), int(n["feature"]), source).key
        out.append(RunNode(name=str(n.get("node_id")), node_type=ftype, layer=int(layer) if str(layer).isdigit() else None,
                           score=n.get("influence"), unit_key=key, position=n.get("ctx_idx"), note=str(n.get("clerp") or "")))
    return sorted(out, key=lambda r: (r.score is None, r.score if r.score is not None else 0.0))


def sae_source(doc: dict[str, Any], known: list[str]) -> str:
    """The SAE name a dashboard's feature keys use. ``mechscope exemplars --units sae:DIR`` names
    the SAE by DIR's folder name, DIR being the SAE's folder or the folder holding one SAE per
    layer, so: the dashboard's SAE folder name (``settings.sae_dir``, which ``mechscope sae
    dashboard`` records) or its parent's, whichever the database knows, else the folder name
    anyway (no links). A dashboard that records no folder (made before it did) gets no links:
    the database's SAE at that layer might be another one."""
    folder = str(doc.get("settings", {}).get("sae_dir") or "")
    if not folder:
        return ""
    path = Path(folder.rstrip("/"))
    for name in (path.name, path.parent.name):
        if name and name in known:
            return name
    return path.name


def dashboard_nodes(doc: dict[str, Any], source: str) -> list[RunNode]:
    """A dashboard's features in its order, each carrying the key of its SAE-feature unit (the
    layer read from the SAE's hook, ``blocks.<L>.``); the score is the feature's largest activation."""
    hook = str(doc.get("sae", {}).get("hook_name", ""))
    m = re.match(r"blocks\.(\d+)\.", hook)
    layer = int(m.group(1)) if m else None
    out = []
    for f in doc.get("features", []):
        feat = int(f.get("feature", -1))
        key = UnitRef("sae", layer, feat, source).key if layer is not None and feat >= 0 and source else None
        density = f.get("density")
        note = f"fires on {100 * density:.3g}% of tokens" if isinstance(density, (int, float)) else ""
        out.append(RunNode(name=f"feature {feat}", node_type="SAE feature", layer=layer, score=f.get("max_act"),
                           unit_key=key, note=note))
    return out
