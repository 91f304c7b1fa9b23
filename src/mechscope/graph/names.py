"""Node names of the computational graph: the one module that builds and parses them.

Senders: ``input``, ``a{l}.h{h}`` (head h of layer l), ``m{l}`` (layer l's MLP).
Receivers: ``a{l}.h{h}<q>`` (head h's query input), ``a{l}.kv{g}<k>`` / ``a{l}.kv{g}<v>``
(KV head g's key / value input), ``m{l}`` (the MLP's input) and ``logits``. ``a{l}.kv{g}``
without a port names the KV group itself (drawn in reports, never an edge end). Per-head
scores (head taxonomy, direct logit attribution) use the same ``a{l}.h{h}`` / ``m{l}`` names.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple, cast

from mechscope.errors import MechscopeError

NodeKind = Literal["input", "head", "kv", "mlp", "logits"]
Port = Literal["q", "k", "v"]

INPUT = "input"
"""The token + position embeddings (a sender)."""
LOGITS = "logits"
"""The final residual stream, read by the unembedding (a receiver)."""

_NODE = re.compile(r"a(\d+)\.(h|kv)(\d+)(?:<([qkv])>)?|m(\d+)")


class Node(NamedTuple):
    """A parsed node name."""

    kind: NodeKind
    """``input``, ``head`` (``a{l}.h{h}``, with or without ``<q>``), ``kv`` (``a{l}.kv{g}``,
    with or without ``<k>``/``<v>``), ``mlp`` (``m{l}``) or ``logits``."""
    layer: int | None = None
    """The layer; ``None`` for ``input`` and ``logits``."""
    head: int | None = None
    """The head index for ``head``, the KV-head index for ``kv``; ``None`` otherwise."""
    port: Port | None = None
    """Which attention input a receiver is (``q``, ``k``, ``v``); ``None`` for senders, MLPs,
    logits and KV groups."""


def head_node(layer: int, head: int) -> str:
    """``a{layer}.h{head}``: a head's output (sender), or its name in per-head scores."""
    return f"a{layer}.h{head}"


def mlp_node(layer: int) -> str:
    """``m{layer}``: an MLP's output (sender) and its input (receiver)."""
    return f"m{layer}"


def kv_group(layer: int, kv_head: int) -> str:
    """``a{layer}.kv{kv_head}``: the KV head (the group of query heads sharing its keys and values)."""
    return f"a{layer}.kv{kv_head}"


def q_receiver(layer: int, head: int) -> str:
    """``a{layer}.h{head}<q>``: head ``head``'s query input."""
    return f"{head_node(layer, head)}<q>"


def kv_receiver(layer: int, kv_head: int, port: Literal["k", "v"]) -> str:
    """``a{layer}.kv{kv_head}<k>`` or ``<v>``: KV head ``kv_head``'s key or value input."""
    return f"{kv_group(layer, kv_head)}<{port}>"


def attn_receiver(layer: int, head: int, port: Port) -> str:
    """The receiver of attention input ``port`` at index ``head``: the query head for ``q``,
    the KV head for ``k``/``v`` (on multi-head models KV head g is head g)."""
    return q_receiver(layer, head) if port == "q" else kv_receiver(layer, head, port)


def parse_node(name: str) -> Node:
    """Parse any node name of the graph (sender, receiver or KV group); a clear error otherwise.

    ``parse_node("a5.kv1<k>") == Node("kv", 5, 1, "k")``, ``parse_node("m7") == Node("mlp", 7)``.
    """
    if name in (INPUT, LOGITS):
        return Node(cast(NodeKind, name))
    m = _NODE.fullmatch(name)
    if m is None:
        raise MechscopeError(
            f"'{name}' is not a graph node name (nodes look like input, a3.h1, a3.h1<q>, a3.kv0<k>, m3, logits)."
        )
    if m[5] is not None:
        return Node("mlp", int(m[5]))
    layer, kind, index, port = int(m[1]), m[2], int(m[3]), m[4]
    if kind == "h" and port in ("k", "v") or kind == "kv" and port == "q":
        raise MechscopeError(
            f"'{name}' is not a graph node name: queries enter a head (a{layer}.h{index}<q>), "
            f"keys and values a KV head (a{layer}.kv{index}<k>)."
        )
    return Node("head" if kind == "h" else "kv", layer, index, cast("Port | None", port))


def node_layer(name: str) -> int | None:
    """The layer of a node name (``None`` for ``input`` and ``logits``)."""
    return parse_node(name).layer
