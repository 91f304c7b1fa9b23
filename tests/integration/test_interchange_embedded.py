"""Interchange interventions on the embedded SmolLM2: the general tool on a real model."""

from __future__ import annotations

import pytest
import torch

from mechscope.models.hooks import resid_pre
from mechscope.patching.interchange import Site, interchange_accuracy, patched_logits

pytestmark = pytest.mark.embedded


def test_interchange_on_the_embedded_model(embedded):
    base = torch.tensor([embedded.to_tokens("The capital of France is the city of")])
    src = torch.tensor([embedded.to_tokens("The capital of Italy is the city of")])
    assert base.shape == src.shape
    diff = int((base != src).nonzero()[0, 1])
    want = embedded(src)
    # the base itself changes nothing; the embedding at the one differing position gives the source run
    torch.testing.assert_close(patched_logits(embedded, base, base, Site(resid_pre(5)), [diff]), embedded(base))
    torch.testing.assert_close(patched_logits(embedded, base, src, Site(resid_pre(0)), [diff]), want, rtol=1e-4, atol=1e-4)
    expected = want[:, -1].argmax(-1)
    assert embedded.to_str_tokens(expected)[0].strip() == "Rome"
    res = interchange_accuracy(embedded, base, src, expected, site="resid", positions=[diff, base.shape[1] - 1])
    L = embedded.summary.n_layers
    assert res.accuracy.shape == (L + 1, 2) and res.base_accuracy == 0
    # the country's token decides at the embedding; the last position decides at the end
    assert res.accuracy[0, 0] == 1 and res.accuracy[L, 1] == 1 and res.accuracy[0, 1] == 0 and res.accuracy[L, 0] == 0
