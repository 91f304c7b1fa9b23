"""The model as a computational graph: senders, receivers, edges and edge masks."""

from mechscope.graph.graph import Graph, build_graph

__all__ = ["Graph", "build_graph"]
