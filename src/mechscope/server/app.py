"""The local web UI of ``mechscope serve``: unit search, unit pages, run folders, a JSON API.

    from mechscope.server import create_app
    app = create_app("runs/", db="units.db")     # a Starlette app; serve() runs it under uvicorn

Why Starlette (with uvicorn and Jinja2) and not Flask: it is small (one dependency, anyio),
typed, actively maintained, ships a test client that drives the app in process (the unit tests
use it, no port), and runs the sync route functions in a thread pool, so SQLite reads never
block the event loop. Uvicorn is its usual server; Jinja2 renders the pages with autoescaping
on for every template, so a model token such as ``<script>`` is text wherever it appears.

Routes (all GET; the app is read-only):

    /                       search box; ?q=&kind=&layer=&min_score=&limit=&semantic=1 -> ranked hits
    /units                  units by kind / layer / source (paged), with their best description
    /unit/<key>             one unit: descriptions with scores, histogram, quantiles, output
                            logits, density, exemplars shaded by activation
    /runs                   run folders under DIR (``runs.find_runs``) with their kind
    /run/<name>             one run: its files and its report page
    /run/<name>/nodes       a circuit's or attribution graph's nodes, or an SAE dashboard's
                            features, linked to unit pages; a vision circuit's units
    /files/<path>           a file a run folder under DIR lists (its report page, data files; no dotfiles), traversal-safe
    /api/search?q=          JSON: the hits, as ``UnitDB.search`` ranks them (an empty q: every unit by score,
                            as ``mechscope search ""``)
    /api/unit/<key>         JSON: the unit record, descriptions and exemplars
    /api/runs               JSON: the run folders

The database is opened read-only (``store.ReadOnlyUnitDB``), one connection per worker thread.
Unknown unit keys, runs and files answer 404 pages (JSON ``{"error": ...}`` under ``/api``), a
malformed parameter 400. The app's own pages run no script; they are sent with a
Content-Security-Policy that forbids scripts altogether, so even a templating mistake could not
execute a token. Served report pages keep their own inline scripts (they are mechscope's own
self-contained pages) and get ``nosniff`` only.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlencode

from jinja2 import Environment, PackageLoader
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from mechscope.errors import MechscopeError
from mechscope.explain.types import Description, Exemplar, UnitKind, UnitRecord, UnitRef
from mechscope.server import runs as runs_mod
from mechscope.server.store import ReadOnlyUnitDB

CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; base-uri 'none'; "
       "frame-ancestors 'none'")
SEARCH_LIMIT = 50
"""Hits per search page (``limit`` may ask for up to ``MAX_LIMIT``)."""
MAX_LIMIT = 500
UNITS_PER_PAGE = 100
SCORE = "simulation"
"""The score shown as a unit's best score and used by ``min_score`` (``UnitDB.search``'s default)."""


# ---- template helpers --------------------------------------------------------------------------
def _num(x: Any, digits: int = 3) -> str:
    from mechscope.report.toolkit import fmt

    return fmt(x, digits) if x is not None else ""


def _pct(x: Any) -> str:
    from mechscope.report.toolkit import pct

    return pct(x) if x is not None else ""


def _tok(t: Any) -> str:
    from mechscope.report.toolkit import token_text

    return token_text(t)


def _shade(a: float, hi: float, lo: float) -> str:
    """Background of a token: blue with opacity act / max for positive activations, red with
    act / min for negative ones."""
    a = float(a) if a is not None and math.isfinite(float(a)) else 0.0
    if a >= 0:
        alpha = min(1.0, a / hi) if hi > 0 else 0.0
        return f"rgba(37,99,235,{alpha:.3f})"
    alpha = min(1.0, a / lo) if lo < 0 else 0.0
    return f"rgba(220,38,38,{alpha:.3f})"


def best_score(d: Description | None) -> float | None:
    """The description's ``simulation`` score, else its first score that is not a shuffled control."""
    if d is None or not d.scores:
        return None
    if SCORE in d.scores:
        return d.scores[SCORE]
    return next((v for k, v in d.scores.items() if not k.endswith("_shuffled")), None)


def best_description(descs: list[Description]) -> Description | None:
    """The unit's current description with the highest ``best_score`` (unscored ones last; stale
    ones, made from exemplars since replaced, only where no current one exists); None if none."""
    def key(d: Description) -> tuple[bool, float]:
        s = best_score(d)
        return (not d.stale, s if s is not None else -math.inf)

    return max(descs, key=key) if descs else None


