"""Reference circuits: published circuits as data, compared to scores by ROC AUC.

File format (JSON)::

    {"model": "gpt2", "task": "ioi", "source": "citation", "nodes": ["a9.h6", "m0", ...],
     "edges": [["a9.h6", "logits"], ...]}          # "edges" optional

Node-level AUC ranks heads and MLPs by their node score (sum of their edge scores); edge-level
AUC (when the file lists edges) ranks edges by |score|.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from mechscope.errors import MechscopeError
from mechscope.graph import Graph

SHIPPED = {"gpt2-ioi": "gpt2_ioi.json", "gpt2-greater-than": "gpt2_greater_than.json"}


@dataclass
class Reference:
    model: str
    task: str
    source: str
    nodes: list[str]
    edges: list[tuple[str, str]] = field(default_factory=list)

    def node_mask(self, graph: Graph) -> torch.Tensor:
        m = torch.zeros(graph.n_senders, dtype=torch.bool)
        for n in self.nodes:
            if n not in graph.senders:
                raise MechscopeError(
                    f"The reference circuit names node '{n}', which this model does not have "
                    f"({graph.n_layers} layers x {graph.n_heads} heads); is it for another model ({self.model})?"
                )
            m[graph.senders.index(n)] = True
        return m

    def edge_mask(self, graph: Graph) -> torch.Tensor | None:
        if not self.edges:
            return None
        return graph.mask_from_edges(self.edges).bool()  # unknown names raise a clear error


def load_reference(path_or_name: str) -> Reference:
    """Load a reference circuit from a JSON file or a shipped name (gpt2-ioi, gpt2-greater-than)."""
    if path_or_name in SHIPPED:
        text = resources.files("mechscope.circuits").joinpath("data", SHIPPED[path_or_name]).read_text()
        where = path_or_name
    else:
        p = Path(path_or_name)
        if not p.is_file():
            raise MechscopeError(
                f"No reference circuit at '{path_or_name}'; pass a JSON file or one of {', '.join(SHIPPED)}."
            )
        text, where = p.read_text(), str(p)
    try:
        d = json.loads(text)
        return Reference(model=d.get("model", "?"), task=d.get("task", "?"), source=d.get("source", ""),
                         nodes=list(d["nodes"]), edges=[tuple(e) for e in d.get("edges", [])])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MechscopeError(f"'{where}' is not a reference circuit file (needs a JSON object with a 'nodes' list).") from exc
