"""Graph layout: counts, causal order, masks and pruning."""

import pytest
import torch

from mechscope.circuits.select import prune, top_k
from mechscope.errors import MechscopeError
from mechscope.graph import Graph


def brute_edge_count(L, H, KV):
    n = 0
    for l in range(L):
        up = 1 + l * (H + 1)
        n += up * (H + 2 * KV) + (up + H)
    return n + 1 + L * (H + 1)


@pytest.mark.parametrize("L,H,KV", [(2, 4, 4), (3, 4, 2), (30, 9, 3)])
def test_edge_count(L, H, KV):
    g = Graph(L, H, KV)
    assert g.n_edges == brute_edge_count(L, H, KV)
    assert g.n_senders == 1 + L * (H + 1)
    assert g.n_receivers == L * (H + 2 * KV + 1) + 1


def test_causal_order():
    g = Graph(3, 4, 2)
    a = g.allowed
    assert a[g.sender_index("a1.h0"), g.receiver_index("m1")]  # head feeds its own layer's MLP
    assert not a[g.sender_index("a1.h0"), g.receiver_index("a1.h2<q>")]  # not its own layer's heads
    assert not a[g.sender_index("m1"), g.receiver_index("a1.kv0<k>")]
    assert a[g.sender_index("m1"), g.receiver_index("a2.kv1<v>")]
    assert a[:, g.logits_receiver].all()


def test_unknown_node_suggests():
    g = Graph(3, 4, 2)
    with pytest.raises(MechscopeError, match="Did you mean"):
        g.sender_index("a1.h9")


def test_bad_shape_is_error():
    with pytest.raises(MechscopeError):
        Graph(2, 4, 3)


def test_prune_keeps_only_connected_paths():
    g = Graph(3, 4, 2)
    keep = g.mask_from_edges([
        ("input", "a0.h1<q>"), ("a0.h1", "a2.kv0<k>"), ("a2.h1", "logits"),  # a2.h1 is in kv group 0
        ("a1.h3", "m2"),  # m2 has no path to logits
        ("m0", "logits"),  # m0 is never reached from input
    ]).bool()
    p = prune(g, keep)
    names = {g.edge_name(s, r) for s, r in p.nonzero().tolist()}
    assert names == {"input->a0.h1<q>", "a0.h1->a2.kv0<k>", "a2.h1->logits"}


def test_top_k_counts():
    g = Graph(2, 4, 4)
    s = torch.randn(g.n_senders, g.n_receivers)
    assert int(top_k(g, s, 17).sum()) == 17
    with pytest.raises(MechscopeError, match="graph has"):
        top_k(g, s, g.n_edges + 1)


def test_node_names_round_trip():
    from mechscope.graph.names import Node, attn_receiver, kv_group, parse_node

    g = Graph(3, 4, 2)
    for name in g.senders + g.receivers:
        n = parse_node(name)
        assert n.kind in ("input", "head", "mlp", "kv", "logits"), name
    assert parse_node("a12.h3") == Node("head", 12, 3, None)
    assert parse_node("a5.h3<q>") == Node("head", 5, 3, "q")
    assert parse_node("a5.kv1<k>") == Node("kv", 5, 1, "k")
    assert parse_node("a5.kv1") == Node("kv", 5, 1, None) and kv_group(5, 1) == "a5.kv1"
    assert parse_node("m7") == Node("mlp", 7) and parse_node("input") == Node("input")
    assert parse_node("logits") == Node("logits")
    assert [attn_receiver(2, 1, p) for p in "qkv"] == ["a2.h1<q>", "a2.kv1<k>", "a2.kv1<v>"]
    for bad in ("a1.h2<k>", "a1.kv0<q>", "a1h2", "m", "x3", "a1.h2 ", "blocks.1.hook_z"):
        with pytest.raises(MechscopeError, match="not a graph node name"):
            parse_node(bad)
