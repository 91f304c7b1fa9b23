"""The exemplars pass on the embedded SmolLM2-135M-Instruct: the neuron hook and one small pass."""

from __future__ import annotations

import pytest
import torch

from mechscope.explain.config import ExemplarsConfig
from mechscope.explain.db import UnitDB
from mechscope.explain.exemplars import harvest_exemplars
from mechscope.explain.types import UnitRef
from mechscope.models.hooks import mlp_out, mlp_post

pytestmark = pytest.mark.embedded


@torch.no_grad()
def test_gated_mlp_neurons_times_w_out_give_mlp_out(embedded):
    toks = torch.tensor([embedded.to_tokens("The Eiffel Tower is in Paris, and the Colosseum is in Rome.")])
    hooks = [mlp_post(5), mlp_out(5)]
    _, cache = embedded.bridge.run_with_cache(toks, names_filter=lambda n: n in hooks)
    assert cache[mlp_post(5)].shape[-1] == embedded.summary.d_mlp == 1536
    rebuilt = cache[mlp_post(5)] @ embedded.bridge.W_out[5]
    torch.testing.assert_close(rebuilt, cache[mlp_out(5)], atol=1e-4, rtol=1e-4)


def test_small_pass_on_the_embedded_corpus(embedded, tmp_path):
    cfg = ExemplarsConfig(layers=[3], unit_range=(0, 64), n_tokens=2 * 8 * 64, context_len=64, batch_size=8, k=5)
    db = UnitDB(tmp_path / "u.db", model_id=embedded.summary.name)
    state = harvest_exemplars(embedded, cfg, db=db)
    assert state.contexts_done == 16 and len(db.units()) == 64
    rec = db.unit(UnitRef("mlp", 3, 7))
    top = db.exemplars(UnitRef("mlp", 3, 7), kind="top")
    assert len(top) == 5 and top[0].act == pytest.approx(rec.max_act, abs=1e-4)
    assert all(t for t, _ in rec.top_logits) and 0 < rec.density < 1
