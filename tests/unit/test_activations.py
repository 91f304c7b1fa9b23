"""Corpora, the streaming activation store and harvested shards, on tiny random models."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from conftest import _CORPUS

from mechscope.activations import (
    ActivationStore,
    ShardStore,
    StoreConfig,
    get_corpus,
    harvest,
    pack_contexts,
    separator_id,
)
from mechscope.activations.store import Harvester
from mechscope.errors import MechscopeError

DOCS = [_CORPUS[i:] + _CORPUS[: i // 2] for i in range(0, 210, 7)]  # 30 documents of varying length
PAIR = ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]  # a transcoder's input and target


def _contexts(model, n, context_len, docs=DOCS):
    it = pack_contexts(model.tokenizer, docs, context_len)
    return torch.tensor([next(it) for _ in range(n)])


def _reference(model, contexts, hook, skip):
    """Rows of a full run_with_cache at positions >= skip, in token order."""
    _, cache = model.bridge.run_with_cache(contexts, names_filter=lambda n: n == hook)
    t = cache[hook][:, skip:]
    return t.reshape(t.shape[0] * t.shape[1], -1)


# --- packing -------------------------------------------------------------------------------

@pytest.mark.slow
def test_pack_contexts_is_the_separated_concatenation(tiny_gpt2):
    tok = tiny_gpt2.tokenizer
    sep = separator_id(tok)
    flat = []
    for d in DOCS:
        flat += tok(d, add_special_tokens=False)["input_ids"] + [sep]
    ctx = list(pack_contexts(tok, DOCS, 24, docs_per_call=7))
    assert all(len(c) == 24 for c in ctx)
    assert len(ctx) == len(flat) // 24
    assert sum(ctx, []) == flat[: 24 * len(ctx)]


# --- the store -----------------------------------------------------------------------------

def test_store_rows_equal_run_with_cache(tiny_model):
    hooks = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z", "blocks.1.hook_mlp_in", *PAIR]
    cfg = StoreConfig(hooks=hooks, context_len=16, batch_size=3, buffer_tokens=60, shuffle=False, skip_first=2)
    store = ActivationStore(tiny_model, DOCS, cfg)
    got = [store.next_batch(50) for _ in range(3)]  # 150 rows, across buffer refills
    ctx = _contexts(tiny_model, 11, 16)  # 11 * 14 = 154 rows
    for h in hooks:
        rows = torch.cat([g[h] for g in got])
        ref = _reference(tiny_model, ctx, h, skip=2)[:150]
        assert rows.shape == ref.shape
        torch.testing.assert_close(rows, ref, atol=1e-4, rtol=1e-4)


def test_per_head_hook_with_split_inputs(tiny_llama):
    """hook_q_input needs the split-input mode: the store keeps it on and flattens heads."""
    h = "blocks.1.hook_q_input"
    cfg = StoreConfig(hooks=[h], context_len=12, batch_size=2, buffer_tokens=40, shuffle=False, skip_first=0)
    rows = ActivationStore(tiny_llama, DOCS, cfg).next_batch(24)[h]
    ref = _reference(tiny_llama, _contexts(tiny_llama, 2, 12), h, skip=0)
    assert rows.shape == (24, 4 * 64)
    torch.testing.assert_close(rows, ref, atol=1e-5, rtol=1e-5)


def test_forward_stops_at_the_last_hooked_layer(tiny_llama):
    """Nothing above the last hooked point runs: later hook points never fire."""
    calls = []

    def spy(name):
        return lambda t, hook: calls.append(name)

    watch = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre", "ln_final.hook_normalized"]
    h = Harvester(tiny_llama, StoreConfig(hooks=["blocks.0.hook_mlp_out"], context_len=8, buffer_tokens=64))
    tokens = _contexts(tiny_llama, 2, 8)
    with tiny_llama.bridge.hooks(fwd_hooks=[(w, spy(w)) for w in watch]):
        h.run(tokens)
    assert calls == ["blocks.0.hook_resid_pre"]
    # the capturing hooks are gone afterwards and the model is unchanged
    logits = tiny_llama.bridge(tokens)
    torch.testing.assert_close(logits, tiny_llama.bridge.original_model(tokens).logits, atol=1e-4, rtol=1e-4)


def test_shuffled_store_serves_the_same_aligned_rows(tiny_gpt2):
    base = dict(hooks=PAIR, context_len=16, batch_size=2, buffer_tokens=64, skip_first=1, repeat=False)
    plain = list(ActivationStore(tiny_gpt2, DOCS, StoreConfig(**base, shuffle=False)).batches(40))
    mixed = list(ActivationStore(tiny_gpt2, DOCS, StoreConfig(**base, shuffle=True, seed=3)).batches(40))

    def pairs(batches):  # each row of hook 1 glued to its row of hook 2
        return torch.cat([torch.cat([b[PAIR[0]], b[PAIR[1]]], 1) for b in batches])

    a, b = pairs(plain), pairs(mixed)
    assert a.shape == b.shape and a.shape[0] > 200
    assert not torch.equal(a, b)  # the order changed...
    key = lambda x: x[torch.argsort(x[:, 0] * 1e3 + x[:, 1])]  # noqa: E731
    torch.testing.assert_close(key(a), key(b), atol=0, rtol=0)  # ...but not the (input, output) pairs
    first = mixed[0][PAIR[0]]
    assert not torch.equal(first, a[:40, :64])  # the first batch is not simply the first tokens


def test_rows_carry_their_token_ids_when_asked(tiny_gpt2):
    """``with_tokens``: every batch holds each row's token id, in the rows' (shuffled) order, and
    the ids survive a mid-stream restore; the separator is among the special tokens."""
    from mechscope.activations import special_token_ids
    from mechscope.activations.config import TOKENS_KEY

    base = dict(hooks=PAIR, context_len=16, batch_size=2, buffer_tokens=64, skip_first=1)
    plain = ActivationStore(tiny_gpt2, DOCS, StoreConfig(**base, shuffle=False, with_tokens=True)).next_batch(15 * 6)
    ctx = _contexts(tiny_gpt2, 6, 16)
    assert torch.equal(plain[TOKENS_KEY], ctx[:, 1:].reshape(-1))
    torch.testing.assert_close(plain[PAIR[0]], _reference(tiny_gpt2, ctx, PAIR[0], 1))
    assert separator_id(tiny_gpt2.tokenizer) in special_token_ids(tiny_gpt2.tokenizer)
    # Shuffled: the (row, token) pairs are those of the plain order.
    cfg = StoreConfig(**base, shuffle=True, seed=2, with_tokens=True)
    store = ActivationStore(tiny_gpt2, DOCS, cfg)
    b = store.next_batch(40)
    assert set(b) == {*PAIR, TOKENS_KEY} and b[TOKENS_KEY].shape == (40,)
    rows = _reference(tiny_gpt2, _contexts(tiny_gpt2, 12, 16), PAIR[0], 1)
    toks = _contexts(tiny_gpt2, 12, 16)[:, 1:].reshape(-1)
    for r, t in zip(b[PAIR[0]], b[TOKENS_KEY]):
        d = (rows - r).abs().amax(1)
        assert float(d.min()) < 1e-4 and int(toks[int(d.argmin())]) == int(t)
    again = ActivationStore(tiny_gpt2, DOCS, cfg)
    again.tokens_seen = 0
    for _ in range(store.tokens_seen // 16):
        next(again._contexts)
    again.tokens_seen = store.tokens_seen
    again.load_state_tensors(store.state_tensors())
    n1, n2 = store.next_batch(30), again.next_batch(30)
    assert all(torch.equal(n1[k], n2[k]) for k in n1)
    with pytest.raises(MechscopeError, match="not a hook name"):
        StoreConfig(hooks=[TOKENS_KEY])


def test_sink_positions_marks_massive_norms_in_any_block():
    from mechscope.activations.store import sink_positions

    a = torch.ones(2, 5)
    b = torch.ones(2, 5)
    a[0, 3] = 40.0  # a sink after the first block only
    b[1, 1] = 31.0  # and one after the second only
    b[1, 2] = 30.0  # exactly 30x the median: not more than it
    got = sink_positions([a, b], 30.0)
    want = torch.zeros(2, 5, dtype=torch.bool)
    want[0, 3] = want[1, 1] = True
    assert torch.equal(got, want)
    assert not sink_positions([torch.zeros(2, 4)], 30.0).any()  # a zero median marks nothing
    with pytest.raises(MechscopeError, match="at least one block"):
        sink_positions([], 30.0)


def test_harvester_marks_sinks_as_an_independent_computation_does(tiny_llama):
    """With ``sink_ratio`` the served token id is ``SINK_TOKEN`` exactly where the residual norm
    after one of the hooks' blocks (computed here from a full ``run_with_cache``) is more than
    ``sink_ratio`` times that block's median over its own context (positions from ``skip_first``),
    so the marks do not depend on how contexts are batched."""
    from mechscope.activations.config import SINK_TOKEN, TOKENS_KEY

    hooks = ["blocks.0.ln2.hook_normalized", "blocks.2.hook_mlp_out"]
    ratio = 1.2  # tiny random models have no massive activations; a low ratio still marks some positions
    h = Harvester(tiny_llama, StoreConfig(hooks=hooks, context_len=16, with_tokens=True, sink_ratio=ratio))
    assert h.sink_hooks == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    ctx = _contexts(tiny_llama, 6, 16)
    got = h.run(ctx)
    _, cache = tiny_llama.bridge.run_with_cache(ctx)
    marked = torch.zeros(6, 15, dtype=torch.bool)
    by_block = []
    for layer in (0, 1, 2):
        n = cache[f"blocks.{layer}.hook_resid_post"][:, 1:].norm(dim=-1)
        by_block.append(n > ratio * n.median(dim=1, keepdim=True).values)
        marked |= by_block[-1]
    assert 0 < int(marked.sum()) < marked.numel() and bool((by_block[0] & ~by_block[2]).any())  # every block counts
    assert torch.equal(got[TOKENS_KEY], torch.where(marked, SINK_TOKEN, ctx[:, 1:]).reshape(-1))
    torch.testing.assert_close(got[hooks[1]], _reference(tiny_llama, ctx, hooks[1], 1))  # the rows are unchanged
    plain = Harvester(tiny_llama, StoreConfig(hooks=hooks, context_len=16, with_tokens=True)).run(ctx)
    assert torch.equal(plain[TOKENS_KEY], ctx[:, 1:].reshape(-1))
    # A data hook that is itself a residual the sink test reads: rows unchanged, the same marks as blocks 0-1.
    shared = Harvester(tiny_llama, StoreConfig(hooks=["blocks.1.hook_resid_post"], context_len=16, with_tokens=True, sink_ratio=ratio))
    got = shared.run(ctx)
    torch.testing.assert_close(got["blocks.1.hook_resid_post"], _reference(tiny_llama, ctx, "blocks.1.hook_resid_post", 1))
    assert torch.equal(got[TOKENS_KEY], torch.where(by_block[0] | by_block[1], SINK_TOKEN, ctx[:, 1:]).reshape(-1))
    with pytest.raises(MechscopeError, match="needs a hook inside a block"):
        Harvester(tiny_llama, StoreConfig(hooks=["hook_embed"], context_len=16, with_tokens=True, sink_ratio=ratio))
    with pytest.raises(MechscopeError, match="sink_ratio must be above 1 and needs with_tokens"):
        StoreConfig(hooks=hooks, sink_ratio=30.0)
    with pytest.raises(MechscopeError, match="sink_ratio must be above 1"):
        StoreConfig(hooks=hooks, with_tokens=True, sink_ratio=0.5)


@pytest.mark.parametrize("served", [40, 64, 230])
def test_a_store_restored_mid_stream_serves_what_the_original_would(tiny_gpt2, served):
    """Skip the contexts run, restore the waiting rows and the generator: the next batches are
    identical to an uninterrupted store's (positions inside a served chunk and at its end)."""
    from mechscope.sae.sources import StoreSource

    cfg = StoreConfig(hooks=PAIR, context_len=16, batch_size=2, buffer_tokens=64, shuffle=True, seed=5)
    first = StoreSource(ActivationStore(tiny_gpt2, DOCS, cfg), PAIR[0], PAIR[1])
    first.next_batch(served)
    state, tensors = first.state_dict(), first.state_tensors()
    again = StoreSource(ActivationStore(tiny_gpt2, DOCS, cfg), PAIR[0], PAIR[1])
    again.load_state_dict(state)
    again.load_state_tensors(tensors)
    for _ in range(6):
        a, b = first.next_batch(48), again.next_batch(48)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    lost = StoreSource(ActivationStore(tiny_gpt2, DOCS, cfg), PAIR[0], PAIR[1])
    lost.load_state_dict(state)  # without the waiting rows the stream differs
    assert not torch.equal(lost.next_batch(48)[0], StoreSource(ActivationStore(tiny_gpt2, DOCS, cfg), PAIR[0]).next_batch(served + 48)[-48:])


