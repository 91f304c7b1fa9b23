"""A resumed job notices a corpus whose file was edited since its checkpoint: every job that
streams a corpus (activation harvest, SAE and transcoder training, tuned-lens training, the
exemplars pass and its token shards) records ``Corpus.digest()`` and refuses to continue over
other text in one sentence. Before, the corpus was known by its path string only, so an edited
file mixed two texts into one result without a word."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from mechscope.activations import StoreConfig, get_corpus
from mechscope.errors import MechscopeError

CHANGED = "other contents of the corpus"


def _copy(corpus: str, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return str(shutil.copy(corpus, folder / "text.jsonl"))


def _edit(path: str, line: int = 1) -> None:
    """One word of one training document changed; the file keeps its size."""
    lines = Path(path).read_text().splitlines()
    row = json.loads(lines[line])
    words = row["text"].split(" ")
    words[0], words[1] = words[1], words[0]
    row["text"] = " ".join(words)
    lines[line] = json.dumps(row)
    before = Path(path).stat().st_size
    Path(path).write_text("\n".join(lines))
    assert Path(path).stat().st_size == before


def _one_sentence(msg: str) -> bool:
    return "\n" not in msg and "Traceback" not in msg and msg.count(". ") == 0


def test_the_digest_follows_the_text_not_the_path(corpus, tmp_path):
    a, b = _copy(corpus, tmp_path / "a"), _copy(corpus, tmp_path / "b")
    da = get_corpus(a).digest()
    assert da and da == get_corpus(b).digest()  # a moved or copied corpus is the same corpus
    assert get_corpus(a, split="train").digest() not in (None, da)  # what a job reads: the split ...
    assert get_corpus(a, seed=1).digest() not in (None, da)  # ... and its order
    _edit(b)
    assert get_corpus(b).digest() != da
    assert get_corpus("embedded").digest() == get_corpus(None).digest()


def test_an_extended_harvest_refuses_an_edited_corpus(tiny_gpt2, corpus, tmp_path):
    from mechscope.activations.shards import harvest

    text = _copy(corpus, tmp_path / "c")

    def run(n: int):
        return harvest(tiny_gpt2, get_corpus(text, split="train"), StoreConfig(hooks=["blocks.0.hook_resid_post"], context_len=16),
                       tmp_path / "h", n, shard_tokens=1000, corpus_spec=text, progress=False)

    assert run(2000)["corpus_digest"]
    _edit(text)
    with pytest.raises(MechscopeError, match=CHANGED) as err:
        run(3000)
    assert _one_sentence(str(err.value))
    # An old harvest recorded no digest: it still extends.
    m = json.loads((tmp_path / "h" / "manifest.json").read_text())
    del m["corpus_digest"]
    (tmp_path / "h" / "manifest.json").write_text(json.dumps(m))
    assert run(3000)["complete"]


def test_sae_training_refuses_to_resume_on_an_edited_corpus(tiny_gpt2, corpus, tmp_path):
    from mechscope.sae import TrainConfig
    from mechscope.sae.train import sae_trainer

    text = _copy(corpus, tmp_path / "c")
    hook = "blocks.0.hook_resid_post"
    cfg = TrainConfig(k=4, expansion=2, tokens=2400, batch_tokens=200, checkpoint_every=400)
    sae_trainer(tiny_gpt2, hook, cfg, tmp_path / "sae", corpus=text, context_len=16).run(stop_after_steps=9)
    _edit(text)
    with pytest.raises(MechscopeError, match=CHANGED) as err:
        sae_trainer(tiny_gpt2, hook, cfg, tmp_path / "sae", corpus=text, context_len=16).run(resume=True)
    assert _one_sentence(str(err.value))
    _edit(text)  # swapped back: the text the checkpoint was made on
    sae = sae_trainer(tiny_gpt2, hook, cfg, tmp_path / "sae", corpus=text, context_len=16).run(resume=True)
    assert sae.cfg.metadata["corpus_digest"] == get_corpus(text, split="train").digest()


def test_transcoder_training_refuses_to_resume_on_an_edited_corpus(tiny_llama, corpus, tmp_path):
    from mechscope.features.config import TranscoderTrainConfig
    from mechscope.features.train import train_transcoders
    from mechscope.progress import Recorder

    text = _copy(corpus, tmp_path / "c")
    cfg = TranscoderTrainConfig(layers=[0], tokens=2000, corpus=text, checkpoint_every=400, context_len=32, batch_contexts=4,
                                forward_contexts=8, shuffle_contexts=16, expansion=2, k=4, lr=1e-2)
    with pytest.raises(KeyboardInterrupt):
        train_transcoders(tiny_llama, cfg, tmp_path / "tc", progress=Recorder(interrupt_at={"training 1 transcoders": 11}))
    _edit(text)
    with pytest.raises(MechscopeError, match=CHANGED) as err:
        train_transcoders(tiny_llama, cfg, tmp_path / "tc", resume=True)
    assert _one_sentence(str(err.value))


def test_tuned_lens_training_refuses_to_resume_on_an_edited_corpus(tiny_llama, corpus, tmp_path):
    from mechscope.lens import TunedLensTrainConfig
    from mechscope.lens.tuned_train import train_tuned_lens
    from mechscope.progress import Recorder

    text = _copy(corpus, tmp_path / "c")
    cfg = TunedLensTrainConfig(tokens=1500, context_len=32, kl_batch=32, kl_tokens=300, token_chunk=40, lr=3e-3,
                               matmul_dtype="float32", kl_steps=4, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        train_tuned_lens(tiny_llama, text, cfg, tmp_path / "tl", progress=Recorder(interrupt_at={"KL fine-tune": 2}))
    _edit(text)
    with pytest.raises(MechscopeError, match=CHANGED) as err:
        train_tuned_lens(tiny_llama, text, cfg, tmp_path / "tl", resume=True)
    assert _one_sentence(str(err.value))
    _edit(text)
    train_tuned_lens(tiny_llama, text, cfg, tmp_path / "tl", resume=True)


def test_exemplars_resume_and_merge_refuse_an_edited_corpus(tiny_llama, corpus, tmp_path):
    from mechscope.explain.config import ExemplarsConfig
    from mechscope.explain.exemplar_shards import merge_states
    from mechscope.explain.exemplars import HarvestState, harvest_exemplars

    class Stop(Exception):
        pass

    def stop(batches: int) -> None:
        if batches == 1:
            raise Stop

    text = _copy(corpus, tmp_path / "c")
    cfg = ExemplarsConfig(units="mlp", layers=[0], corpus=text, n_tokens=256, context_len=16, batch_size=8, checkpoint_every=8)
    with pytest.raises(Stop):
        harvest_exemplars(tiny_llama, cfg, checkpoint=tmp_path / "ck", on_batch=stop)
    assert HarvestState.read(tmp_path / "ck").model["corpus_digest"] == get_corpus(text).digest()
    _edit(text, line=0)
    with pytest.raises(MechscopeError, match=CHANGED) as err:
        harvest_exemplars(tiny_llama, cfg, checkpoint=tmp_path / "ck")
    assert _one_sentence(str(err.value))
    # Token shards of one pass: over the same text they merge; over another copy of the file that
    # differs (another machine's), the calibration shard and the merge refuse.
    first = harvest_exemplars(tiny_llama, replace(cfg, n_tokens=128))
    rest = replace(cfg, n_tokens=128, first_context=first.contexts_done)
    second = harvest_exemplars(tiny_llama, rest, calibration=first)
    merge_states([first, second])
    _edit(text, line=0)
    with pytest.raises(MechscopeError, match="--calibration was made on other contents of the corpus") as err:
        harvest_exemplars(tiny_llama, rest, calibration=first)
    assert _one_sentence(str(err.value))
    second.model["corpus_digest"] = get_corpus(text).digest()
    with pytest.raises(MechscopeError, match="different contents of the corpus") as err:
        merge_states([first, second], ["s0", "s1"])
    assert _one_sentence(str(err.value))
