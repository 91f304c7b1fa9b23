"""In-context learning. Few-shot tasks and the position-group attention knockout of
Bakalova et al. 2025 ("contextualize-then-aggregate"):

    from mechscope.icl import FewShotConfig, fewshot_knockout
    res = fewshot_knockout(model, FewShotConfig(task="antonyms", shots=6))
    res.accuracy, res.chance            # few-shot accuracy of the drawn prompts
    res.curves["cross"]["effect"]       # mean relative change of p(target) per layer window
    res.save("icl-out")                 # icl.json

Configs (``icl.config``, no torch) are imported with the package; the rest loads on first use.
"""

from mechscope._lazy import lazy_exports
from mechscope.icl.config import FewShotConfig

__all__ = [
    "FewShotConfig", "FewShotPrompt", "FewShotResult", "FewShotTask", "block_edges", "fewshot_accuracy",
    "fewshot_knockout", "group_edges", "load_task", "make_prompt", "matched_edges", "random_edges", "sample_prompts",
    "sweep_edges", "task_names",
]

lazy_exports(__name__, {
    "FewShotPrompt": "fewshot", "FewShotTask": "fewshot", "fewshot_accuracy": "fewshot", "load_task": "fewshot",
    "make_prompt": "fewshot", "sample_prompts": "fewshot", "task_names": "fewshot",
    "block_edges": "knockout", "group_edges": "knockout", "matched_edges": "knockout", "random_edges": "knockout",
    "sweep_edges": "knockout",
    "FewShotResult": "result", "fewshot_knockout": "run",
})
