"""Steering: generate with a direction added to the model's activations, side by side with the
unsteered text from the same prompt and the same seed.

Three interventions, each a forward hook at one hook point:

1. **Feature addition**: ``x += scale * W_dec[f] / ||W_dec[f]||`` at every position (the
   feature's unit decoder direction times ``scale``, in the units of the residual stream;
   ``SteerResult.resid_norm``, the median activation norm there, gives the scale to compare).
2. **Clamping** (Templeton et al. 2024, "Scaling Monosemanticity"): encode ``x``, set feature f
   to ``value`` and decode the change, ``x += (value - f(x)) * W_dec[f]``. Since
   ``x = SAE(x) + error``, this is the SAE's reconstruction with feature f clamped plus the
   untouched error term. For a transcoder the feature is read at its input hook and the change
   written at its output hook.
3. **Activation addition** (Turner et al. 2023, "ActAdd"): the steering vector is
   ``h_l(plus) - h_l(minus)``, the two prompts' activations at ``blocks.l.hook_resid_pre``
   (the shorter prompt right-padded with space tokens to equal length), added times ``coef``
   to the first positions of the prompt being continued (a --plus or --minus longer than that
   prompt is refused: its last positions would fall on the generated tokens).

Generation recomputes the whole sequence each step (no KV cache), so the hooks act on the
prompt and on every generated token alike. The unsteered and the steered continuation run as the
two rows of one batch (the hook touches row 1 only), and each row samples with its own
generator seeded identically, so a zero intervention reproduces the unsteered text exactly.
``temperature=0`` is greedy decoding.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from mechscope.errors import FLOAT32_MAX, MechscopeError, check_config
from mechscope.models.hooks import needs_split_attention, resid_pre
from mechscope.models.load import context_overrun, plain_attention
from mechscope.results import write_result_json
from mechscope.sae.config import GenerationConfig
from mechscope.sae.io import check_sae_fits

if TYPE_CHECKING:
    from mechscope.models import Model

SCHEMA_VERSION = 1

Hook = tuple[str, Callable]


@dataclass
class SteerResult:
    """Unsteered and steered continuations of one prompt."""

    mode: str  # "add" | "clamp" | "actadd"
    prompt: str
    unsteered: str
    steered: str
    settings: dict[str, Any]
    model: dict[str, Any] = field(default_factory=dict)
    unsteered_ids: list[int] = field(default_factory=list)
    steered_ids: list[int] = field(default_factory=list)
    next_token: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    """Top-5 (token, probability) of the first generated position, per row."""
    resid_norm: float = 0.0
    """Median L2 norm of the unsteered activation at the steering hook over the prompt's
    positions (the median: position 0 is often an attention sink with a far larger norm)."""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}

    def save(self, out_dir: str | Path) -> Path:
        return write_result_json(out_dir, "steer.json", self.to_dict())


# ------------------------------------------------------------------------ hooks
def _add_at(vec: Tensor, row: int = 1, front: bool = False) -> Callable:
    """Hook adding ``vec`` ([d] at every position, or [n, d] at the first n positions when
    ``front``) to batch row ``row``; per-head activations are treated as flattened."""

    def hook(act: Tensor, hook=None) -> Tensor:
        a = act.reshape(*act.shape[:2], -1)  # [B, P, d]
        v = vec.to(a.dtype).to(a.device)
        add = torch.zeros_like(a)  # out of place: the hooked tensor may be shared elsewhere
        if front:
            n = min(len(v), a.shape[1])
            add[row, :n] = v[:n]
        else:
            add[row] = v
        return (a + add).view(act.shape)

    return hook


def feature_direction(sae, feature: int) -> Tensor:
    """Unit decoder direction [d_out] of one feature."""
    _check_feature(sae, feature)
    d = sae.W_dec.detach()[feature]
    n = d.norm()
    if not n > 0:
        raise MechscopeError(f"Feature {feature} has a zero decoder direction; steer another feature.")
    return d / n


def add_hooks(hook_name: str, direction: Tensor, scale: float) -> list[Hook]:
    """Hooks adding ``scale * direction`` at every position of ``hook_name`` (steered row)."""
    return [(hook_name, _add_at(scale * direction))]


def clamp_hooks(sae, feature: int, value: float) -> list[Hook]:
    """Hooks clamping SAE feature ``feature`` to ``value`` while keeping the SAE error term."""
    _check_feature(sae, feature)
    c = sae.cfg
    read = c.hook_name
    write = getattr(c, "hook_name_out", None) or read
    w = sae.W_dec.detach()[feature]  # [d_out]
    box: dict[str, Tensor] = {}

    def read_hook(act: Tensor, hook=None):
        x = act.reshape(*act.shape[:2], -1)[1]  # [P, d_in], the steered row
        box["delta"] = (value - sae.encode(x.to(sae.device))[..., feature])  # [P]
        return None

    def write_hook(act: Tensor, hook=None) -> Tensor:
        if read == write:
            read_hook(act)
        a = act.reshape(*act.shape[:2], -1)
        add = torch.zeros_like(a)
        add[1] = box.pop("delta").to(a.dtype).to(a.device)[:, None] * w.to(a.dtype).to(a.device)  # [P, d_out]
        return (a + add).view(act.shape)

    return ([] if read == write else [(read, read_hook)]) + [(write, write_hook)]


@torch.no_grad()
def actadd_vector(model: Model, plus: str, minus: str, hook_name: str) -> Tensor:
    """ActAdd steering vector [n, d]: activations of ``plus`` minus those of ``minus`` at
    ``hook_name``, the shorter prompt right-padded with space tokens (Turner et al. 2023)."""
    from mechscope.sae.dashboard import acts_at_hook

    a, b = _actadd_tokens(model, plus, minus)
    n = max(len(a), len(b))
    if (n_ctx := context_overrun(model, n)) is not None:  # before the forward pass, whose own check names --context-len
        raise MechscopeError(f"{_longer(a, b)} is {n} tokens long, more than {model.summary.name} reads ({n_ctx} "
                             f"positions); shorten {_longer(a, b)}.")
    space = model.tokenizer(" ", add_special_tokens=False)["input_ids"]
    pad = space[-1] if space else (model.tokenizer.pad_token_id or 0)
    a, b = a + [pad] * (n - len(a)), b + [pad] * (n - len(b))
    acts = acts_at_hook(model, hook_name, torch.tensor([a, b]))  # [2, n, d]
    return acts[0] - acts[1]


def _actadd_tokens(model: Model, plus: str, minus: str) -> tuple[list[int], list[int]]:
    """The token ids of ActAdd's two prompts, refused in one sentence where one is empty."""
    a, b = model.to_tokens(plus), model.to_tokens(minus)
    if not a or not b:
        raise MechscopeError("ActAdd needs two non-empty prompts (--plus and --minus).")
    return a, b


