"""Pooling the scoring pairs' attribution (circuits/pooling.py): the sum as before, the median
per edge checked against numpy, leaving a fold out, and the pooled scores of a discovery run."""

import numpy as np
import pytest
import torch

from mechscope.circuits import DiscoverConfig, discover
from mechscope.circuits.attribution import edge_score_folds
from mechscope.circuits.crossval import cv_curve
from mechscope.circuits.pooling import PairScores
from mechscope.circuits.toy import induction_task, save_induction_toy
from mechscope.errors import MechscopeError
from mechscope.graph import build_graph
from mechscope.models import load_model


def _parts(n=7, s=3, r=4, seed=0):
    return torch.randn(n, s, r, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n", [7, 6])
def test_median_is_numpys_median_of_the_pairs_on_the_mean_scale(n):
    parts = _parts(n)
    ps = PairScores(parts, [n - n // 2, n // 2], "median")
    want = np.median(parts.numpy(), axis=0) * n  # parts are per-pair scores / n
    assert np.allclose(ps.total().numpy(), want, atol=1e-6)
    # without fold 0: the median of the pairs of fold 1 only
    rest = parts[n - n // 2 :]
    assert np.allclose(ps.without(0).numpy(), np.median(rest.numpy(), axis=0) * n, atol=1e-6)


def test_sum_pooling_is_the_total_minus_the_fold():
    parts = _parts(3)
    ps = PairScores(parts, [4, 4, 2], "sum")
    assert torch.allclose(ps.total(), parts.sum(0))
    assert torch.allclose(ps.without(1), parts[0] + parts[2])


def test_one_extreme_pair_moves_the_sum_but_not_the_median():
    """Eleven pairs agree on which edge matters most; one pair with a huge score on another edge
    takes over the sum's top edge, not the median's."""
    parts = torch.zeros(12, 1, 5)
    parts[:, 0, 2] = 1.0
    parts[:, 0, 0] = 0.1
    parts[11, 0, 0] = 100.0
    assert int(PairScores(parts, [12], "median").total().argmax()) == 2
    assert int(PairScores(parts.sum(0, keepdim=True), [12], "sum").total().argmax()) == 0


def test_rows_must_match_the_folds():
    with pytest.raises(ValueError):
        PairScores(_parts(5), [3, 3], "median")
    with pytest.raises(ValueError):
        PairScores(_parts(3), [2, 2], "sum")
    with pytest.raises(MechscopeError, match="--pool"):
        DiscoverConfig(pool="mean")  # type: ignore[arg-type]
    with pytest.raises(MechscopeError, match="ACDC"):
        DiscoverConfig(method="acdc", pool="median")


def test_cv_curve_takes_fold_tensors_and_pair_scores_alike(tiny_gpt2):
    """Summed fold scores as a tensor or as PairScores give the same curve; per-pair scores
    pooled by the median give each fold's ranking from the other fold's pairs' median."""
    from mechscope.tasks.base import TaskBatch

    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randint(1, 512, s, generator=g)  # noqa: E731
    b = TaskBatch(task="random", clean=r(6, 8), corrupt=r(6, 8), positions=torch.full((6, 1), 7),
                  answers=r(6, 1), wrongs=r(6, 1), lengths=torch.full((6,), 8))
    m, gr = tiny_gpt2, build_graph(tiny_gpt2)
    fs = edge_score_folds(m, gr, b, [3, 3], "eap", 1)
    sizes = [5, 40]
    a = cv_curve(m, gr, b, fs, sizes, "eap")
    c = cv_curve(m, gr, b, PairScores(fs, [3, 3], "sum"), sizes, "eap")
    assert [x["per_fold"] for x in a] == [x["per_fold"] for x in c]
    per_pair = edge_score_folds(m, gr, b, [1] * 6, "eap", 1)
    assert torch.allclose(per_pair[:3].sum(0), fs[0], atol=1e-6)  # the same passes, finer shares
    med = cv_curve(m, gr, b, PairScores(per_pair, [3, 3], "median"), sizes, "eap")
    assert len(med) == 2 and all(len(x["per_fold"]) == 2 for x in med)
    from mechscope.circuits.crossval import cv_per_pair, fold_evaluators

    evs = fold_evaluators(m, gr, b, 2)  # folds of 3 + 3 pairs
    with pytest.raises(ValueError, match="folds"):  # scores cut into other folds than the evaluators'
        cv_per_pair(gr, evs, PairScores(per_pair, [2, 4], "median"), sizes, "eap")


@pytest.mark.slow
def test_discover_with_median_pooling_saves_the_median_scores(tmp_path):
    m = load_model(save_induction_toy(tmp_path / "toy"), device="cpu")
    b = induction_task(m.tokenizer, n=12, seq_len=8, seed=0)
    cfg = DiscoverConfig(task="toy", n=12, method="eap", ablation="zero", labels=False, random_seeds=1, pool="median")
    res = discover(m, cfg, batch=b, progress=False)
    score_set, _ = b.split(cfg.held_out, seed=cfg.seed)
    per_pair = edge_score_folds(m, build_graph(m), score_set, [1] * len(score_set), "eap", 1, "zero")
    want = np.median(per_pair.numpy(), axis=0) * len(score_set)
    assert np.allclose(res.scores.numpy(), want, atol=1e-5)
    assert res.settings["pool"] == "median" and res.metrics["selection"] == "cross-validation"
