"""mechscope serve: every route through Starlette's TestClient (in process, no port) on a
synthetic unit database with hostile tokens and a folder of synthetic run folders; escaping,
404s, path traversal, the read-only database, the one-sentence refusals."""

from __future__ import annotations

import hashlib
import json
import re
import socket
from pathlib import Path

import pytest

from mechscope.errors import MechscopeError
from mechscope.explain.db import UnitDB
from mechscope.explain.types import Description, Exemplar, UnitRecord, UnitRef

starlette = pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

from mechscope.server.app import bind, create_app  # noqa: E402
from mechscope.server.runs import dashboard_nodes, find_runs, sae_source, safe_path  # noqa: E402
from mechscope.server.store import ReadOnlyUnitDB  # noqa: E402

HOSTILE = ["<script>alert(1)</script>", "\"&'", "</textarea>", "<img src=x onerror=window.__pwned=1>"]
CITY = UnitRef("mlp", 1, 3)
TC = UnitRef("transcoder", 1, 2, "tc-set")


def _exemplars(ref: UnitRef, scale: float) -> list[Exemplar]:
    toks = ["The", " city", *HOSTILE, " of", " Paris"]
    out = []
    for i in range(3):  # top
        acts = [0.0, 0.5 * scale, 0.1, 0.2, 0.0, 0.3, 0.0, scale * (1 - 0.1 * i)]
        out.append(Exemplar(toks, acts, focus=7, kind="top", split=("train", "valid", "test")[i], context=i, position=7))
    for i in range(2):  # bottom
        out.append(Exemplar(toks, [0.0, -0.2, 0, 0, 0, 0, -0.1 * (i + 1), 0.0], focus=6, kind="bottom", split="train"))
    for q in range(3):
        for j in range(2):
            out.append(Exemplar(toks[:4], [0.1 * q, 0.0, 0.05 * j, 0.2 * q], focus=3, kind="quantile", split="train", quantile=q))
    out.append(Exemplar(["<b>rand</b>", " om"], [0.0, 0.01], focus=1, kind="random", split="test"))
    return out


def _record(ref: UnitRef, scale: float) -> UnitRecord:
    return UnitRecord(unit=ref, max_act=scale, min_act=-0.3, density=0.05 + 0.01 * ref.index,
                      quantiles=[(0.001, None), (0.5, 0.0), (0.99, 0.8 * scale), (0.999, 0.95 * scale)],
                      histogram=([0.0, 0.25, 0.5, 0.75, 1.0], [50, 20, 5, 1]),
                      top_logits=[(" Paris", 2.5), ("<script>alert(1)</script>", 1.5)],
                      bottom_logits=[("</textarea>", -1.0)], n_tokens=4096)


def synthetic_db(path: Path) -> UnitDB:
    """A small unit database: MLP neurons of layers 0-2 (8 each), one SAE feature, four
    transcoder features of set ``tc-set`` at layer 1; descriptions with scores on some."""
    db = UnitDB(path, model_id="tiny-test")
    refs = [UnitRef("mlp", layer, i) for layer in range(3) for i in range(8)]
    refs += [UnitRef("sae", 1, 0, "sae-l1")] + [UnitRef("transcoder", 1, i, "tc-set") for i in range(4)]
    db.put_units(_record(r, 1.0 + r.index) for r in refs)
    for r in refs:
        db.put_exemplars(r, _exemplars(r, 1.0 + r.index))
    texts = {
        CITY: [("names of cities such as Paris <script>alert(1)</script>", "baseline", "", {"simulation": 0.6, "detection": 0.7}),
               ("capital cities", "server", "qwen-7b", {"simulation": 0.8, "simulation_shuffled": 0.05})],
        UnitRef("mlp", 2, 5): [("cities in Europe", "baseline", "", {"simulation": 0.2})],
        UnitRef("mlp", 0, 1): [("city names \"&' </textarea>", "baseline", "", {"simulation": 0.9})],
        UnitRef("mlp", 0, 2): [("the word the", "baseline", "", {"simulation": 0.4})],
        TC: [("French cities", "local", "SmolLM2-135M", {"simulation": 0.3})],
        UnitRef("sae", 1, 0, "sae-l1"): [("closing brackets", "baseline", "", {"detection": 0.55})],
    }
    for ref, ds in texts.items():
        for text, explainer, model, scores in ds:
            db.put_description(Description(ref, text, explainer, explainer_model=model, scores=scores))
    return db


