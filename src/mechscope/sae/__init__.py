"""Sparse autoencoders and transcoders: the module, SAELens-layout IO, training, evaluation.

    from mechscope.sae import SAE, SAEConfig, load_sae, save_sae
    sae = load_sae("runs/sae-l15")              # a mechscope or SAELens folder
    f = sae.encode(acts)                         # [..., d_sae] feature activations
"""

from mechscope.sae.io import check_sae_fits, load_sae, save_sae
from mechscope.sae.model import ARCHITECTURES, SAE, SAEConfig

__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "check_sae_fits", "load_sae", "save_sae"]
