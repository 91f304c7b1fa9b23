"""TransformerLens hook names: the one module that builds, parses and checks them.

Every hook name mechscope uses comes from a function or constant here, so the strings
(which saved results, SAE folders and tests depend on) have one definition:

- per block ``L``: ``blocks.L.hook_{site}`` (``resid_pre``, ``resid_mid``, ``resid_post``,
  ``attn_out``, ``mlp_in``, ``mlp_out``, ``q_input``/``k_input``/``v_input``), the attention
  hooks ``blocks.L.attn.hook_{site}`` (``q``, ``k``, ``v``, ``rot_q``, ``rot_k``, ``cos``,
  ``sin``, ``attn_scores``, ``pattern``, ``z``, ``result``), the norms'
  ``blocks.L.ln{1,2}.hook_normalized`` and the MLP neurons ``blocks.L.mlp.hook_post``;
- outside the blocks: ``hook_embed``, ``hook_pos_embed``, ``ln_final.hook_in``,
  ``ln_final.hook_out`` and ``unembed.hook_in``.

``parse_hook`` is the inverse (layer and the rest of the name); ``check_hook_name`` is the
user-facing check that a model has a hook of a given name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

from mechscope.errors import MechscopeError, near_matches

if TYPE_CHECKING:
    from mechscope.models.load import Model

BlockSite = Literal[
    "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_in", "mlp_out", "q_input", "k_input", "v_input"
]
AttnSite = Literal["q", "k", "v", "rot_q", "rot_k", "cos", "sin", "attn_scores", "pattern", "z", "result"]

EMBED = "hook_embed"
"""Token embeddings [batch, pos, d_model]."""
POS_EMBED = "hook_pos_embed"
"""Learned position embeddings [batch, pos, d_model] (absent on rotary models)."""
FINAL_NORM_IN = "ln_final.hook_in"
"""The residual stream after the last block, before the final norm [batch, pos, d_model]."""
FINAL_NORM_OUT = "ln_final.hook_out"
"""The final norm's output [batch, pos, d_model]."""
UNEMBED_IN = "unembed.hook_in"
"""The unembedding's input [batch, pos, d_model]; a hook that returns fewer positions makes the
model compute logits at those only (``patching.logits_at``)."""

_BLOCKS = "blocks."
# Sites that exist only while the bridge's split q/k/v inputs or per-head results are on.
_SPLIT_SITES = ("hook_q_input", "hook_k_input", "hook_v_input", "attn.hook_result")


def block_hook(layer: int, site: BlockSite) -> str:
    """``blocks.{layer}.hook_{site}``."""
    return f"{_BLOCKS}{layer}.hook_{site}"


def attn_hook(layer: int, site: AttnSite) -> str:
    """``blocks.{layer}.attn.hook_{site}``."""
    return f"{_BLOCKS}{layer}.attn.hook_{site}"


def resid_pre(layer: int) -> str:
    """The residual stream entering block ``layer`` [batch, pos, d_model]."""
    return block_hook(layer, "resid_pre")


def resid_mid(layer: int) -> str:
    """The residual stream between block ``layer``'s attention and MLP [batch, pos, d_model]."""
    return block_hook(layer, "resid_mid")


def resid_post(layer: int) -> str:
    """The residual stream leaving block ``layer`` [batch, pos, d_model]."""
    return block_hook(layer, "resid_post")


def resid_into(layer: int, n_layers: int) -> str:
    """The residual stream entering block ``layer``; ``ln_final.hook_in`` for ``layer >= n_layers``."""
    return FINAL_NORM_IN if layer >= n_layers else resid_pre(layer)


def attn_out(layer: int) -> str:
    """Block ``layer``'s attention output [batch, pos, d_model]."""
    return block_hook(layer, "attn_out")


def mlp_in(layer: int) -> str:
    """Block ``layer``'s MLP-branch input, before its norm [batch, pos, d_model]."""
    return block_hook(layer, "mlp_in")


def mlp_out(layer: int) -> str:
    """Block ``layer``'s MLP output [batch, pos, d_model]."""
    return block_hook(layer, "mlp_out")


def mlp_norm_in(layer: int) -> str:
    """The input of block ``layer``'s norm after its MLP (Gemma 2/3: ``post_feedforward_layernorm``),
    i.e. ``mlp_post @ W_out + b_out`` before that norm; only models with such a norm have it."""
    return f"blocks.{layer}.ln2_post.hook_in"