def unit_url(u: UnitRef) -> str:
    return "/unit/" + quote(u.key, safe="/:")


def _visible(value: Any) -> Any:
    """Every string a template prints with its control characters shown as pictures (the report
    toolkit's ``VISIBLE_CONTROLS``: a token holding NUL is not dropped by the browser)."""
    from mechscope.report.toolkit import VISIBLE_CONTROLS

    return value.translate(VISIBLE_CONTROLS) if isinstance(value, str) else value


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("mechscope.server", "templates"), autoescape=True, trim_blocks=False,
                      finalize=_visible)
    env.filters.update(num=_num, pct=_pct, tok=_tok, shade=_shade, urlpath=lambda s: quote(str(s), safe="/:"))
    env.globals.update(zip=zip, unit_url=unit_url, best_score=best_score)
    return env


# ---- JSON shapes -------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def description_json(d: Description) -> dict[str, Any]:
    out = dataclasses.asdict(d)
    out["unit"] = d.unit.key
    return _jsonable(out)


def record_json(r: UnitRecord) -> dict[str, Any]:
    out = dataclasses.asdict(r)
    out["unit"] = r.unit.key
    return _jsonable(out)


def exemplar_json(e: Exemplar) -> dict[str, Any]:
    return _jsonable(dataclasses.asdict(e))


def unit_json(u: UnitRef) -> dict[str, Any]:
    return {"key": u.key, "kind": u.kind, "layer": u.layer, "index": u.index, "source": u.source}


# ---- the app -----------------------------------------------------------------------------------
class _State:
    """What every request reads: the run root, the database path, one read-only connection per thread."""

    def __init__(self, root: Path | None, db: Path | None, embedder: Any = None):
        self.root = root
        self.db_path = db
        self.embedder = embedder
        self._local = threading.local()
        self.env = _environment()
        self.css = _css()
        self.model_id = ""
        if db is not None:
            first = ReadOnlyUnitDB(db)  # checks the file now: a bad --db fails before the server starts
            self.model_id = first.model_id
            self._local.db = first

    def db(self) -> ReadOnlyUnitDB | None:
        if self.db_path is None:
            return None
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = ReadOnlyUnitDB(self.db_path)
        return db


def _css() -> str:
    from importlib import resources

    from mechscope.report.toolkit import asset

    return asset("base.css") + resources.files("mechscope.server").joinpath("templates").joinpath("serve.css").read_text(encoding="utf-8")


def _page(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    st: _State = request.app.state.mechscope
    base = {"css": Markup(st.css), "has_db": st.db_path is not None, "can_semantic": st.embedder is not None, "db_name": st.db_path.name if st.db_path else "",
            "model_id": st.model_id, "query": ""}
    html = st.env.get_template(name).render(**{**base, **ctx})
    return HTMLResponse(html, status_code=status, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                                            "Referrer-Policy": "no-referrer"})


MAX_INT = 2**62
"""The largest whole number a query parameter may hold (offsets, layers, unit indices)."""


def _int(request: Request, name: str, lo: int | None = 0, default: int | None = None) -> int | None:
    v = request.query_params.get(name, "").strip()
    if v == "":
        return default
    try:
        n = int(v)
    except ValueError:
        raise HTTPException(400, f"{name} must be a whole number, got {v!r}.") from None
    if lo is not None and n < lo:
        raise HTTPException(400, f"{name} must be at least {lo}, got {n}.")
    if abs(n) > MAX_INT:  # SQLite integers are 64-bit: a larger one raised OverflowError (a 500)
        raise HTTPException(400, f"{name} {n} is too large (at most {MAX_INT:,}).")
    return n


def _float(request: Request, name: str) -> float | None:
    v = request.query_params.get(name, "").strip()
    if v == "":
        return None
    try:
        x = float(v)
    except ValueError:
        raise HTTPException(400, f"{name} must be a number, got {v!r}.") from None
    if not math.isfinite(x):
        raise HTTPException(400, f"{name} must be a finite number, got {v!r}.")
    return x


def _kind(request: Request) -> UnitKind | None:
    k = request.query_params.get("kind", "").strip() or None
    if k is not None and k not in ("mlp", "sae", "transcoder"):
        raise HTTPException(400, f"kind must be mlp, sae or transcoder, got {k!r}.")
    return cast(UnitKind, k) if k is not None else None


