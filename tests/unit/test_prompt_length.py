"""Prompts past a model's context: refused in one sentence where positions are learned (GPT-2
has no position row past its table), run on where they are rotary (Llama), for every check that
encodes a prompt (lens and recall, greedy continuations, steering)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mechscope.errors import MechscopeError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))
from short_context import N_CTX, save_short  # noqa: E402


@pytest.fixture(scope="module")
def short_models(tmp_path_factory):
    from mechscope.models import load_model

    root = tmp_path_factory.mktemp("short")
    return {kind: load_model(save_short(kind, root / kind), device="cpu") for kind in ("gpt2", "llama")}


def long_prompt(model, n: int) -> str:
    """Text of at least ``n`` tokens."""
    text = "the cat sat on a mat"
    while len(model.to_tokens(text)) < n:
        text += " and the cat sat on a mat"
    return text


def test_context_overrun_only_for_learned_positions(short_models):
    from mechscope.models.load import context_overrun

    assert context_overrun(short_models["gpt2"], N_CTX) is None
    assert context_overrun(short_models["gpt2"], N_CTX + 1) == N_CTX
    assert context_overrun(short_models["llama"], 10 * N_CTX) is None


def test_lens_prompt_past_context(short_models):
    from mechscope.models.prompt import encode_prompt

    gpt2, llama = short_models["gpt2"], short_models["llama"]
    with pytest.raises(MechscopeError, match=f"more than the model's context of {N_CTX}"):
        encode_prompt(gpt2, long_prompt(gpt2, N_CTX + 5))
    text = long_prompt(llama, N_CTX + 5)
    ids = encode_prompt(llama, text)
    assert ids.shape[1] > N_CTX
    from mechscope.lens import run_lens

    res = run_lens(llama, text)  # reads every layer past the context without an error
    assert res is not None


def test_greedy_continuations_stop_only_at_a_learned_context(short_models):
    from mechscope.recall.engine import greedy_continuations

    gpt2, llama = short_models["gpt2"], short_models["llama"]
    p = long_prompt(gpt2, N_CTX - 3)
    n = len(gpt2.to_tokens(p))
    assert len(greedy_continuations(gpt2, [p], 10)[0]) == max(0, N_CTX - n)
    q = long_prompt(llama, N_CTX - 3)
    assert len(greedy_continuations(llama, [q], 10)[0]) == 10


def test_steering_generation_past_context(short_models):
    from mechscope.sae.config import GenerationConfig
    from mechscope.sae.steer import generate_pair

    gpt2, llama = short_models["gpt2"], short_models["llama"]
    gen = GenerationConfig(max_new_tokens=8)
    with pytest.raises(MechscopeError, match=f"context of {N_CTX}"):
        generate_pair(gpt2, long_prompt(gpt2, N_CTX - 4), [], gen)
    plain, steered, _ = generate_pair(llama, long_prompt(llama, N_CTX - 4), [], gen)
    assert len(plain) == len(steered) == 8 and plain == steered  # no hooks: both rows alike


def test_task_prompts_past_a_learned_context(short_models, tmp_path):
    """A task file whose prompts run past GPT-2's position table is one sentence (it was an
    IndexError from the embedding), for task-eval, discover and evaluate alike (all score the
    batch through ``evaluate_task`` or ``check_fits``); a rotary model scores it."""
    import json

    from mechscope.tasks import evaluate_task, get_task

    gpt2, llama = short_models["gpt2"], short_models["llama"]
    path = tmp_path / "long.jsonl"
    body = long_prompt(gpt2, N_CTX + 8)
    path.write_text("".join(json.dumps({"clean": f"{body} Mary gave it to", "corrupt": f"{body} Alice gave it to",
                                        "answer": " Mary", "wrong": " John"}) + "\n" for _ in range(1)))
    with pytest.raises(MechscopeError, match=f"prompts of up to .* tokens, more than .* context of {N_CTX}"):
        evaluate_task(gpt2, get_task(str(path)).build(gpt2.tokenizer))
    res = evaluate_task(llama, get_task(str(path)).build(llama.tokenizer))
    assert res["n"] == 1
