"""Factual recall on the embedded SmolLM2-135M-Instruct: the issue's verification.

Over facts the model knows: restoring the last subject token's early-middle MLP outputs
recovers much of p(attribute) while restoring unrelated positions does not (ROME), and
blocking the last position's attention to the subject in middle-upper layers hurts far more
than blocking as many non-subject edges (Geva et al.). Sizes are small (6 facts known among
a seeded 40 of the list, MLP tracing only, every third layer) to keep this file near a
minute; the README's figures come from the full CLI run (30 facts, every second layer).
Thresholds leave margin below what was measured.
"""

from __future__ import annotations

import random

import pytest

from mechscope.lens import run_lens
from mechscope.recall import recall, recall_dataset
from mechscope.recall.dataset import dataset_config
from mechscope.tasks.facts import load_facts

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def model(embedded):
    return embedded


@pytest.fixture(scope="module")
def facts_run(model):
    cfg = dataset_config(layer_stride=3, kinds=("mlp",))
    facts = random.Random(0).sample(load_facts(), 40)
    return recall_dataset(model, n=6, cfg=cfg, parts=("trace", "knockout"), facts=facts)


def test_lens_and_dla_on_a_fact(model):
    res = run_lens(model, "The capital city of France is", target=" Paris")
    L = model.summary.n_layers
    assert res.rank[-1, -1] == 0 and res.dla.error < 1e-3  # measured 2e-7
    site = res.first_top1_site()
    assert site is not None and int(site[1:].split(".")[0]) >= L // 2  # measured L29.post: the lens sees it late


def test_tracing_mlp_at_last_subject_token_recovers_and_unrelated_positions_do_not(facts_run):
    h = facts_run.aggregate["headline"]["tracing_peak_recovered"]
    mlp = h["mlp"]
    last_subj = mlp["last_subject"]["early_middle"]["value"]
    unrelated = max(mlp[c]["all_layers"]["value"] for c in ("first_subsequent", "further") if c in mlp)
    assert last_subj >= 0.4, last_subj  # measured 0.72 (window centred on layer 3)
    assert unrelated <= 0.15 and last_subj >= 4 * max(unrelated, 0.01), (last_subj, unrelated)
    assert mlp["before_subject"]["all_layers"]["value"] == 0.0  # the noise cannot reach them


def test_knockout_of_subject_edges_hurts_more_than_as_many_other_edges(facts_run):
    k = facts_run.aggregate["headline"]["knockout"]["all"]
    subj, matched = k["subject"]["upper_half_mean"], k["non_subject_matched"]["upper_half_mean"]
    assert subj <= matched - 0.15, (subj, matched)  # measured -0.31 vs -0.04
    assert k["subject"]["min"]["value"] <= -0.5  # measured -0.78 (window centred on layer 24)


def test_extraction_and_enrichment_on_one_fact(model):
    from mechscope.recall import RecallConfig

    r = recall(model, "The Eiffel Tower is in the city of", "Eiffel Tower", " Paris",
               RecallConfig(gen_tokens=8), parts=("extraction", "enrichment"))
    L = model.summary.n_layers
    assert r.extraction.attn_rank.shape == (L,) and r.enrichment.rate.shape == (L,)
    assert r.enrichment.related and all(0 <= x <= 1 for x in r.enrichment.rate.tolist())
