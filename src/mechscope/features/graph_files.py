"""Writing an attribution graph: ``graph.json`` in the schema circuit-tracer's and Neuronpedia's
graph frontends read, the full adjacency as safetensors, and the folder's graph index.

``graph.json``: ``metadata`` (slug, scan, transcoder_list, prompt_tokens, prompt,
node_threshold, schema_version 1, plus mechscope's scores and caps), ``qParams`` (pinnedIds,
supernodes, linkType, clickedId, sg_pos), ``nodes`` and ``links`` ``{source, target, weight}``
of the pruned graph. Node ids: feature ``{layer}_{feature}_{pos}``, error ``{layer}_-1_{pos}``,
token ``E_{token_id}_{pos}`` (layer ``"E"``), logit ``{n_layers + 1}_{token_id}_{pos}``; a
node's ``influence`` is its cumulative-influence rank share, as there. Links are capped at
``max_links`` (the strongest by |weight|; the metadata says how many were left out), so a
long prompt never produces a JSON too large for a browser.

``graph-metadata.json`` lists the folder's graphs (``{"graphs": [metadata, ...]}``), which is
what circuit-tracer's local server reads to find them.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from mechscope.features.attribute import AttributionGraph
from mechscope.features.prune import Pruned, scores
from mechscope.models.tokens import token_texts


def _tok(text: str) -> str:
    return text.replace("\n", "⏎").replace("\t", "→")


def logit_label(text: str, p: float) -> str:
    """A logit node's ``clerp``: its token's text (from ``token_texts``, so a padded
    unembedding row reads ``<unused id N>`` rather than an empty string) and its probability."""
    return f'Output "{_tok(text)}" (p={p:.3f})'


def node_ids(g: AttributionGraph) -> list[str]:
    """Every node's id, in adjacency order."""
    ids = [f"{layer}_{f}_{pos}" for layer, pos, f in g.features.tolist()]
    ids += [f"{layer}_-1_{pos}" for layer in range(g.n_layers) for pos in range(g.n_pos)]
    ids += [f"E_{t}_{pos}" for pos, t in enumerate(g.tokens.tolist())]
    ids += [f"{g.n_layers + 1}_{t}_{g.n_pos - 1}" for t in g.logit_tokens.tolist()]
    return ids


def graph_json(g: AttributionGraph, pr: Pruned, tokenizer, slug: str, prompt: str, scan: str,
               node_threshold: float, max_links: int = 50_000, descriptions: dict[str, str] | None = None) -> dict:
    """The frontend's graph document for the pruned graph (module docstring)."""
    ids = node_ids(g)
    nodes = []
    F, L, P = g.n_features, g.n_layers, g.n_pos
    keep = pr.node_mask
    logit_text = token_texts(tokenizer, g.logit_tokens.tolist()) if g.n_logits else []
    for i in torch.nonzero(keep).flatten().tolist():
        base = {"node_id": ids[i], "jsNodeId": ids[i], "influence": float(pr.cumulative[i]), "run_idx": 0,
                "reverse_ctx_idx": 0, "token_prob": 0.0, "is_target_logit": False, "clerp": ""}
        if i < F:
            layer, pos, f = g.features[i].tolist()
            base.update(feature=int(f), layer=str(layer), ctx_idx=pos, feature_type="cross layer transcoder",
                        activation=float(g.activations[i]))
            base["jsNodeId"] = f"{layer}_{f}-0"
            if descriptions and (d := descriptions.get(f"{layer}:{f}")):
                base["clerp"] = d
        elif i < g.token_start:
            layer, pos = divmod(i - F, P)
            base.update(feature=-1, layer=str(layer), ctx_idx=pos, feature_type="mlp reconstruction error",
                        activation=float(g.error_norms[layer, pos]))
            base["jsNodeId"] = f"{layer}_-1-{pos}"
        elif i < g.logit_start:
            pos = i - g.token_start
            base.update(feature=pos, layer="E", ctx_idx=pos, feature_type="embedding", activation=None)
            base["jsNodeId"] = f"E_{int(g.tokens[pos])}-{pos}"
        else:
            j = i - g.logit_start
            tid, p = int(g.logit_tokens[j]), float(g.logit_probs[j])
            base.update(feature=tid, layer=str(L + 1), ctx_idx=P - 1, feature_type="logit", token_prob=p,
                        is_target_logit=j == 0, clerp=logit_label(logit_text[j], p), activation=None)
            base["jsNodeId"] = f"L_{tid}-{P - 1}"
        nodes.append(base)
    tgt, src = torch.nonzero(pr.edge_mask, as_tuple=True)
    w = g.adjacency[tgt, src]
    n_all = len(w)
    if n_all > max_links:
        top = w.abs().topk(max_links).indices
        tgt, src, w = tgt[top], src[top], w[top]
    links = [{"source": ids[s], "target": ids[t], "weight": float(x)} for t, s, x in zip(tgt.tolist(), src.tolist(), w.tolist())]
    full, pruned = scores(g), scores(g, pr.node_mask, pr.edge_mask)
    meta = {
        "slug": slug, "scan": scan, "transcoder_list": [], "prompt": prompt, "node_threshold": node_threshold,
        "prompt_tokens": [_tok(t) for t in g.token_text], "schema_version": 1,
        "generator": {"name": "mechscope", "n_active_features": g.n_active, "n_features_with_rows": g.n_features,
                      "links_total": n_all, "links_written": len(links), "max_links": max_links,
                      "replacement_score": full["replacement"], "completeness_score": full["completeness"],
                      "pruned_replacement_score": pruned["replacement"],
                      "pruned_completeness_score": pruned["completeness"], **g.settings},
    }
    return {"metadata": meta, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "",
                                          "sg_pos": ""}, "nodes": nodes, "links": links}


def save_graph_folder(g: AttributionGraph, doc: dict, out: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``graph.json``, ``graph.safetensors`` (adjacency and node tables),
    ``graph-metadata.json`` and any ``extra_files`` (name -> text) into ``out``: complete or
    absent (written to a temporary folder beside it, then moved into place)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / "graph.json").write_text(json.dumps(doc))
        save_file({"adjacency": g.adjacency.contiguous(), "features": g.features.contiguous(),
                   "activations": g.activations.contiguous(), "tokens": g.tokens.contiguous(),
                   "logit_tokens": g.logit_tokens.contiguous(), "logit_probs": g.logit_probs.contiguous(),
                   "error_norms": g.error_norms.contiguous()}, str(tmp / "graph.safetensors"),
                  metadata={"n_layers": str(g.n_layers), "first_pos": str(g.first_pos), "n_active": str(g.n_active)})
        (tmp / "graph-metadata.json").write_text(json.dumps({"graphs": [doc["metadata"]]}))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_graph(path: str | Path) -> AttributionGraph:
    """An ``AttributionGraph`` back from a folder's ``graph.safetensors`` (token texts empty)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    f = Path(path) / "graph.safetensors"
    t = load_file(str(f))
    with safe_open(str(f), "pt") as h:
        meta = h.metadata() or {}
    return AttributionGraph(tokens=t["tokens"], token_text=[], features=t["features"], activations=t["activations"],
                            logit_tokens=t["logit_tokens"], logit_probs=t["logit_probs"], adjacency=t["adjacency"],
                            n_layers=int(meta.get("n_layers", 0)), first_pos=int(meta.get("first_pos", 0)),
                            error_norms=t["error_norms"], n_active=int(meta.get("n_active", 0)))
