"""Feature dashboards: the one-pass streaming statistics agree with brute force over the same
activations; output logits agree with the model's own final norm; the page escapes tokens."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mechscope.sae import SAE, SAEConfig, save_sae
from mechscope.sae.dashboard import (
    DashboardConfig,
    DashboardResult,
    acts_at_hook,
    corpus_contexts,
    feature_dashboards,
    output_logits,
    parse_features,
)
from mechscope.sae.feature_stats import FeatureStats, StatsConfig

HOOK = "blocks.1.hook_resid_pre"
TEXT = ("When Mary and John went to the store, John gave a drink to Mary. The war lasted from the year "
        "1732 to the year 1789. The Eiffel Tower is in Paris. Then, Alice and Bob went to the park. ")
EVIL = "<script>alert(1)</script>"


def random_sae(d_in: int, d_sae: int = 64, seed: int = 0) -> SAE:
    """A ReLU SAE with random weights and a spread of biases, so densities differ."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="relu", hook_name=HOOK, model_name="tiny",
                        metadata={"seed": seed}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.mul_(1 + torch.rand(d_sae, generator=g))
        sae.b_enc.copy_(-torch.rand(d_sae, generator=g) * 0.3)
    return sae


@pytest.fixture(scope="module")
def setup(tiny_gpt2):
    sae = random_sae(tiny_gpt2.summary.d_model)
    tokens = corpus_contexts(tiny_gpt2.tokenizer, [TEXT] * 40, n_tokens=40 * 24, ctx_len=24)
    cfg = DashboardConfig(features=[0, 3, 5, 9, 17, 30], batch_size=7, n_top=6, n_quantiles=4, n_samples=3,
                          window_left=4, window_right=2, skip_first=1)
    res = feature_dashboards(tiny_gpt2, sae, cfg, tokens=tokens)
    # brute force: every activation at once, same positions
    f = sae.encode(acts_at_hook(tiny_gpt2, HOOK, tokens))[:, 1:, cfg.features]  # [N, L-1, F]
    return res, f.detach(), tokens, cfg, tiny_gpt2.tokenizer


def test_streaming_top_k_equals_brute_force(setup):
    res, f, tokens, cfg, tok = setup
    mx, arg = f.max(dim=1)  # [N, F] per-context maximum
    assert len(tokens) > cfg.batch_size * 2  # several batches were merged
    for j, fd in enumerate(res.features):
        v, c = mx[:, j].topk(cfg.n_top)
        want = [(float(a), int(b), int(arg[b, j]) + 1) for a, b in zip(v, c) if a > 0]
        got = [(e["value"], e["context"], e["position"]) for e in fd.top]
        assert [g[1:] for g in got] == [w[1:] for w in want]
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-6)
        for e in fd.top:  # the window shows the right tokens and activations around the maximum
            lo = e["position"] - e["centre"]
            ids = tokens[e["context"], lo: lo + len(e["tokens"])].tolist()
            assert e["tokens"] == [tok.decode([i]) for i in ids]
            assert e["acts"][e["centre"]] == pytest.approx(e["value"], abs=1e-6)
    assert any(len(fd.top) == cfg.n_top for fd in res.features)


