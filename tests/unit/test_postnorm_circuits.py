"""Circuits on models with a norm after the attention (Gemma 2 and 3): each head's sender is
its share of that norm's output at its run's own scale (``models.norms.HeadShares``), so the
engine's identities hold exactly and gradient attribution is the derivative of edge patching.
A model whose heads' inputs are not separable (OLMo-2 normalises all heads' queries together)
is refused in one sentence."""

from __future__ import annotations

import pytest
import torch
from test_attribution import check_activation_ig_completeness, check_eap_against_finite_differences

from mechscope.errors import MechscopeError
from mechscope.graph import build_graph
from mechscope.models.hooks import attn_out, attn_result
from mechscope.models.norms import HeadShares, head_shares
from mechscope.patching import run_with_edge_mask, run_with_node_mask, source_activations
from mechscope.patching.engine import check_patching_exact
from mechscope.tasks.base import TaskBatch


def _batch(B=5, P=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randint(1, 512, s, generator=g)  # noqa: E731
    return TaskBatch(task="random", clean=r(B, P), corrupt=r(B, P), positions=torch.full((B, 1), P - 1),
                     answers=r(B, 1), wrongs=r(B, 1), lengths=torch.full((B,), P))


def test_head_shares_add_up_to_the_norm_output(tiny_gemma2):
    """The shares of one run sum to what the norm after the attention outputs; the gain is
    Gemma's 1 + w, and scaling every head's output leaves the shares unchanged (the scale is
    the run's own), which a share computed without the run's scale would not do."""
    m = tiny_gemma2
    shares = head_shares(m)
    assert all(isinstance(s, HeadShares) for s in shares)
    toks = torch.randint(1, 512, (2, 7), generator=torch.Generator().manual_seed(1))
    names = {n for l in range(m.summary.n_layers) for n in (attn_result(l), attn_out(l))}
    _, cache = m.bridge.run_with_cache(toks, names_filter=lambda n: n in names)
    for l, share in enumerate(shares):
        r = cache[attn_result(l)]
        got = share(r).sum(2)
        assert torch.allclose(got, cache[attn_out(l)], atol=1e-5), (l, (got - cache[attn_out(l)]).abs().max())
        assert torch.allclose(share(3.0 * r), share(r), atol=1e-4, rtol=1e-4), (share(3.0 * r) - share(r)).abs().max()
        assert not torch.allclose(share(r), r, atol=1e-2)


def test_gemma2_graph_patching_identities(tiny_gemma2):
    """Every edge patched gives the corrupt run, none the clean run; patching a node's
    out-edges equals patching the node, for heads of both layers and an MLP, with each ablation."""
    m = tiny_gemma2
    g = build_graph(m)
    check_patching_exact(m, g)
    b = _batch()
    with torch.no_grad():
        clean, corrupt = m(b.clean), m(b.corrupt)
        src = source_activations(m, g, b.clean, b.corrupt, "patching")
        assert torch.allclose(run_with_edge_mask(m, g, b.clean, src, g.full_mask()), corrupt, atol=1e-4)
        assert torch.allclose(run_with_edge_mask(m, g, b.clean, src, g.empty_mask()), clean, atol=1e-6)
        for ablation in ("patching", "mean", "zero"):
            src = source_activations(m, g, b.clean, b.corrupt, ablation, b.lengths)
            for names in (["a0.h1"], ["a2.h3", "a1.h0", "m1"], ["a1.h2"]):
                nodes = torch.zeros(g.n_senders)
                nodes[[g.sender_index(n) for n in names]] = 1.0
                by_node = run_with_node_mask(m, g, b.clean, src, nodes)
                by_edge = run_with_edge_mask(m, g, b.clean, src, g.node_mask(names))
                assert torch.allclose(by_node, by_edge, atol=1e-4), (ablation, names, (by_node - by_edge).abs().max())
                assert (by_node - clean).abs().max() > 1e-3  # the patch does something
            everything = run_with_node_mask(m, g, b.clean, src, torch.ones(g.n_senders))
            assert torch.allclose(everything, run_with_edge_mask(m, g, b.clean, src, g.full_mask()), atol=1e-4)


def test_gemma2_eap_equals_finite_difference_of_edge_mask(tiny_gemma2):
    """EAP's score is d metric / d mask[s, r] at mask = 0 also through the norm after attention."""
    m = tiny_gemma2
    g, b = build_graph(m), _batch()
    gen = torch.Generator().manual_seed(0)
    heads_out = [j for j in range(g.n_edges) if g.senders[int(g.edge_index[j][0])].startswith("a")]
    picks = [heads_out[i] for i in torch.randperm(len(heads_out), generator=gen)[:10].tolist()]
    check_eap_against_finite_differences(m, g, b, picks + torch.randperm(g.n_edges, generator=gen)[:6].tolist())


@pytest.mark.slow
def test_gemma2_eap_ig_activations_completeness(tiny_gemma2):
    """EAP-IG on activations interpolates the heads' shares along a straight line (through the
    norm's output), so each group's summed scores approach the effect of patching the group."""
    check_activation_ig_completeness(tiny_gemma2, build_graph(tiny_gemma2), _batch(B=4, P=8))


def test_olmo2_circuits_with_its_query_norm_across_heads(tmp_path, monkeypatch):
    """OLMo-2 normalises all heads' projected queries (keys) together, and its blocks have no
    input norm. An edge still changes one head's projection input alone; the joint norm spreads
    it to the other heads as the model does. So: the patching identities hold, EAP equals
    finite differences of the edge mask (the gradient at the pre-norm hook_q carries the joint
    norm), exact q/k scoring falls back in every layer and says so, and a run succeeds. The
    cross-head check itself still refuses coupling that no such norm explains (forced here)."""
    import transformers as T
    from conftest import save_scaled
    from typer.testing import CliRunner

    import mechscope.graph.graph as graph_mod
    from mechscope.circuits.attribution import edge_score_folds
    from mechscope.cli.main import app
    from mechscope.models import load_model
    from mechscope.progress import Recorder

    torch.manual_seed(0)
    cfg = T.Olmo2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=64, vocab_size=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    hf = T.Olmo2ForCausalLM(cfg)
    with torch.no_grad():  # distinct norm gains
        for p in hf.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    path = save_scaled(hf, tmp_path / "olmo2")
    m = load_model(path, device="cpu")
    g, b = build_graph(m), _batch(B=3, P=7)
    check_patching_exact(m, g)
    picks = torch.randperm(len(g.edge_index), generator=torch.Generator().manual_seed(0))[:40].tolist()
    check_eap_against_finite_differences(m, g, b, picks)
    info: dict = {}
    rec = Recorder()
    exact = edge_score_folds(m, g, b, method="eap", progress=rec, info=info)
    assert info["qk_fallback_layers"] == [0, 1] and any("plain gradient" in n for n in rec.notes)
    torch.testing.assert_close(exact, edge_score_folds(m, g, b, method="eap", qk="linear"))
    r = CliRunner().invoke(app, ["discover", "--model", path, "--task", "induction", "--n", "8", "--method", "eap",
                                 "--force", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output

    # The check still runs on OLMo-2, one step earlier: a head's projection must not move when
    # another head's input does (a leak from head 0's query projection into the others, forced
    # by a hook, is refused).
    m3 = load_model(path, device="cpu")

    def leak(x, hook):
        x = x.clone()
        x[:, :, 1:] += x[:, :, :1]
        return x

    m3.bridge.hook_dict["blocks.0.attn.hook_q"].add_hook(leak)
    assert "query" in graph_mod._norms_across_heads(m3)
    assert "moves the other heads" in (graph_mod._cross_head_inputs(m3, b.clean[:1]) or "")
    # Coupling no cross-head norm explains is still refused in one sentence, and an ACDC run
    # (which makes its folder early, for its checkpoint) leaves no empty folder behind.
    monkeypatch.setattr(graph_mod, "_norms_across_heads", lambda model: set())
    m2 = load_model(path, device="cpu")
    with pytest.raises(MechscopeError, match="moves the other heads' attention too"):
        build_graph(m2)
    out = tmp_path / "acdc-run"
    r = CliRunner().invoke(app, ["discover", "--model", path, "--task", "induction", "--n", "8", "--method", "acdc",
                                 "--out", str(out)])
    assert r.exit_code == 2 and "each head to read its own query" in r.output and "Traceback" not in r.output, r.output
    assert not out.exists()


@torch.no_grad()
def test_gemma2_suffix_runs_equal_full_runs_past_the_sliding_window(tiny_gemma2):
    """ACDC's suffix runs (blocks l.. from the cached clean residual) equal the whole patched
    model on Gemma 2, with prompts longer than its sliding window (local and global layers
    alternate by layer index) and heads read as shares."""
    from mechscope.patching import SuffixRunner, run_suffix_with_edge_mask, sender_activations

    m = tiny_gemma2
    g, b = build_graph(m), _batch(B=3, P=14)
    src = source_activations(m, g, b.clean, b.corrupt, "patching")
    keep = torch.tensor([3, 13])
    runner = SuffixRunner(m, b.clean, keep)
    assert runner.check(m.bridge(b.clean))
    clean_delta = sender_activations(m, g, b.clean) - src
    gen = torch.Generator().manual_seed(1)
    for start in range(g.n_layers + 1):
        masks = (torch.rand(2, g.n_senders, g.n_receivers, generator=gen) > 0.5).float()
        masks[:, :, : g.first_receiver(start)] = 0
        full = run_with_edge_mask(m, g, b.clean, src, masks)[:, :, keep]
        suffix = run_suffix_with_edge_mask(m, g, runner, src, clean_delta, masks, start)
        assert torch.allclose(suffix, full, atol=1e-4), (start, (suffix - full).abs().max())


@torch.no_grad()
def test_gemma3_text_model_gets_the_same_graph(tmp_path):
    """Gemma 3 (per-head query/key norms, norms after attention and MLP, local layers with a
    window shorter than the prompts): the graph is accepted, every edge patched is the corrupt
    run, a head's out-edges equal its node, suffix runs reproduce the model, and DLA adds up."""
    import transformers as T
    from conftest import save_scaled

    from mechscope.lens import run_lens
    from mechscope.models import load_model
    from mechscope.patching import SuffixRunner

    torch.manual_seed(0)
    cfg = T.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=4,
                             vocab_size=512, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    hf = T.Gemma3ForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    for p in hf.parameters():
        if p.dim() == 1:
            p.normal_(0.0, 0.3, generator=gen)
    m = load_model(save_scaled(hf, tmp_path / "g3"), device="cpu")
    g, b = build_graph(m), _batch(B=3, P=9)
    check_patching_exact(m, g)
    src = source_activations(m, g, b.clean, b.corrupt, "patching")
    assert torch.allclose(run_with_edge_mask(m, g, b.clean, src, g.full_mask()), m(b.corrupt), atol=1e-4)
    nodes = torch.zeros(g.n_senders)
    nodes[g.sender_index("a1.h2")] = 1.0
    assert torch.allclose(run_with_node_mask(m, g, b.clean, src, nodes),
                          run_with_edge_mask(m, g, b.clean, src, g.node_mask(["a1.h2"])), atol=1e-4)
    assert SuffixRunner(m, b.clean, torch.tensor([8])).check(m.bridge(b.clean))
    res = run_lens(m, "When Mary and John went to the store, John gave a drink to", target=" Mary", distractor=" John")
    assert res.dla.exact and abs(res.dla.actual) > 1e-3


@pytest.mark.parametrize("cap", [True, False])
def test_gemma2_exact_qk_effects_through_the_soft_cap(tiny_gemma2, cap, monkeypatch):
    """Gemma 2 soft-caps its attention scores (c * tanh(s / c), c = 2 here, tight enough to
    matter): exact q/k scoring reads the cap and its effects equal the patched head's output
    change; without the cap (the scorer made blind to it) the reconstruction fails its check
    and the layer falls back, rather than scoring wrongly."""
    import test_qk_exact

    if not cap:
        import mechscope.circuits.qk as qk

        monkeypatch.setattr(qk, "soft_cap", lambda s, c: s)
        with pytest.raises(AssertionError):  # the test's own "assert ex.verify(...)"
            test_qk_exact.test_exact_qk_effects_equal_patched_head_output(tiny_gemma2, "one row a block", monkeypatch)
        return
    test_qk_exact.test_exact_qk_effects_equal_patched_head_output(tiny_gemma2, "one row a block", monkeypatch)
    # 19 positions, longer than the sliding window of 8 (session 29: the window is read, not a fallback)
    test_qk_exact.test_exact_qk_effects_equal_patched_head_output(tiny_gemma2, "blocks", monkeypatch, layer=0)


def test_discover_runs_on_gemma2_and_records_the_reading(tiny_gemma2, tmp_path):
    """The main job on a Gemma 2 folder: exit 0, a circuit, and circuit.json says its heads are
    read as shares of the norm after attention; the saved result loads back."""
    import json

    from typer.testing import CliRunner

    from mechscope.circuits import CircuitResult
    from mechscope.cli.main import app

    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["discover", "--model", tiny_gemma2.summary.source, "--task", "induction", "--n", "8",
                                 "--method", "eap", "--force", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    saved = json.loads((out / "circuit.json").read_text())
    assert saved["model"]["heads_as_norm_shares"] is True and "parallel_blocks" not in saved["model"]
    assert CircuitResult.load(out).graph.n_edges == build_graph(tiny_gemma2).n_edges


def test_a_post_norm_of_unknown_form_is_refused_not_raised(tmp_path, monkeypatch):
    """A norm after attention whose epsilon mechscope cannot find: no shares (the heads read
    raw), so the graph is refused in one sentence and DLA says it does not add up, instead of a
    ValueError from inside the engine."""
    from conftest import _save_tiny

    import mechscope.models.norms as norms
    from mechscope.lens import run_lens
    from mechscope.models import load_model

    monkeypatch.setattr(norms, "norm_eps", lambda norm: None)
    m = load_model(_save_tiny("gemma2", tmp_path / "g2"), device="cpu")
    assert head_shares(m) == [None] * m.summary.n_layers
    with pytest.raises(MechscopeError, match="a norm after the attention"):
        build_graph(m)
    res = run_lens(m, "When Mary and John went to the store", target=" Mary", distractor=" John")
    assert not res.dla.exact and "do not add up" in res.dla.note()
