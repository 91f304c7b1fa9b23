"""Token texts and prompt tokens on a SentencePiece-style tokenizer (Llama-2, Mistral v0.1: "▁"
before the text, ``decode([i])`` drops a word-start piece's space): probe labels, the in-process
simulator's numbers and prompts, exemplar token strings and dashboard token texts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mechscope.explain.scoring import JUDGE_INSTRUCTIONS, SIM_INSTRUCTIONS
from mechscope.tasks import ioi

WORDS = ("cat sat on the mat economically lay by Example Explanation word Activations unknown Text Does neuron "
         "fire anywhere in this text Answer Yes No Are tokens marked like ones explanation is about")


def _corpus() -> list[str]:
    # Tabs, newlines and marks only stand alone here, so no merge crosses a prompt piece's edge.
    return [" ".join(ioi.NAMES), WORDS, SIM_INSTRUCTIONS, JUDGE_INSTRUCTIONS, "0 1 2 3 4 5 6 7 8 9 10",
            "\t \n : < > \" . , \\", "Der Hund und die Katze. El perro y el gato. Le chien et le chat. Il cane e il gatto."]


@pytest.fixture(scope="module")
def spm():
    """A Llama-2-style tokenizer: the normalizer puts "▁" before the text and for every space
    (so " Mary" alone is ['▁', '▁Mary'] and after "to" the one token '▁Mary'), digits split,
    BOS added (conftest._spm_tokenizer, trained on this file's words)."""
    from conftest import _spm_tokenizer

    return _spm_tokenizer(_corpus())


def test_fixture_is_sentencepiece_style(spm):
    assert spm.convert_ids_to_tokens(spm(" Mary", add_special_tokens=False)["input_ids"]) == ["▁", "▁Mary"]
    assert spm.convert_ids_to_tokens(spm("0", add_special_tokens=False)["input_ids"]) == ["▁", "0"]
    assert spm.decode([spm.convert_tokens_to_ids("▁Mary")]) == "Mary"


# ---- finding 1: probe labels read word starts from each token's text with its space --------
def _fake_model(tok):
    return SimpleNamespace(tokenizer=tok, summary=SimpleNamespace(n_ctx=32, d_vocab=len(tok)))


@pytest.mark.parametrize("name", ["ioi-names", "capitalised"])
def test_spm_builtin_labels_find_word_starts(spm, name):
    from mechscope.probes.config import ProbeConfig
    from mechscope.probes.labels import builtin_labels

    docs = [" ".join(ioi.NAMES[:8]) + " cat sat on the mat and " + " ".join(ioi.NAMES[8:16]) + " lay by the mat."] * 40
    data = builtin_labels(_fake_model(spm), name, ProbeConfig(max_items=40), corpus=docs)
    counts = data.counts()
    assert all(n > 0 for n in counts.values()), counts
    mary = spm.convert_tokens_to_ids("▁Mary")
    assert any(data.sequences[s][p] == mary for s, p in zip(data.seq, data.pos))
    assert " Mary" in data.word


def test_spm_language_labels_find_word_starts(spm):
    from mechscope.confusion.prompts import load_prompts
    from mechscope.probes.labels import _language_labels

    data = _language_labels(_fake_model(spm))
    counts = data.counts()
    assert all(n > 0 for n in counts.values()), counts
    # Every prompt's words are found: at least as many items as prompts.
    assert len(data) >= len(load_prompts())


# ---- findings 2, 3: the simulator's numbers and prompts ------------------------------------
@pytest.fixture(scope="module")
def spm_sim(spm):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from mechscope.explain.plain import PlainLM
    from mechscope.explain.scoring import ModelSimulator

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(spm), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048)
    hf = LlamaForCausalLM(cfg).eval()
    return ModelSimulator(PlainLM(hf, spm, "tiny-spm"), batch_size=2)


