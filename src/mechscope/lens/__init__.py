"""Logit lens and direct logit attribution.

    from mechscope.lens import run_lens
    res = run_lens(model, "The capital city of France is", target=" Paris")
    res.rank[:, -1]          # the target's rank at every site (L{l}.pre|mid|post), last position
    res.dla.top(10)          # the heads/MLPs writing most to logit(target) - logit(distractor)
    res.save("lens-out")     # lens.json + lens.safetensors
"""

from mechscope.lens.dla import DLA, direct_logit_attribution
from mechscope.lens.logit_lens import LensTable, logit_lens, site_names
from mechscope.lens.result import LensResult
from mechscope.lens.run import run_lens

__all__ = ["DLA", "LensResult", "LensTable", "direct_logit_attribution", "logit_lens", "run_lens", "site_names"]