def synthetic_runs(root: Path) -> Path:
    """Run folders as the commands write them: a circuit, an attribution graph, a heads run."""
    c = root / "circuits" / "ioi"
    c.mkdir(parents=True)
    nodes = [{"name": "input", "layer": -1, "head": None, "type": "input", "score": 0.0, "in_circuit": True},
             {"name": "a0.h1", "layer": 0, "head": 1, "type": "head", "score": 0.5, "in_circuit": True},
             {"name": "m1", "layer": 1, "head": None, "type": "mlp", "score": -0.9, "in_circuit": True},
             {"name": "m2", "layer": 2, "head": None, "type": "mlp", "score": 0.1, "in_circuit": False},
             {"name": "logits", "layer": 3, "head": None, "type": "logits", "score": 0.0, "in_circuit": True}]
    (c / "circuit.json").write_text(json.dumps({"schema_version": 1, "nodes": nodes, "edges": []}))
    (c / "report.html").write_text("<!DOCTYPE html><title>circuit report</title><h1>the circuit report</h1>")
    g = root / "graphs" / "paris"
    g.mkdir(parents=True)
    feat = {"feature_type": "cross layer transcoder", "layer": "1", "ctx_idx": 2, "clerp": ""}
    gnodes = [{**feat, "node_id": "1_2_2", "feature": 2, "influence": 0.1},
              {**feat, "node_id": "1_7_3", "feature": 7, "influence": 0.3},
              {"node_id": "0_-1_1", "feature": -1, "layer": "0", "ctx_idx": 1, "feature_type": "mlp reconstruction error", "influence": 0.2},
              {"node_id": "E_5_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding", "influence": 0.5},
              {"node_id": "3_9_3", "feature": 9, "layer": "3", "ctx_idx": 3, "feature_type": "logit", "influence": 0.0,
               "clerp": "Output \"<script>alert(1)</script>\" (p=0.5)"}]
    (g / "graph.json").write_text(json.dumps({"metadata": {"scan": "/somewhere/tc-set", "slug": "paris"}, "nodes": gnodes, "links": []}))
    (g / "report.html").write_text("<!DOCTYPE html><title>graph</title><h1>graph page</h1>")
    d = root / "dash"
    d.mkdir()
    feats = [{"feature": 5, "density": 0.01, "max_act": 2.0}, {"feature": 0, "density": 0.25, "max_act": 7.5}]
    (d / "dashboard.json").write_text(json.dumps({"schema_version": 1, "sae": {"hook_name": "blocks.1.hook_resid_post"},
                                                  "settings": {"sae_dir": "/elsewhere/sae-l1"}, "features": feats}))
    (d / "dashboard.html").write_text("<!DOCTYPE html><title>dashboards</title><h1>dashboards</h1>")
    h = root / "heads-run"
    h.mkdir()
    (h / "heads.json").write_text("{}")
    (h / "heads.html").write_text("<h1>heads</h1>")
    (root / "empty").mkdir()
    (root / ".hidden" / "x").mkdir(parents=True)
    (root / ".hidden" / "x" / "circuit.json").write_text("{}")
    return root


@pytest.fixture()
def served(tmp_path):
    db_path = tmp_path / "units.db"
    synthetic_db(db_path).close()
    root = synthetic_runs(tmp_path / "runs")
    (tmp_path / "secret.txt").write_text("outside")
    before = hashlib.sha256(db_path.read_bytes()).hexdigest()
    with TestClient(create_app(root, db_path)) as client:
        yield client, db_path, root
    assert hashlib.sha256(db_path.read_bytes()).hexdigest() == before  # the server never wrote the file


