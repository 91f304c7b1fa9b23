"""In-context learning beyond induction heads (issue 17).

- Few-shot tasks and the position-group attention knockout of Bakalova et al. 2025
  ("contextualize-then-aggregate"), exported here;
- the in-context meta-learning setting of Minegishi et al. 2025 (``icl.meta_data``,
  ``meta_model``, ``meta_train``, ``meta_metrics``, ``meta_dynamics``);
- variable binding (Wu, Geiger, Milliere 2025: ``icl.binding_*``).

From a notebook (few-shot; ``train_meta(MetaConfig(), "run")`` + ``meta_dynamics("run")`` and
``train_binding(BindingConfig(), "run")`` + ``binding_dynamics("run")`` for the two toy settings):

    from mechscope.icl import FewShotConfig, fewshot_knockout
    res = fewshot_knockout(model, FewShotConfig(task="antonyms", shots=6))
    res.accuracy, res.chance            # few-shot accuracy of the drawn prompts
    res.curves["cross"]["effect"]       # mean relative change of p(target) per layer window
    res.save("icl-out")                 # icl.json

Configs (``icl.config``, no torch) are imported with the package; the rest loads on first use.
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports
from mechscope.icl.binding_config import BindingConfig, BindingDataConfig, BindingEvalConfig, BindingInterchangeConfig
from mechscope.icl.config import FewShotConfig
from mechscope.icl.meta_config import MetaConfig, MetaDataConfig, MetaDynamicsConfig

__all__ = [
    "BindingConfig", "BindingDataConfig", "BindingEvalConfig", "BindingInterchangeConfig", "MetaConfig", "MetaDataConfig",
    "MetaDynamicsConfig", "binding_dynamics", "binding_interchange", "meta_dynamics", "train_binding", "train_meta",
    "FewShotConfig", "FewShotPrompt", "FewShotResult", "FewShotTask", "block_edges", "fewshot_accuracy",
    "fewshot_knockout", "group_edges", "load_task", "make_prompt", "matched_edges", "random_edges", "sample_prompts",
    "sweep_edges", "task_names",
]

if TYPE_CHECKING:  # static checkers and IDEs see the lazy exports (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.icl.binding_eval import binding_dynamics, binding_interchange
    from mechscope.icl.binding_train import train_binding
    from mechscope.icl.fewshot import (
        FewShotPrompt,
        FewShotTask,
        fewshot_accuracy,
        load_task,
        make_prompt,
        sample_prompts,
        task_names,
    )
    from mechscope.icl.knockout import block_edges, group_edges, matched_edges, random_edges, sweep_edges
    from mechscope.icl.meta_dynamics import meta_dynamics
    from mechscope.icl.meta_train import train_meta
    from mechscope.icl.result import FewShotResult
    from mechscope.icl.run import fewshot_knockout

lazy_exports(__name__, {
    "FewShotPrompt": "fewshot", "FewShotTask": "fewshot", "fewshot_accuracy": "fewshot", "load_task": "fewshot",
    "make_prompt": "fewshot", "sample_prompts": "fewshot", "task_names": "fewshot",
    "block_edges": "knockout", "group_edges": "knockout", "matched_edges": "knockout", "random_edges": "knockout",
    "sweep_edges": "knockout",
    "FewShotResult": "result", "fewshot_knockout": "run",
    "train_binding": "binding_train", "binding_dynamics": "binding_eval", "binding_interchange": "binding_eval",
    "train_meta": "meta_train", "meta_dynamics": "meta_dynamics",
})
