"""Session 28's fixes: each test fails on the code before it."""

from __future__ import annotations

import json
import math

import pytest

from mechscope.errors import MechscopeError


def test_a_logprob_task_the_model_guesses_at_is_at_chance(tiny_neox, tmp_path):
    """Induction on a random model: its clean-corrupt gap is positive (> 1e-3), which used to
    pass, but the answer is no likelier than a uniform guess over the vocabulary."""
    from mechscope.circuits.discover import LOGPROB_CHANCE_FACTOR, check_task_performance
    from mechscope.tasks import get_task

    batch = get_task("induction").build(tiny_neox.tokenizer, n=8, seed=0)
    res = check_task_performance(tiny_neox, batch, force=True)
    assert res["clean_metric"] - res["corrupt_metric"] > 1e-3  # the situation under test
    assert res["clean_metric"] <= math.log(LOGPROB_CHANCE_FACTOR * res["chance_accuracy"])
    assert res["at_chance"] is True
    with pytest.raises(MechscopeError, match="at chance .*log-probability of the answer .*uniform guess"):
        check_task_performance(tiny_neox, batch)


def test_a_model_that_does_induction_is_not_at_chance(tmp_path):
    """The hand-built induction toy predicts the repeated token: not flagged."""
    from mechscope.circuits.discover import check_task_performance
    from mechscope.circuits.toy import induction_task, save_induction_toy
    from mechscope.models import load_model

    m = load_model(save_induction_toy(tmp_path / "toy"), device="cpu")
    res = check_task_performance(m, induction_task(m.tokenizer, n=12, seq_len=8, seed=0))
    assert res["at_chance"] is False and res["clean_accuracy"] > 0.5


@pytest.mark.parametrize("split", ["train", "heldout", "all"])
def test_a_corpus_too_small_to_hold_documents_out_is_refused_for_training_too(tmp_path, split):
    """A train split of a corpus with no held-out document used to be the whole corpus, so an SAE
    or tuned lens trained on it could never be evaluated; both splits are refused now."""
    from mechscope.activations.corpus import get_corpus

    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"document {i} has a few words."}) + "\n" for i in range(5)))
    if split == "all":
        assert len(get_corpus(small, split="all").refs) == 5
        return
    with pytest.raises(MechscopeError, match="has 5 documents, too few to hold 1 in 20 out"):
        get_corpus(small, split=split)
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": f"document {i} has a few words."}) + "\n" for i in range(20)))
    assert len(get_corpus(big, split=split).refs) == (19 if split == "train" else 1)


def _save(tmp_path, name: str, model) -> str:
    from conftest import save_scaled

    return save_scaled(model, tmp_path / name)


def test_a_model_the_bridge_computes_differently_is_refused_at_load(tmp_path):
    """GPT-2 with scale_attn_weights=False: the bridge divides the scores by sqrt(d_head)
    anyway, so its logits were another model's (0.22 off) and every figure described that one."""
    import torch
    import transformers

    from mechscope.models import load_model

    torch.manual_seed(0)
    cfg = dict(vocab_size=512, bos_token_id=0, eos_token_id=0, n_positions=64, n_embd=64, n_layer=2, n_head=4, n_inner=128)
    bad = _save(tmp_path, "noscale", transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, scale_attn_weights=False)))
    with pytest.raises(MechscopeError, match="computes GPT2LMHeadModel differently from transformers .*scale_attn_weights"):
        load_model(bad, device="cpu")
    torch.manual_seed(0)
    good = _save(tmp_path, "scaled", transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, scale_attn_by_inverse_layer_idx=True)))
    load_model(good, device="cpu")  # an option the bridge does read loads as before


def test_an_adapter_assertion_and_a_long_reason_are_one_clean_sentence(tmp_path):
    """GPT-BigCode without multi-query made the bridge's adapter raise an AssertionError (a
    traceback, exit 1); Phi with q/k layer norms gave a reason cut mid-word at 200 characters."""
    import torch
    import transformers

    from mechscope.models import load_model
    from mechscope.models.load import _first_sentence

    torch.manual_seed(0)
    mha = _save(tmp_path, "bigcode", transformers.GPTBigCodeForCausalLM(transformers.GPTBigCodeConfig(
        vocab_size=512, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=64, multi_query=False)))
    with pytest.raises(MechscopeError, match="does not support GPTBigCodeForCausalLM .*multi_query"):
        load_model(mha, device="cpu")
    long = "HF module has 'q_layernorm' but adapter did not declare 'q_norm'. Add 'q_norm' (name='q_layernorm') to the adapter."
    assert _first_sentence(long) == "HF module has 'q_layernorm' but adapter did not declare 'q_norm'"
    cut = _first_sentence("word " * 60, limit=42)
    assert cut.endswith(" ...") and all(w == "word" for w in cut.removesuffix(" ...").split())


