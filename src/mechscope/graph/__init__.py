"""The model as a computational graph: senders, receivers, edges and edge masks.

Node names (``a3.h1``, ``a3.kv0<k>``, ``m3``, ...) are built and parsed by ``graph.names``,
which needs no torch, so reports can read them without loading it.
"""

__all__ = ["Graph", "build_graph", "check_graph_fits"]


def __getattr__(name):  # lazy: importing mechscope.graph.names does not load torch
    if name in __all__:
        from mechscope.graph import graph

        return getattr(graph, name)
    raise AttributeError(f"module 'mechscope.graph' has no attribute '{name}'")
