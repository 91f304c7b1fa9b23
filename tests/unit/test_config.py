"""Method settings: checked when a config is made (one sentence each), importable without
torch (the CLI's option defaults come from them), and the lazy packages keep their names."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mechscope.activations.config import StoreConfig
from mechscope.circuits.config import METHODS, DiscoverConfig, check_seeds
from mechscope.errors import MechscopeError
from mechscope.heads.config import HeadsConfig, ToyConfig
from mechscope.recall.config import RecallConfig, check_dataset, dataset_config
from mechscope.sae.config import DashboardConfig, GenerationConfig, TrainConfig


def _python(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("kw, needle", [
    ({"method": "acdcx"}, f"Unknown method 'acdcx'; choose {', '.join(METHODS)}."),
    ({"ablation": "resample"}, "Unknown ablation 'resample'; choose patching, mean or zero."),
    ({"level": "head"}, "Unknown level 'head'; choose edge or node."),
    ({"rank": "up"}, "Unknown ranking 'up'; choose auto, signed or abs."),
    ({"method": "acdc", "acdc_metric": "kld"}, "Unknown ACDC metric 'kld'; choose kl or task."),
    ({"acdc_metric": "task"}, "--metric applies to ACDC only; eap-ig always attributes the task's own metric."),
    ({"n": 3}, "--n 3 is too small: at least 4 pairs are needed (some score, some are held out)."),
    ({"held_out": 1.0}, "--held-out 1.0 is out of range: give the share of pairs held out, between 0 and 1 (e.g. 0.25)."),
    ({"n": 4, "held_out": 0.9}, "--held-out 0.9 of --n 4 pairs leaves 0 to score the edges; hold out a smaller share or give more pairs."),
    ({"held_out": 0.0}, "--held-out 0.0 is out of range: give the share of pairs held out, between 0 and 1 (e.g. 0.25)."),
    ({"qk": "fast"}, "Unknown --qk 'fast'; choose exact or linear."),
    ({"folds": 0}, "--folds must be at least 1, got 0."),
    ({"target": float("nan")}, "--target must be a finite number, got nan."),
    ({"threshold": float("nan")}, "--threshold must be a finite number, got nan."),
    ({"threshold": float("-inf")}, "--threshold must be a finite number, got -inf."),
    ({"cv_confidence": 1.0}, "cv_confidence 1.0 is out of range: give a confidence between 0 and 1 (e.g. 0.9)."),
])
def test_discover_config_refuses_bad_settings(kw, needle):
    with pytest.raises(MechscopeError) as e:
        DiscoverConfig(**kw)
    assert str(e.value) == needle


def test_seed_counts_and_other_configs_are_checked():
    cfg = DiscoverConfig()
    check_seeds(cfg, 1)
    check_seeds(cfg, 50)
    for bad in (0, 51):
        with pytest.raises(MechscopeError, match="out of range"):
            check_seeds(cfg, bad)
    with pytest.raises(MechscopeError, match="ACDC runs are too long"):
        check_seeds(DiscoverConfig(method="acdc"), 2)
    bad = [(HeadsConfig, {"n": 0}, "text windows"), (ToyConfig, {"d_model": 30, "heads": 4}, "divisible"),
           (RecallConfig, {"samples": 0}, "--samples and --layer-stride"), (dataset_config, {"layer_stride": 0}, "--layer-stride"),
           (TrainConfig, {"architecture": "gated"}, "unknown SAE architecture"), (TrainConfig, {"tokens": 10}, "less than one batch"),
           (DashboardConfig, {"ctx_len": 1}, "--ctx-len must be at least 2"), (DashboardConfig, {"skip_first": 64}, "leaves nothing"),
           (GenerationConfig, {"temperature": -1.0}, "--temperature must be a finite number of at least 0"), (StoreConfig, {"hooks": ["h"], "dtype": "int8"}, "Unknown dtype")]
    for make, kw, needle in bad:
        with pytest.raises(MechscopeError, match=needle):
            make(**kw)
    check_dataset("facts", 2)
    for name, n, needle in (("wiki", 30, "Unknown dataset 'wiki'"), ("facts", 1, "--n 1 is too small")):
        with pytest.raises(MechscopeError, match=needle):
            check_dataset(name, n)


def test_configs_and_the_cli_import_without_torch():
    out = _python(
        "import sys\n"
        "import mechscope.cli.main\n"
        "from mechscope.circuits import DiscoverConfig\n"
        "from mechscope.heads import HeadsConfig, ToyConfig, DynamicsConfig\n"
        "from mechscope.sae import TrainConfig, DashboardConfig, GenerationConfig\n"
        "from mechscope.activations import StoreConfig\n"
        "from mechscope.recall import RecallConfig\n"
        "from mechscope.vision import CircuitConfig, DataConfig, TrainConfig as VisionTrainConfig\n"
        "print('torch' in sys.modules)\n"
    )
    assert out.strip() == "False"


def test_cli_option_defaults_are_the_config_defaults():
    import typer.main

    from mechscope.cli.main import app

    params = {p.name: p.default for p in typer.main.get_command(app).commands["discover"].params}
    d = DiscoverConfig()
    assert (params["n"], params["held_out"], params["method"], params["metric"], params["folds"]) == (
        None, None, d.method, d.acdc_metric, d.folds)
    # the number of pairs and the held-out share are resolved by the method
    assert (d.n, DiscoverConfig(method="acdc").n, DiscoverConfig(method="eap", n=30).n) == (200, 50, 30)
    assert (d.held_out, DiscoverConfig(method="acdc").held_out, DiscoverConfig(held_out=0.4).held_out) == (0.25, 0.5, 0.4)


def test_vision_cli_defaults_are_the_config_defaults():
    import typer.main

    from mechscope.cli.main import app
    from mechscope.vision import CircuitConfig, TrainConfig

    group = typer.main.get_command(app).commands["vision"]
    circ = {p.name: p.default for p in group.commands["circuit"].params}
    train = {p.name: p.default for p in group.commands["train"].params}
    c, t = CircuitConfig(), TrainConfig()
    assert (circ["k"], circ["ablation"], circ["random_draws"], circ["contrast"], circ["baseline"]) == (c.k, c.ablation, c.random_draws, c.contrast, c.baseline)
    assert (train["arch"], train["epochs"], train["width"], train["heads"]) == (t.arch, t.epochs, t.width, t.heads)


def test_lazy_packages_keep_functions_named_like_their_modules():
    """``from mechscope.circuits import discover`` is the function, even when the submodule of
    the same name was imported first (as an eager ``__init__`` gave)."""
    out = _python(
        "import json, types\n"
        "import mechscope.circuits.discover, mechscope.circuits.acdc, mechscope.heads.dynamics\n"
        "from mechscope.circuits import acdc, discover\n"
        "from mechscope.heads import dynamics, head_scores\n"
        "from mechscope.circuits.discover import pick_rank\n"
        "from mechscope.activations import embedded\n"
        "import mechscope.sae as sae\n"
        "print(json.dumps([callable(f) and not isinstance(f, types.ModuleType) for f in (acdc, discover, dynamics, head_scores)]"
        " + [isinstance(embedded, types.ModuleType), callable(pick_rank), 'train_sae' in dir(sae)]))\n"
    )
    assert json.loads(out) == [True] * 7


def test_top_level_names_resolve_and_complete():
    """Every name in ``mechscope.__all__`` resolves (lazily) and shows in ``dir()`` for
    autocompletion; the lazy table and ``__all__`` list the same names."""
    import mechscope as ms

    assert set(ms.__all__) == {"MechscopeError", "__version__", *ms._LAZY}
    assert set(ms.__all__) <= set(dir(ms))
    for name in ms.__all__:
        assert getattr(ms, name) is not None


def test_result_json_is_replaced_whole_or_not_at_all(tmp_path):
    from mechscope.results import read_result_json, write_result_json

    p = write_result_json(tmp_path / "run", "r.json", {"schema_version": 1, "x": [1, 2]})
    assert read_result_json(tmp_path / "run", "r.json", 1, "test")[0]["x"] == [1, 2]
    with pytest.raises(TypeError):  # not serialisable: the old file stays, no temporary left behind
        write_result_json(tmp_path / "run", "r.json", {"schema_version": 1, "x": object()})
    assert read_result_json(p, "r.json", 1, "test")[0]["x"] == [1, 2]
    assert sorted(f.name for f in (tmp_path / "run").iterdir()) == ["r.json"]


def test_result_json_failing_rename_leaves_no_temporary(tmp_path, monkeypatch):
    """A write that fails after the temporary file exists (here the rename) removes it and keeps
    the old file; non-ASCII text stays UTF-8 when asked (the multilingual confusion results)."""
    import mechscope.results as results

    p = results.write_result_json(tmp_path, "r.json", {"t": "Größe"}, ensure_ascii=False)
    assert "Größe" in p.read_text(encoding="utf-8")
    assert "\\u00df" in results.write_json(tmp_path / "a.json", {"t": "ß"}).read_text(encoding="utf-8")

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", broken)
    with pytest.raises(OSError):
        results.write_result_json(tmp_path, "r.json", {"t": "new"})
    assert sorted(f.name for f in tmp_path.iterdir()) == ["a.json", "r.json"]
    assert "Größe" in p.read_text(encoding="utf-8")
