"""Each method recovers the planted circuit of the hand-built induction model (ROC AUC >= 0.95).

Zero ablation is used because it is the only source under which every planted edge has an
effect (the positional edges of the previous-token head are identical in any two sequences of
the same length, so resample and mean ablation cannot see them; see circuits/toy.py).
"""

import pytest
import torch

from mechscope.circuits import acdc, edge_scores, roc_auc
from mechscope.circuits.toy import induction_task, planted_edges, save_induction_toy
from mechscope.graph import build_graph
from mechscope.models import load_model


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    m = load_model(save_induction_toy(tmp_path_factory.mktemp("toy")), device="cpu")
    return m, build_graph(m), induction_task(m.tokenizer, n=8, seq_len=10, seed=0)


@pytest.mark.parametrize("method", ["eap", "eap-ig", "eap-ig-act"])
def test_attribution_recovers_planted_edges(toy, method):
    m, g, b = toy
    sc = edge_scores(m, g, b, method=method, steps=8, ablation="zero")
    planted = g.mask_from_edges(planted_edges()).bool()
    auc = roc_auc(sc, planted, g.allowed)
    assert auc >= 0.95, auc


@pytest.mark.parametrize("metric", ["kl", "task"])
def test_acdc_recovers_planted_edges(toy, metric):
    m, g, b = toy
    res = acdc(m, g, b, tau=0.05, ablation="zero", metric=metric)
    planted = g.mask_from_edges(planted_edges()).bool()
    assert roc_auc(res.scores, planted, g.allowed) >= 0.95
    # every planted edge kept, and the circuit is small
    assert bool(res.circuit[planted].all())
    assert int(res.circuit.sum()) <= 3 * int(planted.sum())


def test_random_scores_do_not(toy):
    m, g, b = toy
    planted = g.mask_from_edges(planted_edges()).bool()
    rnd = torch.rand(g.n_senders, g.n_receivers, generator=torch.Generator().manual_seed(0))
    assert roc_auc(rnd, planted, g.allowed) < 0.9
