"""Bad input found by trying the commands as a user would: each is one sentence and exit code 2,
and nothing stored is lost or silently mixed with another model's results."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechscope.cli.main import app
from mechscope.errors import MechscopeError

RUN = CliRunner().invoke


def _refused(r, needle: str) -> None:
    assert r.exit_code == 2 and needle in r.stderr and "Traceback" not in r.output, r.output


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "c.txt"
    p.write_text("".join(f"Line {i}: the cat number {i * 7 % 13} sat on mat {i % 5} in town {i % 3}.\n\n" for i in range(300)))
    return p


@pytest.fixture(scope="module")
def twin_dir(tiny_llama_dir, tmp_path_factory) -> str:
    """The tiny Llama's folder copied under the same folder name with other embedding weights."""
    from safetensors.torch import load_file, save_file

    dst = tmp_path_factory.mktemp("other") / Path(tiny_llama_dir).name
    shutil.copytree(tiny_llama_dir, dst)
    f = next(dst.glob("*.safetensors"))
    w = load_file(str(f))
    key = next(k for k in w if "embed_tokens" in k)
    w[key] = w[key] + 0.5
    save_file(w, str(f), metadata={"format": "pt"})
    return str(dst)


def _exemplars(model_dir: str, corpus: Path, *extra: str):
    return RUN(app, ["exemplars", "--model", model_dir, "--corpus", str(corpus), "--context-len", "32", "--batch-size", "4",
                     "--k", "4", "--k-bottom", "2", "--layers", "1", "--unit-range", "0:8", *extra])


def test_export_never_overwrites_a_database(tiny_llama_dir, corpus, tmp_path):
    db = tmp_path / "u.db"
    assert _exemplars(tiny_llama_dir, corpus, "--tokens", "256", "--db", str(db)).exit_code == 0
    before = db.read_bytes()[:16]
    _refused(RUN(app, ["export", "--db", str(db), "--out", str(db)]), "SQLite database (the one read)")
    other = tmp_path / "other.db"
    shutil.copy(db, other)
    _refused(RUN(app, ["export", "--db", str(db), "--out", str(other)]), "is a SQLite database")
    _refused(RUN(app, ["export", "--db", str(db), "--out", str(tmp_path)]), "is a folder")
    assert db.read_bytes()[:16] == before == b"SQLite format 3\x00"
    r = RUN(app, ["export", "--db", str(db), "--out", str(tmp_path / "u.jsonl")])
    assert r.exit_code == 0 and len((tmp_path / "u.jsonl").read_text().splitlines()) == 8


def test_units_of_another_model_with_the_same_folder_name_are_refused(tiny_llama_dir, twin_dir, corpus, tmp_path):
    from mechscope.models import load_model

    assert Path(twin_dir).name == Path(tiny_llama_dir).name
    assert load_model(twin_dir, device="cpu").fingerprint() != load_model(tiny_llama_dir, device="cpu").fingerprint()
    db = tmp_path / "u.db"
    assert _exemplars(tiny_llama_dir, corpus, "--tokens", "256", "--db", str(db)).exit_code == 0
    _refused(_exemplars(twin_dir, corpus, "--tokens", "256", "--db", str(db)), "another model also called")
    # A resumed checkpoint of the other model: refused, not stored as this one's.
    ck = tmp_path / "ck"
    assert _exemplars(tiny_llama_dir, corpus, "--tokens", "256", "--db", str(tmp_path / "a.db"), "--checkpoint", str(ck)).exit_code == 0
    _refused(_exemplars(twin_dir, corpus, "--tokens", "256", "--db", str(tmp_path / "b.db"), "--checkpoint", str(ck)), "another model")
    # A database a failed run left empty takes another model.
    empty = tmp_path / "empty.db"
    _refused(_exemplars(tiny_llama_dir, corpus, "--tokens", "256", "--db", str(empty), "--layers", "9"), "layer 9")
    assert _exemplars(twin_dir, corpus, "--tokens", "256", "--db", str(empty)).exit_code == 0


