"""The embedded text corpus and the activation store on the embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import pytest
import torch

from mechscope.activations import ActivationStore, StoreConfig, get_corpus, pack_contexts

pytestmark = pytest.mark.embedded


def test_embedded_corpus_is_real_prose_of_over_a_million_tokens(embedded):
    corpus = get_corpus()
    assert len(corpus) >= 400 and "public domain" in corpus.licence
    tok = embedded.tokenizer
    n_tokens = 0
    for doc in corpus:
        assert "PROJECT GUTENBERG" not in doc.upper() or "Gutenberg's archives" in doc  # header/footer stripped
        n_tokens += len(tok(doc, add_special_tokens=False, verbose=False)["input_ids"])
    assert n_tokens >= 1_000_000
    first = corpus[0]
    assert first.startswith("SENSE AND SENSIBILITY") and "Dashwood" in first
    held, train = get_corpus(split="heldout"), get_corpus(split="train")
    assert len(held) + len(train) == len(corpus) and not set(held.refs) & set(train.refs)


def test_store_on_the_embedded_model_matches_a_full_run(embedded):
    hook = "blocks.3.hook_resid_post"
    cfg = StoreConfig(hooks=[hook], context_len=32, batch_size=2, buffer_tokens=62, shuffle=False, skip_first=1)
    calls = []
    with embedded.bridge.hooks(fwd_hooks=[("blocks.4.hook_resid_pre", lambda t, hook: calls.append(1))]):
        rows = ActivationStore(embedded, get_corpus(), cfg).next_batch(62)[hook]
    assert calls == []  # blocks 4..29 never ran
    it = pack_contexts(embedded.tokenizer, get_corpus(), 32)
    ctx = torch.tensor([next(it), next(it)])
    _, cache = embedded.bridge.run_with_cache(ctx, names_filter=lambda n: n == hook)
    ref = cache[hook][:, 1:].reshape(-1, 576)
    torch.testing.assert_close(rows, ref, atol=1e-4, rtol=1e-4)
