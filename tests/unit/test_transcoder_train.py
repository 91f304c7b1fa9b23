"""Transcoder sets: the skip architecture, training every layer from one forward pass per
batch (lockstep trainers, exact resume after SIGKILL), evaluation against independent
computations, and the `mechscope transcoders` commands' bad input."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli.common import parse_layers
from mechscope.cli.main import app
from mechscope.errors import MechscopeError
from mechscope.features.config import TranscoderTrainConfig
from mechscope.features.evaluate import evaluate_transcoders
from mechscope.features.transcoder_set import TranscoderSet, load_transcoders, random_transcoders, save_transcoders
from mechscope.sae import SAE, SAEConfig, load_sae, save_sae
from mechscope.sae.sources import TensorSource
from mechscope.sae.train import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from short_context import save_short  # noqa: E402

# Small everything: 31 rows per context, 124-row batches, 4 batches per shuffled chunk.
SMALL = dict(context_len=32, batch_contexts=4, forward_contexts=8, shuffle_contexts=16, expansion=4, k=8, lr=1e-2)



def _heldout(model, corpus, n_ctx=8, ctx_len=32):
    from mechscope.activations import get_corpus, pack_contexts

    return torch.tensor(list(itertools.islice(pack_contexts(model.tokenizer, get_corpus(corpus, split="heldout"), ctx_len), n_ctx)))


# ------------------------------------------------------------------------------ the architecture
def test_skip_transcoder_trains_folds_and_saves_in_saelens_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8000, 32, generator=g)
    lin = torch.randn(24, 32, generator=g) / 32**0.5  # [d_out, d_in], as W_skip
    y = 5.0 * (x @ lin.T) + torch.relu(x) @ (torch.randn(32, 24, generator=g) / 32**0.5) + 0.3
    cfg = TrainConfig(architecture="skip_topk", d_sae=64, k=4, tokens=20_000, batch_tokens=500, lr=1e-2,
                      checkpoint_every=10_000, log_every=10)
    tr = Trainer(TensorSource(x, y), cfg, tmp_path, d_in=32, hook_name="blocks.0.ln2.hook_normalized", model_name="m",
                 d_out=24, hook_name_out="blocks.0.hook_mlp_out")
    sae = tr.run()
    raw = json.loads((tmp_path / "cfg.json").read_text())
    assert raw["architecture"] == "topk_skip_transcoder" and raw["k"] == 4
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "sae_weights.safetensors"))["W_skip"].shape == (24, 32)  # SAELens's [d_out, d_in]
    back = load_sae(tmp_path)
    with torch.no_grad():
        assert back.cfg.architecture == "skip_topk" and torch.equal(back(x[:100]), sae(x[:100]))
        assert torch.allclose(sae(x[:50]), tr.sae(x[:50] * tr.scale_in) / tr.scale_out, atol=1e-4)  # scales folded
        assert torch.allclose(sae.decode(torch.zeros(5, 64), x[:5]) - sae.b_dec, x[:5] @ sae.W_skip.T, atol=1e-5)
        cos = torch.nn.functional.cosine_similarity(sae.W_skip.flatten(), lin.flatten(), 0)
    assert cos > 0.6, float(cos)  # W_skip (zeros at the start) learned the planted linear map
    with pytest.raises(MechscopeError, match="pass x to decode"):
        sae.decode(torch.zeros(2, 64))
    with pytest.raises(MechscopeError, match="is a transcoder architecture"):
        SAE(SAEConfig(d_in=8, d_sae=16, architecture="skip_relu"))  # an SAE with a skip could learn the identity


@pytest.mark.parametrize("arch,saelens", [("skip_relu", "skip_transcoder"), ("skip_jumprelu", "jumprelu_skip_transcoder"),
                                          ("skip_batchtopk", "jumprelu_skip_transcoder"), ("skip_topk", "topk_skip_transcoder")])
def test_skip_architectures_round_trip_under_their_saelens_names(tmp_path, arch, saelens):
    cfg = SAEConfig(d_in=8, d_sae=16, architecture=arch, k=3 if "topk" in arch else None, d_out=6,
                    hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out", apply_b_dec_to_input=False)
    sae = SAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_sae(sae, tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == saelens
    back = load_sae(tmp_path)
    x = torch.randn(5, 8)
    assert back.cfg.architecture == arch and torch.equal(back(x), sae(x))


def test_skip_set_round_trips_through_circuit_tracers_layout(tiny_llama, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    tset = random_transcoders(tiny_llama, d_sae=32, k=4, seed=3, skip=True)
    assert tset.layers[0].cfg.architecture == "skip_topk"
    save_transcoders(tset, tmp_path)
    assert "activation_function: topk" in (tmp_path / "config.yaml").read_text()
    t = load_file(str(tmp_path / "layer_1.safetensors"))
    assert torch.equal(t["W_skip"], tset.layers[1].W_skip.detach())  # [d_out, d_in], no transpose
    for p in tmp_path.glob("layer_*"):
        if p.is_dir():
            shutil.rmtree(p)
    back = load_transcoders(tmp_path)  # circuit-tracer's files only
    x = torch.randn(2, 5, 64)
    for a, b in zip(tset.layers, back.layers):
        assert b.cfg.architecture == "skip_topk" and torch.allclose(a(x), b(x), atol=1e-6)
    assert torch.allclose(back.skip(2, x), x @ back.layers[2].W_skip.T, atol=1e-5)
    save_file({**t, "W_skip": t["W_skip"][:, :10].contiguous()}, str(tmp_path / "layer_1.safetensors"))
    with pytest.raises(MechscopeError, match="W_skip has shape \\[64, 10\\]"):
        load_transcoders(tmp_path)


def test_attribution_through_real_skips_is_exact(tiny_llama):
    """The attribution graph's exactness check (``test_attribution_graph``) with skip
    transcoders: the skip path is linear and inside every edge, and it matters."""
    from test_attribution_graph import _column_check, _prompt  # pytest puts tests/unit on sys.path

    from mechscope.features.attribute import attribute
    from mechscope.features.replacement import capture, frozen_forward

    tset = random_transcoders(tiny_llama, d_sae=40, k=6, seed=1, skip=True)
    toks = _prompt(tiny_llama)
    g = attribute(tiny_llama, tset, toks, max_features=10_000, batch_size=16)
    run = capture(tiny_llama, tset, toks)
    pre0, lg0 = frozen_forward(tiny_llama, tset, run)
    picks = [("feature", int(torch.nonzero(g.features[:, 0] == layer)[0])) for layer in range(g.n_layers - 1)]
    picks += [("error", (0, 3)), ("token", 2)]
    for kind, idx in picks:
        got, want = _column_check(tiny_llama, tset, g, run, pre0, lg0, kind, idx)
        assert (got - want).abs().max() < 1e-4 * max(1.0, float(want.abs().max())), (kind, idx)
    for tc in tset.layers:
        with torch.no_grad():
            tc.W_skip.zero_()
    g0 = attribute(tiny_llama, tset, toks, max_features=10_000, batch_size=16)
    col = g.token_start + 2
    assert (g.adjacency[:, col] - g0.adjacency[:, col]).abs().max() > 1e-2  # the skip carried part of the effect


# ------------------------------------------------------------------------------ training
def _count_forwards(model, monkeypatch):
    calls = []
    real = model.bridge.run_with_hooks

    def counting(*a, **kw):
        calls.append(len(kw.get("fwd_hooks") or []))
        return real(*a, **kw)

    monkeypatch.setattr(model.bridge, "run_with_hooks", counting)
    return calls


@pytest.mark.slow
def test_a_set_trains_every_layer_from_one_forward_pass_per_batch(tiny_llama, corpus, tmp_path, monkeypatch):
    """All three layers train from the same forward passes as one layer alone; each layer's
    trainer is the unchanged ``Trainer`` (a one-layer set equals ``Trainer.run`` on the same
    source, bit for bit, and equals that layer in the three-layer set); trained FVU is far
    below the untrained transcoders'."""
    from mechscope.features.train import transcoder_sources

    torch.manual_seed(0)
    cfg = TranscoderTrainConfig(tokens=4000, corpus=corpus, checkpoint_every=1000, **SMALL)
    calls = _count_forwards(tiny_llama, monkeypatch)
    from mechscope.features.train import train_transcoders

    full = train_transcoders(tiny_llama, cfg, tmp_path / "all")
    all_calls = list(calls)
    calls.clear()
    one = train_transcoders(tiny_llama, TranscoderTrainConfig(layers=[1], tokens=4000, corpus=corpus, checkpoint_every=1000, **SMALL),
                            tmp_path / "one")
    one_calls = list(calls)
    # 32 steps of 4 contexts = 8 chunks of 16 contexts = 16 forward passes of 8 contexts (+ one width
    # probe), or one chunk more where rows left out (special tokens, attention sinks) leave a step short
    n = len(all_calls) - 1
    assert len(one_calls) == len(all_calls) and n in (16, 17), (all_calls, one_calls)
    # every layer's in and out hooks in each pass, and the residual norms after blocks 0 to the
    # deepest one (the sink test, sink_ratio): 3 layers 6 + 3, layer 1 alone 2 + 2
    assert all_calls[1:] == [9] * n and one_calls[1:] == [4] * n
    assert isinstance(full, TranscoderSet) and isinstance(one, dict) and list(one) == [1]
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == [
        "config.yaml", "layer_0", "layer_0.safetensors", "layer_1", "layer_1.safetensors", "layer_2",
        "layer_2.safetensors", "training_log.json"]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["layer_1", "training_log.json"]
    log = json.loads((tmp_path / "all" / "training_log.json").read_text())
    from mechscope.activations import get_corpus, pack_contexts, special_token_ids

    ctx = torch.tensor(list(itertools.islice(pack_contexts(tiny_llama.tokenizer, get_corpus(corpus, split="train"), 32), 128)))
    n_special = int(torch.isin(ctx[:, 1:], torch.tensor(special_token_ids(tiny_llama.tokenizer))).sum())
    assert n_special > 0  # special tokens' rows are left out (exclude_special)
    assert log["harvest"]["forward_passes"] == 16 and log["harvest"]["tokens_trained_per_layer"] == 32 * 124 - n_special
    # The lockstep loop is Trainer.run: the reference trains layer 1 alone through Trainer.run.
    calls.clear()
    ref_cfg = TranscoderTrainConfig(layers=[1], tokens=4000, corpus=corpus, checkpoint_every=1000, **SMALL)
    shared, (src,) = transcoder_sources(tiny_llama, ref_cfg)
    dims = shared.store.dims
    ref = Trainer(src, ref_cfg.train_config(1), tmp_path / "ref", d_in=dims["blocks.1.ln2.hook_normalized"],
                  d_out=dims["blocks.1.hook_mlp_out"], hook_name="blocks.1.ln2.hook_normalized",
                  hook_name_out="blocks.1.hook_mlp_out", model_name=tiny_llama.summary.name).run()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(ref, name), getattr(one[1], name)), name
        assert torch.equal(getattr(full.layers[1], name), getattr(one[1], name)), name
    toks = _heldout(tiny_llama, corpus)
    trained = evaluate_transcoders(tiny_llama, full, toks)
    untrained = evaluate_transcoders(tiny_llama, TranscoderSet([SAE(tc.cfg) for tc in full.layers]), toks)
    for a, b in zip(trained["layers"], untrained["layers"]):
        assert a["fvu"] < 0.85 and a["fvu"] < 0.1 * b["fvu"], (a["fvu"], b["fvu"])  # 32 steps: 0.47-0.77
        assert a["l0"] <= 8