def test_store_streams_with_a_fixed_buffer(tiny_gpt2):
    cfg = StoreConfig(hooks=["blocks.0.hook_resid_post"], context_len=16, batch_size=2, buffer_tokens=64)
    store = ActivationStore(tiny_gpt2, DOCS, cfg)
    store.next_batch(10)
    size = {h: b.shape for h, b in store._buf.items()}
    served = 10
    for _ in range(30):
        served += store.next_batch(32)["blocks.0.hook_resid_post"].shape[0]
    assert {h: b.shape for h, b in store._buf.items()} == size  # buffer never grows
    # contexts are pulled lazily: the model ran on at most the served rows plus one buffer
    rows_run = store.tokens_seen // 16 * 15
    assert served <= rows_run <= served + 64 + 2 * 2 * 15
    assert store.corpus_passes >= 1  # the small corpus repeated instead of ending


def test_exhausted_corpus_ends_iteration(tiny_gpt2):
    cfg = StoreConfig(hooks=["blocks.0.hook_resid_post"], context_len=16, batch_size=4, buffer_tokens=64, repeat=False)
    store = ActivationStore(tiny_gpt2, DOCS[:3], cfg)
    total = sum(b["blocks.0.hook_resid_post"].shape[0] for b in store.batches(25))
    n_ctx = len(list(pack_contexts(tiny_gpt2.tokenizer, DOCS[:3], 16)))
    assert total == n_ctx * 15
    with pytest.raises(StopIteration):
        store.next_batch(1)