def _keys(html: str) -> list[str]:
    return re.findall(r'class="unit-link" href="/unit/([^"]+)"', html)


# ---- search ------------------------------------------------------------------------------------
def test_search_ranks_as_the_database(served):
    client, db_path, _ = served
    db = UnitDB(db_path)
    want = [h.unit.key for h in db.search("cities")]
    assert len(want) >= 4
    page = client.get("/", params={"q": "cities"})
    assert page.status_code == 200 and page.headers["content-security-policy"].startswith("default-src 'none'")
    assert _keys(page.text) == want
    api = client.get("/api/search", params={"q": "cities"}).json()
    assert [h["key"] for h in api["hits"]] == want
    assert [h["relevance"] for h in api["hits"]] == pytest.approx([h.relevance for h in db.search("cities")])
    # Filters reach the database unchanged.
    for params, kw in (({"layer": "2"}, {"layer": 2}), ({"kind": "transcoder"}, {"kind": "transcoder"}),
                       ({"min_score": "0.5"}, {"min_score": 0.5})):
        got = [h["key"] for h in client.get("/api/search", params={"q": "cities", **params}).json()["hits"]]
        assert got == [h.unit.key for h in db.search("cities", **kw)] and got != want
    assert client.get("/api/search", params={"q": "cities", "limit": "1"}).json()["hits"][0]["key"] == want[0]
    assert "no-hits" in client.get("/", params={"q": "zebra"}).text


def test_search_escapes_descriptions(served):
    client, _, _ = served
    page = client.get("/", params={"q": "alert"}).text  # the description holding <script> matches
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>" not in page and "<img" not in page
    page = client.get("/", params={"q": "\"><script>alert(9)</script>"}).text  # the query itself is echoed escaped
    assert "<script>alert(9)" not in page and "&lt;script&gt;alert(9)" in page


@pytest.mark.parametrize("params", [{"layer": "x"}, {"layer": "-1"}, {"kind": "attn"}, {"min_score": "nan"}, {"limit": "0"}])
def test_bad_parameters_are_400(served, params):
    client, _, _ = served
    r = client.get("/api/search", params={"q": "cities", **params})
    assert r.status_code == 400 and r.json()["error"]
    assert client.get("/", params={"q": "cities", **params}).status_code == 400


# ---- unit pages --------------------------------------------------------------------------------
def test_unit_page(served):
    client, db_path, _ = served
    db = UnitDB(db_path)
    r = client.get(f"/unit/{CITY.key}")
    assert r.status_code == 200
    html = r.text
    for d in db.descriptions(CITY):
        assert d.explainer in html and str(d.scores["simulation"]) in html
    assert "capital cities" in html and "qwen-7b" in html and "simulation_shuffled" in html
    assert "not resolved" in html  # a quantile past the exemplar lists, outside the histogram (stored as null)
    # Hostile tokens are text: escaped in the markup, never markup.
    assert "<script>" not in html and "</textarea>" not in html and "<img" not in html
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # exemplars, logits, description
    assert "&lt;b&gt;rand&lt;/b&gt;" in html and "&#34;&amp;&#39;" in html
    # Shading: each token's background opacity is its activation over the unit's maximum.
    rec = db.unit(CITY)
    top = re.search(r'<section class="exemplars" id="ex-top">(.*?)</section>', html, re.S).group(1)
    first_row = top.split('<div class="row">')[1]
    alphas = [float(a) for a in re.findall(r"rgba\(37,99,235,([0-9.]+)\)", first_row)]
    best = max(db.exemplars(CITY, kind="top"), key=lambda e: e.act)
    assert alphas == pytest.approx([max(0.0, a) / rec.max_act for a in best.acts if a >= 0], abs=1e-3)
    bottom = re.search(r'id="ex-bottom">(.*?)</section>', html, re.S).group(1)
    assert re.search(r"rgba\(220,38,38,0\.667\)", bottom)  # -0.2 over the minimum -0.3
    # Groups: top, bottom, three quantile bins (highest first), random.
    assert re.findall(r'id="ex-([a-z0-9]+)"', html) == ["top", "bottom", "q2", "q1", "q0", "random"]
    # The histogram (report toolkit's SVG): one bar per bin.
    hist = re.search(r'<svg[^>]*class="hist".*?</svg>', html, re.S).group(0)
    assert hist.count("<rect") == len(rec.histogram[1])
    assert "Paris" in re.search(r'id="top-logits">(.*?)</table>', html, re.S).group(1)
    assert re.search(r'<div class="label">density</div><div class="value">8%</div>', html)  # 0.05 + 0.01 * 3


