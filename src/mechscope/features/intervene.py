"""Interventions on transcoder features: set feature activations in the replacement model and
see what the logits do, beside what the attribution graph predicted.

The replacement model of a prompt (``replacement_forward``): every MLP's output is replaced by
its transcoder's output plus that (layer, position)'s error vector from the clean run, so with
nothing changed it reproduces the model exactly; set features are clamped at the given values
at their positions while every other feature is recomputed from its (changed) input. With
``frozen=True`` the attention patterns, norm scales and all other features stay at their clean
values (``replacement.frozen_forward``), and the logit change is then exactly the graph's
linear prediction: sum over set features of (new / old - 1) x their adjacency column (for a
model that soft-caps its logits, as Gemma 2 does, the graph's logits are before the cap and
the logits returned here after it, so the two agree only where the cap is nearly linear). A
feature at the BOS position, which is no graph node, moves from its real value.

``generate``: greedy continuation with the clamps held at the prompt's positions (new
positions run the real MLPs: they have no clean error vector).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechscope.errors import FLOAT32_MAX, MechscopeError
from mechscope.features.replacement import ReplacementRun, capture, frozen_forward
from mechscope.features.transcoder_set import TranscoderSet
from mechscope.models.load import plain_attention, position_limit

if TYPE_CHECKING:
    from mechscope.models import Model

Clamp = tuple[int, int, int, float]
"""(layer, feature, position, value)."""



def check_clamp_values(clamps: list[Clamp]) -> None:
    """One sentence for a value the replacement model cannot hold (NaN, infinite, or beyond
    float32's range, where its arithmetic overflows) and for two clamps of one feature at one
    position (only one value could win; which one would be silent)."""
    seen: dict[tuple[int, int, int], float] = {}
    for layer, f, pos, v in clamps:
        if not math.isfinite(v):
            raise MechscopeError(f"--set {layer}:{f}:{pos}={v}: the value must be a finite number.")
        if abs(v) > FLOAT32_MAX:
            raise MechscopeError(f"--set {layer}:{f}:{pos}={v:g}: the value is beyond float32's range (3.4e38), where the "
                                 "model computes; give a value such as 0 (off) or a few times the feature's activation.")
        if (layer, f, pos) in seen:
            raise MechscopeError(f"--set {layer}:{f}:{pos} is given twice (={seen[layer, f, pos]:g} and ={v:g}); keep one.")
        seen[layer, f, pos] = v


def check_clamps(tset: TranscoderSet, n_pos: int, clamps: list[Clamp]) -> None:
    """One sentence for a clamp outside the set or the prompt, or with a value it cannot take."""
    check_clamp_values(clamps)
    for layer, f, pos, _ in clamps:
        if not 0 <= layer < tset.n_layers:
            raise MechscopeError(f"--set {layer}:{f}:{pos}: layer {layer} is out of range (0-{tset.n_layers - 1}).")
        if not 0 <= f < tset.layers[layer].cfg.d_sae:
            raise MechscopeError(f"--set {layer}:{f}:{pos}: feature {f} is out of range (0-{tset.layers[layer].cfg.d_sae - 1}).")
        if not 0 <= pos < n_pos:
            raise MechscopeError(f"--set {layer}:{f}:{pos}: position {pos} is out of range (the prompt has {n_pos} tokens).")


@torch.no_grad()
def replacement_forward(model: Model, tset: TranscoderSet, run: ReplacementRun, clamps: list[Clamp],
                        tokens: Tensor | None = None) -> Tensor:
    """Logits [P', V] of the replacement model with ``clamps`` applied (module docstring);
    ``tokens`` (default: the prompt) may extend the prompt: positions beyond it keep the real MLP."""
    toks = run.tokens if tokens is None else tokens
    P = run.n_pos
    ins = [tc.cfg.hook_name for tc in tset.layers]
    outs = [tc.cfg.hook_name_out or "" for tc in tset.layers]
    seen: dict[int, Tensor] = {}
    by_layer: dict[int, list[tuple[int, int, float]]] = {}
    for layer, f, pos, v in clamps:
        by_layer.setdefault(layer, []).append((pos, f, v))

    def take(layer):
        def hook(t, hook):
            seen[layer] = t
            return t
        return hook

    def put(layer):
        tc = tset.layers[layer]
        xc = run.x_in[layer].to(tc.W_enc.dtype)
        err = run.mlp_out[layer] - tc.decode(tc.encode(xc), xc).float()  # every position (run.errors skips BOS)

        def hook(t, hook):
            x = seen[layer][0, :P].to(tc.W_enc.dtype)
            a = tc.encode(x)
            for pos, f, v in by_layer.get(layer, []):
                a[pos, f] = v
            y = (tc.decode(a, x).float() + err.to(x.device)).to(t.dtype)
            out = t.clone()
            out[0, :P] = y
            return out
        return hook

    hooks = [(ins[i], take(i)) for i in range(tset.n_layers)] + [(outs[i], put(i)) for i in range(tset.n_layers)]
    with plain_attention(model):
        return model.bridge.run_with_hooks(toks[None].to(model.device), fwd_hooks=hooks)[0].float()


def intervene(model, tset: TranscoderSet, tokens: Tensor | list[int], clamps: list[Clamp], frozen: bool = False,
              generate: int = 0) -> dict:
    """Logits at the last position before and after setting ``clamps``: ``{"base", "changed"}``
    [V] (the replacement model's, equal to the model's before), ``"frozen"`` (bool) and, with
    ``generate`` > 0, ``"base_text"``/``"changed_text"`` greedy continuations, ``"generated_tokens"``
    their length and, where the model's context limit cut them short, ``"generate_note"``."""
    if frozen:
        from mechscope.models.check import require_attention_edits

        require_attention_edits(model, "intervene --frozen (the frozen replacement model holds its attention patterns)")
    run = capture(model, tset, tokens)
    check_clamps(tset, run.n_pos, clamps)
    base = run.logits[-1]
    if frozen:
        delta = torch.zeros_like(run.mlp_out)
        acts = {(int(layer), int(pos), int(f)): float(v) for (layer, pos, f), v in zip(run.active.tolist(), run.values)}
        for layer, f, pos, v in clamps:
            if pos < run.first_pos:  # BOS: not a graph node, so not in run.active; its real value is the one to move from
                tc = tset.layers[layer]
                old = float(tc.encode(run.x_in[layer][pos:pos + 1].to(tc.W_enc.dtype))[0, f].detach())
            else:
                old = acts.get((layer, pos, f), 0.0)
            delta[layer, pos] += (v - old) * tset.layers[layer].W_dec[f].detach().float().to(delta.device)
        _, lg = frozen_forward(model, tset, run, delta)
        changed = lg[-1]
    else:
        changed = replacement_forward(model, tset, run, clamps)[-1]
    out = {"base": base.cpu(), "changed": changed.cpu(), "frozen": frozen}
    if generate > 0:
        out["base_text"], made = _greedy(model, tset, run, [], generate)
        out["changed_text"], _ = _greedy(model, tset, run, clamps, generate)
        out["generated_tokens"] = made  # both continuations start at the prompt's end, so they stop alike
        if frozen:  # generation needs fresh attention at every new position: there is no frozen model to run
            out["generate_mode"] = "replacement model (not frozen: the clamps held, attention and norms recomputed)"
        if made < generate:
            out["generate_note"] = (f"generation stopped at the model's context limit ({position_limit(model)} positions) "
                                    f"after {made} of {generate} tokens.")
    return out


def _greedy(model: Model, tset: TranscoderSet, run: ReplacementRun, clamps: list[Clamp], n: int) -> tuple[str, int]:
    """The greedy continuation's text and its length in tokens (short of ``n`` at the model's
    context limit)."""
    toks = run.tokens.clone()
    limit = position_limit(model)
    for _ in range(n):
        if limit is not None and toks.numel() >= limit:
            break
        nxt = int(replacement_forward(model, tset, run, clamps, toks)[-1].argmax())
        toks = torch.cat([toks, torch.tensor([nxt])])
    return model.tokenizer.decode(toks[run.n_pos:].tolist()), toks.numel() - run.n_pos