# --- shards --------------------------------------------------------------------------------

def test_harvest_round_trips_and_resumes(tiny_llama, tmp_path):
    cfg = StoreConfig(hooks=PAIR, context_len=16, batch_size=3, buffer_tokens=64, shuffle=False, skip_first=1)
    man = harvest(tiny_llama, DOCS, cfg, tmp_path / "a", n_tokens=400, shard_tokens=90, progress=False)
    assert man["complete"] and man["n_tokens"] >= 400 and len(man["shards"]) == 5
    assert man["d"] == {PAIR[0]: 64, PAIR[1]: 64} and man["model"] == tiny_llama.summary.name
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert on_disk["hooks"] == PAIR and on_disk["schema_version"] == 1

    back = ShardStore(tmp_path / "a", shuffle=False).next_batch(man["n_tokens"], with_tokens=True)
    live = ActivationStore(tiny_llama, DOCS, cfg).next_batch(man["n_tokens"])
    for h in PAIR:
        torch.testing.assert_close(back[h], live[h], atol=0, rtol=0)
    ctx = _contexts(tiny_llama, man["n_tokens"] // 15, 16)
    assert back["tokens"].tolist() == ctx[:, 1:].reshape(-1).tolist()

    # a harvest killed in its 6th forward pass (2 contexts per shard... 3 per forward: shards 0-1 done)
    class Killed(Exception):
        pass

    seen = []

    def killer(t, hook):
        seen.append(1)
        if len(seen) == 6:
            raise Killed

    with pytest.raises(Killed), tiny_llama.bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", killer)]):
        harvest(tiny_llama, DOCS, cfg, tmp_path / "b", n_tokens=400, shard_tokens=90, progress=False)
    partial = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert len(partial["shards"]) == 2 and not partial["complete"]
    forwards = []
    with tiny_llama.bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda t, hook: forwards.append(t.shape[0]))]):
        man_b = harvest(tiny_llama, DOCS, cfg, tmp_path / "b", n_tokens=400, shard_tokens=90, progress=False)
    assert sum(forwards) == 1 + (5 - 2) * 6  # the width probe + 6 contexts per missing shard; done shards skipped
    for s in man["shards"]:
        from safetensors.torch import load_file

        x, y = load_file(str(tmp_path / "a" / s["file"])), load_file(str(tmp_path / "b" / s["file"]))
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert man_b["complete"]
    more = harvest(tiny_llama, DOCS, cfg, tmp_path / "b", n_tokens=600, progress=False)  # extend: 2 more shards
    assert len(more["shards"]) == 7 and more["n_tokens"] == 7 * 90
    longer = ActivationStore(tiny_llama, DOCS, cfg).next_batch(630)[PAIR[1]]
    torch.testing.assert_close(ShardStore(tmp_path / "b", shuffle=False).next_batch(630)[PAIR[1]], longer, atol=0, rtol=0)

    with pytest.raises(MechscopeError, match="different settings"):
        harvest(tiny_llama, DOCS, StoreConfig(hooks=PAIR[:1], context_len=16), tmp_path / "b", n_tokens=10, progress=False)