def test_unit_api_round_trip(served):
    client, db_path, _ = served
    db = UnitDB(db_path)
    for ref in (CITY, TC):
        got = client.get(f"/api/unit/{ref.key}").json()
        rec = db.unit(ref)
        assert got["unit"]["key"] == ref.key and got["model_id"] == "tiny-test"
        assert got["record"]["max_act"] == rec.max_act and got["record"]["histogram"] == [list(x) for x in rec.histogram]
        assert [d["text"] for d in got["descriptions"]] == [d.text for d in db.descriptions(ref)]
        assert [e["tokens"] for e in got["exemplars"]] == [e.tokens for e in db.exemplars(ref)]


@pytest.mark.parametrize("key", ["mlp/99/99", "mlp/1/8", "garbage", "attn/1/2", "mlp/x/1", "transcoder:nope/1/2"])
def test_unknown_units_are_404(served, key):
    client, _, _ = served
    r = client.get(f"/unit/{key}")
    assert r.status_code == 404 and "not-found" in r.text and "<h1>Not found</h1>" in r.text
    r = client.get(f"/api/unit/{key}")
    assert r.status_code == 404 and "error" in r.json()


def test_units_listing(served):
    client, db_path, _ = served
    db = UnitDB(db_path)
    html = client.get("/units", params={"kind": "mlp", "layer": "1"}).text
    assert _keys(html) == [u.key for u in db.units("mlp", 1)]
    assert "capital cities" in html  # the best-scored description of mlp/1/3 (0.8 over 0.6)
    assert "names of cities" not in html
    all_keys = _keys(client.get("/units").text)
    assert all_keys == [u.key for u in db.units()]
    assert _keys(client.get("/units", params={"kind": "transcoder", "source": "tc-set"}).text) == [u.key for u in db.units("transcoder", source="tc-set")]


def test_units_paging(served, monkeypatch):
    import mechscope.server.app as app_mod

    client, db_path, _ = served
    monkeypatch.setattr(app_mod, "UNITS_PER_PAGE", 5)
    everything = [u.key for u in UnitDB(db_path).units()]
    seen, url = [], "/units"
    while url:
        html = client.get(url).text
        seen += _keys(html)
        m = re.search(r'id="next" href="([^"]+)"', html)
        url = m.group(1).replace("&amp;", "&") if m else None
    assert seen == everything


# ---- runs ----------------------------------------------------------------------------------------
def test_runs_listed_with_kinds(served):
    client, _, root = served
    runs = client.get("/api/runs").json()["runs"]
    assert [(r["name"], r["kind"]) for r in runs] == [("circuits/ioi", "circuit"), ("dash", "SAE dashboards"),
                                                      ("graphs/paris", "attribution graph"), ("heads-run", "heads")]
    html = client.get("/runs").text
    for r in runs:
        assert f'href="/run/{r["name"]}"' in html and f'href="/files/{r["page"]}"' in html
    assert client.get("/").text.count('class="run-link"') == 4  # the search page lists them too
    assert [r.name for r in find_runs(root)] == [r["name"] for r in runs]


