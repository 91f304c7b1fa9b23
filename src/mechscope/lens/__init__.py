"""Logit lens, direct logit attribution and the tuned lens.

    from mechscope.lens import run_lens
    res = run_lens(model, "The capital city of France is", target=" Paris")
    res.rank[:, -1]          # the target's rank at every site (L{l}.pre|mid|post), last position
    res.dla.top(10)          # the heads/MLPs writing most to logit(target) - logit(distractor)
    res.save("lens-out")     # lens.json + lens.safetensors

    lens = train_tuned_lens(model, "embedded", TunedLensTrainConfig(), out="tl")   # or load_tuned_lens("tl", model)
    run_lens(model, "The capital city of France is", tuned=lens)                  # read through the translators

``TunedLensTrainConfig`` (``lens.config``, no torch) is imported with the package; the other
names load on first use.
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports
from mechscope.lens.config import TunedLensTrainConfig

__all__ = [
    "DLA", "LensResult", "LensTable", "TunedLens", "TunedLensTrainConfig", "convert_tuned_lens", "direct_logit_attribution",
    "evaluate_tuned_lens", "load_tuned_lens", "logit_lens", "run_lens", "site_names", "train_tuned_lens",
]

if TYPE_CHECKING:  # static checkers and IDEs see the lazy exports (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.lens.dla import DLA, direct_logit_attribution
    from mechscope.lens.logit_lens import LensTable, logit_lens, site_names
    from mechscope.lens.result import LensResult
    from mechscope.lens.run import run_lens
    from mechscope.lens.tuned import TunedLens, convert_tuned_lens, load_tuned_lens
    from mechscope.lens.tuned_eval import evaluate_tuned_lens
    from mechscope.lens.tuned_train import train_tuned_lens

lazy_exports(__name__, {
    "DLA": "dla", "direct_logit_attribution": "dla",
    "LensTable": "logit_lens", "logit_lens": "logit_lens", "site_names": "logit_lens",
    "LensResult": "result",
    "run_lens": "run",
    "TunedLens": "tuned", "convert_tuned_lens": "tuned", "load_tuned_lens": "tuned",
    "train_tuned_lens": "tuned_train",
    "evaluate_tuned_lens": "tuned_eval",
})
