"""The exemplars pass against brute force over every token, the MLP neuron hook, resume, sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.activations.store import separator_id
from mechscope.errors import MechscopeError
from mechscope.explain.config import ExemplarsConfig
from mechscope.explain.db import UnitDB
from mechscope.explain.exemplars import Interrupted, harvest_exemplars, quantiles
from mechscope.explain.types import UnitRef
from mechscope.explain.units import SaeFeatures, output_logits
from mechscope.models.hooks import mlp_out, mlp_post
from mechscope.progress import Recorder

C, T, B = 16, 32, 4


def _cfg(**kw) -> ExemplarsConfig:
    base = dict(n_tokens=C * T, context_len=T, batch_size=B, k=5, k_bottom=3, before=6, after=3,
                per_quantile=2, n_random=3, n_bins=32, checkpoint_every=0)
    base.update(kw)
    return ExemplarsConfig(**base)


def _contexts(model, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 512, (C, T), generator=g)
    ids[::3, 10] = separator_id(model.tokenizer)  # separators are never exemplars
    return ids.tolist()


@torch.no_grad()
def _brute(model, contexts, hooks):
    """Every token's activation at each hook, from one plain cached forward: {hook: [C, T, U]}."""
    _, cache = model.bridge.run_with_cache(torch.tensor(contexts), names_filter=lambda n: n in hooks)
    return {h: cache[h].float() for h in hooks}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_mlp_post_times_w_out_is_mlp_out(arch, request):
    model = request.getfixturevalue(f"tiny_{arch}")
    toks = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    for layer in range(model.summary.n_layers):
        acts = _brute(model, toks.tolist(), [mlp_post(layer), mlp_out(layer)])
        W_out = model.bridge.W_out[layer]
        b_out = getattr(model.bridge, "b_out", None)
        rebuilt = acts[mlp_post(layer)] @ W_out + (0 if b_out is None else b_out[layer])
        assert acts[mlp_post(layer)].shape[-1] == model.summary.d_mlp
        torch.testing.assert_close(rebuilt, acts[mlp_out(layer)], atol=1e-5, rtol=1e-5)


