"""In-context learning beyond induction. Variable binding (Wu, Geiger and Milliere 2025)::

    from mechscope.icl import BindingConfig, train_binding, binding_dynamics
    train_binding(BindingConfig(), "run")       # small GPT-2, log-spaced checkpoints, resumable
    binding_dynamics("run").rows[-1]["accuracy_by_depth"]

The configs (no torch) load with the package; the other names on first use.
"""

from mechscope._lazy import lazy_exports
from mechscope.icl.binding_config import BindingConfig, BindingDataConfig, BindingEvalConfig, BindingInterchangeConfig

__all__ = ["BindingConfig", "BindingDataConfig", "BindingEvalConfig", "BindingInterchangeConfig", "binding_dynamics",
           "binding_interchange", "train_binding"]

lazy_exports(__name__, {"train_binding": "binding_train", "binding_dynamics": "binding_eval",
                        "binding_interchange": "binding_eval"})