def test_opt_reports_its_real_mlp_width_and_a_projected_final_norm_is_refused(tmp_path):
    import torch
    import transformers

    from mechscope.models import load_model

    base = dict(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    opt = load_model(_save(tmp_path, "opt", transformers.OPTForCausalLM(transformers.OPTConfig(**base, word_embed_proj_dim=64))),
                     device="cpu")
    assert opt.summary.d_mlp == 128  # the bridge's config says 4 x d_model = 256
    proj = _save(tmp_path, "opt_proj", transformers.OPTForCausalLM(transformers.OPTConfig(**base, word_embed_proj_dim=32)))
    with pytest.raises(MechscopeError, match="exposes no final norm .*word_embed_proj_dim"):
        load_model(proj, device="cpu")


def test_a_float32_mask_patches_a_float64_model(tiny_gpt2_dir):
    """run_with_edge_mask on a float64 model with the graph's float32 mask crashed in a bmm."""
    import torch

    from mechscope.graph import build_graph
    from mechscope.models import load_model
    from mechscope.patching import run_with_edge_mask, source_activations
    from mechscope.tasks import get_task

    out = {}
    for dt in (torch.float32, torch.float64):
        m = load_model(tiny_gpt2_dir, device="cpu", dtype=dt)
        g = build_graph(m)
        b = get_task("induction").build(m.tokenizer, n=4, seed=0)
        src = source_activations(m, g, b.clean, b.corrupt, "patching")
        mask = g.empty_mask().float()
        mask[g.edge_index[::7, 0], g.edge_index[::7, 1]] = 1.0
        with torch.no_grad():
            out[dt] = run_with_edge_mask(m, g, b.clean, src, mask).double()
    assert (out[torch.float32] - out[torch.float64]).abs().max() < 1e-4


def test_a_corpus_file_that_is_not_utf8_is_refused(tmp_path):
    from mechscope.activations.corpus import get_corpus

    folder = tmp_path / "c"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i:02d}.txt").write_text(f"plain text number {i}\n")
    assert len(get_corpus(folder)) == 20
    (folder / "07.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(MechscopeError, match=r"07\.txt, line 1: not UTF-8 text .*iconv"):
        get_corpus(folder)


def test_exemplars_merge_will_not_write_over_one_of_its_shards(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "keep.txt").write_text("shard")
    r = CliRunner().invoke(app, ["exemplars-merge", str(a), str(b), "--db", str(tmp_path / "u.db"), "--out", str(tmp_path / "." / "a")])
    assert r.exit_code == 2 and "is one of the shards being merged" in r.output and "Traceback" not in r.output, r.output
    assert (a / "keep.txt").read_text() == "shard"


def test_dynamics_says_a_damaged_train_json_in_one_sentence(tmp_path):
    from typer.testing import CliRunner

    from mechscope.cli.main import app
    from mechscope.heads.config import DataConfig, ToyConfig
    from mechscope.heads.train import train_toy

    run = tmp_path / "run"
    train_toy(ToyConfig(layers=1, heads=2, d_model=16, steps=2, batch=2, n_checkpoints=1, linear_checkpoints=0, n_eval=2,
                        data=DataConfig(vocab=8, seq_len=12, n_repeats=1, min_span=3, max_span=4)), run)
    (run / "train.json").write_text("{")
    r = CliRunner().invoke(app, ["dynamics", str(run), "--n", "2", "--seq-len", "4"])
    assert r.exit_code == 2 and "train.json is damaged" in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("kw, needle", [
    (dict(vocab=1), "--vocab 1 leaves nothing to predict"),
    (dict(seq_len=1), "--seq-len 1 is too short for a repeated span of 4 tokens"),
    (dict(min_span=5, max_span=4), "1 <= min_span <= max_span"),
    (dict(vocab="64"), "vocab must be an integer"),
])
def test_train_toy_refuses_data_it_cannot_learn_induction_from(kw, needle):
    from mechscope.heads.config import DataConfig

    with pytest.raises(MechscopeError, match=needle):
        DataConfig(**kw)


def test_train_toy_refuses_negative_checkpoint_counts():
    from mechscope.heads.config import ToyConfig

    with pytest.raises(MechscopeError, match="cannot be negative"):
        ToyConfig(linear_checkpoints=-1)


def test_a_corpus_with_a_byte_order_mark_reads_without_it(tmp_path):
    """json.loads takes a BOM in bytes (indexing) but not in a str (reading): a BOM-prefixed
    .jsonl indexed fine and then crashed on its first document; a .txt kept U+FEFF as text."""
    import json as js

    from mechscope.activations.corpus import get_corpus

    lines = "".join(js.dumps({"text": f"doc {i}"}) + "\n" for i in range(3))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    assert list(get_corpus(tmp_path / "bom.jsonl")) == ["doc 0", "doc 1", "doc 2"]
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfplain text\n")
    assert list(get_corpus(tmp_path / "bom.txt")) == ["plain text\n"]


def test_a_model_folder_missing_weights_or_tokenizer_or_a_damaged_gguf_is_one_sentence(tmp_path, tiny_gpt2_dir):
    """transformers filled missing tensors with random numbers and built an empty tokenizer from
    a folder without tokenizer files, silently; a damaged GGUF file raised struct.error."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mechscope.models import load_model

    partial = tmp_path / "partial"
    shutil.copytree(tiny_gpt2_dir, partial)
    w = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in w.items() if ".h.1.mlp." not in k}, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MechscopeError, match="has no weights for 4 tensors its config needs .*transformer.h.1.mlp"):
        load_model(str(partial), device="cpu")
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(partial.parent / "partial" / f if f == "config.json" else tiny_gpt2_dir + "/" + f, notok / f)
    with pytest.raises(MechscopeError, match="has no tokenizer files"):
        load_model(str(notok), device="cpu")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF\x03\x00\x00\x00junk")
    with pytest.raises(MechscopeError, match=r"Could not read the GGUF file .*fake\.gguf.*damaged or not a GGUF"):
        load_model(str(fake), device="cpu")


def test_a_local_model_is_recorded_by_its_absolute_path(tiny_gpt2_dir, tmp_path, monkeypatch):
    """A circuit discovered with --model models/gpt2 recorded the relative path, so `evaluate`
    run from another folder went looking for 'models/gpt2' on the Hub."""
    import shutil

    from mechscope.models import load_model

    shutil.copytree(tiny_gpt2_dir, tmp_path / "models" / "gpt2")
    monkeypatch.chdir(tmp_path)
    m = load_model("models/gpt2", device="cpu")
    assert m.summary.source == str(tmp_path.resolve() / "models" / "gpt2") and m.summary.name == "gpt2"
