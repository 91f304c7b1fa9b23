"""Attention heads: taxonomy (previous-token, duplicate, induction, copying), composition,
causal effect, ICL score, and the training dynamics of induction heads on a toy model.

Five lines from a notebook::

    import mechscope as ms
    from mechscope.heads import HeadsConfig, head_scores
    res = head_scores(ms.load_model(), HeadsConfig(n=50, seq_len=20))
    print(res.top_by_category())            # top heads per category
    res.save("heads-out")                   # heads.json + heads.safetensors
"""

from mechscope.heads.result import HeadsResult
from mechscope.heads.scores import HeadsConfig, head_scores

__all__ = ["HeadsConfig", "HeadsResult", "head_scores"]