def test_token_shards_are_kept_checked_and_merged_with_their_own_model(tiny_llama_dir, twin_dir, corpus, tmp_path):
    db = tmp_path / "u.db"
    _refused(_exemplars(tiny_llama_dir, corpus, "--token-range", "0:160", "--db", str(db)), "not a whole number of batches")
    r = _exemplars(tiny_llama_dir, corpus, "--token-range", "0:128", "--db", str(db))
    assert r.exit_code == 0 and "token shard kept in" in r.output, r.output
    kept = [p for p in Path(f"{db}.exemplars").iterdir() if (p / "state.safetensors").is_file()]
    assert len(kept) == 1  # a token shard's state stays for exemplars-merge, even without --checkpoint
    s1 = tmp_path / "s1"
    assert _exemplars(tiny_llama_dir, corpus, "--token-range", "128:256", "--db", str(db), "--checkpoint", str(s1)).exit_code == 0
    r = RUN(app, ["exemplars-merge", str(kept[0]), str(s1), "--db", str(tmp_path / "m.db"), "--json"])  # no --model: the shards'
    assert r.exit_code == 0 and json.loads(r.stdout)["contexts"] == 8, r.output
    _refused(RUN(app, ["exemplars-merge", str(kept[0]), str(s1), "--db", str(tmp_path / "m2.db"), "--model", twin_dir]),
             "made with another model")
    t1 = tmp_path / "t1"
    assert _exemplars(twin_dir, corpus, "--token-range", "128:256", "--db", str(tmp_path / "t.db"), "--checkpoint", str(t1)).exit_code == 0
    _refused(RUN(app, ["exemplars-merge", str(kept[0]), str(t1), "--db", str(tmp_path / "m3.db")]), "different models")
    # An unfinished shard: refused until its run is completed.
    from mechscope.explain.exemplars import HarvestState

    part = HarvestState.read(s1)
    part.contexts_done -= 4
    part.token_ids = part.token_ids[:-4]
    part.save(tmp_path / "part")
    _refused(RUN(app, ["exemplars-merge", str(kept[0]), str(tmp_path / "part"), "--db", str(tmp_path / "m4.db")]), "is unfinished")
    # A file where the checkpoint folder goes: one sentence before the pass.
    (tmp_path / "afile").write_text("x")
    _refused(_exemplars(tiny_llama_dir, corpus, "--tokens", "256", "--db", str(db), "--checkpoint", str(tmp_path / "afile")),
             "is in the way")
    _refused(_exemplars(tiny_llama_dir, corpus, "--tokens", "256", "--db", str(db), "--checkpoint", str(tmp_path / "afile" / "sub")),
             "part of this path is a file")


def test_contexts_longer_than_the_model_takes_are_refused(tiny_gpt2_dir, corpus, tmp_path):
    _refused(RUN(app, ["exemplars", "--model", tiny_gpt2_dir, "--corpus", str(corpus), "--context-len", "128", "--tokens", "1024",
                       "--db", str(tmp_path / "u.db")]), "give --context-len 64 or less")
    _refused(RUN(app, ["tuned-lens", "train", "--model", tiny_gpt2_dir, "--corpus", str(corpus), "--tokens", "200",
                       "--kl-steps", "0", "--kl-tokens", "100", "--context-len", "128", "--out", str(tmp_path / "tl")]),
             "give --context-len 64 or less")
    for args in (["sae", "harvest", "--hook", "blocks.0.hook_resid_post", "--out", str(tmp_path / "acts")],
                 ["sae", "train", "--hook", "blocks.0.hook_resid_post", "--out", str(tmp_path / "sae")],
                 ["transcoders", "train", "--out", str(tmp_path / "tc")]):
        _refused(RUN(app, [*args, "--model", tiny_gpt2_dir, "--corpus", str(corpus), "--context-len", "65"]), "give --context-len 64 or less")
    assert not any((tmp_path / d).exists() for d in ("tl", "acts", "sae", "tc"))



