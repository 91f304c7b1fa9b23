"""The patching engine: properties a wrong implementation would break, on GPT-2 and GQA Llama."""

from types import SimpleNamespace

import torch

from mechscope.graph import build_graph
from mechscope.models.hooks import UNEMBED_IN
from mechscope.patching import logits_at, run_with_edge_mask, run_with_node_mask, source_activations

TOL = 1e-4  # float32 re-association across ~10 additions of O(1) activations


def _tokens(seed=0, B=3, P=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 512, (B, P), generator=g), torch.randint(1, 512, (B, P), generator=g)


@torch.no_grad()
def test_nothing_patched_equals_clean(tiny_model):
    g = build_graph(tiny_model)
    clean, corrupt = _tokens()
    src = source_activations(tiny_model, g, clean, corrupt, "patching")
    out = run_with_edge_mask(tiny_model, g, clean, src, g.empty_mask())
    assert torch.allclose(out, tiny_model(clean), atol=TOL)


@torch.no_grad()
def test_self_patch_equals_clean(tiny_model):
    g = build_graph(tiny_model)
    clean, _ = _tokens()
    src = source_activations(tiny_model, g, clean, clean, "patching")
    out = run_with_edge_mask(tiny_model, g, clean, src, g.full_mask())
    assert torch.allclose(out, tiny_model(clean), atol=TOL)


@torch.no_grad()
def test_all_edges_patched_reproduces_corrupt(tiny_model):
    g = build_graph(tiny_model)
    clean, corrupt = _tokens()
    src = source_activations(tiny_model, g, clean, corrupt, "patching")
    out = run_with_edge_mask(tiny_model, g, clean, src, g.full_mask())
    ref = tiny_model(corrupt)
    assert (tiny_model(clean) - ref).abs().max() > 0.1  # the two runs really differ
    assert torch.allclose(out, ref, atol=TOL)


@torch.no_grad()
def test_node_and_edge_patching_agree(tiny_model):
    g = build_graph(tiny_model)
    clean, corrupt = _tokens(1)
    src = source_activations(tiny_model, g, clean, corrupt, "patching")
    for nodes in (["a0.h1", "m0"], ["a1.h3"], ["input"]):
        nm = torch.zeros(g.n_senders)
        nm[[g.sender_index(n) for n in nodes]] = 1
        a = run_with_node_mask(tiny_model, g, clean, src, nm)
        b = run_with_edge_mask(tiny_model, g, clean, src, g.node_mask(nodes))
        assert (a - tiny_model(clean)).abs().max() > 1e-3
        assert torch.allclose(a, b, atol=TOL)


@torch.no_grad()
def test_single_edge_matches_manual_hook(tiny_llama):
    """Patching a0.h1 -> logits only equals adding (src - live) of that head at ln_final's input."""
    m, g = tiny_llama, build_graph(tiny_llama)
    clean, corrupt = _tokens(2)
    src = source_activations(m, g, clean, corrupt, "patching")
    _, cache = m.bridge.run_with_cache(clean)
    live = cache["blocks.0.attn.hook_result"][:, :, 1]
    patched = src[g.sender_index("a0.h1")]

    def hook(x, hook):
        return x - live + patched

    ref = m.bridge.run_with_hooks(clean, fwd_hooks=[("ln_final.hook_in", hook)])
    out = run_with_edge_mask(m, g, clean, src, g.mask_from_edges([("a0.h1", "logits")]))
    assert torch.allclose(out, ref, atol=TOL)


@torch.no_grad()
def test_batched_masks_equal_one_by_one(tiny_llama):
    m, g = tiny_llama, build_graph(tiny_llama)
    clean, corrupt = _tokens(3)
    src = source_activations(m, g, clean, corrupt, "patching")
    gen = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, g.n_senders, g.n_receivers, generator=gen) > 0.7).float()
    stacked = run_with_edge_mask(m, g, clean, src, masks)
    for k in range(3):
        assert torch.allclose(stacked[k], run_with_edge_mask(m, g, clean, src, masks[k]), atol=TOL)


@torch.no_grad()
def test_logits_at_positions_equal_the_full_run_there(tiny_model):
    """Stacked masks with per-example positions: the unembedding at those rows only gives the
    full run's logits there; and so does a model without the unembedding hook (picked after)."""
    m, g = tiny_model, build_graph(tiny_model)
    clean, corrupt = _tokens(4)
    src = source_activations(m, g, clean, corrupt, "patching")
    gen = torch.Generator().manual_seed(1)
    masks = (torch.rand(2, g.n_senders, g.n_receivers, generator=gen) > 0.5).float()
    pos = torch.tensor([[8, 3], [0, 5], [7, 7]])
    full = run_with_edge_mask(m, g, clean, src, masks)  # [2, B, P, V]
    at = run_with_edge_mask(m, g, clean, src, masks, positions=pos)  # [2, B, 2, V]
    rows = torch.arange(3)[:, None]
    assert at.shape == (2, 3, 2, full.shape[-1])
    for k in range(2):
        assert torch.allclose(at[k], full[k][rows, pos], atol=TOL)
    seen = []
    out = logits_at(m, clean, pos, [(UNEMBED_IN, lambda x, hook: seen.append(x.shape) or x)])
    assert seen[0][1] == clean.shape[1] and out.shape[1] == 2  # the caller's hook sees every row; ours runs after
    assert torch.allclose(out, m(clean)[rows, pos], atol=TOL)
    no_hook = SimpleNamespace(bridge=SimpleNamespace(hook_dict={}, run_with_hooks=m.bridge.run_with_hooks))
    assert torch.allclose(logits_at(no_hook, clean, pos, []), out, atol=TOL)