def test_histogram_density_and_quantiles_agree_with_brute_force(setup):
    res, f, tokens, cfg, _ = setup
    n_tok = f.shape[0] * f.shape[1]
    assert res.n_tokens == n_tok
    edges = torch.tensor([hi for _, hi in res.hist_bins[1:-1]], dtype=torch.float64)
    for j, fd in enumerate(res.features):
        x = f[:, :, j].reshape(-1).double()
        assert sum(fd.hist) == n_tok
        assert fd.n_firing == int((x > 0).sum()) and fd.density == pytest.approx(float((x > 0).double().mean()))
        # independent binning: count per [lo, hi) interval
        want = [int((x <= 0).sum())] + [int(((x > 0) & (x < edges[0])).sum())]
        want += [int(((x >= a) & (x < b)).sum()) for a, b in zip(edges[:-1], edges[1:])]
        want += [int((x >= edges[-1]).sum())]
        # the pass runs in batches (float sums differ by ~1e-7 from this one big batch): values
        # that close to a bin edge may land on either side of it
        near = int(sum(((x - e).abs() < 1e-5 * e).sum() for e in edges))
        assert sum(abs(a - b) for a, b in zip(fd.hist, want)) <= 2 * near
        assert fd.max_act == pytest.approx(float(x.max()), abs=1e-6)
        assert sum(g["n_tokens"] for g in fd.quantiles) == fd.n_firing
        seen = set()
        for g in fd.quantiles:
            in_group = int(((x >= g["lo"] - 1e-6) & (x <= g["hi"] + 1e-6) & (x > 0)).sum())
            assert len(g["samples"]) == min(cfg.n_samples, g["n_tokens"]) and in_group >= g["n_tokens"]
            for s in g["samples"]:
                assert g["lo"] <= s["value"] <= g["hi"]
                assert float(f[s["context"], s["position"] - 1, j]) == pytest.approx(s["value"], abs=1e-6)
                seen.add((s["context"], s["position"]))
        assert len(seen) == sum(len(g["samples"]) for g in fd.quantiles)  # no token sampled twice


def test_stats_do_not_depend_on_batching():
    """Bottom-k samples and top-k merge exactly: feeding batch by batch == all at once."""
    g = torch.Generator().manual_seed(1)
    acts = torch.relu(torch.randn(30, 12, 5, generator=g) - 0.5) * torch.rand(5, generator=g) * 4
    tokens = torch.randint(0, 50, (30, 12), generator=g)
    cfg = StatsConfig(n_top=4, n_samples=2, window_left=2, window_right=1)
    a, b = FeatureStats(5, cfg), FeatureStats(5, cfg)
    a.update(tokens, acts)
    for i in range(0, 30, 4):
        b.update(tokens[i:i + 4], acts[i:i + 4])
    for j in range(5):
        assert a.top(j) == b.top(j)
        assert a.quantile_groups(j, 3) == b.quantile_groups(j, 3)
    assert torch.equal(a.hist, b.hist)


def test_quantile_samples_are_uniform_within_a_bin():
    """One bin, 10 tokens, 2 kept: over 400 identical features (independent keys) every token
    is kept ~20% of the time, whatever batch it arrived in."""
    F = 400
    acts = torch.zeros(10, 2, F)
    acts[:, 1, :] = 1.0  # every feature fires once per context, all in one histogram bin
    tokens = torch.arange(20).view(10, 2)
    st = FeatureStats(F, StatsConfig(n_samples=2, seed=0))
    for i in range(0, 10, 3):
        st.update(tokens[i:i + 3], acts[i:i + 3])
    hits = torch.zeros(10)
    for j in range(F):
        (grp,) = st.quantile_groups(j, 1)
        assert grp["n_tokens"] == 10 and len(grp["samples"]) == 2
        for s in grp["samples"]:
            hits[s["context"]] += 1
    freq = hits / F
    assert freq.sum() == pytest.approx(2.0) and (freq - 0.2).abs().max() < 0.08


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_output_logits_are_the_final_norms_linear_map(kind, request):
    """For a residual x whose centred part is orthogonal to d, the model's own final norm +
    unembedding moves the logits exactly along output_logits(d) (the norm's scale is then first
    order constant). The norm's weight is randomised for the test, so gamma matters."""
    model = request.getfixturevalue(f"tiny_{kind}")
    b = model.bridge
    norm = b.ln_final.original_component
    saved = norm.weight.detach().clone()
    try:
        with torch.no_grad():
            norm.weight.copy_(0.5 + torch.rand(saved.shape, generator=torch.Generator().manual_seed(0)))
        g = torch.Generator().manual_seed(2)
        d = torch.randn(model.summary.d_model, generator=g)
        x = torch.randn(model.summary.d_model, generator=g) * 3
        centre = kind == "gpt2"
        dc, xc = (d - d.mean(), x - x.mean()) if centre else (d, x)
        x = x - (xc @ dc) / (dc @ dc) * dc  # centred x orthogonal to centred d
        _, jd = torch.func.jvp(lambda v: b.unembed(b.ln_final(v[None, None]))[0, 0], (x,), (d,))
        ol = output_logits(model, d[None])[0]
        cos = torch.nn.functional.cosine_similarity(jd, ol, dim=0)
        assert float(cos.detach()) > 0.9999
        unweighted = (dc @ b.W_U).detach()  # without gamma: clearly different
        assert float(torch.nn.functional.cosine_similarity(jd.detach(), unweighted, dim=0)) < 0.99
    finally:
        with torch.no_grad():
            norm.weight.copy_(saved)