def test_shard_store_shuffles_across_shards_and_epochs(tiny_gpt2, tmp_path):
    cfg = StoreConfig(hooks=["blocks.1.hook_resid_post"], context_len=16, batch_size=4, buffer_tokens=64, shuffle=False)
    man = harvest(tiny_gpt2, DOCS, cfg, tmp_path, n_tokens=300, shard_tokens=60, progress=False)
    n = man["n_tokens"]
    ordered = ShardStore(tmp_path, shuffle=False).next_batch(n)["blocks.1.hook_resid_post"]
    ss = ShardStore(tmp_path, seed=1, buffer_shards=2)
    epoch1 = ss.next_batch(n)["blocks.1.hook_resid_post"]
    epoch2 = ss.next_batch(n)["blocks.1.hook_resid_post"]
    assert ss.epoch == 1 and ss.dims == {"blocks.1.hook_resid_post": 64}
    key = lambda x: x[torch.argsort(x[:, 0])]  # noqa: E731
    for e in (epoch1, epoch2):
        torch.testing.assert_close(key(e), key(ordered), atol=0, rtol=0)
    assert not torch.equal(epoch1, ordered) and not torch.equal(epoch1, epoch2)


# --- corpora -------------------------------------------------------------------------------

def test_txt_jsonl_and_folder_corpora(tmp_path):
    text = "\n\n".join(f"Paragraph {i}. " + "word " * 40 for i in range(60))
    (tmp_path / "b.txt").write_text(text, encoding="utf-8")
    c = get_corpus(tmp_path / "b.txt", passage_chars=500)
    assert len(c) > 5 and "".join(c) == text  # passages tile the file exactly
    rows = [{"text": f"doc {i}", "id": i} for i in range(4)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert list(get_corpus(tmp_path / "a.jsonl")) == [r["text"] for r in rows]
    folder = get_corpus(tmp_path, passage_chars=500)
    assert list(folder) == [r["text"] for r in rows] + list(c)  # sorted paths: a.jsonl, b.txt
    assert folder[2] == "doc 2"


def test_heldout_split_and_seeded_order(tmp_path):
    rows = [{"text": f"document number {i}"} for i in range(100)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    train, held = get_corpus(tmp_path / "d.jsonl", split="train"), get_corpus(tmp_path / "d.jsonl", split="heldout")
    assert len(held) == 5 and len(train) == 95
    assert set(train) | set(held) == {r["text"] for r in rows} and not set(train) & set(held)
    s1, s2 = list(get_corpus(tmp_path / "d.jsonl", seed=4)), list(get_corpus(tmp_path / "d.jsonl", seed=4))
    assert s1 == s2 and sorted(s1) == sorted(r["text"] for r in rows) and s1 != [r["text"] for r in rows]
    assert list(get_corpus(tmp_path / "d.jsonl", split="heldout", seed=9)) != list(held) or len(held) < 3


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"text": "ok"}\n{"text": "broken"\n', "line 2: not valid JSON"),
        ('{"text": "ok"}\n{"body": "no text"}\n', 'line 2: expected an object with a "text" field'),
        ('{"text": 3}\n', 'line 1: the "text" field must be a string'),
        ("", "holds no documents"),
    ],
)
def test_bad_jsonl_is_a_clear_error(tmp_path, content, needle):
    p = tmp_path / "c.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(MechscopeError, match=needle):
        get_corpus(p)


