"""Tiny models with a short context, as a user builds them by hand and saves with
``save_pretrained``: a GPT-2 with ``n_positions`` 32 (learned positions: nothing past 32 can be
read) and a Llama with ``max_position_embeddings`` 32 (rotary: runs on past it). The suite's own
tiny models (tests/conftest.py) take 64 positions."""

from __future__ import annotations

N_CTX = 32


def save_short(kind: str, path, n_ctx: int = N_CTX) -> str:
    """Save a tiny ``kind`` ("gpt2" or "llama") model of ``n_ctx`` positions and the suite's tiny
    tokenizer into ``path``; returns the folder."""
    import torch
    import transformers
    from conftest import save_scaled

    torch.manual_seed(0)
    common = dict(vocab_size=512, bos_token_id=0, eos_token_id=0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=n_ctx, n_embd=64, n_layer=2, n_head=4,
                                                                     n_inner=128, **common))
    elif kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=n_ctx, pad_token_id=0, **common))
    else:
        raise ValueError(kind)
    return save_scaled(model, path)
