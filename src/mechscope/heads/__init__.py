"""Attention heads: taxonomy (previous-token, duplicate, induction, copying), composition,
causal effect, ICL score, and the training dynamics of induction heads on a toy model.

Five lines from a notebook::

    import mechscope as ms
    from mechscope.heads import HeadsConfig, head_scores
    res = head_scores(ms.load_model(), HeadsConfig(n=50, seq_len=20))
    print(res.top_by_category())            # top heads per category
    res.save("heads-out")                   # heads.json + heads.safetensors

and for training dynamics: ``train_toy(ToyConfig(), "run")`` then ``dynamics("run")``.
"""

from mechscope.heads.dynamics import DynamicsConfig, DynamicsResult, dynamics
from mechscope.heads.result import HeadsResult
from mechscope.heads.scores import HeadsConfig, head_scores
from mechscope.heads.train import ToyConfig, train_toy

__all__ = ["DynamicsConfig", "DynamicsResult", "HeadsConfig", "HeadsResult", "ToyConfig", "dynamics", "head_scores", "train_toy"]
