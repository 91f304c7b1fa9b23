"""The local replacement model of one prompt: transcoders in place of the MLPs, attention
patterns and norm scales frozen at the prompt's values, an error term per (layer, position).

For a prompt with tokens t_0..t_{P-1}, the clean run gives at every layer l and position p
the transcoder input x_l,p (the MLP's normalised input), the MLP output y_l,p and the feature
activations a_l,p = act(x_l,p W_enc + b_enc). Then

    y_l,p = a_l,p W_dec + b_dec + skip_l(x_l,p) + e_l,p        (e: the error node's vector)

holds exactly. The *frozen* replacement model keeps every attention pattern and every norm's
scale (ln1, ln2, the norms after attention and the MLP where a model has them, final) at its clean value and every MLP's output at its clean value except
for the linear skip, which still reads its (now linear) input. With those frozen, the map
from the nodes' output vectors (a_f W_dec[f] for a feature, e_l,p for an error, the token
embedding for a token) to every feature's pre-activation and every logit is linear, so each
edge's weight is an exact direct effect (``mechscope.features.attribute``).

``capture`` runs the clean pass; ``frozen_forward`` evaluates the frozen model with given
changes to the nodes' vectors by *replacing* values (patterns and scales set to the clean
ones), an implementation independent of the gradient path the attribution uses
(``freeze_hooks``: the same quantities detached), which is what the exactness tests compare.

Position 0: when the prompt starts with the tokenizer's BOS token, that position only ever
sees itself, so its MLP outputs are a constant of every prompt; its features and error are
not nodes (as in circuit-tracer), their output is kept as it is.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from mechscope.errors import MechscopeError
from mechscope.features.transcoder_set import TranscoderSet
from mechscope.models.hooks import (
    EMBED,
    FINAL_NORM_OUT,
    FINAL_NORM_SCALE,
    attn_pattern,
    ln_scale,
)
from mechscope.models.load import context_overrun, plain_attention

if TYPE_CHECKING:
    from mechscope.models import Model


@dataclass
class ReplacementRun:
    """The clean pass of one prompt through the model with its transcoder set.

    Shapes: ``tokens`` [P]; ``x_in``/``mlp_out``/``errors`` [L, P, d]; ``embed`` [P, d];
    ``active`` [n, 3] long rows (layer, pos, feature) in layer-major, then position, then
    feature order and ``values`` [n] their activations; ``logits`` [P, V];
    ``frozen`` maps hook name -> clean value [1, ...] of every pattern and norm scale.
    """

    tokens: Tensor
    x_in: Tensor
    mlp_out: Tensor
    errors: Tensor
    embed: Tensor
    active: Tensor
    values: Tensor
    logits: Tensor
    frozen: dict[str, Tensor]
    first_pos: int
    """The first position with feature and error nodes (1 after a BOS token, else 0)."""

    @property
    def n_layers(self) -> int:
        return self.x_in.shape[0]

    @property
    def n_pos(self) -> int:
        return self.x_in.shape[1]


def frozen_hook_names(model: Model) -> list[str]:
    """Every pattern and norm scale the frozen model holds at its clean value: the patterns, the
    norms before attention and the MLP, the norms after them where the model has them (Gemma 2's
    ``ln1_post``/``ln2_post``: unfrozen, they would make the map from nodes to targets nonlinear)
    and the final norm."""
    n_layers, hooks = model.summary.n_layers, model.bridge.hook_dict
    names = [attn_pattern(layer) for layer in range(n_layers)]
    names += [ln_scale(layer, w) for layer in range(n_layers) for w in (1, 2)]
    names += [h for layer in range(n_layers) for w in (1, 2) if (h := f"blocks.{layer}.ln{w}_post.hook_scale") in hooks]
    return names + [FINAL_NORM_SCALE]


@contextmanager
def quiet_norm_edits():
    """The bridge warns when a hook edits a norm's scale (it then rebuilds the output from the
    hooked values, which is what freezing needs); silence that one warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*hook_scale/hook_normalized.*")
        yield


def _transcoder_hooks(tset: TranscoderSet) -> tuple[list[str], list[str]]:
    return [tc.cfg.hook_name for tc in tset.layers], [tc.cfg.hook_name_out or "" for tc in tset.layers]


@torch.no_grad()
def capture(model: Model, tset: TranscoderSet, tokens: Tensor | list[int]) -> ReplacementRun:
    """The clean pass: everything the frozen replacement model and the graph need."""
    tset.check_fits(model)
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if tokens.numel() == 0:
        raise MechscopeError("the prompt is empty; give at least one token.")
    if (n_ctx := context_overrun(model, tokens.numel())) is not None:
        raise MechscopeError(f"the prompt has {tokens.numel()} tokens but {model.summary.name} reads at most {n_ctx}; shorten it.")
    ins, outs = _transcoder_hooks(tset)
    names = set(frozen_hook_names(model)) | set(ins) | set(outs) | {EMBED}
    with plain_attention(model):
        logits, cache = model.bridge.run_with_cache(tokens[None].to(model.device), names_filter=lambda n: n in names)
    x_in = torch.stack([cache[h][0].float() for h in ins])  # [L, P, d]
    mlp_out = torch.stack([cache[h][0].float() for h in outs])  # [L, P, d]
    bos = getattr(model.tokenizer, "bos_token_id", None)
    first = 1 if bos is not None and int(tokens[0]) == int(bos) and tokens.numel() > 1 else 0
    errors = torch.zeros_like(mlp_out)
    active, values = [], []
    for layer, tc in enumerate(tset.layers):
        x = x_in[layer].to(tc.W_enc.dtype)
        a = tc.encode(x).float()  # [P, d_sae]
        recon = tc.decode(a.to(tc.W_dec.dtype), x).float()
        errors[layer] = mlp_out[layer] - recon
        a[:first] = 0.0
        idx = a.nonzero()  # [n_l, 2] (pos, feature), row-major: position then feature
        active.append(torch.cat([torch.full((len(idx), 1), layer, device=idx.device), idx], 1))
        values.append(a[idx[:, 0], idx[:, 1]])
    errors[:, :first] = 0.0
    frozen = {n: cache[n].detach().clone() for n in frozen_hook_names(model)}
    return ReplacementRun(tokens=tokens.cpu(), x_in=x_in, mlp_out=mlp_out, errors=errors, embed=cache[EMBED][0].float(),
                          active=torch.cat(active).cpu(), values=torch.cat(values), logits=logits[0].float(),
                          frozen=frozen, first_pos=first)