def test_run_pages_and_files(served):
    client, _, root = served
    html = client.get("/run/circuits/ioi").text
    assert 'href="/files/circuits/ioi/report.html"' in html and 'href="/run/circuits/ioi/nodes"' in html
    r = client.get("/files/circuits/ioi/report.html")
    assert r.status_code == 200 and r.text == (root / "circuits/ioi/report.html").read_text()
    assert r.headers["content-type"].startswith("text/html")
    assert client.get("/run/empty").status_code == 404
    assert client.get("/run/heads-run/nodes").status_code == 404  # heads have no graph nodes


@pytest.mark.parametrize("path", ["../secret.txt", "..%2fsecret.txt", "circuits/../../secret.txt", "%2e%2e/secret.txt",
                                  "link-out", "circuits", "/etc/passwd", "nope.html"])
def test_files_stay_inside_the_root(served, path):
    client, _, root = served
    (root / "link-out").unlink(missing_ok=True)
    (root / "link-out").symlink_to(root.parent / "secret.txt")
    r = client.get(f"/files/{path}")
    assert r.status_code == 404 and "outside" not in r.text
    assert safe_path(root, path) is None


def test_circuit_nodes_link_layers(served):
    client, _, _ = served
    html = client.get("/run/circuits/ioi/nodes").text
    names = re.findall(r"<tr><td><code>([^<]+)</code>", html)
    assert names == ["m1", "a0.h1"]  # in the circuit, strongest |score| first; m2, input, logits left out
    link = re.search(r'class="layer-link" href="([^"]+)"', html).group(1).replace("&amp;", "&")
    assert link == "/units?kind=mlp&layer=1" and "(8 in the database)" in html
    assert _keys(client.get(link).text) == [f"mlp/1/{i}" for i in range(8)]


def test_graph_nodes_link_units(served):
    client, _, _ = served
    html = client.get("/run/graphs/paris/nodes").text
    assert _keys(html) == [TC.key]  # feature 2 is in the database, feature 7 is not
    assert "French cities" in html and "transcoder:tc-set/1/7" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert client.get(f"/unit/{TC.key}").status_code == 200


def test_dashboard_features_link_units(served):
    client, _, root = served
    html = client.get("/run/dash/nodes").text
    assert re.findall(r"<tr><td><code>([^<]+)</code>", html) == ["feature 5", "feature 0"]  # the dashboard's order
    assert _keys(html) == ["sae:sae-l1/1/0"]  # feature 0 is in the database, feature 5 is not
    assert "closing brackets" in html and "sae:sae-l1/1/5" in html and "max activation" in html
    assert client.get("/unit/sae:sae-l1/1/0").status_code == 200
    assert 'href="/run/dash/nodes"' in client.get("/runs").text
    # The SAE's name: its folder's or its parent's (exemplars --units sae:DIR over one SAE per layer), as the database knows it.
    doc = {"settings": {"sae_dir": "/x/saes/sae-l1/blocks.1.hook_resid_post"}}
    assert sae_source(doc, ["other", "sae-l1"]) == "sae-l1"
    assert sae_source({"settings": {"sae_dir": "/x/mine"}}, ["other"]) == "mine"  # not known: no link, never another SAE
    assert sae_source({"settings": {}}, ["only"]) == "" and sae_source({}, ["a", "b"]) == ""  # no folder recorded: no links
    nodes = dashboard_nodes({"sae": {"hook_name": "blocks.3.hook_resid_pre"}, "features": [{"feature": 9}]}, "s")
    assert nodes[0].unit_key == "sae:s/3/9" and nodes[0].layer == 3
    assert dashboard_nodes({"sae": {"hook_name": "hook_embed"}, "features": [{"feature": 9}]}, "s")[0].unit_key is None