def test_streaming_pass_equals_brute_force(tiny_llama):
    model = tiny_llama
    ctxs = _contexts(model)
    cfg = _cfg()
    state = harvest_exemplars(model, cfg, contexts=ctxs)
    ids = torch.tensor(ctxs)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, 0] = False
    valid &= ids != separator_id(model.tokenizer)
    acts = _brute(model, ctxs, [mlp_post(layer) for layer in range(3)])
    for layer in range(3):
        a = acts[mlp_post(layer)]  # [C, T, U]
        flat = a[valid]  # [N, U]
        rows = valid.reshape(-1).nonzero()[:, 0]
        st = state.layers[layer]
        assert state.n_tokens == flat.shape[0]
        # Top-k and bottom-k: the same values at the same (context, position).
        for val, row, k, largest in ((st.top_val, st.top_row, cfg.k, True), (st.bot_val, st.bot_row, cfg.k_bottom, False)):
            ref_v, ref_i = flat.topk(k, dim=0, largest=largest)
            order = val.sort(0, descending=largest).indices
            torch.testing.assert_close(val.gather(0, order), ref_v, atol=1e-6, rtol=1e-6)
            assert torch.equal(row.gather(0, order), rows[ref_i])
        # Density exact; quantiles within a histogram bin (exact where the top/bottom lists hold them).
        assert torch.equal(st.positive, (flat > 0).sum(0))
        qs = (0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999)
        est = quantiles(st, flat.shape[0], qs, cfg).numpy()
        ref = np.quantile(flat.double().numpy(), qs, axis=0).T  # [U, q]
        width = (1 / st.inv.double()).numpy()[:, None]
        exact_cols = [0, 6]  # positions 0.5 and 494.5 of 496: inside the bottom-3 / top-5 lists
        np.testing.assert_allclose(est[:, exact_cols], ref[:, exact_cols], atol=1e-6)
        # Where sorted[floor(t)] and sorted[floor(t) + 1] share a histogram bin, the estimate lies in that bin.
        srt = np.sort(flat.double().numpy(), axis=0)
        n = flat.shape[0]
        lo, inv = st.lo.double().numpy(), st.inv.double().numpy()
        width = 1 / inv
        checked = 0
        for i, q in enumerate(qs):
            j0 = int(np.floor(q * (n - 1)))
            b0 = np.floor((srt[j0] - lo) * inv)
            b1 = np.floor((srt[min(j0 + 1, n - 1)] - lo) * inv)
            same = (b0 == b1) & (b0 >= 0) & (b0 < cfg.n_bins)
            checked += same.sum()
            got = est[same, i]  # NaN where float32 binning put an edge value in a wide overflow bin (checked below)
            assert np.all(np.isnan(got) | (np.abs(got - ref[same, i]) <= width[same] + 1e-6)), q
        assert checked > 2 * flat.shape[1]  # most units' central quantiles were checked
        # Every resolved quantile is within one bin width of numpy's (exact ones to 1e-6); a rank past
        # the top/bottom lists in an overflow bin wider than one bin is not resolved (NaN).
        resolved = ~np.isnan(est)
        # Every resolved estimate lies within a bin width of the two order statistics around its rank
        # (one bin width of numpy's value where they share a bin, checked above).
        j0s = np.floor(np.array(qs) * (n - 1)).astype(int)
        gap = srt[np.minimum(j0s + 1, n - 1)].T - srt[j0s].T  # [U, q]
        bound = gap + width[:, None] + 1e-6
        assert np.all((np.abs(est - ref) <= bound)[resolved])
        assert resolved[:, 1:6].mean() > 0.5 and not resolved.all()  # this data does reach wide overflow bins
        for u in range(est.shape[0]):
            assert np.all(np.diff(est[u][resolved[u]]) >= -1e-9)  # monotone where resolved
        # Histogram counts every valid token once.
        assert torch.equal(st.hist.sum(1), torch.full_like(st.hist[:, 0], flat.shape[0]))


def test_exemplars_windows_splits_and_samples(tiny_gpt2, tmp_path):
    model = tiny_gpt2
    ctxs = _contexts(model, seed=3)
    cfg = _cfg(unit_range=(10, 40), layers=[1])
    db = UnitDB(tmp_path / "u.db", model_id="tiny")
    rec = Recorder()
    state = harvest_exemplars(model, cfg, db=db, contexts=ctxs, progress=rec)
    # The pass and the database write each show a bar that ends at its total (30 units written).
    assert rec.names == ["exemplars", "database"] and all(p.closed and p.count == p.total for p in rec.phases)
    assert rec.phases[1].total == 30
    a = _brute(model, ctxs, [mlp_post(1)])[mlp_post(1)]  # [C, T, U]
    st = state.layers[1]
    assert sorted(db.units()) == [UnitRef("mlp", 1, i) for i in range(10, 40)]
    with pytest.raises(Exception, match="out of range"):
        db.unit(UnitRef("mlp", 1, model.summary.d_mlp))
    for u in range(10, 40):
        ref = UnitRef("mlp", 1, u)
        ex = db.exemplars(ref)
        kinds = {e.kind for e in ex}
        assert kinds == {"top", "bottom", "quantile", "random"}
        assert sum(e.kind == "top" for e in ex) == cfg.k and sum(e.kind == "random" for e in ex) == cfg.n_random
        splits_by_ctx: dict[int, set[str]] = {}
        for e in ex:
            # The stored window equals the unit's activations over that context, and its tokens too.
            p0 = e.position - e.focus
            np.testing.assert_allclose(e.acts, a[e.context, p0:p0 + len(e.acts), u].tolist(), atol=1e-5)
            assert e.tokens == model.to_str_tokens(ctxs[e.context][p0:p0 + len(e.tokens)])
            assert len(e.acts) == min(T, e.position + cfg.after + 1) - max(0, e.position - cfg.before)
            assert e.position > 0 and ctxs[e.context][e.position] != separator_id(model.tokenizer)
            splits_by_ctx.setdefault(e.context, set()).add(e.split)
            if e.kind == "quantile":  # in its bin, by the calibrated edges
                edges = [-np.inf] + st.q_edges[u - 10].tolist() + [np.inf]
                assert edges[e.quantile] - 5e-5 <= e.act < edges[e.quantile + 1] + 5e-5  # acts are stored to 4 decimals
        assert all(len(s) == 1 for s in splits_by_ctx.values())  # no context feeds two splits of a unit
        rec = db.unit(ref)
        ids = torch.tensor(ctxs)
        ok = (ids != separator_id(model.tokenizer)) & (torch.arange(T) > 0)
        assert rec.max_act == pytest.approx(a[..., u][ok].max().item(), abs=1e-5)
        assert rec.min_act == pytest.approx(a[..., u][ok].min().item(), abs=1e-5)
        assert rec.density == pytest.approx((a[..., u][ok] > 0).double().mean().item(), abs=1e-12)
        assert sum(rec.histogram[1]) == state.n_tokens
        assert db.exemplars(ref, kind="top")[0].act == pytest.approx(rec.max_act, abs=1e-4)
    # Splits are a function of (seed, unit, context): all three occur over the units.
    assert {e.split for u in range(10, 40) for e in db.exemplars(UnitRef("mlp", 1, u))} == {"train", "valid", "test"}
    # Top logits are the unembedded W_out rows (through the final norm's weight).
    top, _ = output_logits(model, model.bridge.W_out[1][10:11], k=3)
    assert [t for t, _ in db.unit(UnitRef("mlp", 1, 10)).top_logits[:3]] == [t for t, _ in top[0]]


