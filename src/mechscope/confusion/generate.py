"""Greedy generation for the confusion metrics: prompts through the chat template when the
tokenizer has one (SmolLM2-Instruct does; its default system prompt is kept), batched with left
padding on the plain Hugging Face model (``mechscope.explain.plain``: the bridge keeps no
key/value cache, so generating through it would recompute every prefix)."""

from __future__ import annotations

from typing import Any

import torch

from mechscope.progress import PhaseHandle


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as a user turn with the assistant's turn opened, or the plain text
    (with the tokenizer's default special tokens) when there is no chat template."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text)["input_ids"])


@torch.no_grad()
def greedy_generate(hf: Any, tokenizer: Any, prompts: list[list[int]], n_tokens: int, batch_size: int = 16,
                    bar: PhaseHandle | None = None) -> list[list[int]]:
    """Greedy continuations (new ids, cut after the first end-of-sequence token) of token-id
    prompts, ``batch_size`` at a time, left-padded (the attention mask hides the padding);
    ``bar`` advances once per prompt."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    device = next(hf.parameters()).device
    out: list[list[int]] = []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    result: dict[int, list[int]] = {}
    for s in range(0, len(order), batch_size):
        part = order[s:s + batch_size]
        width = max(len(prompts[i]) for i in part)
        ids = torch.full((len(part), width), pad, dtype=torch.long)
        mask = torch.zeros((len(part), width), dtype=torch.long)
        for r, i in enumerate(part):
            p = prompts[i]
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        gen = hf.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=n_tokens, do_sample=False,
                          pad_token_id=pad, eos_token_id=eos, top_p=None, top_k=None, temperature=None)
        for r, i in enumerate(part):
            new = gen[r, width:].tolist()
            if eos is not None and eos in new:
                new = new[:new.index(eos)]
            result[i] = new
        if bar is not None:
            bar.advance(len(part))
    out = [result[i] for i in range(len(prompts))]
    return out
