"""Feature dashboards and steering on the embedded SmolLM2-135M-Instruct (their fast tests, on
tiny models, are in tests/unit/test_dashboard.py and tests/unit/test_steer.py)."""

from __future__ import annotations

import pytest

from mechscope.sae import SAE, SAEConfig
from mechscope.sae.dashboard import DashboardConfig, feature_dashboards
from mechscope.sae.steer import GenerationConfig, steer_actadd

pytestmark = pytest.mark.embedded


def test_embedded_dashboard(embedded, tmp_path):
    """The embedded model and corpus, a random SAE at layer 3: one pass over 2k tokens."""
    d = embedded.summary.d_model
    sae = SAE(SAEConfig(d_in=d, d_sae=256, architecture="topk", k=16, hook_name="blocks.3.hook_resid_post",
                        model_name="smollm2"))
    res = feature_dashboards(embedded, sae, DashboardConfig(features=list(range(20)), n_tokens=2048, ctx_len=64))
    assert res.n_tokens == 32 * 63
    fired = [f for f in res.features if f.n_firing]
    assert fired and all(sum(f.hist) == res.n_tokens for f in res.features)
    assert all(f.logits_pos and f.logits_neg[0][1] < 0 < f.logits_pos[0][1] for f in fired)
    assert all(any(c.isalpha() for c in "".join(e["tokens"])) for f in fired for e in f.top)  # real prose


def test_embedded_steering(embedded):
    """SmolLM2: ActAdd 'Love' - 'Hate' at layer 6 (Turner et al.'s example) turns the greedy
    continuation (the zero-coefficient identity is tested on the tiny models)."""
    r = steer_actadd(embedded, "I hate you because", "Love", "Hate", layer=6, coef=5.0,
                     gen=GenerationConfig(max_new_tokens=6))
    assert len(r.unsteered_ids) == 6 and r.steered != r.unsteered
    assert r.settings["n_positions"] == max(len(embedded.to_tokens("Love")), len(embedded.to_tokens("Hate")))
