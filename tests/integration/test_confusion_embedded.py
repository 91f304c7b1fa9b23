"""`mechscope confusion` end to end on the embedded SmolLM2-135M-Instruct, on a few prompts
and short generations (the README's figures come from the full shipped set)."""

from __future__ import annotations

import pytest

from mechscope.confusion import ConfusionConfig, LangPrompt, run_confusion

pytestmark = pytest.mark.embedded

# Two prompts the model is known to answer partly in English (greedy), and two it answers in the language.
PROMPTS = [
    LangPrompt("Cosa devo mettere in valigia per una settimana in montagna?", "it"),
    LangPrompt("Quels sont les avantages de lire des livres le soir ?", "fr"),
    LangPrompt("Spiegami perché il mare è salato.", "it"),
    LangPrompt("Explique-moi pourquoi la neige est blanche.", "fr"),
]


def test_whole_pipeline_on_a_few_prompts(embedded):
    cfg = ConfusionConfig(langs=("it", "fr"), n_tokens=40, top_n=20, last_layers=4, ioi_n=20, facts_n=20, ppl_contexts=2,
                          ppl_len=64)
    res = run_confusion(embedded, PROMPTS, cfg, english=frozenset())
    base = res.conditions["baseline"]
    assert all(t.strip() for t in base["texts"])
    assert res.lens["n_confused"] >= 1, base["texts"]
    # the last layer's lens is the model itself: the greedy token is its top-1 at every read position
    assert res.lens["confused"]["top1_share"][-1] == 1.0
    if "control" in res.lens:
        assert res.lens["control"]["top1_share"][-1] == 1.0
    assert len(res.top) == 20 and all(x["layer"] >= embedded.summary.n_layers - 4 for x in res.top)
    assert {"top", "random"} <= set(res.conditions) and {"top", "random"} <= set(res.costs)
    # the cost of an edit is measured against the unedited model
    assert set(res.costs["top"]["relative_change"]) == {"ioi_accuracy", "facts_accuracy", "perplexity"}
    # the confusion token is an English word start
    assert any(t and t.strip()[:1].isascii() and t.strip()[:1].isalpha() for t in res.cp_tokens)