def test_bad_corpus_specs(tmp_path):
    with pytest.raises(MechscopeError, match="No corpus at"):
        get_corpus(tmp_path / "missing.txt")
    with pytest.raises(MechscopeError, match="no .txt or .jsonl"):
        get_corpus(tmp_path)
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(MechscopeError, match="use a .txt or .jsonl"):
        get_corpus(tmp_path / "x.csv")
    (tmp_path / "e.txt").write_text("\n\n  \n")
    with pytest.raises(MechscopeError, match="holds no documents"):
        get_corpus(tmp_path / "e.txt")
    with pytest.raises(MechscopeError, match="too few to hold 1 in 20 out"):
        (tmp_path / "one.jsonl").write_text('{"text": "a"}\n')
        get_corpus(tmp_path / "one.jsonl", split="heldout")


def test_hf_corpus(tmp_path):
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(MechscopeError, match="needs the `datasets` package"):
            get_corpus("hf:wikitext")
        return
    (tmp_path / "train.jsonl").write_text('{"text": "alpha one"}\n{"text": "beta two"}\n', encoding="utf-8")
    assert list(get_corpus(f"hf:{tmp_path}")) == ["alpha one", "beta two"]  # a local dataset folder
    with pytest.raises(MechscopeError, match="Could not load the Hugging Face dataset"):
        get_corpus("hf:no-such-user/no-such-dataset")  # the tests run offline


