"""The trainer's small-budget defaults: the dead-latent window follows the run's length, and a
transcoder's encoder starts with centred pre-activations (its input is not centred)."""

from __future__ import annotations

import torch

from mechscope.sae.config import TrainConfig
from mechscope.sae.sources import TensorSource
from mechscope.sae.train import Trainer


def test_dead_window_follows_the_budget():
    assert TrainConfig(tokens=300_000).dead_window == 30_000  # AuxK can act within a short run
    assert TrainConfig(tokens=50_000_000).dead_window == 500_000  # capped for long runs
    assert TrainConfig(tokens=5_000, batch_tokens=2_000).dead_window == 2_000  # at least one batch
    assert TrainConfig(tokens=300_000, dead_tokens=123_456).dead_window == 123_456  # an explicit value wins


def _transcoder(centre: bool, x, y, tmp_path):
    cfg = TrainConfig(architecture="topk", d_sae=64, k=4, tokens=4_000, batch_tokens=500, norm_batches=4, centre_init=centre)
    tr = Trainer(TensorSource(x, y, seed=0), cfg, tmp_path / str(centre), d_in=x.shape[1], d_out=y.shape[1],
                 hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out", model_name="toy")
    tr._initialise()
    return tr


def test_transcoder_pre_activations_start_centred(tmp_path):
    """With an input whose mean is most of its norm, the initial pre-activations of the
    batches the scale was estimated on have mean ~0 per latent with ``centre_init``, and are
    dominated by the mean without it (so TopK would pick the same latents for every token)."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(16, generator=g) * 3
    x = mean + torch.randn(4_000, 16, generator=g) * 0.5
    y = torch.randn(4_000, 12, generator=g)
    for centre in (True, False):
        tr = _transcoder(centre, x, y, tmp_path)
        xs = torch.cat([b[0] for b in tr.pending]) * tr.scale_in
        pre = tr.sae.pre_acts(xs)  # [n, d_sae]
        spread = pre.std(0).mean()
        offset = pre.mean(0).abs().mean()
        if centre:
            assert offset < 0.05 * spread, (offset, spread)
        else:
            assert offset > spread, (offset, spread)