@torch.no_grad()
def test_mean_and_zero_sources(tiny_gpt2):
    m, g = tiny_gpt2, build_graph(tiny_gpt2)
    clean, _ = _tokens(4)
    mean = source_activations(m, g, clean, None, "mean")
    assert mean.shape == (g.n_senders, 1, clean.shape[1], 64)
    full = source_activations(m, g, clean, clean, "patching")
    assert torch.allclose(mean[:, 0], full.mean(1), atol=1e-5)
    zero = source_activations(m, g, clean, None, "zero")
    out = run_with_node_mask(m, g, clean, zero, torch.ones(g.n_senders))
    # every sender zeroed: the residual stream holds only constants (biases), same at every row
    assert torch.allclose(out[0], out[1], atol=1e-4)


@torch.no_grad()
def test_suffix_run_equals_full_run(tiny_model):
    """Running blocks l.. from the cached clean residual equals the whole patched model, when
    every patched edge ends at layer l or above (the ACDC situation), at every l."""
    from mechscope.patching import SuffixRunner, run_suffix_with_edge_mask, sender_activations

    m, g = tiny_model, build_graph(tiny_model)
    clean, corrupt = _tokens(5)
    src = source_activations(m, g, clean, corrupt, "patching")
    keep = torch.tensor([2, 8])
    runner = SuffixRunner(m, clean, keep)
    assert runner.check(m.bridge(clean))
    clean_delta = sender_activations(m, g, clean) - src
    gen = torch.Generator().manual_seed(1)
    for start in range(g.n_layers + 1):
        masks = (torch.rand(2, g.n_senders, g.n_receivers, generator=gen) > 0.5).float()
        masks[:, :, : g.first_receiver(start)] = 0
        full = run_with_edge_mask(m, g, clean, src, masks)[:, :, keep]
        suffix = run_suffix_with_edge_mask(m, g, runner, src, clean_delta, masks, start)
        assert torch.allclose(suffix, full, atol=TOL), start
    masks[:, 0, 0] = 1.0  # an edge into layer 0 cannot be evaluated from a later layer
    import pytest

    from mechscope.errors import MechscopeError

    with pytest.raises(MechscopeError, match="below"):
        run_suffix_with_edge_mask(m, g, runner, src, clean_delta, masks, 1)


def test_patching_runs_outside_no_grad(tiny_llama):
    """The README calls the engine without torch.no_grad(); its in-place corrections used to
    fail there ("functions with out=... arguments don't support automatic differentiation")."""
    m, g = tiny_llama, build_graph(tiny_llama)
    clean, corrupt = _tokens(5)
    assert torch.is_grad_enabled()
    src = source_activations(m, g, clean, corrupt, "patching")
    out = run_with_edge_mask(m, g, clean, src, g.mask_from_edges([("a0.h1", "logits")]))
    nm = torch.zeros(g.n_senders)
    nm[g.sender_index("m0")] = 1
    node = run_with_node_mask(m, g, clean, src, nm)
    with torch.no_grad():
        assert torch.allclose(out, run_with_edge_mask(m, g, clean, src, g.mask_from_edges([("a0.h1", "logits")])), atol=TOL)
        assert torch.allclose(node, run_with_node_mask(m, g, clean, src, nm), atol=TOL)


def test_interchange_bad_inputs_get_one_sentence(tiny_gpt2):
    import pytest

    from mechscope.errors import MechscopeError
    from mechscope.patching import Site, interchange_accuracy, patched_logits

    base, source = _tokens(B=2, P=6)
    expected = torch.tensor([3, 4])
    long_b, long_s = _tokens(B=2, P=70)  # tiny GPT-2 has 64 learned positions
    with pytest.raises(MechscopeError, match="70 tokens, more than the model's context of 64"):
        interchange_accuracy(tiny_gpt2, long_b, long_s, expected)
    with pytest.raises(MechscopeError, match="70 tokens, more than the model's context of 64"):
        patched_logits(tiny_gpt2, long_b, long_s, Site("blocks.0.hook_resid_pre"))
    with pytest.raises(MechscopeError, match="not \\[batch, position, ...\\]"):
        interchange_accuracy(tiny_gpt2, base, source, expected, sites=[Site("blocks.0.attn.hook_pattern")])
    with pytest.raises(MechscopeError, match="not \\[batch, position, ...\\]"):
        patched_logits(tiny_gpt2, base, source, Site("blocks.0.attn.hook_pattern"))
    with pytest.raises(MechscopeError, match="Positions must be integers"):
        interchange_accuracy(tiny_gpt2, base, source, expected, positions=[1.5])
    with pytest.raises(MechscopeError, match="expected must be a torch tensor of 2 token ids.*got list"):
        interchange_accuracy(tiny_gpt2, base, source, [3, 4])
    ok = interchange_accuracy(tiny_gpt2, base, source, expected, positions=[torch.tensor(1), -1],
                              sites=[Site("blocks.0.hook_resid_pre")])
    assert ok.positions == [1, 5]
