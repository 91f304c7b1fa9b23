"""Bad vision input found by a tester, each one sentence now: unreadable or non-numeric concept
files (a traceback, a bare "Aborted." or a ComplexWarning before), pixel values no image holds
or read on the wrong scale (per file, from max > 1, before), EAP on a class the model classifies
at chance (a faithfulness result before), and an --overlay example the shapes data lacks."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.errors import MechscopeError
from mechscope.vision.concept import read_image_folder
from mechscope.vision.config import DataConfig, TrainConfig, parse_pair

S = 8


def random_model(arch: str, tmp_path, name: str = "m"):
    """An untrained tiny model on 8x8 shapes, saved to ``tmp_path / name`` (random: at chance on most classes)."""
    from mechscope.vision.models import VisionModel, build_model

    cfg = TrainConfig(arch=arch, width=8, heads=2, seed=1, data=DataConfig(dataset="shapes", size=S, per_class=10, shift=0))
    torch.manual_seed(0)
    vm = VisionModel(build_model(cfg, cfg.data.n_classes), cfg, cfg.data.class_names(), {})
    vm.save(tmp_path / name)
    return vm, tmp_path / name


def refused(res, *needles: str) -> str:
    err = res.stderr if hasattr(res, "stderr") else res.output
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "Traceback" not in err and "Aborted" not in err, err
    assert all(n in err for n in needles), err
    return err


def folder(tmp_path, **files):
    d = tmp_path / "imgs"
    d.mkdir(exist_ok=True)
    for old in d.glob("*.npy"):
        old.unlink()
    for name, a in files.items():
        np.save(d / f"{name}.npy", a)
    return d


# 1. unreadable or non-real-numeric files


def test_an_empty_npy_file_is_one_sentence_not_aborted(tmp_path):
    _, m = random_model("cnn", tmp_path)
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "a.npy").write_bytes(b"")
    res = CliRunner().invoke(app, ["vision", "circuit", "--model", str(m), "--concept", str(d), "--k", "2",
                                   "--out", str(tmp_path / "o")])
    refused(res, "a.npy", "not a readable .npy array")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad, needle", [
    (np.array([["x"] * S] * S), "holds text values (<U1), not real numbers"),
    (np.zeros((S, S), dtype=complex) + 0.5j, "holds complex values (complex128), not real numbers"),
    (np.zeros((S, S), dtype=[("r", "f4"), ("g", "f4")]), "holds record values"),
])
def test_strings_complex_and_records_are_refused_naming_the_file(tmp_path, bad, needle):
    d = folder(tmp_path, ok=np.zeros((2, S, S), np.float32), bad=bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning on the way
        with pytest.raises(MechscopeError, match=re.escape(needle)) as e:
            read_image_folder(d, S)
    assert "bad.npy" in str(e.value)


def test_damaged_and_npz_files_are_refused_naming_the_file(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "cut.npy").write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (8, 8), }")
    with pytest.raises(MechscopeError, match="cut.npy is not a readable"):
        read_image_folder(d, S)
    (d / "cut.npy").unlink()
    np.savez(d / "z.npz", np.zeros((S, S)))
    (d / "z.npz").rename(d / "z.npy")
    with pytest.raises(MechscopeError, match="z.npy is not a readable"):
        read_image_folder(d, S)


def test_cli_refuses_a_string_concept_in_one_sentence(tmp_path):
    _, m = random_model("cnn", tmp_path)
    d = folder(tmp_path, a=np.array([["x"] * S] * S))
    res = CliRunner().invoke(app, ["vision", "circuit", "--model", str(m), "--concept", str(d), "--k", "2",
                                   "--out", str(tmp_path / "o")])
    refused(res, "a.npy", "not real numbers")


# 2. pixel scale


@pytest.mark.parametrize("values, needle", [
    ((0.0, 1.01), "from 0 to 1.01 that are not whole numbers"),
    ((-0.5, 0.5), "from -0.5 to 0.5, outside what an image holds"),
    ((0.0, 1e30), "from 0 to 1e+30, outside"),
    ((0.0, 256.0), "from 0 to 256, outside"),
])
def test_values_no_image_holds_are_refused_with_the_range_found(tmp_path, values, needle):
    a = np.full((2, S, S), values[0], np.float32)
    a[1] = values[1]
    d = folder(tmp_path, x=a)
    with pytest.raises(MechscopeError, match=re.escape(needle)) as e:
        read_image_folder(d, S)
    assert "x.npy" in str(e.value) and "[0, 1]" in str(e.value) and "[0, 255]" in str(e.value)


def test_the_scale_is_one_for_all_files_and_follows_the_documented_rule(tmp_path):
    half = np.full((S, S), 0.5, np.float32)
    assert read_image_folder(folder(tmp_path, a=half), S).max() == 0.5  # [0, 1]: as it is
    assert read_image_folder(folder(tmp_path, a=np.ones((S, S), np.int64)), S).max() == 1.0  # 0/1 ints: [0, 1]
    byte = np.full((S, S), 255, np.uint8)
    byte[0, 0] = 51
    got = read_image_folder(folder(tmp_path, a=byte, b=byte.astype(np.float64), blank=np.zeros((S, S))), S)
    assert got.shape == (3, 1, S, S) and float(got.max()) == 1.0 and float(got[0, 0, 0, 0]) == pytest.approx(0.2)
    assert float(got[2].max()) == 0.0 and torch.equal(got[0], got[1])  # the blank file; uint8 and float alike
    with pytest.raises(MechscopeError, match=r"a\.npy holds values in \[0, 1\] but b\.npy holds values up to 255"):
        read_image_folder(folder(tmp_path, a=half, b=byte), S)
    assert "decided once for all the files" in (read_image_folder.__doc__ or "")


# 3. EAP on a class the model classifies at chance


def _accuracy_by_class(vm) -> list[float]:
    from mechscope.vision.data import build_dataset

    ds = build_dataset(vm.cfg.data)
    with torch.no_grad():
        pred = vm.net(ds.test.images).argmax(-1)
    return [float((pred[ds.test.labels == c] == c).float().mean()) for c in range(len(vm.classes))]


def test_eap_refuses_a_clean_class_at_chance(tmp_path):
    from mechscope.vision.eap import vision_eap

    vm, m = random_model("vit", tmp_path)
    acc = _accuracy_by_class(vm)
    chance = 1 / len(vm.classes)
    low = next(c for c, a in enumerate(acc) if a <= chance)
    high = max(range(len(acc)), key=acc.__getitem__)
    assert acc[high] > chance
    other = next(c for c in range(len(acc)) if c not in (low, high))
    with pytest.raises(MechscopeError, match=rf"classifies '{vm.classes[low]}' at or below chance \(held-out accuracy"):
        vision_eap(vm, str(low), str(other), n=200, method="eap", seed=0)
    res = vision_eap(vm, str(high), str(other), n=200, method="eap", seed=0)  # a class it gets right still runs
    assert res.accuracy["clean"] > chance
    res_cli = CliRunner().invoke(app, ["vision", "eap", "--model", str(m), "--clean", vm.classes[low], "--corrupt",
                                       vm.classes[other], "--n", "200", "--method", "eap", "--out", str(tmp_path / "e")])
    refused(res_cli, "at or below chance", "chance 20%", "train longer", "pick a class")
    assert not (tmp_path / "e").exists()


def test_eap_refuses_when_the_logit_difference_does_not_separate_the_classes(tmp_path):
    from mechscope.vision.eap import vision_eap

    vm, _ = random_model("vit", tmp_path)
    with torch.no_grad():  # every logit 0: class 0 wins every tie (accuracy 100%), the gap is 0
        vm.net.out.weight.zero_()
        vm.net.out.bias.zero_()
    with pytest.raises(MechscopeError, match="nothing for a circuit to explain"):
        vision_eap(vm, "0", "1", n=8, method="eap")


# 4. the --overlay example fits the data's classes


def test_overlay_examples_fit_the_data(tmp_path):
    with pytest.raises(MechscopeError, match=r"--overlay 5,6 must name two different classes from 0 to 4, e\.g\. 1,2\.") as e:
        DataConfig(dataset="shapes", overlay=(5, 6))
    assert "3,7" not in str(e.value)
    with pytest.raises(MechscopeError, match=r"from 0 to 9, e\.g\. 3,7\."):
        DataConfig(dataset="digits", overlay=(3, 3))
    with pytest.raises(MechscopeError, match=r"write e\.g\. 1,2\."):
        parse_pair("hbar", "shapes")
    r = CliRunner()
    for spec in ("3,7", "x"):
        err = refused(r.invoke(app, ["vision", "train", "--data", "shapes", "--overlay", spec, "--out", str(tmp_path / "t")]),
                      "e.g. 1,2")
        assert "3,7." not in err
    assert parse_pair("1,2", "shapes") == (1, 2)
