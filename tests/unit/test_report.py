"""The circuit report: one self-contained HTML file that escapes every string from the data."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

from mechscope.report import write_circuit_report

EVIL = "<script>alert(1)</script>"
PWN = "<script>window.__pwned = 1</script>"
IMG = '<img src=x onerror="window.__pwned = 2">'


def synthetic_circuit(n_layers: int = 3, n_heads: int = 4, n_kv_heads: int = 2, seed: int = 0) -> dict:
    """A fake ``circuit.json`` (schema 1) with hostile strings in the tokens, prompt and names."""
    rng = random.Random(seed)
    senders, receivers = ["input"], []  # receivers as (name, number of senders upstream)
    for layer in range(n_layers):
        n_up = len(senders)
        receivers += [(f"a{layer}.h{h}<q>", n_up) for h in range(n_heads)]
        receivers += [(f"a{layer}.kv{g}<{c}>", n_up) for c in "kv" for g in range(n_kv_heads)]
        senders += [f"a{layer}.h{h}" for h in range(n_heads)]
        receivers.append((f"m{layer}", len(senders)))
        senders.append(f"m{layer}")
    receivers.append(("logits", len(senders)))
    edges = [
        {"src": s, "dst": r, "score": round(rng.gauss(0, 1) ** 3, 4), "in_circuit": False}
        for r, n_up in receivers for s in senders[:n_up]
    ]
    for ed in sorted(edges, key=lambda ed: -abs(ed["score"]))[:24]:
        ed["in_circuit"] = True
    nodes = [{"name": "input", "layer": -1, "head": None, "type": "input", "score": 1.0, "in_circuit": True}]
    for layer in range(n_layers):
        nodes += [{"name": f"a{layer}.h{h}", "layer": layer, "head": h, "type": "head",
                   "score": round(rng.uniform(-0.5, 1), 3), "in_circuit": h % 2 == 0} for h in range(n_heads)]
        nodes.append({"name": f"m{layer}", "layer": layer, "head": None, "type": "mlp",
                      "score": round(rng.uniform(0, 1), 3), "in_circuit": True})
    nodes.append({"name": "logits", "layer": n_layers, "head": None, "type": "logits", "score": 1.0,
                  "in_circuit": True})
    tokens = ["When", " Mary", " and", EVIL, "</script>", " John", PWN, IMG, " gave", " a", " drink", " to"]
    n = len(tokens)

    def pattern() -> list[list[float]]:
        rows = []
        for i in range(n):
            w = [rng.random() ** 3 for _ in range(i + 1)]
            rows.append([x / sum(w) for x in w] + [0.0] * (n - i - 1))
        return rows

    n_total = len(edges)
    curve = []
    for k in (1, 3, 10, 24, 60, 150, n_total):
        curve.append({"n_edges": k, "fraction": k / n_total, "faithfulness": round(1 - math.exp(-k / 12), 4),
                      "random": round(0.6 * k / n_total - 0.05, 4) if k != 3 else None})
    return {
        "schema_version": 1,
        "model": {"name": f"tiny-llama {EVIL}", "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads},
        "task": "ioi",
        "method": "eap-ig",
        "settings": {"steps": 5, "note": PWN},
        "nodes": nodes,
        "edges": edges,
        "metrics": {"clean": 3.21, "corrupt": -0.4, "circuit": 2.95, "faithfulness": 0.928,
                    "n_edges": n_total, "n_edges_kept": 24, "metric": "logit_diff"},
        "curve": curve,
        "cpr": 0.81,
        "cmd": 0.07,
        "example": {"prompt": "".join(tokens), "tokens": tokens,
                    "attention": {"a2.h1": pattern(), "a1.h3": pattern()}},
        "top_components": [{"name": "a2.h1", "score": 0.91}, {"name": "m1", "score": -0.42},
                           {"name": IMG, "score": 0.1}],
    }


def _write(tmp_path: Path, data: dict | None = None) -> str:
    out = write_circuit_report(data or synthetic_circuit(), tmp_path / "circuit.html")
    assert out.exists()
    return out.read_text(encoding="utf-8")


def test_report_is_self_contained(tmp_path):
    page = _write(tmp_path)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "@import" not in page and "url(http" not in page
    # The only http(s) strings are SVG namespace declarations.
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}


def test_report_escapes_data_strings(tmp_path):
    page = _write(tmp_path)
    for hostile in (EVIL, PWN, IMG, "onerror=\"window"):
        assert hostile not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # shown, as text
    # Exactly one <script> element (ours) and one closing tag.
    assert page.count("<script") == 1 and page.count("</script>") == 1
    assert "<img" not in page


def test_report_has_sections(tmp_path):
    page = _write(tmp_path)
    assert 'id="circuit-graph"' in page and 'id="faithfulness-plot"' in page
    graph = page[page.index('id="circuit-graph"'):page.index("</svg>", page.index('id="circuit-graph"'))]
    assert graph.count('class="edge ') + graph.count('class="edge"') >= 24
    assert "k-k" in graph and "k-q" in graph  # key and query edges are styled apart
    assert 'class="heatmap"' in page and "a2.h1" in page
    assert "eap-ig" in page and "0.928" in page


def test_report_handles_sparse_data(tmp_path):
    data = {"schema_version": 1, "model": {"name": "m", "n_layers": 2, "n_heads": 2, "n_kv_heads": 2},
            "task": "t", "method": "x", "settings": {}, "nodes": [], "edges": [], "metrics": {},
            "curve": [], "cpr": None, "cmd": None, "example": None, "top_components": []}
    page = _write(tmp_path, data)
    assert 'id="circuit-graph"' in page and "no curve recorded" in page


def test_report_path_may_be_a_directory(tmp_path):
    out = write_circuit_report(synthetic_circuit(), tmp_path)
    assert out == tmp_path / "report.html" and out.exists()


def labelled_circuit() -> dict:
    """``synthetic_circuit`` with head labels (``circuits.labels``) whose tokens are hostile."""
    d = synthetic_circuit()
    d["labels"] = {
        "a2.h1": {"role": "copying", "role_score": 0.95, "also": [{"role": "induction", "score": 0.4}],
                  "scores": {"previous-token": 0.1, "duplicate-token": 0.05, "induction": 0.4, "copying": 0.95},
                  "attends": [{"pos": 3, "token": EVIL, "weight": 0.91, "kind": "answer", "what": f"the answer token '{EVIL}'"}],
                  "node_score": 0.91, "in_circuit": True,
                  "text": f"a2.h1: copying head (0.95; also induction 0.40), attends to the answer token '{EVIL}' (0.91)"},
        "a1.h3": {"role": None, "role_score": None, "also": [], "scores": {"previous-token": 0.1},
                  "attends": [{"pos": 6, "token": PWN, "weight": 0.5, "kind": "token", "what": f"'{PWN}' at 6"}],
                  "node_score": -0.2, "in_circuit": False, "text": f"a1.h3: no role, attends to '{PWN}' at 6 (0.50)"},
        "a0.h0": {"role": "induction", "role_score": 0.6, "also": [], "scores": {}, "attends": [], "node_score": 0.3,
                  "in_circuit": True, "text": "a0.h0: induction head (0.60)"},
        "_meta": {"heads_source": IMG, "thresholds": {"copying": 0.9}, "query_position": 11, "query_token": IMG,
                  "answer": EVIL, "distractor": PWN},
    }
    return d


def test_report_labels_heads_and_links_heatmaps(tmp_path):
    page = _write(tmp_path, labelled_circuit())
    for hostile in (EVIL, PWN, IMG):
        assert hostile not in page
    assert page.count("<script") == 1 and "<img" not in page
    sentence = "copying head (0.95; also induction 0.40), attends to the answer token &#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27; (0.91)"
    graph = page[page.index('id="circuit-graph"'):page.index("</svg>", page.index('id="circuit-graph"'))]
    assert f"a2.h1: {sentence}" in graph  # the node's tooltip
    assert 'class="node head on role-copy tip"' in graph or 'role-copy tip"' in graph
    assert 'role-ind' in graph and '>ind</text>' in graph and '>copy</text>' in graph
    # each head with a heatmap links to it from the graph and from the tables; the heatmaps carry the anchors
    for name in ("a2.h1", "a1.h3"):
        assert f'id="att-{name}"' in page and f'href="#att-{name}"' in graph
    assert 'href="#att-a0.h0"' not in page  # no heatmap, no link
    start = page.index('<table class="components with-roles">')
    table = page[start:page.index("</table>", start)]
    assert 'href="#att-a2.h1"' in table
    assert '<span class="role-name role-copy">copying head (0.95; also induction 0.40)</span>' + sentence.split(")", 1)[1] in table
    assert "Head roles" in page and "3 heads" in page


def test_report_without_labels_has_no_roles(tmp_path):
    page = _write(tmp_path)
    assert "Head roles" not in page and "role-" not in page.split("<main>")[1].split("<footer>")[0].replace("role-tag", "")
