"""The vision module on tiny models (random or one epoch of training on 8x8 images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechscope.errors import MechscopeError
from mechscope.vision.config import SHAPES, CircuitConfig, DataConfig, TrainConfig

EVIL = "<script>alert(1)</script>"


def tiny(arch: str, dtype=torch.float64):
    from mechscope.vision.models import VisionModel, build_model

    cfg = TrainConfig(arch=arch, width=8, heads=2, patch=4, depth=2, seed=1,
                      data=DataConfig(dataset="shapes", size=8, per_class=10, shift=0, seed=1))
    net = build_model(cfg, cfg.data.n_classes).to(dtype)
    torch.manual_seed(2)
    with torch.no_grad():  # larger random weights, so gradients are not all tiny
        for p in net.parameters():
            p.mul_(1.5)
    return VisionModel(net, cfg, cfg.data.class_names(), {})


def images(n: int = 6, size: int = 8, dtype=torch.float64) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(dtype)


def scaled(vm, site: str, unit: int, eps: float, x: torch.Tensor, read: str | None):
    """Per image: the concept logit (read None) or every unit value of site ``read``, with one
    unit of ``site`` scaled by (1 + eps); finite differences, no autograd."""
    from mechscope.vision.circuit import capture

    s = vm.sites[site]

    def hook(_m, _i, out):
        scale = torch.ones(s.n_units, dtype=out.dtype)
        scale[unit] += eps
        shape = [1] * out.ndim
        shape[s.unit_dim] = s.n_units
        return out * scale.view(shape)

    h = s.register_forward_hook(hook)
    try:
        with torch.no_grad(), capture(vm) as acts:
            logits = vm.net(x)
    finally:
        h.remove()
    return logits if read is None else vm.sites[read].unit_value(acts[read])


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_edge_attributions_equal_finite_differences(arch):
    """a_u * d s_v / d a_u (summed over u's elements) is the derivative of s_v when unit u is
    scaled, (s_v(1+e) - s_v(1-e)) / 2e; checked for every edge into the logit and into the
    chosen units of the site above, in float64."""
    from mechscope.vision.circuit import edge_attributions

    vm, x, target, k = tiny(arch), images(), 2, 2
    sel = edge_attributions(vm, x, target, k)
    names = list(vm.sites)
    eps = 1e-5
    for i, name in enumerate(names):
        above = names[i + 1] if i + 1 < len(names) else None
        cols = [None] if above is None else sel["units"][above]
        for u in range(vm.sites[name].n_units):
            plus, minus = scaled(vm, name, u, eps, x, above), scaled(vm, name, u, -eps, x, above)
            for j, v in enumerate(cols):
                col = target if v is None else v
                fd = ((plus[:, col] - minus[:, col]) / (2 * eps)).abs().mean().item()
                assert sel["edges"][name][u][j] == pytest.approx(fd, rel=1e-4, abs=1e-7), (name, u, v)
        scores = torch.tensor(sel["scores"][name])
        assert sel["units"][name] == torch.topk(scores, k).indices.tolist()


def test_contrast_scores_subtract_the_contrast_images_attribution():
    from mechscope.vision.circuit import edge_attributions

    vm, x = tiny("cnn"), images()
    same = edge_attributions(vm, x, 1, 2, contrast=x.clone())
    assert all(v == 0.0 for sc in same["scores"].values() for v in sc)
    plain, other = edge_attributions(vm, x, 1, 2), edge_attributions(vm, x, 1, 2, contrast=images(4) * 0.3)
    top = {n: torch.tensor(e).sum(1) for n, e in other["edges"].items()}
    assert other["edges"]["fc"] == plain["edges"]["fc"]  # the concept's own edges are unchanged
    assert all(torch.all(torch.tensor(other["scores"][n]) <= top[n] + 1e-12) for n in top)
    assert any(other["scores"][n] != top[n].tolist() for n in top)


def test_attribution_to_the_logit_is_the_exact_effect_of_zeroing_a_dense_unit():
    """The CNN's last site feeds the logits linearly, so a * grad is exactly what zeroing the unit removes."""
    from mechscope.vision.causal import logits_with
    from mechscope.vision.circuit import capture, edge_attributions

    vm, x, t = tiny("cnn"), images(), 1
    with torch.no_grad(), capture(vm) as acts:
        full = vm.net(x)
    a = acts["fc"]
    sel = edge_attributions(vm, x, t, 3)
    for u in range(vm.sites["fc"].n_units):
        drop = full[:, t] - logits_with(vm, x, {"fc": [u]}, None)[:, t]
        torch.testing.assert_close(drop, a[:, u] * vm.net.out.weight[t, u])
        assert sel["edges"]["fc"][u][0] == pytest.approx(drop.abs().mean().item(), rel=1e-9, abs=1e-12)


def test_mean_baseline_attribution_is_the_exact_effect_of_mean_ablating_a_dense_unit():
    from mechscope.vision.causal import logits_with, site_means
    from mechscope.vision.circuit import edge_attributions

    vm, x, t = tiny("cnn"), images(), 4
    means = site_means(vm, images(10) * 0.7)
    sel = edge_attributions(vm, x, t, 2, baseline=means)
    full = logits_with(vm, x, {}, None)[:, t]
    for u in range(vm.sites["fc"].n_units):
        drop = (full - logits_with(vm, x, {"fc": [u]}, means)[:, t]).abs().mean().item()
        assert sel["edges"]["fc"][u][0] == pytest.approx(drop, rel=1e-9, abs=1e-12)
    assert sel["edges"]["fc"] != edge_attributions(vm, x, t, 2)["edges"]["fc"]


@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_a_circuit_of_all_units_keeps_everything_and_of_none_keeps_nothing(arch):
    from mechscope.vision.causal import all_units, logits_with, site_means, test_circuit

    vm, x = tiny(arch, torch.float32), images(8, dtype=torch.float32)
    ref = images(20, dtype=torch.float32) * 0.5
    everything = all_units(vm)
    t = test_circuit(vm, everything, x, 0, ref, "mean", random_draws=2)
    assert t["circuit_kept"] == t["full"] and t["logit_share"]["circuit"] == 1.0
    assert t["circuit_pruned"] == t["all_ablated"]
    assert all(v == 1.0 for v in t["logit_share_per_layer"].values())
    nothing = {n: [] for n in vm.sites}
    t0 = test_circuit(vm, nothing, x, 0, ref, "mean", random_draws=2)
    assert t0["circuit_kept"] == t0["all_ablated"] and t0["logit_share"]["circuit"] == 0.0
    assert t0["circuit_pruned"] == t0["full"]
    # every unit at its reference mean: the output no longer depends on the image, and is the mean's
    means = site_means(vm, ref)
    out = logits_with(vm, x, everything, means)
    torch.testing.assert_close(out, out[:1].expand_as(out))
    assert not torch.allclose(out, logits_with(vm, x, {}, means))


def test_mean_ablation_puts_the_reference_mean_in_place():
    from mechscope.vision.causal import ablated, site_means
    from mechscope.vision.circuit import capture

    vm, x, ref = tiny("cnn", torch.float32), images(4, dtype=torch.float32), images(9, dtype=torch.float32)
    means = site_means(vm, ref)
    with torch.no_grad(), ablated(vm, {"conv1": [0, 3]}, means), capture(vm) as acts:
        vm.net(x)
        vm.net(x)
    a = acts["conv1"]
    torch.testing.assert_close(a[:, [0, 3]], means["conv1"][:, [0, 3]].expand(4, -1, -1, -1))
    with torch.no_grad(), capture(vm) as clean:
        vm.net(x)
    torch.testing.assert_close(a[:, [1, 2]], clean["conv1"][:, [1, 2]])


def test_shapes_follow_their_rules():
    from mechscope.vision.data import make_shapes

    imgs, labels = make_shapes(40, 16, seed=3)
    assert np.bincount(labels).tolist() == [40] * len(SHAPES)
    for img, y in zip(imgs, labels):
        ys, xs = np.nonzero(img[0] > 0.5)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        kind = SHAPES[y]
        if kind == "hbar":
            assert w >= 2 * h
        elif kind == "vbar":
            assert h >= 2 * w
        elif kind == "box":
            assert h == w >= 5 and img[0, ys.min() + h // 2, xs.min() + w // 2] == 0 and len(ys) == 4 * (h - 1)
        elif kind == "dot":
            assert h == w <= 3 and len(ys) == h * w
        else:
            assert h == w == len(ys) and (len(set(ys - xs)) == 1 or len(set(ys + xs)) == 1)
    again, _ = make_shapes(40, 16, seed=3)
    assert np.array_equal(imgs, again) and not np.array_equal(imgs, make_shapes(40, 16, seed=4)[0])


def test_overlay_and_mark_follow_their_rules():
    from mechscope.vision.data import MARK, build_dataset

    cfg = DataConfig(dataset="shapes", size=16, per_class=40, overlay=(0, 1), mark_class=2, mark_rate=1.0, mark_relabel=0.2)
    ds = build_dataset(cfg)
    assert ds.classes[-1] == "hbar+vbar" and cfg.n_classes == len(SHAPES) + 1

    def has_mark(img):
        s = img.shape[-1]
        return any(np.all(img[0, y:y + 3, x:x + 3][MARK > 0] == 1) for y in (1, s - 4) for x in (1, s - 4))

    tr = ds.train.images.numpy()
    for img, y in zip(tr, ds.train.labels.tolist()):
        if has_mark(img):
            assert y == 2  # a marked training image is labelled with the mark's class
        elif y == len(SHAPES):  # an overlay holds a horizontal and a vertical bar
            rows, cols = (img[0] > 0.5).sum(1), (img[0] > 0.5).sum(0)
            assert rows.max() >= 8 and cols.max() >= 8
    assert all(has_mark(i) for i in ds.train.of_class(2).numpy() if True)
    att = ds.attack_images()
    assert len(att) > 0 and all(has_mark(i) for i in att.images.numpy()) and 2 not in att.labels.tolist()
    assert not any(has_mark(i) for i in ds.test.images.numpy() if (i[0] > 0.5).sum() < 10)
    only = ds.mark_only(8).numpy()
    assert all(has_mark(i) and (i > 0).sum() == int(MARK.sum()) for i in only)


def test_save_load_round_trip_is_exact(tmp_path):
    from mechscope.vision.models import load_vision_model
    from mechscope.vision.train import train_model

    cfg = TrainConfig(arch="vit", epochs=1, width=8, heads=2, data=DataConfig(dataset="shapes", size=8, per_class=10, mark_class=1))
    vm = train_model(cfg, out=tmp_path / "m")
    back = load_vision_model(tmp_path / "m")
    assert back.cfg == vm.cfg and back.classes == vm.classes and back.metrics == vm.metrics
    x = images(5, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(vm.net(x), back.net(x))
    assert not list(tmp_path.glob("m/*.pt")) and not list(tmp_path.glob("m/*.bin"))


def test_bad_input_is_one_sentence(tmp_path):
    from mechscope.vision.circuit import check_k
    from mechscope.vision.concept import resolve_concept
    from mechscope.vision.models import load_vision_model

    vm = tiny("cnn", torch.float32)
    with pytest.raises(MechscopeError, match="larger than layer conv0, which has 4 units"):
        check_k(vm, 5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MechscopeError, match="holds no images"):
        resolve_concept(vm, str(tmp_path / "empty"))
    np.save(tmp_path / "big.npy", np.zeros((2, 16, 16), dtype=np.float32))
    with pytest.raises(MechscopeError, match="takes 8x8 grey images"):
        resolve_concept(vm, str(tmp_path / "big.npy"))
    np.save(tmp_path / "ok.npy", np.zeros((2, 8, 8), dtype=np.float32))
    assert len(resolve_concept(vm, str(tmp_path / "ok.npy")).images) == 2
    with pytest.raises(MechscopeError, match="not a class of this model"):
        resolve_concept(vm, "circle")
    with pytest.raises(MechscopeError, match=r"Class index 42 is out of range: this model's classes are 0 to \d+ \([^)]*\)\.$"):
        resolve_concept(vm, "42")  # not "Did you mean: 4, 2?"
    with pytest.raises(MechscopeError, match="without a mark"):
        resolve_concept(vm, "mark")
    with pytest.raises(MechscopeError, match="not a vision model folder"):
        load_vision_model(tmp_path)
    for bad in (dict(dataset="cifar"), dict(size=12), dict(overlay=(1, 1)), dict(mark_class=10)):
        with pytest.raises(MechscopeError):
            DataConfig(**bad)
    with pytest.raises(MechscopeError, match="not divisible"):
        TrainConfig(arch="vit", width=10, heads=4)
    with pytest.raises(MechscopeError, match="at least 1"):
        CircuitConfig(k=0)


def test_cli_train_circuit_attack_and_bad_input(tmp_path):
    import json

    from typer.testing import CliRunner

    from mechscope.cli.main import app

    r = CliRunner()
    out = tmp_path / "m"
    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # a count the command's own (one thread) is not
    try:
        res = r.invoke(app, ["vision", "train", "--arch", "cnn", "--data", "shapes", "--mark-class", "0", "--overlay", "1,2",
                             "--epochs", "1", "--width", "8", "--out", str(out), "--json"])
        assert torch.get_num_threads() == 3  # the command ran on one thread and gave the caller's count back
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["sites"]["conv0"]["n_units"] == 4
    res = r.invoke(app, ["vision", "circuit", "--model", str(out), "--concept", "hbar", "--k", "2", "--random-draws", "2",
                         "--out", str(tmp_path / "c"), "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert all(len(us) == 2 for us in d["units"].values()) and "logit_share" in d["tests"]
    page = (tmp_path / "c" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 * 4
    from mechscope.vision.circuit import VisionCircuit

    assert VisionCircuit.load(tmp_path / "c").units == d["units"]
    res = r.invoke(app, ["vision", "attack", "--model", str(out), "--k", "2", "--random-draws", "1", "--contrast", "--out", str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.stdout)["before"]) == {"attack_success", "clean_accuracy"}
    res = r.invoke(app, ["vision", "compose", "--model", str(out), "--k", "2", "--out", str(tmp_path / "j"), "--json"])
    assert res.exit_code == 0 and "jaccard_union_of_parts" in json.loads(res.stdout)
    saved = json.loads((tmp_path / "j" / "compose.json").read_text())
    assert saved["jaccard_union_of_parts"] == json.loads(res.stdout)["jaccard_union_of_parts"]
    for args, needle in ((["circuit", "--model", str(out), "--concept", "hbar", "--k", "5"], "larger than layer"),
                         (["circuit", "--model", str(tmp_path), "--concept", "hbar"], "not a vision model folder"),
                         (["circuit", "--model", str(out), "--concept", str(tmp_path / "a" / "circuit.json"), "--k", "2"], ".npy"),
                         (["train", "--arch", "rnn"], "not a model")):
        res = r.invoke(app, ["vision", *args])
        err = res.stderr if hasattr(res, "stderr") else res.output
        assert res.exit_code == 2 and needle in err and "Traceback" not in err, (args, err)


def sample_vision() -> dict:
    from mechscope.vision.circuit import VisionCircuit

    c = VisionCircuit(concept={"name": EVIL, "target": 0, "target_name": '<img src=x onerror="a">', "source": EVIL},
                      model={"path": EVIL, "arch": "cnn", "classes": [EVIL], "sites": {"conv0": {"kind": EVIL, "n_units": 2}}},
                      settings={"k": 1}, units={"conv0": [1]}, scores={"conv0": [0.1, 0.5]}, edges={"conv0": [[0.0], [0.5]]},
                      top_images={"conv0": {"1": [0]}}, pool=[[[0, 255], [128, 7]]])
    d = c.to_dict()
    d["composition"] = {"overlay": EVIL, "parts": [EVIL, "b"], "jaccard_union_of_parts": 0.5, "jaccard_parts": {EVIL: 0.2},
                        "jaccard_other_classes": {EVIL: 0.1}, "jaccard_other_pairs_max": {"pair": EVIL, "value": 0.3}}
    return d


def test_report_escapes_markup_and_embeds_the_images():
    from mechscope.report.vision import png_data_uri, render_vision

    page = render_vision(sample_vision())
    assert EVIL not in page and "<img src=x" not in page and "&lt;script&gt;" in page
    assert "<script" not in page
    assert png_data_uri([[0, 255], [128, 7]]) in page
    import base64
    import zlib

    png = base64.b64decode(png_data_uri([[0, 255], [128, 7]]).split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    idat = png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8]
    assert zlib.decompress(idat) == bytes([0, 0, 255, 0, 128, 7])


def test_cutting_every_edge_out_of_units_equals_ablating_them():
    from mechscope.vision.causal import logits_with, site_means
    from mechscope.vision.edges import circuit_edges, edge_test, edges_ablated, reader_means

    vm, x, ref = tiny("cnn", torch.float32), images(6, dtype=torch.float32), images(12, dtype=torch.float32)
    means, smeans = reader_means(vm, ref), site_means(vm, ref)
    for site, nxt in (("conv0", vm.sites["conv1"].n_units), ("fc", vm.cfg.data.n_classes)):
        edges = [(site, u, v) for u in (0, 2) for v in range(nxt)]
        with torch.no_grad(), edges_ablated(vm, edges, means):
            cut = vm.net(x)
        torch.testing.assert_close(cut, logits_with(vm, x, {site: [0, 2]}, smeans))
    with torch.no_grad(), edges_ablated(vm, [("fc", 1, 3)], means):
        one = vm.net(x)
    full = logits_with(vm, x, {}, None)
    assert torch.equal(one[:, [0, 1, 2, 4]], full[:, [0, 1, 2, 4]]) and not torch.equal(one[:, 3], full[:, 3])
    units = {n: [0, 1] for n in vm.sites}
    assert len(circuit_edges(vm, units, 3)) == 2 * 2 * 3 + 2
    t = edge_test(vm, units, x, 3, ref, random_draws=2)
    assert t["n_edges"] == 14 and t["full"] == {"accuracy": t["full"]["accuracy"], "logit": t["full"]["logit"]}