def test_spm_simulator_numbers_in_context(spm, spm_sim):
    # "0" alone is ['▁', '0']: decided after the tab, the numbers are the digit pieces (digits split: top 9).
    assert spm_sim.number_ids == spm.convert_tokens_to_ids([str(k) for k in range(10)])
    assert spm_sim.top == 9
    assert spm_sim.tok.convert_ids_to_tokens([spm_sim.yes, spm_sim.no]) == ["▁Yes", "▁No"]


def test_simulator_without_numbers_still_detects(spm_sim):
    from mechscope.errors import MechscopeError

    sim = object.__new__(type(spm_sim))
    sim.__dict__.update(spm_sim.__dict__)
    sim.number_ids, sim.top = [], 0  # a tokenizer without single-token numbers
    sim.check_prompts([[" cat", " sat"]], scorers=("detection", "fuzzing"))  # no digits needed
    assert len(sim.detect("cats", [[" cat", " sat"]])) == 1
    with pytest.raises(MechscopeError, match="no single-token digits"):
        sim.check_prompts([[" cat", " sat"]], scorers=("simulation",))
    with pytest.raises(MechscopeError, match="no single-token digits"):
        sim.simulate("cats", [[" cat", " sat"]])


def test_spm_simulation_prompt_is_the_text_tokenised(spm, spm_sim):
    from mechscope.explain.explainers.base import clean_token

    window = [" cat", " sat", " economically", ",", " lay", " by"]
    ids, reads = spm_sim.sim_sequence("the word cat", window)
    head = (f"{SIM_INSTRUCTIONS.format(top=spm_sim.top)}\n\nExample.\nExplanation: the word \"cat\"\n"
            f"Activations:\nThe\t0\n cat\t{spm_sim.top}\n sat\t0\n on\t0\n the\t0\n mat\t0\n\n"
            f"Explanation: the word cat\nActivations:\n")
    text = head + "".join(f"{clean_token(t)}\tunknown\n" for t in window)
    assert ids == spm(text)["input_ids"]
    assert len(reads) == len(window)
    tab = spm.convert_tokens_to_ids("\t")
    assert all(ids[r] == tab for r in reads)
    alone = [i for t in window for i in spm(f"{t}\t" "unknown\n", add_special_tokens=False)["input_ids"]]
    assert ids[-len(alone):] != alone  # pieces encoded alone (the old way) each gain a stray '▁'


def test_spm_judge_prompt_is_the_text_tokenised(spm, spm_sim):
    head, tail = spm_sim._judge_parts("cats", " cat sat on the mat", "Does the neuron fire anywhere in this text?")
    text = f"{JUDGE_INSTRUCTIONS}\n\nExplanation: cats\nText:  cat sat on the mat\nDoes the neuron fire anywhere in this text? Answer:"
    assert head + tail == spm(text)["input_ids"]


# ---- finding 4: exemplar token strings and dashboard token texts keep word starts ----------
def test_spm_token_strings_keep_spaces(spm):
    from mechscope.explain.units import token_strings

    table = token_strings(spm, len(spm) + 2)
    assert len(table) == len(spm) + 2 and table[-2:] == [f"<unused id {len(spm)}>", f"<unused id {len(spm) + 1}>"]
    assert table[spm.convert_tokens_to_ids("▁Mary")] == " Mary"
    ids = spm(" cat sat on the mat", add_special_tokens=False)["input_ids"]
    assert "".join(table[i] for i in ids) == "  cat sat on the mat"  # the dummy '▁' then the words


def test_spm_dashboard_decoder_keeps_spaces(spm):
    from mechscope.sae.dashboard import _decoder

    vocab = _decoder(spm)
    assert vocab(spm.convert_tokens_to_ids("▁Mary")) == " Mary"
    assert vocab(spm.convert_tokens_to_ids("▁Mary")) == " Mary"  # cached


def test_bpe_token_texts_unchanged():
    from conftest import _tiny_tokenizer

    from mechscope.explain.units import token_strings
    from mechscope.sae.dashboard import _decoder

    tok = _tiny_tokenizer()
    table, vocab = token_strings(tok), _decoder(tok)
    assert table == [tok.decode([i]) for i in range(len(tok))]
    assert all(vocab(i) == tok.decode([i]) for i in range(len(tok)))