@torch.no_grad()
def frozen_forward(model: Model, tset: TranscoderSet, run: ReplacementRun, mlp_delta: Tensor | None = None,
                   embed_delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Evaluate the frozen replacement model with the node vectors changed.

    ``mlp_delta`` [L, P, d] is added to each MLP's output (a feature's change is
    delta_a * W_dec[f] at its layer and position, an error's the change of e), ``embed_delta``
    [P, d] to the token embeddings. Returns (transcoder pre-activations [L, P, d_sae_max]
    padded with 0 where layers differ in width, logits [P, V]). With no change it returns the
    clean pre-activations and the model's clean logits.
    """
    L = run.n_layers
    ins, outs = _transcoder_hooks(tset)
    frozen = run.frozen
    x_seen: dict[int, Tensor] = {}
    const = [run.mlp_out[layer] - tset.skip(layer, run.x_in[layer].to(tset.layers[layer].W_dec.dtype)).float()
             for layer in range(L)]

    def set_frozen(t, hook):
        return frozen[hook.name].to(t.dtype)

    def take_in(layer):
        def hook(t, hook):
            x_seen[layer] = t[0].float()
            return t
        return hook

    def put_out(layer):
        def hook(t, hook):
            x = x_seen[layer].to(tset.layers[layer].W_dec.dtype)
            y = tset.skip(layer, x).float() + const[layer]
            if mlp_delta is not None:
                y = y + mlp_delta[layer].to(y)
            return y[None].to(t.dtype)
        return hook

    def add_embed(t, hook):
        return t + embed_delta[None].to(t) if embed_delta is not None else t

    hooks = [(n, set_frozen) for n in frozen]
    hooks += [(ins[layer], take_in(layer)) for layer in range(L)]
    hooks += [(outs[layer], put_out(layer)) for layer in range(L)]
    hooks += [(EMBED, add_embed)]
    with plain_attention(model), quiet_norm_edits():
        logits = model.bridge.run_with_hooks(run.tokens[None].to(model.device), fwd_hooks=hooks)
    width = max(tset.d_sae)
    pre = torch.zeros(L, run.n_pos, width)
    for layer, tc in enumerate(tset.layers):
        pre[layer, :, : tc.cfg.d_sae] = tc.pre_acts(x_seen[layer].to(tc.W_enc.dtype)).float().cpu()
    return pre, logits[0].float()


def freeze_hooks(model, tset: TranscoderSet, run: ReplacementRun, batch: int, store: dict) -> list:
    """Forward hooks for the *gradient* pass of the frozen model over ``batch`` copies of the
    prompt: patterns and norm scales detached, each MLP's output made ``skip(x) + const``
    (gradient only through the skip), the token embedding a leaf. ``store`` receives the
    tensors the attribution reads: ``"x_in"`` (per layer, [B, P, d]: where feature targets'
    gradients are injected), ``"mlp_out"`` (per layer: where feature and error sources are
    read), ``"embed"`` and ``"final"`` (the final norm's output, where logit targets are injected).
    """
    L = run.n_layers
    ins, outs = _transcoder_hooks(tset)
    store.update(x_in=[None] * L, mlp_out=[None] * L)
    const = [run.mlp_out[layer] - tset.skip(layer, run.x_in[layer].to(tset.layers[layer].W_dec.dtype)).float()
             for layer in range(L)]

    def detach(t, hook):
        return t.detach()

    def take_in(layer):
        def hook(t, hook):
            store["x_in"][layer] = t
            return t
        return hook

    def put_out(layer):
        def hook(t, hook):
            x = store["x_in"][layer]
            y = tset.skip(layer, x.to(tset.layers[layer].W_dec.dtype)).to(t.dtype) + const[layer].to(t.dtype)[None]
            if not y.requires_grad:  # no skip: the output is a constant; a leaf to read gradients at
                y = y.detach().requires_grad_(True)
            store["mlp_out"][layer] = y
            return y
        return hook

    def leaf(t, hook):
        t = t.detach().requires_grad_(True)
        store["embed"] = t
        return t

    def final(t, hook):
        store["final"] = t
        return t

    hooks = [(n, detach) for n in run.frozen]
    hooks += [(ins[layer], take_in(layer)) for layer in range(L)]
    hooks += [(outs[layer], put_out(layer)) for layer in range(L)]
    return hooks + [(EMBED, leaf), (FINAL_NORM_OUT, final)]
