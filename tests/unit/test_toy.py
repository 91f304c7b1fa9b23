"""The hand-built induction toy (mechscope.circuits.toy): behaviour, attention patterns and
faithfulness of the planted circuit, all through mechscope's real loader and patching engine."""

from __future__ import annotations

import pytest
import torch

from mechscope.circuits.toy import induction_task, planted_edges, save_induction_toy
from mechscope.graph import build_graph
from mechscope.models import load_model
from mechscope.patching.engine import run_with_edge_mask, source_activations

SEQ_LEN = 10


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = save_induction_toy(tmp_path_factory.mktemp("induction_toy"))
    return load_model(path, device="cpu")


@pytest.fixture(scope="module")
def task(toy):
    return induction_task(toy.tokenizer, n=8, seq_len=SEQ_LEN, seed=0)


@pytest.fixture(scope="module")
def metrics(toy, task):
    with torch.no_grad():
        clean_logits, corrupt_logits = toy(task.clean), toy(task.corrupt)
    return clean_logits, corrupt_logits, task.metric(clean_logits).item(), task.metric(corrupt_logits).item()


def test_tokenizer_and_shapes(toy):
    tok = toy.tokenizer
    assert tok("t3 t7 t1")["input_ids"] == [4, 8, 2]
    assert tok.bos_token == tok.eos_token == tok.pad_token == "<bos>"
    assert tok.bos_token_id == 0
    s = toy.summary
    assert (s.n_layers, s.n_heads, s.d_vocab, s.n_ctx) == (2, 4, 64, 64)


def test_task_layout(task):
    assert task.clean.shape == (8, 2 * SEQ_LEN + 1)
    assert (task.clean[:, 0] == 0).all()
    r = task.clean[:, 1 : SEQ_LEN + 1]
    assert torch.equal(task.clean[:, SEQ_LEN + 1 :], r)
    assert torch.equal(task.corrupt[:, : SEQ_LEN + 1], task.clean[:, : SEQ_LEN + 1])
    # the token after each scored position is its answer
    b = torch.arange(8)[:, None]
    assert torch.equal(task.clean[b, task.positions + 1], task.answers)
    assert task.positions.shape == (8, SEQ_LEN - 1)


def test_predicts_repeated_tokens(task, metrics):
    clean_logits, corrupt_logits, clean, corrupt = metrics
    assert task.accuracy(clean_logits) >= 0.9
    assert task.accuracy(corrupt_logits) <= 0.1
    assert clean > -0.1  # log p(answer) ~ 0
    assert clean - corrupt > 2.5  # corrupt ~ chance, log(1/64) ~ -4.2


@pytest.fixture(scope="module")
def cache(toy, task):
    with torch.no_grad():
        return toy.bridge.run_with_cache(task.clean)[1]


def test_attention_patterns(task, cache):
    p0 = cache["blocks.0.attn.hook_pattern"]  # [batch, head, q, k]
    p1 = cache["blocks.1.attn.hook_pattern"]
    i = torch.arange(1, task.n_pos)
    assert p0[:, 0, i, i - 1].min() > 0.9  # previous-token head
    q = task.positions[0]
    k = q - SEQ_LEN + 1  # the token after the earlier occurrence of the current token
    assert p1[:, 0, q, k].min() > 0.9  # induction head


def test_inert_components(cache):
    for l in range(2):
        assert cache[f"blocks.{l}.hook_mlp_out"].abs().max() == 0
        assert cache[f"blocks.{l}.attn.hook_result"][:, :, 1:].abs().max() == 0  # heads 1..3


def _faithfulness(toy, graph, task, source, masks, clean, corrupt) -> list[float]:
    """(patched - corrupt) / (clean - corrupt) for each mask, all masks in one forward pass."""
    with torch.no_grad():
        logits = run_with_edge_mask(toy, graph, task.clean, source, torch.stack(masks))
    return [(task.metric(lg).item() - corrupt) / (clean - corrupt) for lg in logits]


def test_planted_circuit_is_faithful(toy, task, metrics):
    *_, clean, corrupt = metrics
    graph = build_graph(toy)
    src = source_activations(toy, graph, task.clean, task.corrupt, "patching")
    planted = graph.mask_from_edges(planted_edges())
    # With this corruption (first half shared) the query and output edges carry the effect;
    # the direct path does not matter (why input->logits is not planted).
    singles = [("input", "a1.h0<q>"), ("a1.h0", "logits"), ("input", "logits")]
    only, rest, q, out, direct = _faithfulness(
        toy, graph, task, src,
        [planted, graph.full_mask() - planted] + [graph.mask_from_edges([e]) for e in singles],
        clean, corrupt,
    )
    assert only < 0.1  # patching the circuit alone destroys the behaviour
    assert rest >= 0.9  # patching everything else keeps it
    assert q < 0.1 and out < 0.1
    assert direct > 0.99


def test_mean_ablation_sees_key_and_value_edges(toy, task, metrics):
    *_, clean, corrupt = metrics
    graph = build_graph(toy)
    src = source_activations(toy, graph, task.clean, None, "mean", task.lengths)
    edges = [("a0.h0", "a1.kv0<k>"), ("input", "a1.kv0<v>"), ("input", "a0.kv0<v>")]
    rest = graph.full_mask() - graph.mask_from_edges(planted_edges())
    *singles, kept = _faithfulness(
        toy, graph, task, src, [graph.mask_from_edges([e]) for e in edges] + [rest], clean, corrupt
    )
    assert max(singles) < 0.6
    assert kept >= 0.9
