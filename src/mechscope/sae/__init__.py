"""Sparse autoencoders and transcoders: the module, SAELens-layout IO, training, evaluation.

    from mechscope.sae import SAE, SAEConfig, load_sae, save_sae
    sae = load_sae("runs/sae-l15")              # a mechscope or SAELens folder
    f = sae.encode(acts)                         # [..., d_sae] feature activations
    print(evaluate_sae(model, sae, tokens))      # L0, FVU, CE loss recovered, ...
    feature_dashboards(model, sae, DashboardConfig(features=list(range(100))))
"""

from mechscope.sae.dashboard import DashboardConfig, DashboardResult, feature_dashboards
from mechscope.sae.evaluate import SAEEval, evaluate_sae
from mechscope.sae.io import check_sae_fits, load_sae, save_sae
from mechscope.sae.model import ARCHITECTURES, SAE, SAEConfig
from mechscope.sae.steer import GenerationConfig, steer_actadd, steer_feature
from mechscope.sae.train import TrainConfig, Trainer

__all__ = [
    "ARCHITECTURES", "SAE", "SAEConfig", "SAEEval", "DashboardConfig", "DashboardResult", "GenerationConfig",
    "Trainer", "TrainConfig", "check_sae_fits", "evaluate_sae", "feature_dashboards", "load_sae", "save_sae",
    "steer_actadd", "steer_feature",
]