def _cli_train(model_dir, corpus, out, tokens, extra=()):
    return ["transcoders", "train", "--model", model_dir, "--corpus", corpus, "--tokens", str(tokens), "--context-len", "32",
            "--batch-contexts", "4", "--shuffle-contexts", "16", "--expansion", "4", "--k", "8", "--lr", "1e-2", "--checkpoint-every", "1000",
            "--out", str(out), "--device", "cpu", *extra]


@pytest.mark.slow
def test_sigkilled_set_resumes_to_the_uninterrupted_result(tiny_llama_dir, corpus, tmp_path, one_thread, kill_when):
    tokens = 12_000  # 96 steps, 24 chunks; checkpoints at chunk boundaries every ~1000 tokens
    extra = ["--skip", "--sink-ratio", "1.2"]  # a low ratio, so rows are dropped on this tiny model too
    out = tmp_path / "killed"
    latest = out / "checkpoint" / "latest.json"
    kill_when(_cli_train(tiny_llama_dir, corpus, out, tokens, extra), latest)
    assert not (out / "config.yaml").exists() and not (out / "training_log.json").exists()  # it died before finishing
    gen = out / "checkpoint" / json.loads(latest.read_text())["generation"]
    at = json.loads((gen / "set.json").read_text())["tokens"]
    assert 0 < at < tokens
    runner = CliRunner()
    r = runner.invoke(app, _cli_train(tiny_llama_dir, corpus, out, tokens, extra))  # no --resume: refused
    assert r.exit_code == 2 and "add --resume" in r.stderr
    r = runner.invoke(app, _cli_train(tiny_llama_dir, corpus, out, tokens, [*extra, "--k", "4", "--resume"]))
    assert r.exit_code == 2 and "k=8, not 4" in r.stderr  # other settings: refused
    r = runner.invoke(app, _cli_train(tiny_llama_dir, corpus, out, tokens, [*extra, "--resume", "--json"]))
    assert r.exit_code == 0, r.output
    resumed_tokens = json.loads(r.stdout)["tokens"]
    assert 0.5 * 96 * 124 < resumed_tokens < 0.95 * 96 * 124 and not (out / "checkpoint").exists()  # special and sink rows left out
    r = runner.invoke(app, _cli_train(tiny_llama_dir, corpus, tmp_path / "straight", tokens, [*extra, "--json"]))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tokens"] == resumed_tokens
    killed, straight = load_transcoders(out), load_transcoders(tmp_path / "straight")
    assert killed.layers[0].cfg.architecture == "skip_topk"
    for a, b in zip(killed.layers, straight.layers):
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    logs = [json.loads((p / "training_log.json").read_text())["training_log"] for p in (out, tmp_path / "straight")]
    strip = lambda rows: [{k: v for k, v in row.items() if k != "tok_per_s"} for row in rows]  # noqa: E731
    assert all(strip(logs[0][k]) == strip(logs[1][k]) for k in logs[1])
    # A finished set: resuming or training into it again is refused, and it is left as it was.
    before = (out / "layer_0.safetensors").read_bytes()
    r = runner.invoke(app, _cli_train(tiny_llama_dir, corpus, out, tokens, [*extra, "--resume"]))
    assert r.exit_code == 2 and "nothing to resume" in r.stderr
    r = runner.invoke(app, _cli_train(tiny_llama_dir, corpus, out, tokens, extra))
    assert r.exit_code == 2 and "already holds transcoders" in r.stderr
    assert (out / "layer_0.safetensors").read_bytes() == before
    # And it evaluates from the command line: eval.json, eval.html.
    r = runner.invoke(app, ["transcoders", "eval", str(out), "--model", tiny_llama_dir, "--corpus", corpus, "--tokens", "256",
                            "--context-len", "32", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert [row["layer"] for row in ev["layers"]] == [0, 1, 2] and ev["all_layers"]["layers"] == [0, 1, 2]
    assert json.loads((out / "eval.json").read_text()) == ev
    html = (out / "eval.html").read_text()
    assert "CE recovered, all spliced" in html and "<script" not in html


# ------------------------------------------------------------------------------ special tokens
def test_shared_batches_leave_out_exactly_the_special_tokens_rows(tiny_llama, corpus):
    """With ``exclude_special`` each batch is the batch without it less the rows whose token is
    special (recomputed here from the packed contexts and the chunk's seeded permutation); all
    hooks keep the same rows; the trainers then see only text."""
    from mechscope.activations import get_corpus, pack_contexts, special_token_ids
    from mechscope.features.train import transcoder_sources

    cfg_all = TranscoderTrainConfig(tokens=2_000, layers=[0, 1], corpus=corpus, exclude_special=False, sink_ratio=None, **SMALL)
    cfg_ex = TranscoderTrainConfig(tokens=2_000, layers=[0, 1], corpus=corpus, sink_ratio=None, **SMALL)
    shared_all, _ = transcoder_sources(tiny_llama, cfg_all)
    shared_ex, _ = transcoder_sources(tiny_llama, cfg_ex)
    assert cfg_ex.exclude_special and shared_ex.store.cfg.with_tokens and not shared_all.store.cfg.with_tokens
    n_batches = 2 * shared_ex.per_chunk  # two chunks
    ctx = torch.tensor(list(itertools.islice(pack_contexts(tiny_llama.tokenizer, get_corpus(corpus, split="train"), 32),
                                             2 * cfg_ex.shuffle_contexts)))
    special = torch.tensor(special_token_ids(tiny_llama.tokenizer))
    left_out = 0
    for i in range(n_batches):
        chunk, m = divmod(i, shared_ex.per_chunk)
        rows = ctx[chunk * cfg_ex.shuffle_contexts : (chunk + 1) * cfg_ex.shuffle_contexts, 1:].reshape(-1)
        perm = torch.randperm(shared_ex.chunk_rows, generator=torch.Generator().manual_seed(cfg_ex.seed * 1_000_003 + chunk))
        tok = rows[perm][m * cfg_ex.batch_rows : (m + 1) * cfg_ex.batch_rows]
        keep = ~torch.isin(tok, special)
        a = [shared_all.get(r, cfg_all.batch_rows) for r in range(2)][0]
        b = [shared_ex.get(r, cfg_ex.batch_rows) for r in range(2)][0]
        assert set(a) == set(b) and len(a) == 4
        for h in a:
            assert b[h].shape[0] == int(keep.sum())
            assert torch.equal(b[h], a[h][keep]), (i, h)
        left_out += int((~keep).sum())
    assert left_out > 0  # the corpus's documents are packed with separators mid-context


def _sinks(model, ctx, layers, ratio, batch):
    """Sink positions [n, ctx_len - 1] by hand: residual norm after any of ``layers`` above
    ``ratio`` times that layer's median over the position's own context (positions >= 1), run
    in batches of ``batch`` contexts (which must not matter)."""
    out = []
    with torch.no_grad():
        for t in ctx.split(batch):
            _, cache = model.bridge.run_with_cache(t)
            m = torch.zeros(t.shape[0], t.shape[1] - 1, dtype=torch.bool)
            for layer in layers:
                n = cache[f"blocks.{layer}.hook_resid_post"][:, 1:].norm(dim=-1)
                m |= n > ratio * n.median(dim=1, keepdim=True).values
            out.append(m)
    return torch.cat(out)


def test_shared_batches_leave_out_the_sinks_rows(tiny_llama, corpus):
    """With ``sink_ratio`` (special tokens kept here) each batch is the batch without it less
    the rows of sink positions, found here by hand per forward pass of ``forward_contexts``."""
    from mechscope.activations import get_corpus, pack_contexts
    from mechscope.features.train import transcoder_sources

    ratio = 1.2
    cfg_all = TranscoderTrainConfig(tokens=2_000, layers=[0, 1], corpus=corpus, exclude_special=False, sink_ratio=None, **SMALL)
    cfg_sk = TranscoderTrainConfig(tokens=2_000, layers=[0, 1], corpus=corpus, exclude_special=False, sink_ratio=ratio, **SMALL)
    shared_all, _ = transcoder_sources(tiny_llama, cfg_all)
    shared_sk, _ = transcoder_sources(tiny_llama, cfg_sk)
    ctx = torch.tensor(list(itertools.islice(pack_contexts(tiny_llama.tokenizer, get_corpus(corpus, split="train"), 32),
                                             cfg_sk.shuffle_contexts)))
    sinks = _sinks(tiny_llama, ctx, [0, 1], ratio, cfg_sk.forward_contexts).reshape(-1)
    perm = torch.randperm(shared_sk.chunk_rows, generator=torch.Generator().manual_seed(cfg_sk.seed * 1_000_003))
    left_out = 0
    for m in range(shared_sk.per_chunk):
        keep = ~sinks[perm][m * cfg_sk.batch_rows : (m + 1) * cfg_sk.batch_rows]
        a = [shared_all.get(r, cfg_all.batch_rows) for r in range(2)][0]
        b = [shared_sk.get(r, cfg_sk.batch_rows) for r in range(2)][0]
        for h in a:
            assert torch.equal(b[h], a[h][keep]), (m, h)
        left_out += int((~keep).sum())
    assert 0 < left_out < shared_sk.chunk_rows


def test_eval_leaves_sink_positions_alone(tiny_llama, corpus):
    """``sink_ratio``: positions whose residual norm after a layer of the set is above the
    ratio times its median (by hand here) are left unspliced and out of the statistics."""
    tset = random_transcoders(tiny_llama, d_sae=48, k=6, seed=7, scale=2.0)
    toks = _heldout(tiny_llama, corpus, n_ctx=4)
    ratio = 1.2
    keep = ~_sinks(tiny_llama, toks, [0, 1, 2], ratio, 4)
    r = evaluate_transcoders(tiny_llama, tset, toks, batch_size=4, exclude_special=False, sink_ratio=ratio)
    r_all = evaluate_transcoders(tiny_llama, tset, toks, batch_size=4, exclude_special=False, sink_ratio=None)
    assert r["tokens"] == int(keep.sum()) < r_all["tokens"] == 4 * 31
    assert r["settings"]["sink_positions"] == int((~keep).sum()) and r["settings"]["special_positions"] == 0
    tc = tset.layers[2]
    cache = {}
    with torch.no_grad():
        tiny_llama.bridge.run_with_hooks(toks, fwd_hooks=[(h, lambda t, hook, h=h: cache.__setitem__(h, t.clone()))
                                                          for h in (tc.cfg.hook_name, tc.cfg.hook_name_out)])
        x, y = cache[tc.cfg.hook_name][:, 1:], cache[tc.cfg.hook_name_out][:, 1:]
        y_hat = tc.decode(tc.encode(x), x)
        yk = y[keep]
        fvu = float((y_hat[keep] - yk).pow(2).sum(-1).mean() / (yk - yk.mean(0)).pow(2).sum(-1).mean())
        assert abs(r["layers"][2]["fvu"] - fvu) < 1e-4 * max(1, fvu)
        assert abs(r["layers"][2]["fvu_with_special"] - r_all["layers"][2]["fvu"]) < 1e-6

        def spliced(t, hook):
            t = t.clone()
            t[:, 1:] = torch.where(keep[..., None], y_hat, t[:, 1:])
            return t

        from mechscope.features.evaluate import _ce

        logits = tiny_llama.bridge.run_with_hooks(toks, fwd_hooks=[(tc.cfg.hook_name_out, spliced)])
        assert abs(float(_ce(logits, toks).mean()) - r["layers"][2]["ce_spliced"]) < 1e-4
    # With special tokens left out too: a position that is both is counted once, as special.
    from mechscope.activations import special_token_ids

    toks2 = toks.clone()
    toks2[:, 9] = special_token_ids(tiny_llama.tokenizer)[0]
    special = torch.isin(toks2[:, 1:], torch.tensor(special_token_ids(tiny_llama.tokenizer)))
    sinks2 = _sinks(tiny_llama, toks2, [0, 1, 2], ratio, 4)
    both = evaluate_transcoders(tiny_llama, tset, toks2, batch_size=4, sink_ratio=ratio)
    assert both["tokens"] == int((~special & ~sinks2).sum())
    assert both["settings"]["special_positions"] == int(special.sum())
    assert both["settings"]["sink_positions"] == int((sinks2 & ~special).sum()) > 0
    # A set of layer 0 alone reads block 0 only (not the deepest block of the model).
    low_ratio = 1.1  # here blocks 1-2 mark positions that block 0 does not
    part = evaluate_transcoders(tiny_llama, {0: tset.layers[0]}, toks, batch_size=4, exclude_special=False,
                                sink_ratio=low_ratio)
    low, full = _sinks(tiny_llama, toks, [0], low_ratio, 4), _sinks(tiny_llama, toks, [0, 1, 2], low_ratio, 4)
    assert part["settings"]["sink_positions"] == int(low.sum()) and not torch.equal(low, full)
    tc0 = tset.layers[0]
    with torch.no_grad():
        _, c0 = tiny_llama.bridge.run_with_cache(toks)
        x0, y0 = c0[tc0.cfg.hook_name][:, 1:], c0[tc0.cfg.hook_name_out][:, 1:]
        se = (tc0.decode(tc0.encode(x0), x0) - y0).pow(2).sum(-1)

        def fvu_on(mask):
            yk = y0[mask]
            return float(se[mask].mean() / (yk - yk.mean(0)).pow(2).sum(-1).mean())

        assert abs(part["layers"][0]["fvu"] - fvu_on(~low)) < 1e-4 * max(1, fvu_on(~low))
        assert abs(fvu_on(~low) - fvu_on(~full)) > 1e-6  # block 0 and blocks 0-2 mark different positions
    with pytest.raises(MechscopeError, match="sink_ratio must be above 1"):
        evaluate_transcoders(tiny_llama, tset, toks, sink_ratio=1.0)


def test_eval_leaves_special_positions_alone(tiny_llama, corpus):
    """``exclude_special``: special tokens' positions keep the model's own MLP output in every
    spliced and zeroed run and are left out of FVU, L0 and dead features (checked against a
    direct hooked computation); ``fvu_with_special`` equals the FVU of the run that counts them."""
    from mechscope.activations import special_token_ids
    from mechscope.features.evaluate import _ce

    tset = random_transcoders(tiny_llama, d_sae=48, k=6, seed=7, scale=2.0)
    toks = _heldout(tiny_llama, corpus, n_ctx=4)
    sep = special_token_ids(tiny_llama.tokenizer)[0]
    toks[:, 9] = sep  # a separator mid-context in every row, beside those packing put there
    special = torch.isin(toks, torch.tensor(special_token_ids(tiny_llama.tokenizer)))
    keep = ~special[:, 1:]
    r = evaluate_transcoders(tiny_llama, tset, toks, batch_size=4, sink_ratio=None)
    r_all = evaluate_transcoders(tiny_llama, tset, toks, batch_size=4, exclude_special=False, sink_ratio=None)
    assert r["tokens"] == int(keep.sum()) < r_all["tokens"] == 4 * 31
    assert r["settings"]["special_positions"] == int((~keep).sum())
    layer = 1
    tc = tset.layers[layer]
    cache = {}
    with torch.no_grad():
        tiny_llama.bridge.run_with_hooks(toks, fwd_hooks=[(h, lambda t, hook, h=h: cache.__setitem__(h, t.clone()))
                                                          for h in (tc.cfg.hook_name, tc.cfg.hook_name_out)])
        x, y = cache[tc.cfg.hook_name][:, 1:], cache[tc.cfg.hook_name_out][:, 1:]
        f = tc.encode(x)
        y_hat = tc.decode(f, x)
        yk = y[keep]
        fvu = float((y_hat[keep] - yk).pow(2).sum(-1).mean() / (yk - yk.mean(0)).pow(2).sum(-1).mean())
        row = r["layers"][layer]
        assert abs(row["fvu"] - fvu) < 1e-4 * max(1, fvu)
        assert abs(row["l0"] - float((f[keep] > 0).sum(-1).float().mean())) < 1e-5
        assert abs(row["fvu_with_special"] - r_all["layers"][layer]["fvu"]) < 1e-6
        assert row["fvu_with_special"] != pytest.approx(row["fvu"], rel=1e-3)

        def spliced(t, hook):
            t = t.clone()
            t[:, 1:] = torch.where(keep[..., None], y_hat, t[:, 1:])
            return t

        def zeroed(t, hook):
            t = t.clone()
            t[:, 1:] = t[:, 1:].masked_fill(keep[..., None], 0)
            return t

        for fn, key in ((spliced, "ce_spliced"), (zeroed, "ce_zero")):
            logits = tiny_llama.bridge.run_with_hooks(toks, fwd_hooks=[(tc.cfg.hook_name_out, fn)])
            assert abs(float(_ce(logits, toks).mean()) - row[key]) < 1e-4, key
        assert abs(r_all["layers"][layer]["ce_spliced"] - row["ce_spliced"]) > 1e-6  # the mask changed the run
        # All layers at once: each transcoder reads the spliced run's input, special positions kept.
        seen = {}
        hooks = []
        for lyr, t_c in enumerate(tset.layers):
            def read(a, hook, lyr=lyr):
                seen[lyr] = a[:, 1:]

            def write(a, hook, lyr=lyr, t_c=t_c):
                b = a.clone()
                b[:, 1:] = torch.where(keep[..., None], t_c(seen[lyr]), b[:, 1:])
                return b
            hooks += [(t_c.cfg.hook_name, read), (t_c.cfg.hook_name_out, write)]
        want = float(_ce(tiny_llama.bridge.run_with_hooks(toks, fwd_hooks=hooks), toks).mean())
        assert abs(r["all_layers"]["ce_spliced"] - want) < 1e-4
        zero_all = [(t_c.cfg.hook_name_out, zeroed) for t_c in tset.layers]
        want_zero = float(_ce(tiny_llama.bridge.run_with_hooks(toks, fwd_hooks=zero_all), toks).mean())
        assert abs(r["all_layers"]["ce_zero"] - want_zero) < 1e-4
    slow = evaluate_transcoders(tiny_llama, tset, toks, batch_size=4, fast=False, sink_ratio=None)
    assert abs(slow["all_layers"]["ce_spliced"] - r["all_layers"]["ce_spliced"]) < 1e-5


# ------------------------------------------------------------------------------ evaluation
def test_eval_equals_independent_computations(tiny_llama, corpus):
    """Each layer's numbers equal ``evaluate_sae`` of its transcoder (separate code); the
    all-layers numbers equal a direct hooked computation; a one-layer dict's "all layers" is
    that layer."""
    from mechscope.features.evaluate import _ce
    from mechscope.sae.evaluate import evaluate_sae

    tset = random_transcoders(tiny_llama, d_sae=48, k=6, seed=5, skip=True, scale=2.0)
    toks = _heldout(tiny_llama, corpus, n_ctx=6)
    r = evaluate_transcoders(tiny_llama, tset, toks, batch_size=4, exclude_special=False, sink_ratio=None)  # two batches, the second short
    assert r["tokens"] == 6 * 31
    for row in r["layers"]:
        e = evaluate_sae(tiny_llama, tset.layers[row["layer"]], toks, batch_size=4)
        for mine, theirs in (("fvu", "fvu"), ("mse", "mse"), ("l0", "l0"), ("dead_frac", "dead_frac"), ("ce_spliced", "ce_sae"),
                             ("ce_zero", "ce_zero"), ("ce_recovered", "ce_recovered")):
            assert abs(row[mine] - getattr(e, theirs)) <= 1e-4 * max(1.0, abs(getattr(e, theirs))), (row["layer"], mine)
        assert abs(r["ce_clean"] - e.ce_clean) < 1e-4
    # All layers at once, by hand: layer by layer, each transcoder reads the spliced run's input.
    with torch.no_grad():
        ce_all, ce_zero = [], []
        for t in toks.split(4):
            x_seen = {}

            def hooks(splice):
                hs = []
                for layer, tc in enumerate(tset.layers):
                    def read(a, hook, layer=layer):
                        x_seen[layer] = a

                    def write(a, hook, layer=layer, tc=tc):
                        b = a.clone()
                        b[:, 1:] = tc(x_seen[layer][:, 1:]) if splice else 0.0
                        return b
                    hs += [(tc.cfg.hook_name, read), (tc.cfg.hook_name_out, write)]
                return hs

            ce_all.append(_ce(tiny_llama.bridge.run_with_hooks(t, fwd_hooks=hooks(True)), t))
            ce_zero.append(_ce(tiny_llama.bridge.run_with_hooks(t, fwd_hooks=hooks(False)), t))
        want_all, want_zero = float(torch.cat(ce_all).mean()), float(torch.cat(ce_zero).mean())
    a = r["all_layers"]
    assert abs(a["ce_spliced"] - want_all) < 1e-4 and abs(a["ce_zero"] - want_zero) < 1e-4
    assert abs(a["ce_recovered"] - (want_zero - want_all) / (want_zero - r["ce_clean"])) < 1e-4
    assert abs(a["ce_spliced"] - r["ce_clean"]) > 1e-3  # the splice changed something
    one = evaluate_transcoders(tiny_llama, {1: tset.layers[1]}, toks, batch_size=4, exclude_special=False, sink_ratio=None)
    assert one["all_layers"]["layers"] == [1]
    assert abs(one["all_layers"]["ce_spliced"] - r["layers"][1]["ce_spliced"]) < 1e-5
    assert abs(one["all_layers"]["ce_zero"] - r["layers"][1]["ce_zero"]) < 1e-5


def test_eval_page_escapes_model_text():
    from mechscope.report.transcoders import render_transcoders_eval

    row = {"layer": 0, "architecture": '<img src=x onerror="1">', "d_sae": 8, "fvu": 0.2, "l0": 3.0, "dead_frac": 0.1,
           "ce_spliced": 2.0, "ce_zero": 3.0, "ce_recovered": 0.9}
    d = {"model": "<script>alert(1)</script>", "tokens": 10, "layers": [row, {**row, "layer": 1}], "ce_clean": 1.9,
         "all_layers": {"layers": [0, 1], "ce_spliced": 2.1, "ce_zero": 3.5, "ce_recovered": 0.875},
         "summary": {"median_fvu": 0.2, "max_fvu": 0.2, "mean_l0": 3.0, "mean_dead_frac": 0.1},
         "settings": {"corpus": "</p><b>x</b>", "n_layers_model": 2}}
    html = render_transcoders_eval(d)
    assert "<script" not in html and "<img" not in html and "<b>x" not in html
    assert "&lt;script&gt;" in html and "0.875" in html and "<svg" in html


# ------------------------------------------------------------------------------ bad input
def test_layers_parse_and_config_checks():
    assert parse_layers("all", 4) == [0, 1, 2, 3] and parse_layers("0,2-3", 4) == [0, 2, 3]
    assert parse_layers("all") is None and parse_layers(None) is None and parse_layers("7,2-3") == [2, 3, 7]
    for spec, msg in (("4", "layer 4 does not exist"), ("a", "not a layer number"), ("1,1", "names a layer twice"),
                      ("3-1", "runs backwards"), ("-1", "is negative; layers count from 0")):
        with pytest.raises(MechscopeError, match=msg):
            parse_layers(spec, 4)
    for kw, msg in ((dict(tokens=-5), "--tokens must be positive"), (dict(architecture="gated"), "unknown SAE architecture"),
                    (dict(shuffle_contexts=20, batch_contexts=8), "must be a multiple"), (dict(tokens=100), "less than one batch"),
                    (dict(train_options={"lr": 1.0}), "may not set lr"), (dict(train_options={"nope": 1}), "does not know"),
                    (dict(sink_ratio=0.5), "sink_ratio must be above 1")):
        with pytest.raises(MechscopeError, match=msg):
            TranscoderTrainConfig(**kw)
    assert TranscoderTrainConfig(architecture="relu", skip=True).arch_name == "skip_relu"


def test_bad_input_is_one_sentence_and_writes_nothing(tiny_llama_dir, corpus, tmp_path):
    runner = CliRunner()

    def bad(args, *needles):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, r.output
        lines = [line for line in r.stderr.splitlines() if line.strip() and "Loading weights" not in line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
        err = lines[0]
        for n in needles:
            assert n in err, err

    out = tmp_path / "out"
    bad(_cli_train(tiny_llama_dir, corpus, out, 4000, ["--layers", "7"]), "layer 7 does not exist", "0-2")
    bad(_cli_train(tiny_llama_dir, corpus, out, 4000, ["--layers", "one,two"]), "not a layer number")
    bad(_cli_train(tiny_llama_dir, corpus, out, -5), "--tokens must be positive")
    bad(_cli_train(tiny_llama_dir, corpus, out, 4000, ["--arch", "gated"]), "unknown --arch 'gated'", "relu, topk, batchtopk, jumprelu")
    bad(_cli_train(tiny_llama_dir, corpus, out, 4000, ["--shuffle-contexts", "10"]), "must be a multiple of batch_contexts=4")
    bad(_cli_train(tiny_llama_dir, corpus, out, 4000, ["--resume"]), "does not exist")
    bad(_cli_train(tiny_llama_dir, corpus, out, 4000, ["--sink-ratio", "0.5"]), "sink_ratio must be above 1")
    bad(_cli_train(tiny_llama_dir, str(tmp_path / "missing.jsonl"), out, 4000), "missing.jsonl")
    assert not out.exists()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    bad(["transcoders", "eval", str(junk), "--model", tiny_llama_dir], "not a transcoder set")
    bad(["transcoders", "eval", str(tmp_path / "nowhere"), "--model", tiny_llama_dir], "is not a folder")
    bad(["transcoders", "eval", str(junk), "--tokens", "-1", "--model", tiny_llama_dir], "--tokens")
    sae_dir = junk / "layer_0"
    save_sae(SAE(SAEConfig(d_in=64, d_sae=16, k=4, hook_name="blocks.0.hook_resid_post")), sae_dir)
    bad(["transcoders", "eval", str(junk), "--model", tiny_llama_dir], "is an SAE, not a transcoder")
    assert sorted(p.name for p in junk.iterdir()) == ["layer_0", "notes.txt"]  # no eval.json / eval.html


def test_a_short_context_model_trains_and_evaluates_with_the_default_context(corpus, tmp_path):
    """A hand-built GPT-2 of 32 learned positions: with --context-len left out, train and eval read
    contexts of 32 tokens (not 128); one given beyond 32 is refused in one sentence before the run is
    announced and before anything is written."""
    short = save_short("gpt2", tmp_path / "short")
    out = tmp_path / "set"
    train = ["transcoders", "train", "--model", short, "--corpus", corpus, "--tokens", "1000", "--batch-contexts", "4",
             "--shuffle-contexts", "16", "--expansion", "2", "--k", "4", "--out", str(out), "--device", "cpu"]
    runner = CliRunner()
    for args in ([*train, "--context-len", "33"], [*train, "--context-len", "33", "--resume"]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and "give --context-len 32 or less" in r.stderr and r.stderr.count("\n") == 1, r.output
        assert "training" not in r.stdout and not out.exists(), r.stdout  # nothing announced, nothing written
    r = runner.invoke(app, [*train, "--resume"])
    assert r.exit_code == 2 and "does not exist" in r.stderr and "training" not in r.stdout, r.output
    r = runner.invoke(app, [*train, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "layer_0" / "cfg.json").read_text())["metadata"]["context_size"] == 32
    ev = ["transcoders", "eval", str(out), "--model", short, "--corpus", corpus, "--tokens", "256", "--device", "cpu"]
    r = runner.invoke(app, [*ev, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["settings"]["ctx_len"] == 32
    r = runner.invoke(app, [*ev, "--context-len", "33", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 2 and "give --context-len 32 or less" in r.stderr and not (tmp_path / "ev").exists(), r.output