def _longer(a: list[int], b: list[int]) -> str:
    """The option naming the longer of ActAdd's prompts (``a``: --plus, ``b``: --minus)."""
    return "--plus" if len(a) > len(b) else "--minus" if len(b) > len(a) else "--plus/--minus"


def check_actadd_fits(model: Model, prompt: str, plus: str, minus: str) -> None:
    """ActAdd adds its vector to the prompt's first positions (Turner et al. 2023, whose code
    asserts the same): a --plus or --minus with more tokens than the prompt would spill its last
    positions onto the generated tokens, one more each step, so it is refused in one sentence."""
    ids = model.to_tokens(prompt)
    if not ids:
        raise MechscopeError("The prompt is empty; give some text to continue.")
    a, b = _actadd_tokens(model, plus, minus)
    n = max(len(a), len(b))
    if n > len(ids):
        raise MechscopeError(f"{_longer(a, b)} is {n} tokens long but the prompt is only {len(ids)}, and ActAdd adds "
                             f"the steering vector to the prompt's first positions; shorten {_longer(a, b)} to at most "
                             f"{len(ids)} tokens or give a longer prompt.")


def actadd_hooks(vector: Tensor, hook_name: str, coef: float) -> list[Hook]:
    return [(hook_name, _add_at(coef * vector, front=True))]


