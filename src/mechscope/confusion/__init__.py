"""Language confusion (Nie et al. 2025): an English-centric model answering in English when
asked in another language; where in depth the English token takes over, which MLP neurons push
it, and whether zeroing them helps.

    from mechscope.confusion import ConfusionConfig, load_prompts, run_confusion
    res = run_confusion(model, load_prompts("builtin"), ConfusionConfig(n_tokens=64, top_n=100))
    res.headline()            # LPR before / after the edit / after a random edit, and the costs
    res.save("confusion-out") # confusion.json + confusion.safetensors

Only the torch-free ``config`` and ``prompts`` are imported with the package; the other names
load on first use.
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports
from mechscope.confusion.config import LANGS, ConfusionConfig
from mechscope.confusion.prompts import LangPrompt, load_prompts

__all__ = [
    "LANGS", "ConfusionConfig", "ConfusionResult", "LangPrompt", "Prefix", "check_response", "confusion_point",
    "load_prompts", "logit_decomposition", "neuron_gains", "pass_rates", "run_confusion", "zeroed_neurons",
]

if TYPE_CHECKING:  # static checkers and IDEs see the lazy exports (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.confusion.attribution import Prefix, logit_decomposition, neuron_gains
    from mechscope.confusion.edit import zeroed_neurons
    from mechscope.confusion.metrics import check_response, pass_rates
    from mechscope.confusion.points import confusion_point
    from mechscope.confusion.result import ConfusionResult
    from mechscope.confusion.run import run_confusion

lazy_exports(__name__, {
    "Prefix": "attribution", "logit_decomposition": "attribution", "neuron_gains": "attribution",
    "zeroed_neurons": "edit",
    "check_response": "metrics", "pass_rates": "metrics",
    "confusion_point": "points",
    "ConfusionResult": "result",
    "run_confusion": "run",
})
