"""Sparse autoencoders and transcoders: the module, SAELens-layout IO, training, evaluation.

    from mechscope.sae import SAE, SAEConfig, load_sae, save_sae
    sae = load_sae("runs/sae-l15")              # a mechscope or SAELens folder
    f = sae.encode(acts)                         # [..., d_sae] feature activations
    print(evaluate_sae(model, sae, tokens))      # L0, FVU, CE loss recovered, ...
    feature_dashboards(model, sae, DashboardConfig(features=list(range(100))))
    train_sae(model, "blocks.6.hook_resid_post", TrainConfig(k=32), "runs/sae-l6")   # harvest + train
    print(evaluate_on_corpus(model, load_sae("runs/sae-l6")))                        # on held-out text

The configs (``sae.config``, no torch) are imported with the package; the other names load on
first use.
"""

from typing import TYPE_CHECKING

from mechscope._lazy import lazy_exports
from mechscope.sae.config import DashboardConfig, GenerationConfig, TrainConfig

__all__ = [
    "ARCHITECTURES", "SAE", "SAEConfig", "SAEEval", "DashboardConfig", "DashboardResult", "GenerationConfig",
    "Trainer", "TrainConfig", "check_sae_fits", "evaluate_on_corpus", "evaluate_sae", "feature_dashboards", "load_sae",
    "sae_trainer", "save_sae", "steer_actadd", "steer_feature", "train_sae", "transcoder_output_hook",
]

if TYPE_CHECKING:  # static checkers and IDEs see the lazy exports (tests/unit/test_lazy_exports.py keeps this in step)
    from mechscope.sae.dashboard import DashboardResult, feature_dashboards
    from mechscope.sae.evaluate import SAEEval, evaluate_on_corpus, evaluate_sae
    from mechscope.sae.io import check_sae_fits, load_sae, save_sae
    from mechscope.sae.model import ARCHITECTURES, SAE, SAEConfig
    from mechscope.sae.steer import steer_actadd, steer_feature
    from mechscope.sae.train import Trainer, sae_trainer, train_sae, transcoder_output_hook

lazy_exports(__name__, {
    "DashboardResult": "dashboard", "feature_dashboards": "dashboard",
    "SAEEval": "evaluate", "evaluate_on_corpus": "evaluate", "evaluate_sae": "evaluate",
    "check_sae_fits": "io", "load_sae": "io", "save_sae": "io",
    "ARCHITECTURES": "model", "SAE": "model", "SAEConfig": "model",
    "steer_actadd": "steer", "steer_feature": "steer",
    "Trainer": "train", "sae_trainer": "train", "train_sae": "train", "transcoder_output_hook": "train",
})