# ------------------------------------------------------------------------ generation
@torch.no_grad()
def generate_pair(model: Model, prompt: str, hooks: list[Hook], gen: GenerationConfig | None = None) -> tuple[list[int], list[int], Tensor]:
    """Continue ``prompt`` twice in one batch: row 0 plain, row 1 with ``hooks`` (which touch
    row 1 only). Returns the new token ids of each row and the first step's next-token
    probabilities [2, d_vocab]."""
    gen = gen or GenerationConfig()
    ids = model.to_tokens(prompt)
    if not ids:
        raise MechscopeError("The prompt is empty; give some text to continue.")
    if (n_ctx := context_overrun(model, len(ids) + gen.max_new_tokens)) is not None:
        raise MechscopeError(f"Prompt ({len(ids)} tokens) plus {gen.max_new_tokens} new tokens exceeds the model's context of {n_ctx}; shorten one.")
    gens = [torch.Generator().manual_seed(gen.seed) for _ in range(2)]
    seq = torch.tensor([ids, ids], device=model.device)
    first = None
    split = any(needs_split_attention(name) for name, _ in hooks)
    ctx = contextlib.nullcontext() if split else plain_attention(model)
    with ctx:
        for _ in range(gen.max_new_tokens):
            logits = model.bridge.run_with_hooks(seq, fwd_hooks=hooks)[:, -1].float()  # [2, V]
            if not bool(torch.isfinite(logits[1]).all()) and bool(torch.isfinite(logits[0]).all()):
                raise MechscopeError("the steering made the model's outputs NaN or infinite (its activations overflowed "
                                     "float32), so the steered text would be empty; use a smaller --scale, --clamp or --coef.")
            if first is None:
                first = logits.softmax(-1)
            nxt = torch.stack([_pick(logits[r], gen, gens[r]) for r in range(2)])
            seq = torch.cat([seq, nxt[:, None].to(seq.device)], dim=1)
    new = seq[:, len(ids):].tolist()
    eos = model.tokenizer.eos_token_id
    if gen.stop_at_eos and eos is not None:
        new = [r[: r.index(eos)] if eos in r else r for r in new]
    if first is None:
        raise MechscopeError("generation needs max_new_tokens >= 1; got 0.")
    return new[0], new[1], first


def _pick(logits: Tensor, gen: GenerationConfig, g: torch.Generator) -> Tensor:
    if gen.temperature <= 0:
        return logits.argmax()
    lg = logits / gen.temperature
    if gen.top_k:
        kth = lg.topk(min(gen.top_k, len(lg))).values[-1]
        lg = lg.masked_fill(lg < kth, float("-inf"))
    return torch.multinomial(lg.softmax(-1).cpu(), 1, generator=g)[0]


def _run(model: Model, prompt: str, hooks: list[Hook], hook_name: str, mode: str, settings: dict, gen: GenerationConfig) -> SteerResult:
    from mechscope.sae.dashboard import acts_at_hook

    t0 = time.perf_counter()
    if hook_name not in model.bridge.hook_dict:
        raise MechscopeError(f"The model has no hook '{hook_name}'; is this the SAE's model?")
    a, b, first = generate_pair(model, prompt, hooks, gen)
    x = acts_at_hook(model, hook_name, torch.tensor([model.to_tokens(prompt)]))
    dec = model.tokenizer.decode
    top = {}
    for r, name in enumerate(("unsteered", "steered")):
        pv, pi = first[r].topk(5)
        top[name] = [(dec([i]), float(p)) for i, p in zip(pi.tolist(), pv.tolist())]
    return SteerResult(mode=mode, prompt=prompt, unsteered=dec(a), steered=dec(b),
                       settings={**settings, **asdict(gen)}, model=model.summary.to_dict(),
                       unsteered_ids=a, steered_ids=b, next_token=top,
                       resid_norm=float(x[0].norm(dim=-1).median()), seconds=time.perf_counter() - t0)