def test_interrupted_pass_resumes_to_the_uninterrupted_result(tiny_llama, tmp_path):
    model = tiny_llama
    ctxs = _contexts(model, seed=5)
    cfg = _cfg(checkpoint_every=2 * B, layers=[0, 2])
    full = harvest_exemplars(model, cfg, contexts=ctxs)

    def stop_after_three(batches: int) -> None:
        if batches == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        harvest_exemplars(model, cfg, checkpoint=tmp_path / "ck", contexts=ctxs, on_batch=stop_after_three)
    assert (tmp_path / "ck" / "state.safetensors").is_file() and not list((tmp_path / "ck").glob("*.pt"))
    resumed = harvest_exemplars(model, cfg, checkpoint=tmp_path / "ck", contexts=ctxs)
    assert resumed.contexts_done == full.contexts_done and resumed.n_tokens == full.n_tokens
    assert torch.equal(resumed.token_ids, full.token_ids)
    for layer in (0, 2):
        for name, t in full.layers[layer].tensors().items():
            assert torch.equal(torch.nan_to_num(resumed.layers[layer].tensors()[name], nan=-7.0),
                               torch.nan_to_num(t, nan=-7.0)), name
    # Other settings with the same checkpoint folder: refused.
    with pytest.raises(Exception, match="other settings"):
        harvest_exemplars(model, _cfg(checkpoint_every=2 * B, layers=[0], k=4), checkpoint=tmp_path / "ck", contexts=ctxs)


def test_sae_source_reads_encoded_features(tiny_llama, tmp_path):
    from mechscope.models.hooks import resid_post
    from mechscope.sae.io import save_sae
    from mechscope.sae.model import SAE, SAEConfig

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=64, d_sae=48, architecture="relu", hook_name=resid_post(1), model_name="tiny"))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.fill_(-1.0)
    save_sae(sae, tmp_path / "sae-l1")
    src = SaeFeatures(tiny_llama, tmp_path / "sae-l1")
    assert src.layers == [1] and src.n_units(1) == 48 and src.kind == "sae"
    ctxs = _contexts(tiny_llama, seed=7)
    state = harvest_exemplars(tiny_llama, _cfg(units=f"sae:{tmp_path / 'sae-l1'}"), source=src, contexts=ctxs)
    x = _brute(tiny_llama, ctxs, [resid_post(1)])[resid_post(1)]
    f = sae.encode(x)  # [C, T, 48]
    ids = torch.tensor(ctxs)
    valid = (ids != separator_id(tiny_llama.tokenizer))
    valid[:, 0] = False
    torch.testing.assert_close(state.layers[1].top_val.max(0).values, f[valid].max(0).values, atol=1e-5, rtol=1e-5)
    assert torch.equal(state.layers[1].positive, (f[valid] > 0).sum(0))


