"""Attention heads: taxonomy (previous-token, duplicate, induction, copying), composition,
causal effect, ICL score, and the training dynamics of induction heads on a toy model.

Five lines from a notebook::

    import mechscope as ms
    from mechscope.heads import HeadsConfig, head_scores
    res = head_scores(ms.load_model(), HeadsConfig(n=50, seq_len=20))
    print(res.top_by_category())            # top heads per category
    res.save("heads-out")                   # heads.json + heads.safetensors

and for training dynamics: ``train_toy(ToyConfig(), "run")`` then ``dynamics("run")``.

The configs (``heads.config``, no torch) are imported with the package; the other names load
on first use.
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports
from mechscope.heads.config import DataConfig, DynamicsConfig, HeadsConfig, ToyConfig

__all__ = ["DataConfig", "DynamicsConfig", "DynamicsResult", "HeadsConfig", "HeadsResult", "ToyConfig", "dynamics",
           "head_scores", "train_toy"]

if TYPE_CHECKING:  # static checkers and IDEs see the lazy exports (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.heads.dynamics import DynamicsResult, dynamics
    from mechscope.heads.result import HeadsResult
    from mechscope.heads.scores import head_scores
    from mechscope.heads.train import train_toy

lazy_exports(__name__, {"DynamicsResult": "dynamics", "dynamics": "dynamics", "HeadsResult": "result",
                        "head_scores": "scores", "train_toy": "train"})
