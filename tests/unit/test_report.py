"""The report pages: each one self-contained HTML file that escapes every string from the data."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import pytest

from mechscope.report.circuit import write_circuit

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
    out = write_circuit(data or synthetic_circuit(), tmp_path / "circuit.html")
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
    out = write_circuit(synthetic_circuit(), tmp_path)
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


# ---- every page kind ------------------------------------------------------------------------
def sample_heads(n_layers: int = 2, n_heads: int = 3) -> dict:
    """A ``heads.json`` dict plus ``example_patterns`` [L][H][pos][pos], hostile example tokens."""
    rng = random.Random(1)
    tokens = ["<bos>", EVIL, " a", IMG, EVIL, " a", IMG]
    n = len(tokens)

    def grid() -> list[list[float]]:
        return [[round(rng.uniform(-0.2, 1), 3) for _ in range(n_heads)] for _ in range(n_layers)]

    pats = []
    for _ in range(n_layers):
        layer = []
        for _ in range(n_heads):
            rows = []
            for i in range(n):
                w = [rng.random() for _ in range(i + 1)]
                rows.append([round(x / sum(w), 3) for x in w] + [0.0] * (n - i - 1))
            layer.append(rows)
        pats.append(layer)
    return {
        "schema_version": 1, "model": {"name": f"tiny {EVIL}", "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": 1},
        "settings": {"n": 4, "note": PWN}, "text_source": IMG,
        "scores": {"previous_token": grid(), "induction": grid(), "copying_eigen": grid(),
                   "ablation": [[None if h else 0.5 for h in range(n_heads)] for _ in range(n_layers)]},
        "top_heads": {"induction": [{"head": "a1.h2", "score": 0.91}, {"head": "a0.h1", "score": 0.5}]},
        "top_composition_pairs": {"k": [{"writer": "a0.h1", "reader": "a1.h2", "score": 0.4}], "q": [], "v": []},
        "icl": {"late": 500, "early": 50, "n_contexts": 8, "icl_score": -0.45},
        "ablation": {"clean_loss": 2.5, "k": 2, "top_heads": ["a1.h2", "a0.h1"], "top_k_increase": 0.8,
                     "random_increases": [0.1, 0.2], "random_mean_increase": 0.15},
        "example_tokens": tokens, "example_patterns": pats,
    }


def sample_dynamics() -> dict:
    rows = []
    for i, step in enumerate((0, 10, 100, 1000, 3000)):
        rows.append({"step": step, "loss": 4 - i * 0.5, "repeated_loss": 4 - i * 0.8, "icl_score": -0.1 * i,
                     "max_previous_token": 0.1 + 0.2 * i, "max_induction": 0.05 + 0.2 * i, "max_k_composition": 0.1 * i,
                     "k_composition_prev_to_induction": 0.05 * i})
    return {"schema_version": 1, "run": f"runs/{EVIL}", "settings": {}, "checkpoints": rows,
            "formation": {"induction_step": 1000, "note": EVIL}, "train_loss": [[1, 4.2], [500, 3.1], [3000, 1.5]]}


def sample_lens() -> dict:
    toks = ["When", EVIL, " gave", IMG]
    sites = ["resid_pre 0", "resid_post 0", "resid_post 1"]
    return {
        "schema_version": 1, "kind": "lens", "model": {"name": f"tiny {EVIL}"}, "settings": {},
        "prompt": "".join(toks), "tokens": toks, "target": EVIL, "target_id": 3, "distractor": PWN, "distractor_id": 4,
        "lens": {"sites": sites, "target_rank": [[5, 3, 2, 1], [4, 2, 1, 0], [3, 1, 0, 0]],
                 "target_prob": [[0.01, 0.02, 0.1, 0.2]] * 3, "top_tokens": [[[EVIL, IMG, " a"]] * 4] * 3,
                 "top_probs": [[[0.5, 0.2, 0.1]] * 4] * 3, "first_top1_site_last_position": "resid_post 0"},
        "dla": {"position": 3, "metric": "logit diff", "heads": [[0.1, -0.2]], "mlps": [0.3], "other": {"embed": 0.1},
                "total": 1.5, "actual": 1.5000001, "error": 1e-7,
                "top": [{"name": "a0.h1", "value": 0.8}, {"name": "m0", "value": -0.3}, {"name": IMG, "value": 0.1}]},
    }


def sample_recall() -> dict:
    toks = ["The", " Eiffel", EVIL, " is", " in"]
    layers = [0, 1, 2]
    return {
        "schema_version": 1, "kind": "recall", "model": {"name": f"tiny {EVIL}"}, "settings": {},
        "prompt": "".join(toks), "subject": f"Eiffel{EVIL}", "subject_positions": [1, 2], "target": IMG, "tokens": toks,
        "causal_tracing": {"clean_prob": 0.6, "corrupt_prob": 0.05, "noise_std": 0.3, "window": 2, "layers": layers,
                           "restored_prob": {k: [[0.1 * (i + p) for p in range(len(toks))] for i in layers]
                                             for k in ("resid", "mlp", "attn")}},
        "attention_knockout": {"window": 2, "layers": layers, "key_positions": {"subject": [1, 2], "last": [4]},
                               "relative_change": {"subject": [-0.5, -0.2, 0.0], "last": [0.0, -0.1, 0.1]}},
        "attribute_extraction": {"attn_rank": [5, 0, 1], "attn_top_token": [EVIL, IMG, " Paris"], "mlp_rank": [3, 2, 0],
                                 "mlp_top_token": [" a", PWN, " France"], "attn_layers": [1], "mlp_layers": [2]},
        "subject_enrichment": {"rate": [0.0, 0.1, 0.3], "control_rate": [0.0, 0.0, 0.1], "control_subject": EVIL,
                               "related_tokens": [EVIL, " paris"]},
    }


def sample_recall_dataset() -> dict:
    layers = [0, 1, 2]
    cats = {"last_subject": {"n": 3, "restored_prob": [0.2, 0.4, 0.3], "recovered": [0.1, 0.5, 0.4]},
            "before_subject": {"n": 1, "restored_prob": [0.05, 0.05, 0.05], "recovered": [0.0, 0.0, 0.0]},
            "further": None}
    fact = {k: v for k, v in sample_recall().items() if k not in ("schema_version", "model", "settings")}
    return {
        "schema_version": 1, "kind": "recall-dataset", "model": {"name": f"tiny {EVIL}"}, "settings": {},
        "n_facts_in_list": 301, "n_known_top1": 40, "n_analysed": 1, "seconds": 12.5,
        "aggregate": {
            "causal_tracing": {"layers": layers, "clean_prob": 0.6, "corrupt_prob": 0.05,
                               "by_category": {"resid": cats, "mlp": cats}},
            "attention_knockout": {"all": {"layers": layers, "subject": {"n": 3, "relative_change": [-0.4, -0.1, 0.0]},
                                           "last": None}},
            "attribute_extraction": {"attn_rate": [0.0, 0.5, 0.7], "mlp_rate": [0.1, 0.2, 0.3], "attn_any": 0.8, "mlp_any": 0.4},
            "subject_enrichment": {"rate": [0.0, 0.2, 0.3], "control_rate": [0.0, 0.1, 0.1]},
        },
        "facts": [{**fact, "relation": PWN}],
    }


def sample_icl() -> dict:
    from mechscope.icl.result import headline

    layers = [0, 2, 4]
    curves = {s: {"effect": [-0.3, -0.1, 0.0], "control": [-0.01, 0.0, 0.01], "matched": [-0.1, 0.0, 0.0], "effect_per_prompt": [[-0.3, -0.1, 0.0]],
                  "control_per_prompt": [[-0.01, 0.0, 0.01]], "n_edges": [4]} for s in ("within", "cross", "aggregation")}
    prompt = {"text": f"\n{EVIL} -> {IMG}\nup ->", "query": "up", "answer": PWN, "alternative_answer": IMG, "target_id": 3,
              "prob": 0.4, "correct": True, "knocked_out": True, "groups": {"x1": [1]}}
    return {"schema_version": 1, "kind": "icl-fewshot", "model": {"name": f"tiny {EVIL}"}, "settings": {"shots": 1, "layer_stride": 2, "task": EVIL},
            "task": {"name": EVIL, "source": IMG, "n_pairs": 3, "ambiguous": PWN}, "prompt_format": f"x -> y {EVIL}",
            "accuracy": 0.5, "chance": 0.1, "n_prompts": 2, "n_correct": 1, "window": 2, "layers": layers, "n_layers": 6,
            "curves": curves, "headline": headline(curves, layers, 6), "seconds": 3.0,
            "prompts": [prompt, {**prompt, "correct": False, "knocked_out": False}]}


def sample_dashboard() -> dict:
    ctx = {"tokens": [" a", EVIL, IMG], "acts": [0.0, 2.5, 0.5], "centre": 1, "value": 2.5}
    bins = [[0.0, 0.0], [0.0, 0.001]] + [[10 ** (k / 2 - 3), 10 ** (k / 2 - 2.5)] for k in range(12)] + [[1000.0, None]]
    hist = [90, 0] + [0, 0, 0, 1, 3, 5, 2, 1, 0, 0, 0, 0] + [0]
    feat = {"feature": 7, "density": 0.12, "n_firing": 12, "max_act": 2.5, "mean_act": 1.1, "hist": hist, "top": [ctx],
            "quantiles": [{"lo": 0.1, "hi": 1.0, "n_tokens": 8, "samples": [ctx]}, {"lo": 1.0, "hi": 2.5, "n_tokens": 4, "samples": [ctx]}],
            "logits_pos": [[EVIL, 1.2], [" b", 0.5]], "logits_neg": [[IMG, -0.7]]}
    dead = {**feat, "feature": 9, "density": 0.0, "n_firing": 0, "max_act": 0.0, "mean_act": 0.0, "hist": [100] + [0] * 14,
            "top": [], "quantiles": [], "logits_pos": [], "logits_neg": []}
    return {"schema_version": 1, "model": {"name": f"tiny {EVIL}"}, "sae": {"architecture": "topk", "d_sae": 16, "hook_name": PWN},
            "settings": {"ctx_len": 3, "window_left": 1, "window_right": 1}, "n_tokens": 100, "n_contexts": 34,
            "hist_bins": bins, "features": [feat, dead], "seconds": 0.5}


def sample_sae_eval() -> dict:
    return {"schema_version": 1, "tokens": 4096, "l0": 32.0, "mse": 0.5, "fvu": 0.12, "cos": 0.95, "ce_clean": 2.5,
            "ce_sae": 2.7, "ce_zero": 6.0, "ce_recovered": 0.94, "kl": 0.2, "dead_frac": 0.01, "dense_frac": 0.0,
            "density_hist": {"log10_edges": [-6, -5, -4, -3, -2, -1, 0], "counts": [3, 1, 4, 10, 5, 2]},
            "sae": {"architecture": "topk", "d_in": 64, "d_sae": 256, "k": 32, "model_name": f"tiny {EVIL}", "hook_name": IMG},
            "settings": {"corpus": EVIL}}


def sample_vision() -> dict:
    return {"schema_version": 1, "kind": "vision-circuit", "settings": {"k": 1},
            "concept": {"name": EVIL, "target": 0, "target_name": IMG, "source": PWN},
            "model": {"path": EVIL, "arch": "cnn", "classes": [EVIL], "sites": {"conv0": {"kind": PWN, "n_units": 2}}},
            "units": {"conv0": [1]}, "scores": {"conv0": [0.1, 0.5]}, "edges": {"conv0": [[0.0], [0.5]]},
            "top_images": {"conv0": {"1": [0]}}, "pool": [[[0, 255], [128, 7]]],
            "tests": {"attack": {"mark_class": EVIL, "k": 1, "n_attack": 3, "clean_accuracy_drop_points": 1.0,
                                 "before": {"attack_success": 0.9, "clean_accuracy": 0.9},
                                 "after": {"attack_success": 0.1, "clean_accuracy": 0.8},
                                 "random": {"attack_success": 0.8, "clean_accuracy": 0.7}}}}


def sample_binding_dynamics() -> dict:
    rows = [{"step": s, "dir": f"ckpt_{s}", "accuracy_by_depth": {"1": a, "2": a / 2}, "heuristic_agreement": h,
             "heuristic_agreement_discordant": h / 2} for s, a, h in ((0, 0.1, 0.1), (10, 0.4, 0.6), (100, 1.0, 0.2))]
    return {"schema_version": 1, "setting": "binding", "run": EVIL, "settings": {"run": PWN},
            "phases": {"chance": 0.1, "systematic_step": 100, "note": IMG}, "checkpoints": rows, "train_loss": [[1, 2.0], [50, 1.0]]}


def sample_binding_interchange() -> dict:
    words = ["<bos>", EVIL, "=", "3", ";", "?", IMG]
    return {"schema_version": 1, "setting": "binding", "model": PWN, "settings": {"site": "resid", "depth": 1},
            "interchange": {"sites": ["blocks.0.hook_resid_pre", EVIL], "positions": list(range(7)),
                            "accuracy": [[0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1]], "n": 5, "answer_pos": -1, "base_accuracy": 0.0},
            "roles": ["bos", "line 0 lhs", "line 0 =", "line 0 rhs", "line 0 ;", "?", IMG], "chain_positions": [3, 6], "example": words,
            "summary": {"pairs": 5, "pairs_used": 5, "min_chain_accuracy": 1.0, "trace_moves_forward": True,
                        "chain": [{"position": 3, "role": EVIL, "best_site": PWN, "accuracy": 1.0}],
                        "trace": [{"site": IMG, "position": 3, "role": EVIL, "accuracy": 1.0}]}}


def sample_vision_eap() -> dict:
    curve = [{"n_edges": k, "n_edges_after_pruning": k, "fraction": k / 110, "faithfulness": f, "random": 0.01}
             for k, f in ((1, 0.0), (11, 0.3), (55, 0.9), (110, 1.0))]
    return {"schema_version": 1, "kind": "vision-eap", "clean_class": EVIL, "corrupt_class": IMG, "method": "eap-ig",
            "steps": 5, "n_edges": 110, "n_pairs": {"fit": 40, "held_out": 30}, "accuracy": {"clean": 0.9, "corrupt": 0.8},
            "chosen": {"n_edges": 20, "fraction": 20 / 110, "faithfulness_fit": 0.81,
                       "held_out": {"faithfulness": 0.8, "ci_low": 0.7, "ci_high": 0.9}},
            "curve": curve, "top_edges": [{"sender": PWN, "receiver": EVIL, "score": -0.5}]}


def sample_confusion() -> dict:
    import torch

    from mechscope.confusion.result import ConfusionResult

    rates = {"all": {"n": 2, "scored": 2, "lpr": 0.5, "wpr": 1.0, "english_rate": 0.5},
             "by_lang": {"de": {"n": 2, "scored": 2, "lpr": 0.5, "wpr": 1.0, "english_rate": 0.5}}}
    cond = {"rates": rates, "heldout": rates, "texts": [EVIL, "Der Himmel " + IMG], "points": [0, None], "checks": []}
    lens = {"lens": "logit", "n_confused": 1, "n_control": 1, "relative_position": 0.5,
            "confused": {"mean_prob": [0.1, 0.5], "median_rank": [3.0, 0.0], "top1_share": [0.0, 1.0]},
            "control": {"mean_prob": [0.2, 0.6], "median_rank": [2.0, 0.0], "top1_share": [0.0, 1.0]}}
    cost = {"ioi_accuracy": 0.9, "facts_accuracy": 0.6, "perplexity": 30.0}
    res = ConfusionResult(
        model={"name": PWN}, settings={"langs": ["de"], "n_tokens": 8, "top_n": 1, "seed": 0, "ranking": EVIL, "min_words": 5,
                                       "threshold": 0.3},
        prompts=[{"prompt": PWN, "lang": "de", "split": "find"}, {"prompt": "Hallo", "lang": "de", "split": "heldout"}],
        cp_tokens=[EVIL, None], conditions={"baseline": cond, "top": cond, "random": cond}, lens=lens,
        top=[{"layer": 1, "neuron": 3, "score": 0.4, "confused": 0.5, "control": 0.1, "count": 1}], random=[[1, 5]],
        costs={"baseline": cost, "top": {**cost, "relative_change": {"perplexity": 0.01}}},
        confused_scores=torch.zeros(2, 4), control_scores=torch.zeros(2, 4), notes=[IMG])
    return res.to_dict()


def sample_meta_dynamics() -> dict:
    rows = []
    for i, step in enumerate((0, 10, 100, 1000)):
        m = {"self": 0.1 * i, "label": 0.2 * i, "chunk": 0.05 * i}
        rows.append({"step": step, "accuracy": 0.2 * i, "random_label_accuracy": 0.1 * i, "loss": 3 - i, **m,
                     "per_layer": {k: [v, v / 2] for k, v in m.items()}})
    pat = {"step": 100, "pattern": [[[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]]}
    return {"run": f"runs/{EVIL}", "config": {"band": IMG, "min_span": 3}, "checkpoints": rows,
            "phases": {"tasks": 4, "one_over_tasks": 0.25, "chance": 0.1, "peaks": {"self": 10, "label": 100, "chunk": 1000},
                       "peaks_in_order": True, "final_accuracy": 0.6,
                       "plateaus": [{"start": 10, "end": 100, "n": 2, "mean": 0.25}],
                       "phase2": {"step": 100, "accuracy": 0.4, "random_label_accuracy": 0.2}},
            "patterns": {"self_peak": pat, "final": {**pat, "step": 1000}}}


def sample_probe() -> dict:
    return {"layers": [0, 1], "hooks": [f"blocks.0.{EVIL}", "blocks.1.hook_resid_post"], "accuracy": [0.6, 0.8],
            "train_accuracy": [0.7, 0.9], "control_accuracy": [0.5, None], "selectivity": [0.1, None], "majority": 0.4,
            "label_set": EVIL, "class_counts": {IMG: 3, PWN: 5}, "n_train": 40, "n_test": 10, "n_word_types": 12,
            "model": {"name": f"tiny {IMG}"}}


def sample_tuned_lens_eval() -> dict:
    rows = [{"layer": i, "hook": f"blocks.{i}.{EVIL}", "kl_logit": 2.0 - i, "kl_tuned": 1.0 - i / 2, "ratio": 2.0,
             "top1_logit": 0.3, "top1_tuned": 0.5} for i in range(2)]
    return {"model": {"name": IMG}, "lens": {"reads": "resid_pre", "path": PWN, "source": EVIL}, "tokens": 100,
            "corpus": EVIL, "split": "held out", "context_len": 32, "layers": rows,
            "summary": {"tuned_below_logit_every_layer": False, "layers_tuned_not_below": [IMG], "mean_kl_logit": 1.5}}


def sample_transcoders_eval() -> dict:
    row = {"layer": 0, "architecture": IMG, "d_sae": 8, "fvu": 0.2, "l0": 3.0, "dead_frac": 0.1, "ce_spliced": 2.0,
           "ce_zero": 3.0, "ce_recovered": 0.9}
    return {"model": EVIL, "tokens": 10, "layers": [row, {**row, "layer": 1}],
            "all_layers": {"layers": [0, 1], "ce_recovered": 0.875, PWN: 1},
            "summary": {"median_fvu": 0.2, "max_fvu": 0.2, "mean_l0": 3.0, "mean_dead_frac": 0.1},
            "settings": {"corpus": PWN, "n_layers_model": 3}}


def sample_attribution() -> dict:
    toks = ["When", EVIL, IMG]
    nodes = [{"node_id": f"E_{i}", "feature": None, "layer": "E", "ctx_idx": i, "feature_type": "embedding",
              "clerp": "", "influence": 0.1, "activation": None} for i in range(3)]
    nodes += [{"node_id": "0_5_2", "feature": 5, "layer": "0", "ctx_idx": 2, "feature_type": "cross layer transcoder",
               "clerp": PWN, "influence": 0.5, "activation": 1.2},
              {"node_id": "0_err_2", "feature": None, "layer": "0", "ctx_idx": 2, "feature_type": "mlp reconstruction error",
               "clerp": "", "influence": 0.2, "activation": None},
              {"node_id": "L_7_2", "feature": 7, "layer": "1", "ctx_idx": 2, "feature_type": "logit",
               "clerp": f"output {EVIL} (p=0.5)", "influence": 1.0, "activation": None}]
    links = [{"source": "E_1", "target": "0_5_2", "weight": 0.7}, {"source": "0_5_2", "target": "L_7_2", "weight": -0.4},
             {"source": "0_err_2", "target": "L_7_2", "weight": 0.2}]
    return {"metadata": {"prompt": "".join(toks), "prompt_tokens": toks, "generator": {"links_written": 3, "links_total": 9}},
            "nodes": nodes, "links": links}


def _pages() -> list[tuple[str, str, dict, int]]:
    """(page module, render/write suffix, sample data, script elements the page has of its own)."""
    return [
        ("circuit", "circuit", labelled_circuit(), 1),
        ("heads", "heads", sample_heads(), 2),  # the patterns' JSON block and patterns.js
        ("dynamics", "dynamics", sample_dynamics(), 0),
        ("lens", "lens", sample_lens(), 0),
        ("recall", "recall", sample_recall(), 0),
        ("recall", "recall", sample_recall_dataset(), 0),
        ("icl", "icl", sample_icl(), 0),
        ("dashboard", "dashboard", sample_dashboard(), 0),
        ("sae_eval", "sae_eval", sample_sae_eval(), 0),
        ("vision", "vision", sample_vision(), 0),
        ("vision_eap", "vision_eap", sample_vision_eap(), 0),
        ("binding", "binding_dynamics", sample_binding_dynamics(), 0),
        ("binding", "binding_interchange", sample_binding_interchange(), 1),  # tooltip.js
        ("confusion", "confusion", sample_confusion(), 0),
        ("meta_dynamics", "meta_dynamics", sample_meta_dynamics(), 0),
        ("probe", "probe", sample_probe(), 0),
        ("tuned_lens", "tuned_lens_eval", sample_tuned_lens_eval(), 0),
        ("transcoders", "transcoders_eval", sample_transcoders_eval(), 0),
        ("attribution", "attribution", sample_attribution(), 2),  # the graph's JSON block and attribution.js
    ]


@pytest.mark.parametrize("module, name, data, n_scripts", _pages(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_page_escapes_tokens_and_is_self_contained(tmp_path, module, name, data, n_scripts):
    import importlib

    mod = importlib.import_module(f"mechscope.report.{module}")
    page = getattr(mod, f"render_{name}")(data)
    for hostile in (EVIL, PWN, IMG, "<img", "onerror=\"window"):
        assert hostile not in page, hostile
    assert "&lt;script&gt;" in page  # the hostile tokens are shown, as text
    assert page.count("<script") == n_scripts and page.count("</script>") == n_scripts
    assert page.startswith("<!DOCTYPE html>") and "<main>" in page and "<footer>" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I) and "@import" not in page
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {"http://www.w3.org/2000/svg"}
    written = getattr(mod, f"write_{name}")(data, tmp_path / "page.html")
    written = written[0] if isinstance(written, tuple) else written
    assert written.read_text(encoding="utf-8") == page


def test_dynamics_writes_the_standalone_svg_next_to_the_page(tmp_path):
    from mechscope.report.dynamics import render_dynamics_svg, write_dynamics

    html, svg = write_dynamics(sample_dynamics(), tmp_path / "dynamics.html")
    assert svg == tmp_path / "dynamics.svg" and svg.read_text() == render_dynamics_svg(sample_dynamics())
    assert svg.read_text().startswith("<svg") and EVIL not in svg.read_text() and html.is_file()


def test_heads_pattern_viewer_draws_the_most_inductive_head():
    from mechscope.report.heads import render_heads

    d = sample_heads()
    page = render_heads(d)
    best = max(((l, h) for l in range(2) for h in range(3)), key=lambda x: d["scores"]["induction"][x[0]][x[1]])
    assert f'<option value="{best[0] * 3 + best[1]}" selected>a{best[0]}.h{best[1]}</option>' in page
    n = len(d["example_tokens"])
    viewer = page[page.index("<div id='pattern'>"):page.index("</div>", page.index("<div id='pattern'>"))]
    assert viewer.count("data-rc=") == n * (n + 1) // 2  # one cell per query and earlier key
    assert "<select" not in render_heads({k: v for k, v in d.items() if k != "example_patterns"})