def test_cli_exemplars_writes_db_and_refuses_bad_input(tiny_llama_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from mechscope.cli.main import app

    corpus = tmp_path / "c.txt"
    corpus.write_text(("The Eiffel Tower is in Paris. When Mary and John went to the store, John gave a drink "
                       "to Mary. The war lasted from the year 1732 to the year 1789.\n\n") * 40)
    db = tmp_path / "u.db"
    common = ["exemplars", "--model", tiny_llama_dir, "--corpus", str(corpus), "--context-len", "32",
              "--batch-size", "4", "--k", "4", "--k-bottom", "2", "--tokens", "512"]
    r = CliRunner().invoke(app, [*common, "--db", str(db), "--layers", "1-2", "--unit-range", "0:16", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["layers"] == [1, 2] and out["n_units"] == 32
    store = UnitDB(db)
    assert len(store.units()) == 32 and len(store.exemplars(UnitRef("mlp", 2, 15), kind="top")) == 4
    assert not (tmp_path / "u.db.exemplars").exists()  # checkpoint removed after the write
    other = tmp_path / "other.db"
    from mechscope.explain.types import Description

    held = UnitDB(other, model_id="some/other-model")  # holds a unit of another model (an empty one would take this model)
    held.put_description(Description(UnitRef("mlp", 0, 0), "a description", "baseline"))
    held.close()
    for args, needle in ((["--db", str(db), "--layers", "7"], "layer 7"), (["--db", str(db), "--layers", "x"], "--layers"),
                         (["--db", str(db), "--unit-range", "5:2"], "--unit-range"),
                         (["--db", str(db), "--units", "nope"], "unknown --units"),
                         (["--db", str(other)], "some/other-model")):
        r = CliRunner().invoke(app, [*common, *args])
        assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.output, r.output


def test_cli_exemplars_default_context_fits_a_short_model(tmp_path):
    """A hand-built GPT-2 of 32 learned positions: with --context-len left out the pass reads
    contexts of 32 tokens (the default 128 would not fit, nor would 4 of them in --tokens 256), a
    --token-range counts in them, and a --context-len given beyond 32 is refused in one sentence."""
    import json
    import sys
    from pathlib import Path

    from typer.testing import CliRunner

    from mechscope.cli.main import app

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
    from short_context import save_short

    short = save_short("gpt2", tmp_path / "short")
    corpus = tmp_path / "c.txt"
    corpus.write_text("The Eiffel Tower is in Paris. When Mary and John went to the store, John gave a drink to Mary.\n\n" * 40)
    common = ["exemplars", "--model", short, "--corpus", str(corpus), "--batch-size", "4", "--k", "4", "--k-bottom", "2",
              "--layers", "1", "--unit-range", "0:8", "--json"]
    r = CliRunner().invoke(app, [*common, "--tokens", "256", "--db", str(tmp_path / "u.db")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["contexts"] == 8  # 256 tokens in contexts of 32
    r = CliRunner().invoke(app, [*common, "--token-range", "64:192", "--db", str(tmp_path / "s.db"), "--checkpoint", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["contexts"] == 4
    r = CliRunner().invoke(app, [*common, "--tokens", "256", "--context-len", "33", "--db", str(tmp_path / "x.db")])
    assert r.exit_code == 2 and "give --context-len 32 or less" in r.stderr and r.stderr.count("\n") == 1, r.output
    assert not (tmp_path / "x.db").exists()
    # Settings no context length would fix are still refused before the model loads (none here).
    nowhere = ["--model", str(tmp_path / "no-model"), "--db", str(tmp_path / "x.db")]
    for args, needle in ((["--layers", "x"], "--layers"), (["--k", "100000"], "--k")):
        r = CliRunner().invoke(app, ["exemplars", "--corpus", str(corpus), *args, "--tokens", "256", *nowhere])
        assert r.exit_code == 2 and needle in r.stderr and "Could not load" not in r.stderr, r.output


def test_attention_sinks_are_left_out_by_the_sources_deepest_layer(tiny_llama, tmp_path):
    """With a sink ratio, a position is no candidate where its residual norm after any block up to
    the source's deepest layer (not the deepest harvested one) exceeds ratio x that block's median
    over its own context's positions from 1; checked against an independent cached forward."""
    from mechscope.models.hooks import resid_post

    model = tiny_llama
    ctxs = _contexts(model, seed=5)
    ratio = 1.3  # a random tiny model has no massive activations: a low ratio marks some positions
    state = harvest_exemplars(model, _cfg(layers=[0], sink_ratio=ratio), contexts=ctxs)
    L = model.summary.n_layers
    acts = _brute(model, ctxs, [mlp_post(0)] + [resid_post(layer) for layer in range(L)])
    ids = torch.tensor(ctxs)
    valid = ids != separator_id(model.tokenizer)
    valid[:, 0] = False
    sinks = torch.zeros_like(valid)
    for layer in range(L):
        norm = acts[resid_post(layer)].norm(dim=-1)[:, 1:]  # [C, T - 1]
        sinks[:, 1:] |= norm > ratio * norm.median(dim=1, keepdim=True).values
    assert 0 < int((sinks & valid).sum()) < int(valid.sum()) // 2  # the test bites: some sinks, mostly text
    only0 = acts[resid_post(0)].norm(dim=-1)[:, 1:]
    assert not torch.equal(sinks[:, 1:], only0 > ratio * only0.median(dim=1, keepdim=True).values)  # depth matters
    keep = valid & ~sinks
    flat = acts[mlp_post(0)][keep]
    st = state.layers[0]
    assert state.n_tokens == flat.shape[0]
    assert torch.equal(st.positive, (flat > 0).sum(0))
    torch.testing.assert_close(st.top_val.max(0).values, flat.max(0).values, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(st.bot_val.min(0).values, flat.min(0).values, atol=1e-6, rtol=1e-6)
    assert set(st.top_row[st.top_row >= 0].tolist()) <= set(keep.reshape(-1).nonzero()[:, 0].tolist())
    # defaults: on for transcoder features (the sets' training rule), off for neurons and SAEs; 0 is off
    assert ExemplarsConfig(units="transcoders:/x").effective_sink_ratio == 30.0  # a set that records no ratio
    import json
    for trained_with, expected in ((None, None), (50.0, 50.0)):  # else the ratio the set was trained with
        (tmp_path / "set.json").write_text(json.dumps({"settings": {"sink_ratio": trained_with}}))
        assert ExemplarsConfig(units=f"transcoders:{tmp_path}").effective_sink_ratio == expected
    assert ExemplarsConfig(units="mlp").effective_sink_ratio is None
    assert ExemplarsConfig(units="transcoders:/x", sink_ratio=0).effective_sink_ratio is None
    with pytest.raises(MechscopeError, match="--sink-ratio must be above 1"):
        ExemplarsConfig(sink_ratio=0.5)


def _same_state(a, b) -> None:
    """Two harvest states hold the same lists (top/bottom in the readers' order), counts and calibration."""
    from mechscope.explain.exemplars import _best_first

    assert a.n_tokens == b.n_tokens and a.contexts_done == b.contexts_done and torch.equal(a.token_ids, b.token_ids)
    assert sorted(a.layers) == sorted(b.layers)
    for layer, sa in a.layers.items():
        sb = b.layers[layer]
        for p, largest in (("top_", True), ("bot_", False)):
            oa = _best_first(getattr(sa, p + "val"), getattr(sa, p + "row"), largest)
            ob = _best_first(getattr(sb, p + "val"), getattr(sb, p + "row"), largest)
            for f in ("val", "row"):
                assert torch.equal(getattr(sa, p + f).gather(0, oa), getattr(sb, p + f).gather(0, ob)), (layer, p + f)
            W = sa.top_win.shape[-1]
            wa = getattr(sa, p + "win").gather(0, oa[..., None].expand(-1, -1, W))
            wb = getattr(sb, p + "win").gather(0, ob[..., None].expand(-1, -1, W))
            assert torch.equal(wa.nan_to_num(-7.0), wb.nan_to_num(-7.0)), (layer, p + "win")
        for name in ("q_key", "q_val", "q_row", "q_win", "r_key", "r_val", "r_row", "r_win", "positive", "hist", "lo", "inv", "q_table"):
            assert torch.equal(getattr(sa, name).nan_to_num(-7.0), getattr(sb, name).nan_to_num(-7.0)), (layer, name)


def test_token_shards_merge_to_the_single_pass(tiny_llama, tmp_path):
    """Three token shards (run in any order, merged in any order) give exactly the state of one pass
    over their contexts; each later shard calibrates on the pass's first batch, not its own."""
    from mechscope.explain.exemplar_shards import merge_states
    from mechscope.explain.exemplars import HarvestState

    model = tiny_llama
    ctxs = _contexts(model, seed=11)
    cfg = _cfg(layers=[0, 2], sink_ratio=1.3)  # sinks too: the mask is per context
    full = harvest_exemplars(model, cfg, contexts=ctxs)
    bounds = [(0, 2 * B), (2 * B, 3 * B), (3 * B, 4 * B)]
    shards = []
    for i, (c0, c1) in reversed(list(enumerate(bounds))):
        part = _cfg(layers=[0, 2], sink_ratio=1.3, first_context=c0, n_tokens=(c1 - c0) * T, checkpoint_every=B)
        st = harvest_exemplars(model, part, contexts=ctxs, checkpoint=tmp_path / f"s{i}")
        assert st.token_ids.shape[0] == c1 - c0
        shards.append(HarvestState.read(tmp_path / f"s{i}"))
    for layer in (0, 2):  # the test bites: a later shard's own first batch calibrates otherwise
        own = harvest_exemplars(model, _cfg(layers=[layer], n_tokens=B * T), contexts=ctxs[2 * B:])
        assert not torch.equal(own.layers[layer].lo, shards[1].layers[layer].lo)
    merged = merge_states(shards, ["s2", "s1", "s0"])
    _same_state(merged, full)
    assert merged.cfg.first_context == 0 and merged.cfg.n_tokens == C * T
    # A merged state merges further (a fourth shard later): two then one gives the same.
    _same_state(merge_states([merge_states(shards[1:]), shards[0]]), full)
    # Bad sets of shards: one sentence each.
    with pytest.raises(MechscopeError, match="leave a gap"):
        merge_states([shards[0], shards[2]])
    with pytest.raises(MechscopeError, match="overlap"):
        merge_states([shards[2], shards[2]])
    other = harvest_exemplars(model, _cfg(layers=[0, 2], sink_ratio=1.3, k=4, first_context=2 * B, n_tokens=B * T), contexts=ctxs)
    with pytest.raises(MechscopeError, match="k differ"):
        merge_states([shards[2], other])
    # A shard may take its bins from another shard's checkpoint (shards made on other machines):
    # taken as given, not recomputed; bins that differ are refused by the merge.
    fake = HarvestState.read(tmp_path / "s0")
    for st in fake.layers.values():
        st.lo = st.lo - 0.01
    part = _cfg(layers=[0, 2], sink_ratio=1.3, first_context=2 * B, n_tokens=B * T)
    taken = harvest_exemplars(model, part, contexts=ctxs, calibration=fake)
    assert torch.equal(taken.layers[0].lo, fake.layers[0].lo) and not torch.equal(taken.layers[0].lo, shards[2].layers[0].lo)
    with pytest.raises(MechscopeError, match="different histogram bins"):
        merge_states([shards[2], taken])
    _same_state(merge_states([shards[2], harvest_exemplars(model, part, contexts=ctxs, calibration=shards[2]), shards[0]]), full)
    with pytest.raises(MechscopeError, match="other settings"):
        harvest_exemplars(model, _cfg(layers=[0, 2], sink_ratio=1.3, k=4, first_context=2 * B, n_tokens=B * T), contexts=ctxs,
                          calibration=shards[2])
    # The last shard may end with the corpus (it asked for more): merged; any other short shard is refused.
    tail = harvest_exemplars(model, _cfg(layers=[0, 2], sink_ratio=1.3, first_context=3 * B, n_tokens=3 * B * T), contexts=ctxs)
    assert tail.exhausted and tail.contexts_done == B
    _same_state(merge_states([shards[2], shards[1], tail]), full)
    early = harvest_exemplars(model, _cfg(layers=[0, 2], sink_ratio=1.3, first_context=2 * B, n_tokens=2 * B * T), contexts=ctxs[:3 * B])
    assert early.exhausted
    with pytest.raises(MechscopeError, match="not the last shard"):
        merge_states([shards[2], early, tail])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(MechscopeError, match="damaged"):
        HarvestState.read(tmp_path / "broken")
    with pytest.raises(MechscopeError, match="no exemplars checkpoint"):
        HarvestState.read(tmp_path / "nothing")


def test_cli_token_shards_merge_into_the_units_of_one_pass(tiny_llama_dir, tmp_path):
    import json

    from typer.testing import CliRunner

    from mechscope.cli.main import app

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"Line {i}: the cat number {i * 7 % 13} sat on mat {i % 5} in town {i % 3}.\n\n" for i in range(400)))
    common = ["exemplars", "--model", tiny_llama_dir, "--corpus", str(corpus), "--context-len", "32", "--batch-size", "4",
              "--k", "4", "--k-bottom", "2", "--layers", "1", "--unit-range", "0:12"]
    run = CliRunner().invoke
    r = run(app, [*common, "--tokens", "768", "--db", str(tmp_path / "one.db"), "--json"])
    assert r.exit_code == 0, r.output
    for name, rng in (("a", "0:256"), ("b", "256:768")):
        r = run(app, [*common, "--token-range", rng, "--db", str(tmp_path / f"{name}.db"), "--checkpoint", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    r = run(app, ["exemplars-merge", str(tmp_path / "b"), str(tmp_path / "a"), "--model", tiny_llama_dir,
                  "--db", str(tmp_path / "merged.db"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["contexts"] == 24
    one, merged = UnitDB(tmp_path / "one.db"), UnitDB(tmp_path / "merged.db")
    for u in range(12):
        ref = UnitRef("mlp", 1, u)
        assert merged.unit(ref) == one.unit(ref)
        for kind in ("top", "bottom", "quantile", "random"):
            assert merged.exemplars(ref, kind=kind) == one.exemplars(ref, kind=kind), (u, kind)
    # one shard, a gap, a folder with no checkpoint: one sentence and exit code 2
    r = run(app, [*common, "--token-range", "512:768", "--db", str(tmp_path / "c.db"), "--checkpoint", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    for args, needle in (([str(tmp_path / "a")], "at least two"), ([str(tmp_path / "a"), str(tmp_path / "c")], "leave a gap"),
                         ([str(tmp_path / "a"), str(tmp_path / "nope")], "no exemplars checkpoint")):
        r = run(app, ["exemplars-merge", *args, "--model", tiny_llama_dir, "--db", str(tmp_path / "x.db")])
        assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.output, r.output


def test_batch_size_changes_no_result(tiny_llama):
    """The histogram and quantile bins are calibrated on the corpus's first contexts, not on the
    first batch, and a final partial batch is read: batch sizes 1, 3 (16 contexts: a partial last
    batch) and 8 give the same state. Before, batch size 1 against 8 changed the quantiles and the
    per-quantile samples of most units, and batch size 3 dropped the last context."""
    model = tiny_llama
    ctxs = _contexts(model, seed=3)
    states = [harvest_exemplars(model, _cfg(layers=[0, 2], batch_size=b), contexts=ctxs) for b in (8, 1, 3)]
    assert states[0].contexts_done == C
    for st in states[1:]:
        _same_state(st, states[0])