def mlp_post(layer: int) -> str:
    """Block ``layer``'s MLP neurons [batch, pos, d_mlp]: the activation that multiplies the output
    matrix W_out (``act(pre)``; ``act(gate) * up`` for gated MLPs), so ``mlp_post @ W_out + b_out``
    equals ``hook_mlp_out`` (tested on GPT-2 and Llama shapes)."""
    return f"{_BLOCKS}{layer}.mlp.hook_post"


def q_input(layer: int) -> str:
    """Per-head query inputs of block ``layer`` [batch, pos, n_heads, d_model] (split mode)."""
    return block_hook(layer, "q_input")


def k_input(layer: int) -> str:
    """Per-KV-head key inputs of block ``layer`` [batch, pos, n_kv_heads, d_model] (split mode)."""
    return block_hook(layer, "k_input")


def v_input(layer: int) -> str:
    """Per-KV-head value inputs of block ``layer`` [batch, pos, n_kv_heads, d_model] (split mode)."""
    return block_hook(layer, "v_input")


def attn_z(layer: int) -> str:
    """Per-head attention-weighted values of block ``layer`` [batch, pos, n_heads, d_head]."""
    return attn_hook(layer, "z")


def attn_result(layer: int) -> str:
    """Per-head outputs z_h @ W_O[h] of block ``layer`` [batch, pos, n_heads, d_model] (per-head result mode)."""
    return attn_hook(layer, "result")


def attn_pattern(layer: int) -> str:
    """Attention probabilities of block ``layer`` [batch, n_heads, q_pos, k_pos]."""
    return attn_hook(layer, "pattern")


def attn_scores(layer: int) -> str:
    """Attention scores before the softmax of block ``layer`` [batch, n_heads, q_pos, k_pos]."""
    return attn_hook(layer, "attn_scores")


def ln_normalized(layer: int, which: Literal[1, 2]) -> str:
    """``blocks.{layer}.ln{which}.hook_normalized``: the normalised input of the attention (1) or MLP (2)."""
    return f"{_BLOCKS}{layer}.ln{which}.hook_normalized"


def ln_scale(layer: int, which: Literal[1, 2]) -> str:
    """``blocks.{layer}.ln{which}.hook_scale``: the norm's per-position scale [batch, pos, 1]
    (sqrt of the mean square, or of the variance for LayerNorm, plus eps); a hook that
    replaces it changes the norm's output (outside the split-attention modes)."""
    return f"{_BLOCKS}{layer}.ln{which}.hook_scale"


FINAL_NORM_SCALE = "ln_final.hook_scale"
"""The final norm's per-position scale [batch, pos, 1]."""


class HookName(NamedTuple):
    """A hook name split into its block and the rest."""

    layer: int | None
    """The block index of ``blocks.{layer}.…``; ``None`` for hooks outside the blocks."""
    site: str
    """The name after ``blocks.{layer}.`` (``hook_resid_post``, ``attn.hook_z``,
    ``ln2.hook_normalized``), or the whole name outside the blocks (``hook_embed``)."""


def parse_hook(name: str) -> HookName:
    """Split a hook name into (layer, site); the inverse of the builders above.

    ``parse_hook("blocks.3.attn.hook_z") == HookName(3, "attn.hook_z")``;
    ``parse_hook("hook_embed") == HookName(None, "hook_embed")``. Does not check that a
    model has the hook (``check_hook_name`` does).
    """
    if name.startswith(_BLOCKS):
        layer, dot, site = name[len(_BLOCKS):].partition(".")
        if dot and site and layer.isascii() and layer.isdigit():
            return HookName(int(layer), site)
    return HookName(None, name)


def hook_layer(name: str) -> int:
    """The block index of a ``blocks.{layer}.…`` hook name; a clear error for any other name."""
    layer = parse_hook(name).layer
    if layer is None:
        raise MechscopeError(f"'{name}' is not a hook inside a block (block hooks look like 'blocks.3.hook_resid_post').")
    return layer


def needs_split_attention(name: str) -> bool:
    """Whether hook ``name`` exists only with split q/k/v inputs or per-head results switched on."""
    return name.endswith(_SPLIT_SITES)


def check_hook_name(model: Model, name: str) -> str:
    """Return ``name`` if the model has a hook point of that name, else raise a clear error."""
    names = sorted(model.bridge.hook_dict.keys())
    if name in model.bridge.hook_dict:
        return name
    raise MechscopeError(
        f"The model has no hook named '{name}'.{near_matches(name, names)} "
        f"(Hook names look like '{resid_post(max(0, model.summary.n_layers - 1))}'; there are {len(names)} in all: "
        "`mechscope hooks` lists them.)"
    )