def test_result_round_trips_and_page_escapes_tokens(setup, tmp_path):
    from mechscope.report.dashboard import render_dashboard

    res, *_ = setup
    path = res.save(tmp_path)
    back = DashboardResult.load(tmp_path)
    assert back.to_dict() == res.to_dict() and json.loads(path.read_text())["schema_version"] == 1
    d = res.to_dict()
    fd = next(f for f in d["features"] if f["top"])
    fd["top"][0]["tokens"][0] = EVIL
    fd["logits_pos"][0] = [EVIL, 1.0]
    fd["quantiles"][-1]["samples"][0]["tokens"][0] = EVIL
    html = render_dashboard(d)
    assert "<script" not in html and html.count("&lt;script&gt;") >= 3
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in html
    for f in d["features"]:
        assert f'id="f{f["feature"]}"' in html


def test_parse_features():
    assert parse_features("0-3, 7,5", 10) == [0, 1, 2, 3, 5, 7]
    from mechscope.errors import MechscopeError

    for bad, why in (("3-1", "runs backwards"), ("a", "Cannot read 'a'"), ("0-10", "got 10 in"), ("", "names no feature"),
                     (" , ", "names no feature"), ("-1", "is negative"), ("2,-3", "is negative"), ("1-x", "Cannot read '1-x'")):
        with pytest.raises(MechscopeError, match=why):
            parse_features(bad, 10)


def test_cli_dashboard(tiny_gpt2, tiny_gpt2_dir, tmp_path):
    from mechscope.cli.main import app

    sae = random_sae(tiny_gpt2.summary.d_model, d_sae=32)
    sae.cfg.model_name = tiny_gpt2_dir
    save_sae(sae, tmp_path / "sae")
    corpus = tmp_path / "c.txt"
    corpus.write_text((TEXT + EVIL + "\n\n") * 30)
    out = tmp_path / "dash"
    r = CliRunner().invoke(app, ["sae", "dashboard", str(tmp_path / "sae"), "--features", "0-4,9", "--tokens", "600",
                                 "--ctx-len", "20", "--corpus", str(corpus), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["features"] == 6 and s["tokens"] == 30 * 19
    html = (out / "dashboard.html").read_text()
    assert "<script" not in html and "&lt;" in html
    assert DashboardResult.load(out).settings["features"] == [0, 1, 2, 3, 4, 9]
    from mechscope.server.runs import sae_source  # serve links the features to their unit pages by the SAE's folder
    assert DashboardResult.load(out).settings["sae_dir"] == str((tmp_path / "sae").resolve())
    assert sae_source(json.loads((out / "dashboard.json").read_text()), ["other", "sae"]) == "sae"
    bad = CliRunner().invoke(app, ["sae", "dashboard", str(tmp_path / "sae"), "--features", "0-40", "--corpus", str(corpus)])
    assert bad.exit_code == 2 and "0..31" in bad.output
