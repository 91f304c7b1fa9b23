"""mechscope: a workbench for mechanistic interpretability of transformer language models.

Five lines from a notebook::

    import mechscope as ms
    model = ms.load_model()                      # embedded SmolLM2-135M-Instruct
    batch = ms.get_task("ioi").build(model.tokenizer, n=50)
    graph = ms.build_graph(model)
    print(ms.evaluate_task(model, batch))
"""

__version__ = "0.1.0"

from typing import TYPE_CHECKING  # noqa: E402

from mechscope.errors import MechscopeError  # noqa: E402

if TYPE_CHECKING:  # static checkers and IDEs see the lazy names (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.circuits import CircuitResult, DiscoverConfig, discover
    from mechscope.features import attribute, load_transcoders, train_transcoders
    from mechscope.graph import Graph, build_graph
    from mechscope.heads import HeadsConfig, head_scores
    from mechscope.lens import run_lens
    from mechscope.models import Model, ModelSummary, load_model
    from mechscope.recall import recall
    from mechscope.sae import TrainConfig, load_sae, train_sae
    from mechscope.tasks import TaskBatch, evaluate_task, get_task, list_tasks

_LAZY = {
    "load_model": "models", "Model": "models", "ModelSummary": "models",
    "get_task": "tasks", "list_tasks": "tasks", "TaskBatch": "tasks", "evaluate_task": "tasks",
    "build_graph": "graph", "Graph": "graph",
    "discover": "circuits", "DiscoverConfig": "circuits", "CircuitResult": "circuits",
    "head_scores": "heads", "HeadsConfig": "heads",
    "run_lens": "lens", "recall": "recall",
    "load_sae": "sae", "train_sae": "sae", "TrainConfig": "sae",
    "load_transcoders": "features", "train_transcoders": "features", "attribute": "features",
}
"""Public names served from their subpackage on first use (``import mechscope`` stays fast:
torch loads when a name that needs it is first touched)."""

__all__ = [
    "CircuitResult", "DiscoverConfig", "Graph", "HeadsConfig", "MechscopeError", "Model", "ModelSummary", "TaskBatch",
    "TrainConfig", "__version__", "attribute", "build_graph", "discover", "evaluate_task", "get_task", "head_scores",
    "list_tasks", "load_model", "load_sae", "load_transcoders", "recall", "run_lens", "train_sae", "train_transcoders",
]


def __getattr__(name):
    sub = _LAZY.get(name)
    if sub is None:
        raise AttributeError(f"module 'mechscope' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(f"mechscope.{sub}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
