"""Batched interventions on one prompt, read out as the target's probability at the last
position.

Each row of a batch is the same prompt with its own intervention: optional Gaussian noise on
the subject's token embeddings (``hook_embed``), states restored from the clean run at given
(hook, positions), and attention edges last position -> keys blocked at given layers
(``blocks.L.attn.hook_attn_scores`` set to -inf before the softmax). The forward pass
stops at ``ln_final.hook_in``: only the last position's residual goes through the final norm
and unembedding (``models.unembed.project``), which saves the unembedding of every other
position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from mechscope.errors import MechscopeError
from mechscope.models import plain_attention
from mechscope.models.hooks import EMBED, FINAL_NORM_IN, attn_scores
from mechscope.models.load import position_limit
from mechscope.models.unembed import final_norm, project

if TYPE_CHECKING:
    from mechscope.models import Model


class _Stop(Exception):
    """Raised by the hook on ``ln_final.hook_in`` once the last residual is captured."""


@dataclass
class Row:
    """One intervention: ``noise`` index into the noise bank (None: no noise), ``restore``
    {hook name: positions restored from the clean run}, ``block`` {layer: key positions the
    last position may not attend to}."""

    noise: int | None = None
    restore: dict[str, list[int]] = field(default_factory=dict)
    block: dict[int, list[int]] = field(default_factory=dict)


@torch.no_grad()
def clean_states(model: Model, tokens: torch.Tensor, hooks: list[str]) -> dict[str, torch.Tensor]:
    """The clean run's activations at ``hooks``: {name: [pos, d_model]}."""
    wanted = set(hooks)
    with plain_attention(model):
        _, cache = model.bridge.run_with_cache(tokens.to(model.device), names_filter=lambda n: n in wanted)
    return {h: cache[h][0].detach() for h in hooks}


def _index(rows: list[Row], attr: str) -> dict:
    """{key: (row indices, position indices)} over the rows of a chunk."""
    out: dict = {}
    for r, row in enumerate(rows):
        for key, pos in getattr(row, attr).items():
            ri, pi = out.setdefault(key, ([], []))
            ri += [r] * len(pos)
            pi += list(pos)
    return {k: (torch.tensor(ri, dtype=torch.long), torch.tensor(pi, dtype=torch.long)) for k, (ri, pi) in out.items() if ri}


@torch.no_grad()
def run_rows(
    model: Model, tokens: torch.Tensor, target_id: int, rows: list[Row], *, noise_pos: list[int] | None = None,
    noise_bank: torch.Tensor | None = None, clean: dict[str, torch.Tensor] | None = None, max_rows: int = 64,
) -> torch.Tensor:
    """p(target) at the last position for every row -> [len(rows)].

    tokens [1, pos]; ``noise_bank`` [n_noise, len(noise_pos), d_model] added to the token
    embeddings at ``noise_pos``; ``clean`` the states restored (see ``clean_states``).
    """
    if any(row.noise is not None for row in rows) and (noise_bank is None or noise_pos is None):
        raise MechscopeError("rows add noise but no noise_bank/noise_pos were given; pass both to run_rows.")
    if any(row.restore for row in rows) and clean is None:
        raise MechscopeError("rows restore clean states but no clean states were given; pass clean=clean_states(...).")
    dev = model.device
    norm = final_norm(model)
    out = []
    for start in range(0, len(rows), max_rows):
        chunk = rows[start:start + max_rows]
        R = len(chunk)
        hooks: list[tuple[str, Callable]] = []
        noisy = [(r, row.noise) for r, row in enumerate(chunk) if row.noise is not None]
        if noisy:
            assert noise_bank is not None  # checked above
            ri = torch.tensor([r for r, _ in noisy], device=dev)
            ni = torch.tensor([n for _, n in noisy])
            add = noise_bank[ni].to(dev)  # [n_noisy, n_subj, d_model]
            pos = torch.tensor(noise_pos, device=dev)

            def embed_hook(x, hook, ri=ri, add=add, pos=pos):
                x = x.clone()
                x[ri[:, None], pos[None, :]] += add.to(x.dtype)
                return x

            hooks.append((EMBED, embed_hook))
        for name, (ri, pi) in _index(chunk, "restore").items():
            assert clean is not None  # checked above
            src = clean[name][pi].to(dev)  # [n, d_model]

            def restore_hook(x, hook, ri=ri.to(dev), pi=pi.to(dev), src=src):
                x = x.clone()
                x[ri, pi] = src.to(x.dtype)
                return x

            hooks.append((name, restore_hook))
        for layer, (ri, pi) in _index(chunk, "block").items():
            def block_hook(s, hook, ri=ri.to(dev), pi=pi.to(dev)):  # s [rows, heads, q, k]
                s = s.clone()
                s[ri, :, -1, pi] = float("-inf")
                return s

            hooks.append((attn_scores(layer), block_hook))
        batch = tokens.to(dev).expand(R, -1)
        logits = last_logits(model, batch, hooks, norm)  # [R, d_vocab]
        out.append(logits.softmax(-1)[:, target_id].cpu())
    return torch.cat(out)


@torch.no_grad()
def last_logits(model: Model, tokens: torch.Tensor, hooks: list | None = None, norm=None) -> torch.Tensor:
    """Logits at the last position only, [batch, d_vocab], for tokens [batch, pos]: the
    forward pass stops at the final norm's input (plain attention, ``hooks`` applied)."""
    final: list[torch.Tensor] = []

    def stop(x, hook):
        final.append(x[:, -1].detach())
        raise _Stop

    with plain_attention(model):
        try:
            model.bridge.run_with_hooks(tokens.to(model.device), fwd_hooks=list(hooks or []) + [(FINAL_NORM_IN, stop)])
        except _Stop:
            pass
    return project(model, final[0], norm or final_norm(model))


@torch.no_grad()
def greedy_continuations(model: Model, prompts: list[str], n_tokens: int, max_rows: int = 64) -> list[list[int]]:
    """Greedy continuations (token ids) of ``prompts``, batched over prompts of equal token
    length (so no padding is needed; no KV cache: each step reruns the prefix). A continuation
    stops at the context of a model with learned positions (``models.load.position_limit``):
    such a short-context model gives fewer tokens, and a prompt that fills its context none."""
    enc = [model.to_tokens(p) for p in prompts]
    n_ctx = position_limit(model) or 0
    out: list[list[int]] = [[] for _ in prompts]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(enc):
        by_len.setdefault(len(ids), []).append(i)
    norm = final_norm(model)
    for idx in by_len.values():
        for s in range(0, len(idx), max_rows):
            part = idx[s:s + max_rows]
            x = torch.tensor([enc[i] for i in part], device=model.device)
            room = n_tokens if n_ctx <= 0 else max(0, min(n_tokens, n_ctx - x.shape[1]))
            for _ in range(room):
                nxt = last_logits(model, x, norm=norm).argmax(-1)  # [rows]
                x = torch.cat([x, nxt[:, None].to(x.device)], 1)
            for j, i in enumerate(part):
                out[i] = x[j, len(enc[i]):].tolist()
    return out
