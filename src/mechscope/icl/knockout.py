"""Position-group attention knockout: block attention edges (query position -> key position)
at windows of layers and read the target's probability at the last position.

Generalises ``recall.knockout`` (which blocks the last position's edges only): here any query
position may lose any earlier key. A blocked edge's pre-softmax score is set to -inf in every
head (``blocks.L.attn.hook_attn_scores``), so that query's attention renormalises over its other
keys. A position never loses itself (edges have key < query), so no row of attention is empty.

Sweeps over a ``FewShotPrompt`` (Bakalova et al. 2025):

- ``within``: Y_i <- X_i (each output token from its own input);
- ``cross``: Y_i <- X_j and Y_j for every earlier example j < i;
- ``aggregation``: final <- Y_i (the last position from every example's output).

Each is measured beside two seeded controls of as many edges: ``control``, random edges drawn
from every edge key < query of the prompt except those into position 0 (the attention sink) and
the sweep's own (the issue's control); ``matched``, random edges from the sweep's own query
positions to their other earlier keys (again never position 0), which asks whether it is these
keys that matter or any perturbation of these queries' attention (fewer when the pool is smaller).
"""

from __future__ import annotations

import random
from typing import Collection

import torch

from mechscope.errors import MechscopeError
from mechscope.icl.fewshot import FewShotPrompt

Edge = tuple[int, int]
"""(query position, key position), key < query."""
AGGREGATES = {"X": "x", "Y": "y", "A": "a", "N": "n"}
"""Group names that join one kind over all examples: X (inputs), Y (outputs), A (arrows), N (newlines)."""


def group_positions(prompt: FewShotPrompt, name: str) -> list[int]:
    """Positions of a group (``x3``, ``y1``, ``xq``, ``final``, ...) or of an aggregate
    (``X``, ``Y``, ``A``, ``N``, ``sep`` = every arrow and newline)."""
    if name in AGGREGATES:
        pos = [p for i in range(1, prompt.shots + 1) for p in prompt.groups[f"{AGGREGATES[name]}{i}"]]
    elif name == "sep":
        pos = [p for k in ("A", "N") for p in group_positions(prompt, k)] + prompt.groups["aq"]
    elif name in prompt.groups:
        pos = prompt.groups[name]
    else:
        raise MechscopeError(f"Unknown position group '{name}'; groups are x1..x{prompt.shots}, y1.., a1.., n1.., xq, aq, "
                             "final, sink and the aggregates X, Y, A, N, sep.")
    if not pos:
        raise MechscopeError(f"The position group '{name}' is empty in this prompt; pick a group that holds tokens.")
    return sorted(pos)


def group_edges(prompt: FewShotPrompt, queries: str | list[str], keys: str | list[str]) -> list[Edge]:
    """Every edge from a position of the query group(s) to an earlier position of the key group(s)."""
    qs = sorted({p for g in ([queries] if isinstance(queries, str) else queries) for p in group_positions(prompt, g)})
    ks = sorted({p for g in ([keys] if isinstance(keys, str) else keys) for p in group_positions(prompt, g)})
    edges = [(q, k) for q in qs for k in ks if k < q]
    if not edges:
        raise MechscopeError(f"No edge from {queries} to {keys}: no key position precedes a query position.")
    return edges


def sweep_edges(prompt: FewShotPrompt, sweep: str) -> list[Edge]:
    """The edges one sweep blocks (see the module doc)."""
    K = prompt.shots
    if sweep == "within":
        return [e for i in range(1, K + 1) for e in group_edges(prompt, f"y{i}", f"x{i}")]
    if sweep == "cross":
        if K < 2:
            raise MechscopeError("The cross-example sweep needs 2 or more examples.")
        return [e for i in range(2, K + 1) for e in group_edges(prompt, f"y{i}", [g for j in range(1, i) for g in (f"x{j}", f"y{j}")])]
    if sweep == "aggregation":
        return group_edges(prompt, "final", "Y")
    raise MechscopeError(f"Unknown sweep '{sweep}'; choose within, cross or aggregation.")


def random_edges(n_pos: int, count: int, exclude: Collection[Edge] = (), seed: int = 0) -> list[Edge]:
    """``count`` distinct random edges key < query of a prompt of ``n_pos`` tokens, none into
    position 0 and none in ``exclude`` (seeded)."""
    excl = set(exclude)
    pool = [(q, k) for q in range(2, n_pos) for k in range(1, q) if (q, k) not in excl]
    if count > len(pool):
        raise MechscopeError(f"Cannot draw {count} random control edges from the {len(pool)} left in a {n_pos}-token prompt.")
    return sorted(random.Random(seed).sample(pool, count))


def matched_edges(edges: list[Edge], seed: int = 0) -> list[Edge]:
    """As many random edges as ``edges`` (or all there are) from the same query positions to
    other earlier keys, none into position 0 (seeded)."""
    excl = set(edges)
    pool = [(q, k) for q in sorted({q for q, _ in edges}) for k in range(1, q) if (q, k) not in excl]
    return sorted(random.Random(seed).sample(pool, min(len(edges), len(pool))))


def _index(rows: list[dict[int, list[Edge]]]) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{layer: (row indices, query positions, key positions)} over the rows of a chunk."""
    out: dict[int, tuple[list[int], list[int], list[int]]] = {}
    for r, row in enumerate(rows):
        for layer, edges in row.items():
            ri, qi, ki = out.setdefault(layer, ([], [], []))
            for q, k in edges:
                if not 0 <= k < q:
                    raise MechscopeError(f"Edge ({q}, {k}) is not query -> earlier key; only keys before the query can be blocked.")
                ri.append(r)
                qi.append(q)
                ki.append(k)
    as_long = lambda v: torch.tensor(v, dtype=torch.long)
    return {lay: (as_long(t[0]), as_long(t[1]), as_long(t[2])) for lay, t in out.items() if t[0]}


@torch.no_grad()
def block_edges(model, ids: list[int] | torch.Tensor, target_id: int, rows: list[dict[int, list[Edge]]],
                max_rows: int = 64) -> torch.Tensor:
    """p(target) at the last position [len(rows)] of one prompt ``ids`` [pos], each row with its
    own blocked edges {layer: [(query, key), ...]} (an empty row is the clean run)."""
    from mechscope.models.check import require_attention_edits
    from mechscope.models.hooks import attn_scores
    from mechscope.models.unembed import final_norm
    from mechscope.recall.engine import last_logits

    require_attention_edits(model, "block_edges (the position-group knockout)")
    tokens = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    n_layers = model.summary.n_layers
    bad = [lay for row in rows for lay in row if not 0 <= lay < n_layers]
    if bad:
        raise MechscopeError(f"Layer {bad[0]} does not exist; the model has layers 0..{n_layers - 1}.")
    norm, dev, out = final_norm(model), model.device, []
    for start in range(0, len(rows), max_rows):
        chunk = rows[start:start + max_rows]
        hooks = []
        for layer, (ri, qi, ki) in _index(chunk).items():
            def block(s, hook, ri=ri.to(dev), qi=qi.to(dev), ki=ki.to(dev)):  # s [rows, heads, q, k]
                s = s.clone()
                s[ri, :, qi, ki] = float("-inf")
                return s

            hooks.append((attn_scores(layer), block))
        logits = last_logits(model, tokens.expand(len(chunk), -1), hooks, norm)  # [rows, d_vocab]
        out.append(logits.float().softmax(-1)[:, target_id].cpu())
    return torch.cat(out)
