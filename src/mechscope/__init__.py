"""mechscope: a workbench for mechanistic interpretability of transformer language models.

Five lines from a notebook::

    import mechscope as ms
    model = ms.load_model()                      # embedded SmolLM2-135M-Instruct
    batch = ms.get_task("ioi").build(model.tokenizer, n=50)
    graph = ms.build_graph(model)
    print(ms.evaluate_task(model, batch))
"""

__version__ = "0.1.0"

from mechscope.errors import MechscopeError  # noqa: E402

__all__ = ["MechscopeError", "__version__"]


def __getattr__(name):  # lazy: `import mechscope` stays fast, torch loads on first use
    if name in ("load_model", "Model", "ModelSummary"):
        from mechscope import models

        return getattr(models, name)
    if name in ("get_task", "list_tasks", "TaskBatch", "evaluate_task"):
        from mechscope import tasks

        return getattr(tasks, name)
    if name in ("build_graph", "Graph"):
        from mechscope import graph

        return getattr(graph, name)
    raise AttributeError(f"module 'mechscope' has no attribute '{name}'")
