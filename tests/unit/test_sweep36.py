"""Session 36: settings no machine here can run, refused before anything is allocated, and
counts that were accepted with a meaning nobody asked for."""

from __future__ import annotations

import pytest

from mechscope.errors import MechscopeError


def _huge(which: str):
    from mechscope.heads.config import DataConfig, ToyConfig
    from mechscope.icl.binding_config import BindingConfig
    from mechscope.icl.meta_config import MetaConfig, MetaDataConfig

    return {"seq_len": lambda: ToyConfig(data=DataConfig(seq_len=1_000_000)),
            "d_model": lambda: ToyConfig(d_model=400_000, heads=4),
            "batch": lambda: ToyConfig(batch=10**8),
            "binding": lambda: BindingConfig(d_model=200_000),
            "icml": lambda: MetaConfig(data=MetaDataConfig(n_classes=10**10))}[which]


@pytest.mark.parametrize("which", ["seq_len", "d_model", "batch", "binding", "icml"])
def test_toy_sizes_beyond_this_machines_memory_are_one_sentence(which):
    with pytest.raises(MechscopeError, match=r"would need about [\d,]+ GiB of memory and this machine has"):
        _huge(which)()


def test_the_default_toy_runs_pass_the_memory_check():
    from mechscope.heads.config import ToyConfig
    from mechscope.icl.binding_config import BindingConfig
    from mechscope.icl.meta_config import MetaConfig
    from mechscope.resources import gpt_training_bytes

    ToyConfig(), BindingConfig(), MetaConfig()  # noqa: B018
    small = gpt_training_bytes(vocab=65, positions=65, d_model=128, layers=2, heads=4, mlp=False, batch=32, seq=65)
    assert 2**20 < small < 2**30  # weights and activations of the default toy: megabytes
    # doubling the sequence more than doubles it (the attention pattern is quadratic)
    assert gpt_training_bytes(vocab=65, positions=130, d_model=128, layers=2, heads=4, mlp=False, batch=32, seq=130) > 2 * small


def test_cli_train_toy_huge_sequence_is_exit_2_and_leaves_nothing(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
    from cli_inprocess import run_cli

    r = run_cli("--quiet", "train-toy", "--seq-len", "1000000", "--steps", "2", "--out", str(tmp_path / "t"), "--json")
    assert r.returncode == 2 and "GiB of memory" in json.loads(r.stdout)["error"]
    assert "Traceback" not in r.stderr and not (tmp_path / "t").exists()


def test_exemplars_refuses_a_negative_checkpoint_interval():
    from mechscope.explain.config import ExemplarsConfig

    with pytest.raises(MechscopeError, match="--checkpoint-every counts contexts"):
        ExemplarsConfig(checkpoint_every=-1)
    assert ExemplarsConfig(checkpoint_every=0).checkpoint_every == 0  # 0: only when the pass ends