def _search(request: Request, empty_ranks: bool = False) -> dict[str, Any]:
    """Run the query in the request's parameters: a dict of the hits and the parameters used.
    An empty query finds nothing (the search page then lists the runs) unless ``empty_ranks``:
    then every unit, by score, as ``UnitDB.search("")``."""
    st: _State = request.app.state.mechscope
    q = request.query_params.get("q", "").strip()
    kind, layer, min_score = _kind(request), _int(request, "layer"), _float(request, "min_score")
    params: dict[str, Any] = {"query": q, "kind": kind, "layer": layer, "min_score": min_score,
                              "semantic": request.query_params.get("semantic", "") in ("1", "true", "on")}
    limit = min(_int(request, "limit", lo=1, default=SEARCH_LIMIT) or SEARCH_LIMIT, MAX_LIMIT)
    db = st.db()
    hits = []
    if db is not None and (q or empty_ranks):
        if params["semantic"] and q:
            from mechscope.explain.semantic import semantic_search

            if st.embedder is None:
                raise HTTPException(400, "This server answers full-text searches only; start it with --semantic for semantic search.")
            try:
                hits = semantic_search(db, q, st.embedder, layer=layer, kind=kind, min_score=min_score, limit=limit)
            except MechscopeError as e:
                raise HTTPException(400, str(e)) from None
        else:
            hits = db.search(q, layer=layer, kind=kind, min_score=min_score, limit=limit)
    return {**params, "hits": hits, "limit": limit}


def _unit(request: Request) -> tuple[UnitRef, UnitRecord, ReadOnlyUnitDB]:
    st: _State = request.app.state.mechscope
    key = request.path_params["key"]
    db = st.db()
    if db is None:
        raise HTTPException(404, "No unit database: start the server with --db FILE to see unit pages.")
    try:
        ref = UnitRef.parse(key)
        rec = db.unit(ref)
    except (ValueError, OverflowError, MechscopeError):  # OverflowError: an index past SQLite's 64 bits
        rec = None
    if rec is None:
        raise HTTPException(404, f"No unit {key!r} in this database.")
    return ref, rec, db


async def _not_found_or_bad(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "") or "Not found."
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": detail}, status_code=status)
    return _page(request, "404.html", status=status, message=detail)


async def _server_error(request: Request, exc: Exception) -> Response:
    """An unexpected error: JSON under ``/api/`` (a client parses it), the error page elsewhere;
    the traceback still goes to the server's log."""
    detail = f"Internal error ({type(exc).__name__}); the server's log has the details."
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": detail}, status_code=500)
    return _page(request, "404.html", status=500, message=detail)


# ---- routes ------------------------------------------------------------------------------------
def search_page(request: Request) -> Response:
    res = _search(request)
    st: _State = request.app.state.mechscope
    runs = runs_mod.find_runs(st.root) if st.root is not None and not res["query"] else []
    return _page(request, "search.html", **res, runs=runs)


def api_search(request: Request) -> Response:
    res = _search(request, empty_ranks=True)
    return JSONResponse({
        "query": res["query"], "kind": res["kind"], "layer": res["layer"], "min_score": res["min_score"],
        "semantic": res["semantic"], "limit": res["limit"],
        "hits": [{**unit_json(h.unit), "relevance": h.relevance, "best_score": best_score(h.description),
                  "description": description_json(h.description)} for h in res["hits"]],
    })


def unit_page(request: Request) -> Response:
    ref, rec, db = _unit(request)
    descs = db.descriptions(ref)
    exs = db.exemplars(ref)
    names: list[str] = []
    for d in descs:
        names += [k for k in d.scores if k not in names]
    groups = []
    for kind, title in (("top", "Top activations"), ("bottom", "Bottom activations")):
        items = sorted((e for e in exs if e.kind == kind), key=lambda e: -e.act if kind == "top" else e.act)
        if items:
            groups.append({"id": kind, "title": title, "rows": items})
    qs = sorted({e.quantile for e in exs if e.kind == "quantile" and e.quantile is not None}, reverse=True)
    for q in qs:
        items = sorted((e for e in exs if e.kind == "quantile" and e.quantile == q), key=lambda e: -e.act)
        groups.append({"id": f"q{q}", "title": f"Quantile bin {q} (samples)", "rows": items})
    rnd = [e for e in exs if e.kind == "random"]
    if rnd:
        groups.append({"id": "random", "title": "Random contexts", "rows": rnd})
    acts = [a for e in exs for a in e.acts if a is not None and math.isfinite(a)]
    hi = rec.max_act if rec.max_act and rec.max_act > 0 else max(acts + [0.0])
    lo = rec.min_act if rec.min_act and rec.min_act < 0 else min(acts + [0.0])
    from mechscope.report.charts import histogram

    svg = ""
    if rec.histogram and len(rec.histogram[1]) and len(rec.histogram[0]) == len(rec.histogram[1]) + 1:
        svg = histogram(rec.histogram[0], rec.histogram[1], title="activation histogram", xlabel="activation", width=460)
    return _page(request, "unit.html", unit=ref, rec=rec, descriptions=descs, score_names=names, groups=groups,
                 scale_hi=hi, scale_lo=lo, histogram_svg=Markup(svg))