@pytest.mark.parametrize("make", [
    lambda: __import__("mechscope.lens.config", fromlist=["x"]).TunedLensTrainConfig(lr=math.nan),
    lambda: __import__("mechscope.lens.config", fromlist=["x"]).TunedLensTrainConfig(lr=math.inf),
    lambda: __import__("mechscope.icl.binding_config", fromlist=["x"]).BindingConfig(lr=math.nan),
    lambda: __import__("mechscope.icl.binding_config", fromlist=["x"]).BindingConfig(d_model=0),
    lambda: __import__("mechscope.heads.config", fromlist=["x"]).ToyConfig(lr=-1.0),
    lambda: __import__("mechscope.heads.config", fromlist=["x"]).ToyConfig(d_model=0),
    lambda: __import__("mechscope.vision.config", fromlist=["x"]).TrainConfig(lr=math.inf),
    lambda: __import__("mechscope.features.config", fromlist=["x"]).TranscoderTrainConfig(lr=math.nan),
    lambda: __import__("mechscope.icl.binding_config", fromlist=["x"]).BindingInterchangeConfig(head=1),
    lambda: __import__("mechscope.icl.binding_config", fromlist=["x"]).BindingInterchangeConfig(n=10**9),
])
def test_settings_that_cannot_train_or_run_are_refused(make):
    with pytest.raises(MechscopeError):
        make()


def test_damaged_weights_and_non_utf8_files_are_one_sentence(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    next(bad.glob("*.safetensors")).write_bytes(b"\x00" * 64)
    _refused(RUN(app, ["info", "--model", str(bad)]), "damaged or not safetensors")
    labels = tmp_path / "labels.jsonl"
    labels.write_bytes(b'{"text": "caf\xe9", "label": "a"}\n')
    _refused(RUN(app, ["probe", "--model", tiny_llama_dir, "--labels", str(labels)]), "not UTF-8")
    _refused(RUN(app, ["probe", "--model", tiny_llama_dir, "--labels", "capitalised", "--hook", "blocks.0.attn.hook_pattern"]),
             "not [batch, position, ...]")


def test_nan_concept_images_are_refused(tmp_path):
    import numpy as np

    from mechscope.vision.concept import read_image_folder

    (tmp_path / "imgs").mkdir()
    a = np.zeros((2, 16, 16), dtype=np.float32)
    a[0, 3, 3] = np.nan
    np.save(tmp_path / "imgs" / "a.npy", a)
    with pytest.raises(MechscopeError, match="NaN or infinite"):
        read_image_folder(tmp_path / "imgs", 16)
    a[0, 3, 3] = 0.5
    np.save(tmp_path / "imgs" / "a.npy", a)
    assert read_image_folder(tmp_path / "imgs", 16).shape == (2, 1, 16, 16)


def test_options_beyond_what_the_model_or_method_has_are_refused(tiny_gpt2_dir, tiny_llama_dir, tmp_path):
    """Found by trying commands on other inputs (session 20): each was a traceback, a NaN result
    or a silent clamp before."""
    prompt = "When Mary and John went to the store, John gave a drink to"
    _refused(RUN(app, ["lens", prompt, "--model", tiny_gpt2_dir, "--k", "100000"]), "--k 100000 must be from 1 to 100")
    _refused(RUN(app, ["lens", prompt, "--model", tiny_gpt2_dir, "--target", " Mary", "--distractor", " Mary"]),
             "is the target token itself")
    _refused(RUN(app, ["heads", "--model", tiny_gpt2_dir, "--n", "2", "--seq-len", "1"]), "--seq-len of at least 2")
    _refused(RUN(app, ["icl", "--task", "antonyms", "--shots", "2", "--n", "4", "--window", "100", "--model", tiny_gpt2_dir,
                       "--out", str(tmp_path / "icl")]), "--window 100 is wider than the model (2 layers)")
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Hallo", "lang": "de"}) + "\n")
    _refused(RUN(app, ["confusion", "--prompts", str(f), "--langs", "de", "--last-layers", "31", "--model", tiny_llama_dir,
                       "--out", str(tmp_path / "conf")]), "--last-layers 31 is more than the model's 3 layers")
    _refused(RUN(app, ["recall", "The Eiffel Tower is in Paris", "--subject", "in Paris", "--model", tiny_gpt2_dir,
                       "--out", str(tmp_path / "rec")]), "runs to the prompt's last token")
