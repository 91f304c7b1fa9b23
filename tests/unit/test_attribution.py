"""EAP / EAP-IG / ACDC against independent computations through the patching engine."""

import pytest
import torch

from mechscope.circuits import acdc, edge_scores, node_scores
from mechscope.circuits.evaluate import Evaluator, cpr_cmd, faithfulness_curve, roc_auc
from mechscope.graph import build_graph
from mechscope.patching import run_with_edge_mask, source_activations
from mechscope.tasks.base import TaskBatch


def _batch(B=6, P=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randint(1, 512, s, generator=g)  # noqa: E731
    return TaskBatch(task="random", clean=r(B, P), corrupt=r(B, P), positions=torch.full((B, 1), P - 1),
                     answers=r(B, 1), wrongs=r(B, 1), lengths=torch.full((B,), P))


def check_eap_against_finite_differences(m, g, b: TaskBatch, picks: list[int]) -> None:
    """EAP's scores (pure gradient, q/k edges included) of the edges ``picks`` (indices into
    ``g.edge_index``) equal d metric / d mask[s, r] at mask = 0, by finite differences."""
    sc = edge_scores(m, g, b, method="eap", qk="linear")
    assert (sc[~g.allowed] == 0).all()
    src = source_activations(m, g, b.clean, b.corrupt, "patching")
    eps = 1e-3
    with torch.no_grad():
        base = b.metric(run_with_edge_mask(m, g, b.clean, src, g.empty_mask()))
        for j in picks:
            s, r = g.edge_index[j].tolist()
            mk = g.empty_mask()
            mk[s, r] = eps
            fd = (b.metric(run_with_edge_mask(m, g, b.clean, src, mk)) - base) / eps
            assert abs(fd - sc[s, r]) < 2e-3 + 0.02 * abs(fd), (g.edge_name(s, r), float(fd), float(sc[s, r]))


def check_activation_ig_completeness(m, g, b: TaskBatch, steps: int = 40):
    """EAP-IG on activations: each sender group's summed edge scores approach the effect of
    patching the whole group (integrated gradients' completeness). Returns the scores."""
    from mechscope.patching import run_with_node_mask
    from mechscope.patching.engine import sender_hooks

    sc = edge_scores(m, g, b, method="eap-ig-act", steps=steps)
    src = source_activations(m, g, b.clean, b.corrupt, "patching")
    with torch.no_grad():
        base = b.metric(run_with_node_mask(m, g, b.clean, src, torch.zeros(g.n_senders)))
        for _, sl in sender_hooks(g):
            nodes = torch.zeros(g.n_senders)
            nodes[sl] = 1.0
            effect = float(b.metric(run_with_node_mask(m, g, b.clean, src, nodes)) - base)
            total = float(sc[sl].sum())
            assert abs(total - effect) < 0.02 + 0.03 * abs(effect), (sl, total, effect)
    return sc


def test_eap_equals_finite_difference_of_edge_mask(tiny_model):
    """EAP's score is exactly d metric / d mask[s, r] at mask = 0 (the patching engine's (1)).

    Both norms (LayerNorm, RMSNorm) and GQA: the per-head input gradients are rebuilt from
    hook_q/k/v gradients through W and the norm's Jacobian, the patching runs use split inputs.
    """
    m, g, b = tiny_model, build_graph(tiny_model), _batch()
    check_eap_against_finite_differences(m, g, b, torch.randperm(g.n_edges, generator=torch.Generator().manual_seed(0))[:12].tolist())


def test_eap_ig_one_step_is_eap_and_batches_sum(tiny_gpt2):
    m, g, b = tiny_gpt2, build_graph(tiny_gpt2), _batch(B=5)
    eap = edge_scores(m, g, b, method="eap", batch_size=2)
    assert torch.allclose(edge_scores(m, g, b, method="eap-ig", steps=1, batch_size=5), eap, atol=1e-5)
    ig = edge_scores(m, g, b, method="eap-ig", steps=4)
    assert not torch.allclose(ig, eap)
    assert (ig[~g.allowed] == 0).all()
    assert torch.allclose(node_scores(g, ig), ig.sum(1))


@pytest.mark.slow
def test_ig_scores_track_true_patching_effects(tiny_llama):
    """Spearman-free check: the top-scored edges have larger true effects than random edges."""
    m, g, b = tiny_llama, build_graph(tiny_llama), _batch(seed=3)
    ig = edge_scores(m, g, b, method="eap-ig", steps=8)
    src = source_activations(m, g, b.clean, b.corrupt, "patching")
    order = ig.abs()[g.edge_index[:, 0], g.edge_index[:, 1]].argsort(descending=True)
    with torch.no_grad():
        base = b.metric(run_with_edge_mask(m, g, b.clean, src, g.empty_mask()))

        def effect(j):
            s, r = g.edge_index[j].tolist()
            return abs(b.metric(run_with_edge_mask(m, g, b.clean, src, g.mask_from_edges([(g.senders[s], g.receivers[r])]))) - base)

        top = sum(effect(j) for j in order[:5].tolist())
        bottom = sum(effect(j) for j in order[-40:-35].tolist())
    assert top > 5 * bottom


def test_curve_ends_at_one_and_cpr(tiny_llama):
    m, g, b = tiny_llama, build_graph(tiny_llama), _batch()
    ev = Evaluator(m, g, b)
    sc = edge_scores(m, g, b, method="eap")
    curve = faithfulness_curve(ev, sc, [5, 50, g.n_edges])
    assert abs(curve[-1]["faithfulness"] - 1) < 1e-4 and abs(curve[-1]["random"] - 1) < 1e-4
    cpr, cmd = cpr_cmd(curve)
    fs = [c["faithfulness"] for c in curve]
    assert min(fs) - 1e-6 <= cpr <= max(fs) + 1e-6  # an average of the curve
    if max(fs) <= 1 + 1e-6:
        assert abs(cpr + cmd - 1) < 1e-5  # then |1 - f| = 1 - f
    # independent trapezoid on the same points
    xs = [c["fraction"] for c in curve]
    area = sum((xs[i + 1] - xs[i]) * (fs[i] + fs[i + 1]) / 2 for i in range(len(xs) - 1))
    assert abs(cpr - area / (xs[-1] - xs[0])) < 1e-6


@pytest.mark.slow
def test_acdc_full_tau_zero_keeps_everything_that_matters(tiny_gpt2):
    m, g, b = tiny_gpt2, build_graph(tiny_gpt2), _batch(B=4, P=8)
    res = acdc(m, g, b, tau=-1.0)  # nothing can be removed when every removal must lower KL by 1
    assert res.circuit.sum() == g.n_edges
    res_big = acdc(m, g, b, tau=1e9)  # everything removable
    assert res_big.circuit.sum() == 0


@pytest.mark.slow
def test_acdc_batched_equals_sequential(tiny_llama):
    m, g, b = tiny_llama, build_graph(tiny_llama), _batch(B=4, P=8)
    a = acdc(m, g, b, tau=0.02, k_batch=1, suffix=False)
    c = acdc(m, g, b, tau=0.02, k_batch=8)  # speculative batches and suffix runs
    assert torch.equal(a.circuit, c.circuit)
    assert torch.allclose(a.scores, c.scores, atol=1e-5)
    assert 0 < int(a.circuit.sum()) < g.n_edges
    assert c.n_forward < a.n_forward  # suffix runs count their share of the blocks


def test_roc_auc_independent():
    s = torch.tensor([0.9, 0.8, 0.1, 0.4, 0.3])
    y = torch.tensor([1, 0, 1, 0, 0]).bool()
    allowed = torch.ones(5, dtype=torch.bool)
    # pairs (pos, neg): 0.9 beats all 3 negatives, 0.1 beats none -> 3/6
    assert abs(roc_auc(s, y, allowed) - 0.5) < 1e-9
    assert roc_auc(s, torch.tensor([1, 1, 0, 0, 0]).bool(), allowed) == 1.0


@pytest.mark.slow
def test_acdc_resumes_from_checkpoint(tiny_llama, tmp_path):
    """A run stopped early and resumed from its checkpoint equals an uninterrupted run."""
    m, g, b = tiny_llama, build_graph(tiny_llama), _batch(B=4, P=8)
    full = acdc(m, g, b, tau=0.02)
    ck = tmp_path / "acdc.safetensors"
    part = acdc(m, g, b, tau=0.02, checkpoint=ck, max_seconds=0.0)
    assert not part.complete and ck.is_file() and part.seconds_before == 0.0
    from safetensors import safe_open

    with safe_open(str(ck), "pt") as f:
        spent = float(f.metadata()["seconds"])
    resumed = acdc(m, g, b, tau=0.02, checkpoint=ck)
    assert resumed.complete and torch.equal(resumed.circuit, full.circuit)
    assert resumed.seconds_before == spent > 0  # the earlier run's pruning time, for discover's total
    import pytest

    from mechscope.errors import MechscopeError

    with pytest.raises(MechscopeError, match="other settings"):
        acdc(m, g, b, tau=0.5, checkpoint=ck)


def test_head_input_grads_match_autograd(tiny_model):
    """The fused per-head input gradients (norm scale folded into W, closed-form RMS / layer
    norm Jacobian) equal autograd's through the real norm module, with random norm weights;
    a norm of no known form falls back to torch.func and is still exact."""
    import copy

    from mechscope.circuits.attribution import HeadInputGrads
    from mechscope.patching.engine import attn_weights

    norm = copy.deepcopy(tiny_model.bridge.blocks[0].ln1.original_component)  # leave the fixture alone
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(torch.randn_like(norm.bias))
    W = {k: v.detach().clone() for k, v in attn_weights(tiny_model, 0).items()}

    class Odd(torch.nn.Module):  # neither RMS nor layer norm
        def forward(self, x):
            return x / (x.abs().amax(-1, keepdim=True) + 1.0)

    for module, kind in ((norm, {"rms", "ln"}), (Odd(), {"other"})):
        hig = HeadInputGrads(module, W)
        assert hig.kind in kind
        x = torch.randn(2, 3, 64) * 2
        gs = [torch.randn(2, 3, W[k].shape[0], W[k].shape[2]) for k in ("W_Q", "W_K", "W_V")]
        got = hig(x, *gs)
        i = 0
        for k, g in zip(("W_Q", "W_K", "W_V"), gs):
            for h in range(W[k].shape[0]):
                xx = x.clone().requires_grad_(True)
                ((module(xx) @ W[k][h]) * g[:, :, h]).sum().backward()
                assert torch.allclose(got[i], xx.grad, atol=1e-5), (k, h)
                i += 1


def test_head_input_grads_sum_over_steps(tiny_model, tiny_llama):
    """Several passes accumulated in head space and flushed once equal the sum of autograd's
    per-pass gradients, for layer norm (GPT-2) and RMS norm (Llama), whether the projection
    outputs passed in are affine in the normalised input (biases: the offset path) or not
    (then they must be ignored)."""
    import copy

    from mechscope.circuits.attribution import HeadInputGrads
    from mechscope.patching.engine import attn_weights

    torch.manual_seed(0)
    for model in (tiny_model, tiny_llama):
        norm = copy.deepcopy(model.bridge.blocks[0].ln1.original_component)
        with torch.no_grad():
            norm.weight.copy_(torch.randn_like(norm.weight))
        W = {k: v.detach().clone() for k, v in attn_weights(model, 0).items()}
        d = W["W_Q"].shape[1]
        bias = {k: torch.randn(W[k].shape[0], W[k].shape[2]) for k in ("W_Q", "W_K", "W_V")}
        for affine in (True, False):
            hig = HeadInputGrads(norm, W)
            want = 0.0
            for _ in range(3):
                x = torch.randn(2, 3, d) * 2
                gs = [torch.randn(2, 3, W[k].shape[0], W[k].shape[2]) for k in ("W_Q", "W_K", "W_V")]
                with torch.no_grad():
                    outs = [torch.einsum("bpd,hde->bphe", norm(x), W[k]) + bias[k] for k in ("W_Q", "W_K", "W_V")]
                if not affine:
                    outs = [o + torch.randn_like(o) for o in outs]
                hig.step(x, *gs, outs=tuple(outs))
                rows = []
                for k, g in zip(("W_Q", "W_K", "W_V"), gs):
                    for h in range(W[k].shape[0]):
                        xx = x.clone().requires_grad_(True)
                        ((norm(xx) @ W[k][h]) * g[:, :, h]).sum().backward()
                        rows.append(xx.grad.reshape(-1))
                want = want + torch.stack(rows)
            got = torch.zeros_like(want)
            hig.flush(got)
            assert hig.offset is not None and (hig.offset is not False) == affine
            assert torch.allclose(got, want, atol=1e-4), (model.summary.name, affine, (got - want).abs().max())


@pytest.mark.slow
def test_eap_ig_activations_completeness_per_sender_group(tiny_model):
    """IG on activations integrates along each sender group's own path, so a group's summed
    edge scores approach the effect of patching that whole group (integrated gradients'
    completeness); one step is EAP's gradient restricted to the group's edges."""

    m, g, b = tiny_model, build_graph(tiny_model), _batch(B=4, P=8)
    check_activation_ig_completeness(m, g, b)
    eap = edge_scores(m, g, b, method="eap", qk="linear")  # eap-ig-act keeps gradients for q/k edges
    one = edge_scores(m, g, b, method="eap-ig-act", steps=1)
    assert torch.allclose(one, eap, atol=1e-4)  # alpha = 1 only: the clean run's gradient for every group


def test_edge_scores_of_a_float64_model_equal_float32(tiny_llama_dir, tiny_llama):
    """A model loaded in float64 is scored (the per-head input gradients mixed float32 and
    float64 weights and crashed) and agrees with the float32 model's scores."""
    from mechscope.models import load_model

    m64 = load_model(tiny_llama_dir, device="cpu", dtype=torch.float64)
    b = _batch(B=3, P=8)
    for method in ("eap", "eap-ig"):
        s64 = edge_scores(m64, build_graph(m64), b, method=method, steps=2)
        s32 = edge_scores(tiny_llama, build_graph(tiny_llama), b, method=method, steps=2)
        assert torch.allclose(s64.float(), s32, atol=1e-4, rtol=1e-3), (method, (s64.float() - s32).abs().max())