def test_bad_store_settings(tiny_gpt2):
    with pytest.raises(MechscopeError, match="Did you mean"):
        ActivationStore(tiny_gpt2, DOCS, StoreConfig(hooks=["blocks.0.hook_resid_pots"]))
    with pytest.raises(MechscopeError, match="skip_first"):
        StoreConfig(hooks=["blocks.0.hook_resid_post"], context_len=8, skip_first=8)
    with pytest.raises(MechscopeError, match="dtype"):
        StoreConfig(hooks=["blocks.0.hook_resid_post"], dtype="int8")
    with pytest.raises(MechscopeError, match="no documents"):
        ActivationStore(tiny_gpt2, [], StoreConfig(hooks=["blocks.0.hook_resid_post"], context_len=32, buffer_tokens=300)).next_batch(4)
    with pytest.raises(MechscopeError, match="give --context-len 64 or less"):  # learned positions end at n_ctx
        ActivationStore(tiny_gpt2, DOCS, StoreConfig(hooks=["blocks.0.hook_resid_post"], context_len=65))
    with pytest.raises(MechscopeError, match="no manifest.json|No activation shards"):
        ShardStore("/nonexistent/shards")


def test_bfloat16_storage(tiny_gpt2):
    cfg = StoreConfig(hooks=["blocks.0.hook_resid_post"], context_len=16, buffer_tokens=64, dtype="bfloat16", shuffle=False)
    rows = ActivationStore(tiny_gpt2, DOCS, cfg).next_batch(30)["blocks.0.hook_resid_post"]
    ref = _reference(tiny_gpt2, _contexts(tiny_gpt2, 2, 16), "blocks.0.hook_resid_post", 1)[:30]
    assert rows.dtype == torch.bfloat16
    torch.testing.assert_close(rows.float(), ref, atol=0.05, rtol=0.02)


