"""The circuit result object: ``circuit.json`` (schema-versioned) + ``scores.safetensors``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechscope.brief import brief_repr
from mechscope.errors import MechscopeError
from mechscope.graph import Graph
from mechscope.graph.names import INPUT, LOGITS, parse_node
from mechscope.results import check_tensors_match, library_versions, read_result_json, save_with_json

SCHEMA_VERSION = 1


@dataclass
class CircuitResult:
    """Edge scores, the chosen circuit and its evaluation."""

    model: dict[str, Any]
    task: str
    method: str
    settings: dict[str, Any]
    graph: Graph
    scores: torch.Tensor  # [n_senders, n_receivers]
    circuit: torch.Tensor  # bool [n_senders, n_receivers]
    metrics: dict[str, Any] = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)
    cpr: float | None = None
    cmd: float | None = None
    example: dict[str, Any] | None = None
    labels: dict[str, dict] | None = None
    """Head roles and attention on the example (``circuits.labels.label_heads``); None: not labelled."""
    cv_curve: list[dict] | None = None
    """Cross-validated faithfulness by size inside the scoring pairs (``circuits.crossval``)."""
    stability: dict[str, Any] | None = None
    """Across-seed stability (``circuits.stability``): per-seed figures, overlaps, edge frequency."""

    def __repr__(self) -> str:  # a notebook's last line: one short line, not every tensor
        return brief_repr(self)

    def node_scores(self) -> dict[str, float]:
        s = (self.scores.cpu() * self.graph.allowed).sum(1)
        return {n: float(v) for n, v in zip(self.graph.senders, s)}

    def circuit_nodes(self) -> set[str]:
        keep = self.circuit.cpu()
        from mechscope.circuits.select import receiver_owner

        nodes = {self.graph.senders[s] for s in keep.any(1).nonzero()[:, 0].tolist()}
        owners = receiver_owner(self.graph)
        for r in keep.any(0).nonzero()[:, 0].tolist():
            nodes |= {self.graph.senders[s] for s in owners[r]} or {LOGITS}
        return nodes

    def top_components(self, k: int = 20) -> list[dict]:
        ns = self.node_scores()
        ranked = sorted((n for n in ns if n != INPUT), key=lambda n: -abs(ns[n]))[:k]
        return [{"name": n, "score": ns[n]} for n in ranked]

    def to_dict(self) -> dict[str, Any]:
        g = self.graph
        sc, keep = self.scores.cpu(), self.circuit.cpu()
        ns = self.node_scores()
        in_nodes = self.circuit_nodes()
        nodes = [_node(n, g, ns.get(n, 0.0), n in in_nodes) for n in g.senders + [LOGITS]]
        ei = g.edge_index
        vals, kept = sc[ei[:, 0], ei[:, 1]].tolist(), keep[ei[:, 0], ei[:, 1]].tolist()
        edges = [
            {"src": g.senders[s], "dst": g.receivers[r], "score": v, "in_circuit": k}
            for (s, r), v, k in zip(ei.tolist(), vals, kept)
        ]
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "task": self.task,
            "method": self.method,
            "settings": self.settings,
            "versions": library_versions(),
            "nodes": nodes,
            "edges": edges,
            "metrics": self.metrics,
            "curve": self.curve,
            "cpr": self.cpr,
            "cmd": self.cmd,
            "example": self.example,
            "labels": self.labels,
            "cv_curve": self.cv_curve,
            "stability": self.stability,
            "top_components": self.top_components(),
        }

    def save(self, out_dir: str | Path) -> Path:
        """``circuit.json`` and ``scores.safetensors``, saved as one (``results.save_with_json``)."""
        return save_with_json(out_dir, "circuit.json", self.to_dict(), "scores.safetensors",
                              {"scores": self.scores, "circuit": self.circuit.to(torch.uint8)})

    @classmethod
    def load(cls, path: str | Path) -> "CircuitResult":
        if not isinstance(path, (str, Path)):
            raise MechscopeError(f"CircuitResult.load needs the folder `mechscope discover` wrote (a str or Path), "
                                 f"got a {type(path).__name__}.")
        p0 = Path(path)
        j = p0 / "circuit.json" if p0.is_dir() else p0
        if j.is_file():  # a JSON file that is not an object: say so, not "schema_version None"
            import json

            try:
                if not isinstance(json.loads(j.read_text(encoding="utf-8")), dict):
                    raise _damaged(path, "circuit.json holds no JSON object")
            except (json.JSONDecodeError, UnicodeDecodeError):
                pass  # read_result_json says where
        d, p = read_result_json(path, "circuit.json", SCHEMA_VERSION, "mechscope discover")
        try:
            m = d["model"]
            g = Graph(n_layers=int(m["n_layers"]), n_heads=int(m["n_heads"]), n_kv_heads=int(m["n_kv_heads"]),
                      parallel=bool(m.get("parallel_blocks", False)))
            task, method, settings = d["task"], d["method"], d["settings"]
        except (KeyError, TypeError, ValueError) as exc:
            raise _damaged(path, f"circuit.json lacks or mangles {exc}") from exc
        if not isinstance(settings, dict):
            raise _damaged(path, "its settings are not a JSON object")
        st = p.parent / "scores.safetensors"
        shape = (g.n_senders, g.n_receivers)
        if st.is_file():
            from safetensors.torch import load_file

            check_tensors_match(d, st, str(path))
            try:
                t = load_file(str(st))
            except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
                raise _damaged(path, f"scores.safetensors cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
            if "scores" not in t or "circuit" not in t:
                raise _damaged(path, f"scores.safetensors holds {sorted(t)}, not 'scores' and 'circuit'")
            scores, circuit = t["scores"], t["circuit"].bool()
            if tuple(scores.shape) != shape or tuple(circuit.shape) != shape:
                raise _damaged(path, f"scores.safetensors holds scores of shape {tuple(scores.shape)} but the graph circuit.json "
                                     f"describes has {shape}")
        else:  # rebuild from the JSON edge list
            scores, circuit = torch.zeros(shape), torch.zeros(shape, dtype=torch.bool)
            try:
                for e in d["edges"]:
                    s, r = g.sender_index(e["src"]), g.receiver_index(e["dst"])
                    scores[s, r], circuit[s, r] = e["score"], e["in_circuit"]
            except (KeyError, TypeError, ValueError) as exc:
                raise _damaged(path, f"an edge of circuit.json lacks or mangles {exc}") from exc
            except MechscopeError as exc:
                raise _damaged(path, str(exc).rstrip(".")) from exc
        return cls(model=m, task=task, method=method, settings=settings, graph=g,
                   scores=scores, circuit=circuit, metrics=d.get("metrics", {}), curve=d.get("curve", []),
                   cpr=d.get("cpr"), cmd=d.get("cmd"), example=d.get("example"), labels=d.get("labels"),
                   cv_curve=d.get("cv_curve"), stability=d.get("stability"))


def _damaged(path: str | Path, what: str) -> MechscopeError:
    return MechscopeError(f"'{path}' is damaged or not a mechscope circuit folder: {what}; run discover again.")


def _node(name: str, g: Graph, score: float, in_circuit: bool) -> dict[str, Any]:
    n = parse_node(name)
    if n.kind == "input":
        return {"name": name, "layer": -1, "head": None, "type": "input", "score": score, "in_circuit": True}
    if n.kind == "logits":
        return {"name": name, "layer": g.n_layers, "head": None, "type": "logits", "score": 0.0, "in_circuit": True}
    return {"name": name, "layer": n.layer, "head": n.head, "type": n.kind, "score": score, "in_circuit": in_circuit}