# ---- opening, refusals -----------------------------------------------------------------------------
def test_read_only_store(tmp_path):
    p = tmp_path / "u.db"
    synthetic_db(p).close()
    ro = ReadOnlyUnitDB(p)
    assert ro.model_id == "tiny-test" and ro.fts
    assert [h.unit for h in ro.search("cities")] == [h.unit for h in UnitDB(p).search("cities")]
    with pytest.raises(MechscopeError, match="read-only"):
        ro.put_description(Description(CITY, "x", "baseline"))
    import sqlite3

    with pytest.raises(sqlite3.OperationalError, match="readonly"):  # the connection itself refuses writes
        ro.con.execute("DELETE FROM units")
    assert ro.layer_counts("mlp") == {0: 8, 1: 8, 2: 8} and ro.sources("transcoder") == ["tc-set"]
    assert ro.count("mlp", 1) == 8 and ro.units_page("mlp", None, None, 3, 4) == UnitDB(p).units("mlp")[3:7]


def test_bad_database_and_folder(tmp_path):
    text = tmp_path / "notes.db"
    text.write_text("hello, not a database " * 100)
    other = tmp_path / "other.sqlite"
    import sqlite3

    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    (tmp_path / "empty.db").write_bytes(b"")
    before = text.read_bytes()
    for path, words in ((text, "not a readable SQLite"), (other, "not a mechscope unit database"),
                        (tmp_path / "empty.db", "empty"), (tmp_path / "missing.db", "no database file")):
        with pytest.raises(MechscopeError, match=words) as e:
            create_app(tmp_path, path)
        assert "\n" not in str(e.value)
    assert text.read_bytes() == before and not (tmp_path / "missing.db").exists()
    with pytest.raises(MechscopeError, match="not a folder"):
        create_app(tmp_path / "nope")


def test_no_database_no_folder(tmp_path):
    with TestClient(create_app(None, None)) as client:
        assert "no-db" in client.get("/", params={"q": "x"}).text
        assert client.get("/api/search", params={"q": "x"}).json()["hits"] == []
        assert client.get("/unit/mlp/1/1").status_code == 404
        assert client.get("/runs").status_code == 404
        assert client.get("/files/x").status_code == 404


def test_port_in_use_is_one_sentence():
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        with pytest.raises(MechscopeError, match=f"port {port} .* already in use"):
            bind("127.0.0.1", port)
    finally:
        busy.close()
    sock = bind("127.0.0.1", port)  # free again
    assert sock.getsockname()[1] == port
    sock.close()


def test_cli_refusals_are_one_sentence_exit_2(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    bad = tmp_path / "bad.db"
    bad.write_text("not sqlite " * 50)
    good = tmp_path / "u.db"
    synthetic_db(good).close()
    runner = CliRunner()
    try:
        for args, words in (([str(tmp_path), "--db", str(good), "--port", str(port)], "already in use"),
                            ([str(tmp_path), "--db", str(bad)], "not a readable SQLite"),
                            ([str(tmp_path / "nope")], "does not exist"),
                            ([str(tmp_path), "--port", "70000"], "--port must be"),
                            ([str(tmp_path), "--host", "999.1.1.1"], "not an address of this machine")):
            r = runner.invoke(app, ["serve", *args])
            err = r.stderr if hasattr(r, "stderr") else r.output
            assert r.exit_code == 2, (args, r.output)
            assert words in err and err.count("\n") == 1 and "Traceback" not in err
            assert "other machines" not in r.output  # the network warning only once the socket listens
    finally:
        busy.close()


def test_every_command_that_writes_a_run_folder_is_listed(tmp_path):
    """The run folders of icl, confusion, binding dynamics and interchange, vision eap and compose,
    and a tuned lens (whose eval.json is not an SAE evaluation) are found with their kinds."""
    made = {"icl": "icl.json", "conf": "confusion.json", "bd": "binding_dynamics.json", "ix": "interchange.json",
            "veap": "eap.json", "vcomp": "compose.json", "lens": "tuned_lens.json"}
    for folder, data in made.items():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / data).write_text("{}")
    (tmp_path / "lens" / "eval.json").write_text("{}")
    (tmp_path / "lens" / "eval.html").write_text("<p>eval</p>")
    kinds = {r.name: r.kind for r in find_runs(tmp_path)}
    assert kinds == {"icl": "few-shot ICL knockout", "conf": "language confusion", "bd": "binding dynamics",
                     "ix": "interchange interventions", "veap": "vision EAP", "vcomp": "vision composition", "lens": "tuned lens"}
    assert next(r for r in find_runs(tmp_path) if r.name == "lens").page == "lens/eval.html"