# --- the R data reader behind the embedded corpus -------------------------------------------

def test_rdata_reader_reads_a_character_vector(tmp_path):
    from mechscope.activations.rdata import read_character_vectors

    def i32(*v):
        return struct.pack(f">{len(v)}i", *v)

    def charsxp(s):
        b = s.encode()
        return i32(0x00040009 | (1 << 15), len(b)) + b

    header = b"X\n" + i32(3, 0x040201, 0x030500, 5) + b"UTF-8"
    strs = header + i32(16, 3) + charsxp("It is a truth") + i32(9, -1) + charsxp("universally acknowledged")
    rdb = i32(len(strs)) + zlib.compress(strs)
    # index: list(variables = list(words = c(0L, len)), ...) with names attributes
    names_attr = i32(0x402, 1) + i32(0x40009 | (1 << 15), 5) + b"names"
    index = (header + i32(0x213, 1) + i32(0x213, 1) + i32(13, 2, 0, len(rdb)) + names_attr
             + i32(16, 1) + charsxp("words") + i32(254) + names_attr + i32(16, 1) + charsxp("variables") + i32(254))
    import gzip

    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    assert read_character_vectors(tmp_path) == {"words": ["It is a truth", "", "universally acknowledged"]}


# --- CLI -----------------------------------------------------------------------------------

def test_cli_corpus_json_and_errors(tmp_path, tiny_gpt2_dir, tiny_gpt2):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": d}) for d in DOCS[:25]), encoding="utf-8")
    r = CliRunner().invoke(app, ["corpus", "--corpus", str(p), "--split", "train", "--tokens", "--model", tiny_gpt2_dir, "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    train = DOCS[:19] + DOCS[20:25]  # document 19 of 0..24 is held out (1 in 20)
    assert info["documents"] == len(train) == 24
    assert info["characters"] == sum(map(len, train))
    assert info["tokens"] == sum(len(tiny_gpt2.tokenizer(d)["input_ids"]) + 1 for d in train)
    p.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    r = CliRunner().invoke(app, ["corpus", "--corpus", str(p)])
    assert r.exit_code == 2 and "line 2: not valid JSON" in r.output


def test_embedded_corpus_chapters_and_gutenberg_stripping():
    from mechscope.activations.embedded import chapters, strip_gutenberg

    book = "TITLE\n\nCHAPTER I\n\n" + "a" * 500 + "\n\nChapter 2\n\n" + "b" * 500 + "\n\nCHAPTER III\nshort"
    parts = chapters(book, min_chars=100)
    assert len(parts) == 2 and parts[0].startswith("TITLE") and parts[1].endswith("short")  # short tail joins
    assert "".join(parts).replace("\n", "") == book.replace("\n", "")
    pg = ("The Project Gutenberg EBook of X\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nBody text.\n"
          "End of Project Gutenberg's X\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nlicence")
    assert strip_gutenberg(pg).strip() == "Body text."
