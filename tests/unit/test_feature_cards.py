"""Feature cards of the graph page (``features.cards``): top-activating contexts and the output
tokens a feature's decoder promotes, each checked against an independent computation."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.features.cards import feature_cards, feature_contexts, feature_logits
from mechscope.features.replacement import capture
from mechscope.features.transcoder_set import random_transcoders


def _seqs(model, n=3, P=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, model.summary.d_vocab, (n, P), generator=g)
    toks[:, 0] = model.tokenizer.bos_token_id
    return toks


@pytest.mark.parametrize("arch,k", [("relu", None), ("topk", 5)])
def test_contexts_are_the_largest_activations_of_the_replacement_run(tiny_model, arch, k):
    """Each feature's best exemplar is its largest activation over every context and position
    >= 1 that is not a special token, as the graph's own clean pass (``capture``, one prompt at
    a time) computes it; the window shows that activation at its marked token; batching changes
    nothing."""
    from mechscope.activations import special_token_ids

    tset = random_transcoders(tiny_model, d_sae=24, architecture=arch, k=k, seed=3)
    toks = _seqs(tiny_model)
    sep = special_token_ids(tiny_model.tokenizer)[0]
    toks[0, 5] = toks[1, 9] = sep  # mid-context separators: never exemplars
    special = set(special_token_ids(tiny_model.tokenizer))
    runs = [capture(tiny_model, tset, t) for t in toks]
    table = {}  # (layer, feature) -> [(value, context, pos)]
    for c, run in enumerate(runs):
        for (layer, pos, f), v in zip(run.active.tolist(), run.values.tolist()):
            if pos >= 1 and int(toks[c, pos]) not in special:
                table.setdefault((layer, f), []).append((v, c, pos))
    feats = sorted(table)[:: max(1, len(table) // 12)]
    assert len(feats) >= 6
    got = feature_contexts(tiny_model, tset, feats, toks, top=2, before=3, after=1, batch_size=2)
    again = feature_contexts(tiny_model, tset, feats, toks, top=2, before=3, after=1, batch_size=3)
    for layer, f in feats:
        best = sorted(table[(layer, f)], reverse=True)
        ex = got[f"{layer}:{f}"]
        assert abs(ex[0]["max"] - best[0][0]) < 1e-3 * max(1.0, best[0][0])
        assert abs(ex[0]["acts"][ex[0]["at"]] - ex[0]["max"]) < 1e-3 * max(1.0, best[0][0])
        _, c, pos = best[0]
        lo = max(0, pos - 3)
        assert ex[0]["tokens"] == tiny_model.to_str_tokens(toks[c, lo:pos + 2])
        if len(best) > 1:
            assert abs(ex[1]["max"] - best[1][0]) < 1e-3 * max(1.0, best[1][0])
        assert [e["max"] for e in again[f"{layer}:{f}"]] == pytest.approx([e["max"] for e in ex], rel=1e-4, abs=1e-5)


def test_output_tokens_follow_the_final_norm_and_unembedding(tiny_model):
    from mechscope.models.unembed import final_norm, unembed_weights

    tset = random_transcoders(tiny_model, d_sae=16, architecture="relu", k=None, seed=4)
    feats = [(0, 3), (tiny_model.summary.n_layers - 1, 7)]
    got = feature_logits(tiny_model, tset, feats, top=5)
    W_U, _ = unembed_weights(tiny_model)
    norm = final_norm(tiny_model)
    for layer, f in feats:
        direct = norm.linear(tset.layers[layer].W_dec[f].detach()[None], torch.ones(1, 1))[0] @ W_U
        direct = direct - direct.mean()
        vals, idx = direct.topk(5)
        rows = got[f"{layer}:{f}"]
        assert [r[0] for r in rows] == tiny_model.to_str_tokens([int(i) for i in idx])
        assert [r[1] for r in rows] == pytest.approx(vals.tolist(), abs=1e-3)


def test_cards_refuse_features_outside_the_set_and_malformed_contexts(tiny_llama):
    tset = random_transcoders(tiny_llama, d_sae=16, architecture="relu", k=None, seed=5)
    with pytest.raises(MechscopeError, match="feature 0:16 is not in the transcoder set"):
        feature_cards(tiny_llama, tset, [(0, 16)], None)
    with pytest.raises(MechscopeError, match="contexts must be"):
        feature_contexts(tiny_llama, tset, [(0, 1)], torch.tensor([1, 2, 3]))
    cards = feature_cards(tiny_llama, tset, [(1, 2)], None)
    assert cards["1:2"]["contexts"] == [] and len(cards["1:2"]["logits"]) == 8


def test_context_search_reports_its_progress(tiny_llama):
    from mechscope.progress import Recorder

    tset = random_transcoders(tiny_llama, d_sae=16, architecture="relu", k=None, seed=6)
    rec = Recorder()
    feature_contexts(tiny_llama, tset, [(0, 1)], _seqs(tiny_llama, n=3, P=8), batch_size=2, progress=rec)
    phase = next(p for p in rec.phases if p.name == "feature contexts")
    assert phase.total == 24 and phase.count == 24 and phase.closed


def test_contexts_leave_out_attention_sinks_marked_per_context(tiny_llama):
    """With ``sink_ratio`` no exemplar sits where a context's residual norm after some block up to
    the set's deepest layer is above ``ratio`` times that block's median over the context's
    positions from 1 (computed here from a full ``run_with_cache``), even for features of the
    first layer; each feature's best exemplar is its largest activation elsewhere; the marks do
    not depend on batching; ``None`` lets sinks back in."""
    ratio = 1.1  # tiny random models have no massive activations; a low ratio still marks some positions
    tset = random_transcoders(tiny_llama, d_sae=32, architecture="relu", k=None, seed=7)
    toks = _seqs(tiny_llama, n=12, P=16, seed=2)
    feats = [(0, f) for f in range(32)]  # layer 0 of 3: the sink test still reads every block up to the set's last
    _, cache = tiny_llama.bridge.run_with_cache(toks)
    by_block = []
    for layer in range(tiny_llama.summary.n_layers):
        n = cache[f"blocks.{layer}.hook_resid_post"][:, 1:].norm(dim=-1)  # [contexts, pos - 1]
        by_block.append(torch.cat([torch.zeros(len(toks), 1, dtype=torch.bool), n > ratio * n.median(dim=1, keepdim=True).values], 1))
    sinks = torch.stack(by_block).any(0)
    assert 0 < int(sinks.sum()) < sinks.numel() - toks.shape[0]
    got = feature_contexts(tiny_llama, tset, feats, toks, top=3, before=2, after=0, batch_size=4, sink_ratio=ratio)
    again = feature_contexts(tiny_llama, tset, feats, toks, top=3, before=2, after=0, batch_size=1, sink_ratio=ratio)
    kept = feature_contexts(tiny_llama, tset, feats, toks, top=3, before=2, after=0, batch_size=4, sink_ratio=None)
    runs = [capture(tiny_llama, tset, t) for t in toks]

    def best(f: int, masked: torch.Tensor | None) -> float:
        vals = [v for c, run in enumerate(runs) for (layer, pos, g), v in zip(run.active.tolist(), run.values.tolist())
                if layer == 0 and g == f and pos >= 1 and (masked is None or not masked[c, pos])]
        return max(vals, default=0.0)

    deeper_matters = on_sink = 0
    for _, f in feats:
        b, b_any, b_first = best(f, sinks), best(f, None), best(f, by_block[0])
        ex = got[f"0:{f}"]
        assert [e["max"] for e in ex] == [e["max"] for e in again[f"0:{f}"]]
        if b > 0:
            assert ex[0]["max"] == pytest.approx(b, rel=1e-3, abs=1e-4)
        if b_any > 0:
            assert kept[f"0:{f}"][0]["max"] == pytest.approx(b_any, rel=1e-3, abs=1e-4)
        on_sink += b_any > b + 1e-4
        deeper_matters += b_first > b + 1e-4
    assert on_sink > 0 and deeper_matters > 0  # the rule, and its blocks above the features' layer, change some best exemplar
    with pytest.raises(MechscopeError, match="sink_ratio must be above 1"):
        feature_contexts(tiny_llama, tset, feats, toks, sink_ratio=0.5)
    assert feature_contexts(tiny_llama, tset, [], toks) == {}


def test_graph_page_cards_read_contexts_a_short_model_takes(tmp_path):
    """The attribution page's feature contexts are min(128, the model's context) tokens long: a
    hand-built GPT-2 of 32 learned positions gets cards, not an IndexError from its position table."""
    import sys
    from pathlib import Path

    from mechscope.cli.features import _feature_cards
    from mechscope.models import load_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
    from short_context import save_short

    m = load_model(save_short("gpt2", tmp_path / "short"), device="cpu")
    tset = random_transcoders(m, d_sae=16, architecture="topk", k=4, seed=0)
    doc = {"nodes": [{"layer": 0, "feature": f, "feature_type": "cross layer transcoder"} for f in range(16)]}
    corpus = ["The Eiffel Tower is in Paris. When Mary and John went to the store, John gave a drink to Mary."] * 20
    cards, note = _feature_cards(m, tset, doc, 256, corpus, quiet=True)
    assert not note and set(cards) == {f"0:{f}" for f in range(16)}
    assert any(card["contexts"] for card in cards.values())