def api_unit(request: Request) -> Response:
    ref, rec, db = _unit(request)
    return JSONResponse({"unit": unit_json(ref), "model_id": db.model_id, "record": record_json(rec),
                         "descriptions": [description_json(d) for d in db.descriptions(ref)],
                         "exemplars": [exemplar_json(e) for e in db.exemplars(ref)]})


def units_page(request: Request) -> Response:
    st: _State = request.app.state.mechscope
    kind, layer = _kind(request), _int(request, "layer")
    source = request.query_params.get("source") or None
    offset = _int(request, "offset", default=0) or 0
    db = st.db()
    rows, total = [], 0
    if db is not None:
        total = db.count(kind, layer, source)
        for u in db.units_page(kind, layer, source, offset, UNITS_PER_PAGE):
            descs = db.descriptions(u)
            rows.append((u, best_description(descs)))
    base = {k: v for k, v in (("kind", kind), ("layer", layer), ("source", source)) if v is not None}

    def page_url(off: int) -> str:
        return "/units?" + urlencode({**base, "offset": max(0, off)})

    return _page(request, "units.html", kind=kind, layer=layer, source=source, units=rows, total=total, offset=offset,
                 limit=UNITS_PER_PAGE, page_url=page_url)


def _root(request: Request) -> Path:
    st: _State = request.app.state.mechscope
    if st.root is None:
        raise HTTPException(404, "No run folder: start the server with a DIR to list runs.")
    return st.root


def runs_page(request: Request) -> Response:
    root = _root(request)
    return _page(request, "runs.html", runs=runs_mod.find_runs(root), root=str(root))


def api_runs(request: Request) -> Response:
    root = _root(request)
    return JSONResponse({"root": str(root), "runs": [{**dataclasses.asdict(r), "has_nodes": r.has_nodes} for r in runs_mod.find_runs(root)]})


def _run(request: Request) -> tuple[Path, runs_mod.Run]:
    root = _root(request)
    run = runs_mod.find_run(root, request.path_params["name"])
    if run is None:
        raise HTTPException(404, f"No run folder {request.path_params['name']!r} under the served directory.")
    return root, run


def run_page(request: Request) -> Response:
    _, run = _run(request)
    return _page(request, "run.html", run=run)


def nodes_page(request: Request) -> Response:
    root, run = _run(request)
    if not run.has_nodes:
        raise HTTPException(404, f"Run {run.name!r} is a {run.kind} run, which has no graph nodes.")
    try:
        doc = runs_mod.load_data(root, run)
    except (OSError, ValueError) as e:
        raise HTTPException(404, f"{run.data_file} cannot be read ({e}).") from None
    st: _State = request.app.state.mechscope
    db = st.db()
    known: dict[str, Description | None] = {}
    layer_counts: dict[int, int] = {}
    source = ""
    try:  # a data file of the wrong shape (edited, truncated, another tool's) is a 404 that says so, not a 500
        if run.kind == "circuit":
            nodes = runs_mod.circuit_nodes(doc)
        elif run.kind == runs_mod.VISION_CIRCUIT:
            nodes = runs_mod.vision_circuit_nodes(doc)
        elif run.kind == "SAE dashboards":
            source = runs_mod.sae_source(doc, db.sources("sae") if db is not None else [])
            nodes = runs_mod.dashboard_nodes(doc, source)
        else:
            source = runs_mod.transcoder_source(doc, db.sources("transcoder") if db is not None else [])
            nodes = runs_mod.graph_nodes(doc, source)
    except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as e:
        raise HTTPException(404, f"{run.data_file} is not a {run.kind} file mechscope can read ({type(e).__name__}).") from None
    if run.kind == "circuit":
        if db is not None:
            layer_counts = db.layer_counts("mlp")
    elif run.kind != runs_mod.VISION_CIRCUIT:  # a vision unit has no unit page
        if db is not None:
            for n in nodes:
                if n.unit_key and n.unit_key not in known:
                    try:
                        ref = UnitRef.parse(n.unit_key)
                        if db.unit(ref) is None:
                            continue
                        descs = db.descriptions(ref)
                    except (ValueError, OverflowError, MechscopeError):
                        continue
                    known[n.unit_key] = best_description(descs)
    return _page(request, "nodes.html", run=run, nodes=nodes, known=known, layer_counts=layer_counts, source=source)


