"""``evaluate_transcoders``' fast path (each layer's runs start at its block, replaying the
recorded block calls) gives the numbers of the straightforward full forward passes, and its
confidence half-widths are the delta-method ones of the per-context losses."""

from __future__ import annotations

import math

import torch

from mechscope.features.evaluate import _BlockReplay, _ce, _recovered_ci95, evaluate_transcoders
from mechscope.features.transcoder_set import random_transcoders


def _tokens(model, n_ctx: int = 5, ctx_len: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.tokenizer.vocab_size if hasattr(model.tokenizer, "vocab_size") else 100, (n_ctx, ctx_len), generator=g)


def _close(a, b, tol=1e-5):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            if k != "fast":
                _close(a[k], b[k], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, tol)
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol * max(1.0, abs(b)), (a, b)
    else:
        assert a == b


def test_fast_eval_equals_full_passes(tiny_model):
    """Every number, per layer and for all layers spliced, within 1e-5 of the full-pass path,
    for a whole (skip) set and for some layers only; the fast path was really taken."""
    from mechscope.activations import special_token_ids

    tset = random_transcoders(tiny_model, d_sae=40, k=5, seed=3, skip=True, scale=2.0)
    toks = _tokens(tiny_model)
    toks[:, 6] = special_token_ids(tiny_model.tokenizer)[0]  # mid-context separators: the masked path too
    fast = evaluate_transcoders(tiny_model, tset, toks, batch_size=2)  # three batches, the last short
    slow = evaluate_transcoders(tiny_model, tset, toks, batch_size=2, fast=False)
    assert fast["settings"]["fast"] is True and slow["settings"]["fast"] is False
    assert fast["settings"]["special_positions"] >= toks.shape[0]
    _close(fast, slow)
    assert abs(fast["all_layers"]["ce_spliced"] - fast["ce_clean"]) > 1e-3  # the splice changed something
    some = {layer: tset.layers[layer] for layer in range(1, len(tset.layers))}
    _close(evaluate_transcoders(tiny_model, some, toks[:3], batch_size=3),
           evaluate_transcoders(tiny_model, some, toks[:3], batch_size=3, fast=False))


def test_replay_from_any_block_gives_the_models_logits(tiny_model):
    """With no hooks, entering block l with the recorded residual reproduces the clean logits."""
    from mechscope.models.load import plain_attention

    toks = _tokens(tiny_model, n_ctx=2)
    rep = _BlockReplay(tiny_model.bridge)
    with torch.no_grad(), plain_attention(tiny_model):
        with rep.record():
            clean = tiny_model.bridge(toks)
        for layer in range(len(rep.blocks)):
            assert torch.allclose(rep.logits(layer, []), clean, atol=1e-5)
            assert torch.allclose(rep.logits(layer, []), clean, atol=1e-5)  # replaying again changes nothing (no KV cache kept)


def test_ci95_is_the_delta_method_of_per_context_sums(tiny_llama):
    """The all-layers half-width equals the ratio estimator's delta-method half-width computed
    here from per-context losses of direct hooked runs; it is NaN for one context."""
    tset = random_transcoders(tiny_llama, d_sae=40, k=5, seed=4, scale=2.0)
    toks = _tokens(tiny_llama, n_ctx=6)
    r = evaluate_transcoders(tiny_llama, tset, toks, batch_size=4, exclude_special=False, sink_ratio=None)  # the hand runs splice everything

    def zero_all(t, hook):
        t = t.clone()
        t[:, 1:] = 0
        return t

    with torch.no_grad():
        c = _ce(tiny_llama.bridge(toks), toks).sum(1).double()
        z = _ce(tiny_llama.bridge.run_with_hooks(toks, fwd_hooks=[(tc.cfg.hook_name_out, zero_all) for tc in tset.layers]), toks).sum(1).double()
    # the spliced per-context losses: recovered from the evaluation's own mean is not enough, so use layer 0 alone
    one = evaluate_transcoders(tiny_llama, {0: tset.layers[0]}, toks, batch_size=4, exclude_special=False, sink_ratio=None)
    with torch.no_grad():
        y_hat = {}

        def grab(t, hook):
            y_hat["x"] = t[:, 1:]

        def put(t, hook):
            t = t.clone()
            tc = tset.layers[0]
            t[:, 1:] = tc.decode(tc.encode(y_hat["x"]), y_hat["x"])
            return t

        s0 = _ce(tiny_llama.bridge.run_with_hooks(toks, fwd_hooks=[(tset.layers[0].cfg.hook_name, grab), (tset.layers[0].cfg.hook_name_out, put)]), toks).sum(1).double()
        z0 = _ce(tiny_llama.bridge.run_with_hooks(toks, fwd_hooks=[(tset.layers[0].cfg.hook_name_out, zero_all)]), toks).sum(1).double()
    a, b = z0 - s0, z0 - c
    ratio = a.sum() / b.sum()
    n = len(a)
    want = 1.96 * math.sqrt(n / (n - 1) * float((a - ratio * b).pow(2).sum()) / float(b.sum()) ** 2)
    assert abs(one["layers"][0]["ce_recovered_ci95"] - want) < 1e-4 * max(1.0, want)
    assert abs(one["layers"][0]["ce_recovered"] - float(ratio)) < 1e-4
    assert r["all_layers"]["ce_recovered_ci95"] > 0 and abs(float(z.mean()) * n / (n * (toks.shape[1] - 1)) - r["all_layers"]["ce_zero"]) < 1e-4
    assert math.isnan(_recovered_ci95([1.0], [0.5], [0.2]))
