"""EAP / EAP-IG over the ViT's graph: the edge forward is the model's forward, patching every
edge gives the corrupt run, scores are first-order patching effects, and the language tools'
faithfulness and selection run on it unchanged."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.vision.config import DataConfig, TrainConfig
from mechscope.vision.eap import EdgeViT, ImagePairs, ViTEvaluator, edge_scores


def tiny_vit(dtype=torch.float64):
    from mechscope.vision.models import VisionModel, build_model

    cfg = TrainConfig(arch="vit", width=8, heads=2, patch=4, depth=2, seed=1,
                      data=DataConfig(dataset="shapes", size=8, per_class=10, shift=0, seed=1))
    net = build_model(cfg, cfg.data.n_classes).to(dtype)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    return VisionModel(net, cfg, cfg.data.class_names(), {})


def imgs(n, seed, dtype=torch.float64):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(dtype)


def test_edge_forward_is_the_model_and_patching_everything_is_the_corrupt_run():
    vm = tiny_vit()
    ev = EdgeViT(vm)
    clean, corrupt = imgs(5, 0), imgs(5, 1)
    with torch.no_grad():
        logits, outs = ev.run(clean)
        assert torch.allclose(logits, vm.net(clean), atol=1e-10)
        _, corr = ev.run(corrupt)
        every = ev.graph.allowed.double()
        patched, _ = ev.run(clean, patch=every, corrupt=corr)
        assert torch.allclose(patched, vm.net(corrupt), atol=1e-10)
        nothing, _ = ev.run(clean, patch=torch.zeros_like(every), corrupt=corr)
        assert torch.allclose(nothing, logits, atol=1e-12)
    assert outs.shape[0] == ev.graph.n_senders


def test_eap_scores_are_single_edge_patching_effects_to_first_order():
    vm = tiny_vit()
    ev = EdgeViT(vm)
    clean = imgs(4, 0)
    corrupt = clean + 1e-4 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(3), dtype=clean.dtype)
    pairs = ImagePairs(clean, corrupt, 0, 1)
    scores = edge_scores(ev, pairs, "eap")
    g = ev.graph
    with torch.no_grad():
        _, corr = ev.run(corrupt)
        base = ev.run(clean)[0]
    m0 = (base[:, 0] - base[:, 1]).mean()
    rs = g.receiver_slices(1)
    picks = [(0, g.receiver_slices(0)["q"].start), (3, rs["q"].start + 1), (1, rs["k"].start + 1), (g.mlp_sender(0), rs["v"].start), (2, rs["mlp"].start),
             (g.mlp_sender(1), g.logits_receiver), (1, g.logits_receiver)]
    for s, r in picks:
        patch = torch.zeros(g.n_senders, g.n_receivers, dtype=torch.float64)
        patch[s, r] = 1
        with torch.no_grad():
            lg, _ = ev.run(clean, patch=patch, corrupt=corr)
        actual = float((lg[:, 0] - lg[:, 1]).mean() - m0)
        assert actual != 0.0
        assert float(scores[s, r]) == pytest.approx(actual, rel=2e-2, abs=1e-12), (g.senders[s], g.receivers[r])
    assert float(scores[~g.allowed].abs().max()) == 0.0


def test_faithfulness_of_all_edges_is_one_and_of_none_is_zero():
    vm = tiny_vit()
    ev = EdgeViT(vm)
    pairs = ImagePairs(imgs(6, 0), imgs(6, 1), 0, 2)
    fe = ViTEvaluator(ev, pairs)
    g = ev.graph
    f = fe.faithfulness(torch.stack([g.allowed, torch.zeros_like(g.allowed)]))
    assert f.tolist() == pytest.approx([1.0, 0.0], abs=1e-9)
    iv = fe.faithfulness_interval(g.allowed, n_boot=50)
    assert iv["faithfulness"] == pytest.approx(1.0, abs=1e-9)


def test_eap_ig_moves_the_input_from_corrupt_to_clean():
    vm = tiny_vit()
    ev = EdgeViT(vm)
    pairs = ImagePairs(imgs(4, 0), imgs(4, 1), 0, 1)
    one = edge_scores(ev, pairs, "eap-ig", steps=1)
    assert torch.allclose(one, edge_scores(ev, pairs, "eap"))  # one step at alpha = 1 is EAP
    five = edge_scores(ev, pairs, "eap-ig", steps=5)
    assert not torch.allclose(five, one)


def test_bad_input_is_one_sentence():
    from tests.unit.test_vision import tiny

    with pytest.raises(MechscopeError, match="needs a ViT"):
        EdgeViT(tiny("cnn"))
    ev = EdgeViT(tiny_vit())
    pairs = ImagePairs(imgs(2, 0), imgs(2, 1), 0, 1)
    with pytest.raises(MechscopeError, match="unknown method"):
        edge_scores(ev, pairs, "acdc")  # type: ignore[arg-type]
    with pytest.raises(MechscopeError, match="between 1 and 200"):
        edge_scores(ev, pairs, "eap-ig", steps=0)
    with pytest.raises(MechscopeError, match="between 1 and 200.*got 1000000"):
        edge_scores(ev, pairs, "eap-ig", steps=1_000_000)


def test_cli_eap_writes_its_files_and_refuses_bad_input(tmp_path):
    import json

    from typer.testing import CliRunner

    from mechscope.cli.main import app
    from mechscope.report.vision_eap import render_vision_eap

    r = CliRunner()
    vit, cnn = tmp_path / "vit", tmp_path / "cnn"
    for arch, out in (("vit", vit), ("cnn", cnn)):
        res = r.invoke(app, ["vision", "train", "--arch", arch, "--data", "shapes", "--epochs", "2", "--width", "8",
                             *(["--heads", "2"] if arch == "vit" else []), "--out", str(out), "--json"])
        assert res.exit_code == 0, res.output
    res = r.invoke(app, ["vision", "eap", "--model", str(vit), "--clean", "dot", "--corrupt", "vbar", "--n", "12",
                         "--out", str(tmp_path / "e"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert json.loads((tmp_path / "e" / "eap.json").read_text())["chosen"] == d["chosen"]
    assert d["curve"][-1]["faithfulness"] == pytest.approx(1.0, abs=1e-5)  # every edge kept
    assert d["n_edges"] == d["curve"][-1]["n_edges"] and d["n_pairs"]["fit"] == 12
    assert d["top_edges"] and all(e["sender"] and e["receiver"] for e in d["top_edges"])
    assert ("note" in d) == (min(d["n_pairs"].values()) < 12)
    res = r.invoke(app, ["vision", "eap", "--model", str(vit), "--clean", "dot", "--corrupt", "vbar", "--n", "100000",
                         "--steps", "1", "--out", str(tmp_path / "e2"), "--json"])
    assert res.exit_code == 0, res.output
    many = json.loads(res.stdout)  # more pairs asked for than the images give: every one used, and said
    assert max(many["n_pairs"].values()) < 100000 and f"{many['n_pairs']['held_out']} held-out" in many["note"]
    assert json.loads((tmp_path / "e2" / "eap.json").read_text())["note"] == many["note"]  # the saved result says it too
    page = (tmp_path / "e" / "report.html").read_text()
    assert "Faithfulness by circuit size" in page and "<svg" in page
    d["clean_class"] = "<script>alert(1)</script>"
    assert "<script>alert(1)" not in render_vision_eap(d)
    for args, needle in ((["--model", str(cnn), "--clean", "hbar", "--corrupt", "vbar"], "needs a ViT"),
                         (["--model", str(vit), "--clean", "hbar", "--corrupt", "hbar"], "same class"),
                         (["--model", str(vit), "--clean", "hbar", "--corrupt", "zebra"], "not a class"),
                         (["--model", str(vit), "--clean", "hbar", "--corrupt", "vbar", "--method", "acdc"], "unknown method"),
                         (["--model", str(vit), "--clean", "hbar", "--corrupt", "vbar", "--n", "1"], "at least 2")):
        res = r.invoke(app, ["vision", "eap", *args, "--out", str(tmp_path / "bad")])
        err = res.stderr if hasattr(res, "stderr") else res.output
        assert res.exit_code == 2 and needle in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "bad").exists()