def file_response(request: Request) -> Response:
    """A file of a run folder, as its run page lists it: not any file under the root (the root may
    be a home folder, whose dotfiles and keys a URL must not reach)."""
    root = _root(request)
    p = runs_mod.safe_path(root, request.path_params["path"])
    if p is None or not runs_mod.listed_file(root, p):
        raise HTTPException(404, "No such file under the served directory.")
    return FileResponse(p, headers={"X-Content-Type-Options": "nosniff"})


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "testserver")
"""Host names a server on this machine answers to (``testserver``: Starlette's test client). A
web page the user visits could otherwise point a name it controls at 127.0.0.1 (DNS rebinding)
and read the runs and the database through the browser."""


def host_name(header: str) -> str:
    """The host of a ``Host`` header without its port: ``[::1]:8000`` -> ``::1``, ``a.b:80`` -> ``a.b``."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class _HostCheck:
    """ASGI middleware: answer 400 to a request whose ``Host`` is not one of ``hosts``."""

    def __init__(self, app: Any, hosts: tuple[str, ...]):
        self.app, self.hosts = app, {h.lower() for h in hosts}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.hosts:
                await Response("This server answers only to localhost.", status_code=400, media_type="text/plain")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(root: str | Path | None = None, db: str | Path | None = None, *, embedder: Any = None,
               hosts: tuple[str, ...] | None = LOCAL_HOSTS) -> Starlette:
    """The web app over run folders under ``root`` and the unit database ``db`` (either may be
    None). Raises ``MechscopeError`` (one sentence) for a missing ``root`` or a bad ``db``.
    ``hosts``: the ``Host`` names it answers to (None: any, for a server the user put on the
    network with ``--host``)."""
    root_p = None
    if root is not None:
        root_p = Path(root)
        if not root_p.is_dir():
            raise MechscopeError(f"{root_p} is not a folder; give the folder that holds your mechscope run folders.")
        root_p = root_p.resolve()
    state = _State(root_p, Path(db) if db is not None else None, embedder)
    routes = [
        Route("/", search_page), Route("/units", units_page), Route("/unit/{key:path}", unit_page),
        Route("/runs", runs_page), Route("/run/{name:path}/nodes", nodes_page), Route("/run/{name:path}", run_page),
        Route("/files/{path:path}", file_response),
        Route("/api/search", api_search), Route("/api/unit/{key:path}", api_unit), Route("/api/runs", api_runs),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _not_found_or_bad, Exception: _server_error})
    app.state.mechscope = state
    if hosts is not None:
        app.add_middleware(_HostCheck, hosts=hosts)
    return app


def bind(host: str, port: int):
    """A listening socket on ``host:port``, or ``MechscopeError`` when the port is taken or the
    address is not this machine's. Binding here (and handing the socket to uvicorn) leaves no gap
    in which another program could take the port between the check and the start."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise MechscopeError(f"--host {host!r} is not an address of this machine; use 127.0.0.1 (the default).") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise MechscopeError(f"port {port} on {host} is already in use; pick another with --port (or stop the program using it).") from None
        if e.errno == errno.EACCES:
            raise MechscopeError(f"port {port} needs administrator rights; pick one above 1024 with --port.") from None
        raise MechscopeError(f"cannot listen on {host}:{port} ({e.strerror}); use --host 127.0.0.1 and another --port.") from None
    sock.set_inheritable(True)
    return sock


def serve(root: str | Path | None = None, db: str | Path | None = None, *, host: str = "127.0.0.1", port: int = 8000,
          embedder: Any = None, log_level: str = "warning", announce: Any = None) -> None:
    """Run the app under uvicorn until interrupted (checks the folder, the database and the port
    first). ``port=0`` takes a free port; ``announce(url)`` is called once the socket listens."""
    import uvicorn

    bound = host.strip("[]").lower()
    local = bound in LOCAL_HOSTS or bound.startswith("127.")
    app = create_app(root, db, embedder=embedder, hosts=(*LOCAL_HOSTS, bound) if local else None)
    sock = bind(host, port)
    if announce is not None:
        name = sock.getsockname()
        shown = f"[{name[0]}]" if ":" in name[0] else name[0]
        announce(f"http://{shown}:{name[1]}/")
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