def steer_feature(model, sae, prompt: str, feature: int, scale: float | None = None, clamp: float | None = None,
                  gen: GenerationConfig | None = None) -> SteerResult:
    """Generate with SAE feature ``feature`` added (``scale``) or clamped (``clamp``), beside the
    unsteered text."""
    check_config(gen, GenerationConfig, "steer_feature")
    gen = gen or GenerationConfig()
    check_feature_mode(scale, clamp)
    c = sae.cfg
    write = getattr(c, "hook_name_out", None) or c.hook_name
    check_sae_fits(sae, model)
    if scale is not None:
        hooks, mode, settings = add_hooks(write, feature_direction(sae, feature), scale), "add", {"scale": scale}
    else:
        assert clamp is not None  # check_feature_mode: exactly one of scale and clamp
        hooks, mode, settings = clamp_hooks(sae, feature, clamp), "clamp", {"value": clamp}
    settings = {"feature": feature, "hook": write, "sae": c.to_dict() if hasattr(c, "to_dict") else {}, **settings}
    return _run(model, prompt, hooks, write, mode, settings, gen)


def check_feature_mode(scale: float | None, clamp: float | None) -> None:
    """Feature steering either adds the direction (``scale``) or clamps the feature (``clamp``)."""
    if (scale is None) == (clamp is None):
        raise MechscopeError("Give exactly one of --scale (add the feature's direction) or --clamp (set the feature's activation).")
    check_steer_value("--scale" if scale is not None else "--clamp", scale if scale is not None else clamp)



def check_steer_value(option: str, value: float | None) -> None:
    """NaN, infinity or a value beyond float32's range (the model's arithmetic: it becomes inf
    there) steers to NaN activations, whose text is empty: refused in one sentence."""
    if value is not None and not math.isfinite(value):
        raise MechscopeError(f"{option} must be a finite number; got {value}.")
    if value is not None and abs(value) > FLOAT32_MAX:
        raise MechscopeError(f"{option} {value:g} is beyond float32's range (3.4e38), where the model computes; give a "
                             "value such as 4 or 10.")



def steer_actadd(model: Model, prompt: str, plus: str, minus: str, layer: int, coef: float = 1.0,
                 gen: GenerationConfig | None = None) -> SteerResult:
    """Generate with the ActAdd vector ``h(plus) - h(minus)`` at ``blocks.layer.hook_resid_pre``
    added ``coef`` times to the prompt's first positions, beside the unsteered text."""
    gen = gen or GenerationConfig()
    check_steer_value("--coef", coef)
    n_layers = model.summary.n_layers
    if not 0 <= layer < n_layers:
        raise MechscopeError(f"Layer {layer} is out of range; the model has layers 0..{n_layers - 1}.")
    hook = resid_pre(layer)
    check_actadd_fits(model, prompt, plus, minus)
    vec = actadd_vector(model, plus, minus, hook)
    settings = {"plus": plus, "minus": minus, "layer": layer, "hook": hook, "coef": coef, "n_positions": len(vec)}
    return _run(model, prompt, actadd_hooks(vec, hook, coef), hook, "actadd", settings, gen)


def _check_feature(sae, feature: int) -> None:
    if isinstance(feature, bool) or not hasattr(feature, "__index__"):
        raise MechscopeError(f"The feature must be a whole-number index from 0 to {sae.cfg.d_sae - 1}; got {feature!r}.")
    if not 0 <= feature < sae.cfg.d_sae:
        raise MechscopeError(f"Feature {feature} is out of range; this SAE has features 0..{sae.cfg.d_sae - 1}.")
