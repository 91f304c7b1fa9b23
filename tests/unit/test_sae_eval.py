"""SAE evaluation on a tiny model: exact SAEs recover everything, empty ones nothing, and the
statistics agree with a direct computation."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.sae import SAE, SAEConfig, check_sae_fits
from mechscope.sae.evaluate import evaluate_sae

HOOK = "blocks.1.hook_resid_pre"


def _tokens(n=6, L=12, vocab=500, seed=0):
    return torch.randint(1, vocab, (n, L), generator=torch.Generator().manual_seed(seed))


def _identity_sae(d: int) -> SAE:
    """ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: reconstructs any input exactly."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", hook_name=HOOK, model_name="tiny"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_exact_sae_recovers_all_and_empty_sae_nothing(tiny_gpt2):
    d = tiny_gpt2.summary.d_model
    toks = _tokens()
    r = evaluate_sae(tiny_gpt2, _identity_sae(d), toks, batch_size=4)
    assert r.fvu < 1e-10 and r.kl < 1e-8 and abs(r.ce_sae - r.ce_clean) < 1e-5
    assert r.ce_recovered == pytest.approx(1.0, abs=1e-4) and r.cos == pytest.approx(1.0, abs=1e-5)
    assert r.tokens == 6 * 11 and r.l0 == pytest.approx(d, abs=2.0)  # about half of 2d fire
    empty = _identity_sae(d)
    with torch.no_grad():
        empty.W_dec.zero_()
    r0 = evaluate_sae(tiny_gpt2, empty, toks, batch_size=4)
    assert r0.ce_sae == pytest.approx(r0.ce_zero, abs=1e-5) and r0.ce_recovered == pytest.approx(0.0, abs=1e-4)
    assert r0.fvu > 0.5


def test_statistics_match_a_direct_computation(tiny_llama):
    torch.manual_seed(1)
    d = tiny_llama.summary.d_model
    sae = SAE(SAEConfig(d_in=d, d_sae=3 * d, architecture="topk", k=5, hook_name=HOOK, model_name="tiny"))
    toks = _tokens(n=5, L=10)
    r = evaluate_sae(tiny_llama, sae, toks, batch_size=2)
    _, cache = tiny_llama.bridge.run_with_cache(toks, names_filter=[HOOK])
    x = cache[HOOK][:, 1:].reshape(-1, d)
    with torch.no_grad():
        f = sae.encode(x)
        err = ((sae.decode(f) - x) ** 2).sum(-1).mean()
        var = ((x - x.mean(0)) ** 2).sum(-1).mean()
        density = (f > 0).float().mean(0)
    assert r.l0 == pytest.approx(5.0)
    assert r.fvu == pytest.approx(float(err / var), rel=1e-4)
    assert r.dead_frac == pytest.approx(float((density == 0).float().mean()))
    assert sum(r.density_hist["counts"]) == 3 * d


def test_sae_for_another_model_or_hook_is_refused(tiny_gpt2):
    d = tiny_gpt2.summary.d_model
    with pytest.raises(MechscopeError, match="width 64"):
        check_sae_fits(SAE(SAEConfig(d_in=d + 1, d_sae=8, architecture="relu", hook_name=HOOK)), tiny_gpt2)
    with pytest.raises(MechscopeError, match="no hook named"):
        check_sae_fits(SAE(SAEConfig(d_in=d, d_sae=8, architecture="relu", hook_name="blocks.1.hook_resid_prex")), tiny_gpt2)


def test_sae_of_other_weights_is_refused_by_its_fingerprint(tiny_gpt2, tmp_path):
    from mechscope.sae import load_sae, save_sae

    d = tiny_gpt2.summary.d_model

    def sae(meta):
        return SAE(SAEConfig(d_in=d, d_sae=8, architecture="relu", hook_name=HOOK, model_name="other", metadata=meta))

    check_sae_fits(sae({"model_fingerprint": tiny_gpt2.fingerprint()}), tiny_gpt2)
    check_sae_fits(sae({}), tiny_gpt2)  # nothing recorded (SAELens's SAEs): width and hook only
    wrong = save_sae(sae({"model_fingerprint": "v1:0123456789abcdef"}), tmp_path / "wrong")
    with pytest.raises(MechscopeError, match="weights differ.*v1:0123456789abcdef"):
        check_sae_fits(load_sae(wrong), tiny_gpt2)


def test_ce_recovered_is_null_in_json_where_undefined():
    """(zero - sae) / (zero - clean) is where the spliced loss lies between the zeroed (0) and
    the clean (1) loss, also when zeroing lowers the loss; undefined (NaN) when they coincide,
    and NaN, which is not JSON, is written as null."""
    import json
    import math

    from mechscope.results import json_safe
    from mechscope.sae.evaluate import SAEEval, recovered

    assert recovered(6.0, 3.0, 2.0) == pytest.approx(0.75)
    assert recovered(6.22, 6.357, 6.357) == pytest.approx(1.0)  # zeroing helps a random model: still the position
    assert math.isnan(recovered(6.0, 6.0, 6.0)) and math.isnan(recovered(6.0, 5.0, 6.0))
    r = SAEEval(tokens=10, l0=1.0, mse=1.0, fvu=math.nan, cos=1.0, ce_clean=6.0, ce_sae=6.0, ce_zero=6.0,
                ce_recovered=recovered(6.0, 6.0, 6.0), kl=0.0, dead_frac=0.0, dense_frac=0.0)
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["ce_recovered"] is None and d["fvu"] is None and d["ce_zero"] == 6.0
    assert json_safe({"a": [1.0, math.inf, {"b": -math.inf}], "c": "x"}) == {"a": [1.0, None, {"b": None}], "c": "x"}