# ---- session 26 sweep: files a run does not list, Host names, huge numbers, malformed data ----
def test_files_serves_only_what_a_run_lists(served):
    """``/files/`` gave any file under the root, dotfiles included (``cd ~ && mechscope serve``
    would hand out ``.ssh`` keys); now only the files a run folder lists."""
    client, _, root = served
    (root / ".env").write_text("SECRET")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("SECRET")
    (root / "notes.txt").write_text("not a run's")
    (root / "circuits" / "ioi" / ".hidden").write_text("SECRET")
    hidden = root / ".cache" / "run"
    hidden.mkdir(parents=True)
    (hidden / "heads.json").write_text("{}")
    for path in (".env", ".git/config", "notes.txt", "circuits/ioi/.hidden", ".cache/run/heads.json"):
        r = client.get(f"/files/{path}")
        assert r.status_code == 404 and "SECRET" not in r.text, path
    assert client.get("/files/circuits/ioi/report.html").status_code == 200
    assert client.get("/files/circuits/ioi/circuit.json").status_code == 200


def test_requests_for_another_host_name_are_refused(tmp_path):
    """DNS rebinding: a page on attacker.example resolving to 127.0.0.1 read the runs through the
    browser; the server answers only to local names (or any, when put on the network)."""
    root = synthetic_runs(tmp_path / "runs")
    with TestClient(create_app(root, None)) as client:
        assert client.get("/api/runs").status_code == 200
        for host in ("attacker.example", "attacker.example:8000", "127.0.0.1.attacker.example"):
            r = client.get("/api/runs", headers={"host": host})
            assert r.status_code == 400 and "root" not in r.text, host
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            assert client.get("/api/runs", headers={"host": host}).status_code == 200, host
    with TestClient(create_app(root, None, hosts=None)) as client:
        assert client.get("/api/runs", headers={"host": "box.lan:8000"}).status_code == 200


def test_huge_numbers_and_malformed_run_files_are_not_server_errors(served):
    client, _, root = served
    big = "9" * 25
    for url in (f"/units?offset={big}", f"/units?layer={big}", f"/?q=x&layer={big}", f"/api/search?q=&layer={big}"):
        r = client.get(url)
        assert r.status_code == 400 and "too large" in r.text, url
    for url in (f"/unit/mlp/1/{big}", f"/api/unit/mlp/{big}/1"):
        assert client.get(url).status_code == 404, url
    assert client.get(f"/api/unit/mlp/{big}/1").json()["error"]
    bad = root / "bad"
    bad.mkdir()
    for doc in ([1, 2], {"nodes": [1, 2]}, {"nodes": [{"name": "m1", "score": "x", "in_circuit": True}]}):
        (bad / "circuit.json").write_text(json.dumps(doc))
        r = client.get("/run/bad/nodes")
        assert r.status_code == 404 and "circuit.json" in r.text, doc


def test_control_characters_are_shown_not_written_raw(served):
    """A token holding NUL (or U+2028) was written raw into pages, where browsers drop it."""
    from mechscope.report.toolkit import esc, show_token

    assert esc("nul\x00byte\u2028") == "nul\u2400byte\u2424" and show_token("a\x00") == "a\u2400"
    client, _, root = served
    (root / "circuits" / "ioi" / "circuit.json").write_text(json.dumps({"schema_version": 1, "nodes": [
        {"name": "m1\x00", "layer": 1, "head": None, "type": "mlp", "score": 1.0, "in_circuit": True}], "edges": []}))
    html = client.get("/run/circuits/ioi/nodes").text
    assert "\x00" not in html and "m1\u2400" in html
