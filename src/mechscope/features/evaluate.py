"""Evaluate a transcoder set on held-out text: per layer, and all layers spliced at once.

Per layer ``l`` (its transcoder reads ``x`` = ``blocks.l.ln2.hook_normalized`` and predicts
``y`` = ``blocks.l.hook_mlp_out``, both ``[batch, pos, d_model]``):

- ``fvu``: the mean over tokens of the summed squared error ``|y - y_hat|^2``, over the summed
  per-dimension variance of ``y`` on these tokens; ``mse`` is the numerator;
- ``l0``: mean number of active features per token; ``dead_frac``: the fraction of features
  that never fire on these tokens;
- ``ce_spliced``: next-token cross-entropy with that MLP's output replaced by the transcoder's
  output (every other layer clean); ``ce_zero``: with that MLP's output zeroed (the baseline);
  ``ce_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)``.

All layers at once (the replacement model; ``all_layers``): every MLP's output replaced by its
transcoder's output computed from that layer's input *in the spliced run* (so errors compound
through the layers), against the baseline with every MLP's output zeroed:
``ce_recovered = (ce_zero_all - ce_spliced_all) / (ce_zero_all - ce_clean)``. For a folder
holding some layers only (``{layer: transcoder}``), "all" means the layers present.

Conventions are those of ``mechscope.sae.evaluate`` (so a layer's numbers equal
``evaluate_sae`` of its transcoder on the same tokens when ``exclude_special`` is off and
``sink_ratio`` None):
positions before ``skip_first`` (the attention sink at position 0) are never spliced or zeroed
and are left out of the statistics; with ``exclude_special`` (the default, as in training) so
are the positions of special tokens (``activations.special_token_ids``: the document separator
that packing puts mid-context, BOS, chat markers), the other attention sinks, whose MLP outputs
are tens of times larger than a text token's (the embedded model's layer 11: norm ~15,800
against ~400) so that a handful of them would set the FVU; with ``sink_ratio`` (default 30,
as in training) so are the attention sinks, positions whose residual stream after one of
blocks 0 to the set's deepest layer is more than 30x that block's median in the clean pass
(``activations.store.sink_positions``: massive activations, e.g. a newline at position 1);
``fvu_with_special`` reports the FVU over every position from ``skip_first`` on, for the record;
cross-entropies are means over the predictions made from positions ``max(skip_first, 1) - 1``
on. Forward passes run with split attention inputs off (``plain_attention``).

Speed (``fast=True``, the default). Splicing or zeroing layer ``l``'s MLP changes nothing
below block ``l``, so those runs start at block ``l``: the clean pass records every block's
call (its input residual and the keyword arguments the model passed it: rotary embeddings,
attention mask; key/value caches dropped), and a variant run calls blocks ``l..L-1``
itself with those arguments, then the final norm and unembedding, the hooks of the variant
live on the bridge meanwhile. Why not the bridge's ``start_at_layer``: in transformer-lens 4.3
it still runs blocks ``0..l-1`` and discards them, so it saves nothing. A batch then costs one
clean pass, ``2 * sum over layers of (L - l)`` blocks plus ``2 * n_layers`` unembeddings, and
two passes from the lowest layer for all layers at once, instead of ``2 * n_layers + 3`` full
passes (measured in ``bench/transcoders_eval.py``). The replay is checked on the first batch
(block ``L-1`` replayed must give the clean logits) and the straightforward full passes are
used when it does not; ``fast=False`` forces them (a test: both give the same numbers, 1e-5).

Uncertainty: CE loss recovered is a ratio of means over contexts, so each one comes with a
95% confidence half-width (``ce_recovered_ci95``) by the delta method over the per-context
sums (contexts, not tokens, are the independent units), so a short run says how far to trust it.
"""

from __future__ import annotations

import itertools
import math
import statistics
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from mechscope.activations import StoreConfig, get_corpus, pack_contexts, special_token_ids
from mechscope.activations.config import check_sink_ratio
from mechscope.activations.store import sink_hooks, sink_positions
from mechscope.errors import MechscopeError
from mechscope.features.config import EVAL_TOKENS, SINK_RATIO
from mechscope.features.transcoder_set import TranscoderSet
from mechscope.models.hooks import hook_layer, parse_hook
from mechscope.models.load import plain_attention
from mechscope.progress import ProgressArg, as_progress
from mechscope.results import json_safe, write_json
from mechscope.sae.io import check_sae_fits
from mechscope.sae.model import SAE

if TYPE_CHECKING:
    from mechscope.models import Model

SCHEMA_VERSION = 1
EVAL_JSON = "eval.json"


def _ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Per-prediction next-token loss [b, pos - 1] of logits [b, pos, V] for tokens [b, pos]."""
    lp = logits[:, :-1].float().log_softmax(-1)
    return -lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _as_layers(tset: TranscoderSet | Mapping[int, SAE]) -> dict[int, SAE]:
    if isinstance(tset, TranscoderSet):
        return dict(enumerate(tset.layers))
    layers = dict(sorted(tset.items()))
    if not layers:
        raise MechscopeError("no transcoders to evaluate; pass a set or at least one layer's transcoder.")
    return layers


def _recovered(zero: float, spliced: float, clean: float) -> float:
    from mechscope.sae.evaluate import recovered

    return recovered(zero, spliced, clean)


def _recovered_ci95(zero: list[float], spliced: list[float], clean: list[float]) -> float:
    """95% half-width of ``sum(z - s) / sum(z - c)`` over per-context sums (delta method for a
    ratio estimator); NaN with fewer than two contexts."""
    n = len(zero)
    a = torch.tensor(zero, dtype=torch.float64) - torch.tensor(spliced, dtype=torch.float64)
    b = torch.tensor(zero, dtype=torch.float64) - torch.tensor(clean, dtype=torch.float64)
    if n < 2 or float(b.sum()) == 0.0:
        return math.nan
    r = a.sum() / b.sum()
    var = n / (n - 1) * float((a - r * b).pow(2).sum()) / float(b.sum()) ** 2
    return 1.96 * math.sqrt(var)


def _is_kv_cache(v: Any) -> bool:
    return type(v).__name__.endswith("Cache")


class _BlockReplay:
    """Runs the model from the input of block ``l`` on (module docstring): ``record`` captures
    each block's call during a clean pass, ``logits(l, hooks)`` replays blocks ``l..L-1`` with
    ``hooks`` live, then the final norm and unembedding."""

    def __init__(self, bridge: Any):
        self.bridge = bridge
        self.blocks = list(bridge.blocks)
        self.calls: dict[int, tuple[tuple, dict]] = {}

    @staticmethod
    def available(bridge: Any) -> bool:
        return all(hasattr(bridge, a) for a in ("blocks", "ln_final", "unembed", "hooks"))

    @contextmanager
    def record(self) -> Iterator[None]:
        self.calls.clear()

        def grab(i: int) -> Callable:
            def hook(mod: Any, args: tuple, kwargs: dict) -> None:
                args = (args[0].detach().clone(), *(None if _is_kv_cache(a) else a for a in args[1:]))
                kw = {k: None if _is_kv_cache(v) else v for k, v in kwargs.items()}
                if "use_cache" in kw:
                    kw["use_cache"] = False
                self.calls[i] = (args, kw)
            return hook

        handles = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def logits(self, start: int, hooks: list) -> Tensor:
        """Logits [batch, pos, V] of the run that enters block ``start`` with the recorded residual."""
        with self.bridge.hooks(fwd_hooks=hooks):
            h = self.calls[start][0][0]
            for i in range(start, len(self.blocks)):
                args, kw = self.calls[i]
                out = self.blocks[i](h, *args[1:], **kw)
                h = out[0] if isinstance(out, tuple) else out
            return self.bridge.unembed(self.bridge.ln_final(h))


def _start_block(*hooks: str | None) -> int:
    """The first block a run must recompute when these hooks change: the lowest layer among
    them (0 when one is outside the blocks or not given)."""
    layers = [parse_hook(h).layer if h is not None else None for h in hooks]
    found = [x for x in layers if x is not None]
    return min(found) if len(found) == len(layers) else 0


@torch.no_grad()
def evaluate_transcoders(
    model: Model,
    tset: TranscoderSet | Mapping[int, SAE],
    tokens: Tensor,
    *,
    batch_size: int = 8,
    skip_first: int = 1,
    exclude_special: bool = True,
    sink_ratio: float | None = SINK_RATIO,
    progress: ProgressArg = False,
    fast: bool = True,
) -> dict[str, Any]:
    """Evaluate ``tset`` (a ``TranscoderSet`` or ``{layer: transcoder}``) on ``tokens``
    ``[n_contexts, ctx_len]`` (module docstring for the metrics and baselines).

    Returns a JSON-ready dict: ``schema_version``, ``model``, ``tokens`` (positions scored per
    layer), ``ce_clean``, ``layers`` (one dict per layer: ``layer``, ``architecture``,
    ``d_sae``, ``k``, ``fvu``, ``mse``, ``l0``, ``dead_frac``, ``ce_spliced``, ``ce_zero``,
    ``ce_recovered``), ``all_layers`` (``layers``, ``ce_spliced``, ``ce_zero``,
    ``ce_recovered``), ``summary`` (``median_fvu``, ``max_fvu``, ``mean_l0``,
    ``mean_dead_frac``, ``min_ce_recovered``) and ``settings``; each layer also has
    ``fvu_with_special`` (every position from ``skip_first`` on counted: special tokens' and
    sinks'); ``sink_ratio`` leaves out the attention sinks as training does
    (``activations.store.sink_positions`` over the residual stream after blocks 0 to the set's
    deepest layer in the clean pass; None keeps them); each ``ce_recovered`` has a
    ``ce_recovered_ci95`` beside it. ``fast`` starts each layer's runs at its block (module
    docstring); ``fast=False`` runs ``2 * n_layers + 3`` full forward passes per batch.
    ``progress`` (``mechscope.progress``) sees one phase counting the contexts done.
    """
    layers = _as_layers(tset)
    if tokens.dim() != 2 or tokens.shape[0] == 0 or not 0 <= skip_first < tokens.shape[1]:
        raise MechscopeError(f"tokens must be [n_contexts, ctx_len] with ctx_len > skip_first={skip_first}; got {list(tokens.shape)}.")
    dev = model.device
    for tc in layers.values():
        check_sae_fits(tc, model)
    layers = {layer: tc.to(dev) for layer, tc in layers.items()}
    out_hook: dict[int, str] = {}
    for layer, tc in layers.items():
        if tc.cfg.hook_name_out is None:
            raise MechscopeError(f"layer {layer}'s module is an SAE, not a transcoder (its config names no hook_name_out); "
                                 "evaluate it with `mechscope sae eval`.")
        out_hook[layer] = tc.cfg.hook_name_out
    bridge = model.bridge
    s = skip_first
    lo = max(s, 1) - 1
    special = torch.tensor(special_token_ids(model.tokenizer) if exclude_special else [], dtype=torch.long, device=dev)
    check_sink_ratio(sink_ratio)
    deepest = max(hook_layer(h) for layer, tc in layers.items() for h in (tc.cfg.hook_name, out_hook[layer]))
    sinks_read = sink_hooks(model, deepest) if sink_ratio is not None else []
    acc: dict[int, dict[str, Any]] = {layer: {"n": 0, "l0": 0.0, "mse": 0.0, "ce_spliced": 0.0, "ce_zero": 0.0, "ctx_spliced": [], "ctx_zero": [],
                   "fired": torch.zeros(tc.cfg.d_sae, dtype=torch.bool, device=dev),
                   "y_sum": torch.zeros(tc.cfg.out_dim, dtype=torch.float64, device=dev),
                   "y_sq": torch.zeros((), dtype=torch.float64, device=dev),
                   "n_all": 0, "mse_all": 0.0, "y_sum_all": torch.zeros(tc.cfg.out_dim, dtype=torch.float64, device=dev),
                   "y_sq_all": torch.zeros((), dtype=torch.float64, device=dev)} for layer, tc in layers.items()}
    tot: dict[str, Any] = {"ce_clean": 0.0, "ce_all": 0.0, "ce_all_zero": 0.0, "ce_n": 0, "sinks": 0,
                           "ctx_clean": [], "ctx_all": [], "ctx_all_zero": []}
    replay = _BlockReplay(bridge) if fast and _BlockReplay.available(bridge) else None
    starts = {layer: _start_block(out_hook[layer]) for layer in layers}
    start_all = min(_start_block(tc.cfg.hook_name, tc.cfg.hook_name_out) for tc in layers.values())

    keep = torch.ones(0, dtype=torch.bool)  # [batch, pos - s]: positions spliced, zeroed and counted (set per batch)

    def replace(rows: Tensor) -> Callable:
        def hook(t: Tensor, hook: Any = None) -> Tensor:
            t = t.clone()
            t[:, s:] = torch.where(keep[..., None], rows.to(t.dtype), t[:, s:])
            return t
        return hook

    def zero(t: Tensor, hook: Any = None) -> Tensor:
        t = t.clone()
        t[:, s:] = t[:, s:].masked_fill(keep[..., None], 0)
        return t

    with plain_attention(model), as_progress(progress).phase("evaluating", total=tokens.shape[0], unit="ctx") as bar:
        done = 0
        while done < tokens.shape[0]:
            toks = tokens[done : done + batch_size].to(dev)
            keep = ~torch.isin(toks[:, s:], special)
            cache: dict[str, Tensor] = {}

            def grab(name: str) -> Callable:
                def hook(t: Tensor, hook: Any = None) -> None:
                    cache[name] = t.detach().clone()
                return hook

            names = [h for layer, tc in layers.items() for h in (tc.cfg.hook_name, out_hook[layer])]
            norms: dict[str, Tensor] = {}

            def grab_norm(name: str) -> Callable:
                def hook(t: Tensor, hook: Any = None) -> None:
                    norms[name] = t[:, s:].detach().float().norm(dim=-1)
                return hook

            with replay.record() if replay is not None else _nothing():
                clean = bridge.run_with_hooks(toks, fwd_hooks=[(h, grab(h)) for h in names] + [(h, grab_norm(h)) for h in sinks_read])
            sinks = sink_positions([norms[h] for h in sinks_read], sink_ratio) if sink_ratio is not None else None
            if sinks is not None:
                keep = keep & ~sinks
                tot["sinks"] += int((sinks & torch.isin(toks[:, s:], special, invert=True)).sum())
            if replay is not None and done == 0 and not _replay_matches(replay, clean):
                replay = None  # this model's blocks cannot be called on their own: full passes

            def run(first: int, hooks: list) -> Tensor:
                """Logits with ``hooks``, which touch nothing below block ``first``."""
                if replay is not None:
                    return replay.logits(first, hooks)
                return bridge.run_with_hooks(toks, fwd_hooks=hooks)

            def ce(logits: Tensor) -> tuple[float, list[float]]:
                """The batch's summed loss (summed as the straightforward code always has, so
                results stay the same to the last digit) and per-context sums (for the intervals)."""
                per = _ce(logits, toks)[:, lo:]
                return float(per.sum()), per.double().sum(1).tolist()

            ce_clean, ctx = ce(clean)
            tot["ce_clean"] += ce_clean
            tot["ce_n"] += toks.shape[0] * (toks.shape[1] - 1 - lo)
            tot["ctx_clean"] += ctx
            for layer, tc in layers.items():
                a = acc[layer]
                x, y = cache[tc.cfg.hook_name][:, s:], cache[out_hook[layer]][:, s:]
                f = tc.encode(x)
                y_hat = tc.decode(f, x)
                se = (y.float() - y_hat.float()).pow(2).sum(-1)  # [batch, pos - s]
                yf = y.flatten(0, 1).double()
                a["n_all"] += yf.shape[0]
                a["mse_all"] += float(se.sum())
                a["y_sum_all"] += yf.sum(0)
                a["y_sq_all"] += yf.pow(2).sum()
                yk, fk = y[keep].double(), f[keep]
                a["n"] += yk.shape[0]
                a["l0"] += float((fk > 0).sum())
                a["mse"] += float(se[keep].sum())
                a["fired"] |= (fk > 0).any(0)
                a["y_sum"] += yk.sum(0)
                a["y_sq"] += yk.pow(2).sum()
                for key, hook in (("spliced", replace(y_hat)), ("zero", zero)):
                    total, ctx = ce(run(starts[layer], [(out_hook[layer], hook)]))
                    a[f"ce_{key}"] += total
                    a[f"ctx_{key}"] += ctx
            for key, hooks in (("all", _replaced_hooks(layers, s, keep)), ("all_zero", [(tc.cfg.hook_name_out, zero) for tc in layers.values()])):
                total, ctx = ce(run(start_all, hooks))
                tot[f"ce_{key}"] += total
                tot[f"ctx_{key}"] += ctx
            done += toks.shape[0]
            bar.advance(toks.shape[0])
    m = tot["ce_n"]
    ce_clean = tot["ce_clean"] / m
    rows = []
    if acc[next(iter(layers))]["n"] == 0:
        raise MechscopeError("every evaluated position holds a special token or an attention sink; evaluate on text.")
    for layer, tc in layers.items():
        a = acc[layer]
        n = a["n"]
        var = float(a["y_sq"] / n - (a["y_sum"] / n).pow(2).sum())
        n_all = a["n_all"]
        var_all = float(a["y_sq_all"] / n_all - (a["y_sum_all"] / n_all).pow(2).sum())
        ce_s, ce_z = a["ce_spliced"] / m, a["ce_zero"] / m
        rows.append({
            "layer": layer, "architecture": tc.cfg.architecture, "d_sae": tc.cfg.d_sae, "k": tc.cfg.k,
            "fvu": (a["mse"] / n) / var if var > 0 else math.nan,
            "fvu_with_special": (a["mse_all"] / n_all) / var_all if var_all > 0 else math.nan,
            "mse": a["mse"] / n, "l0": a["l0"] / n,
            "dead_frac": float((~a["fired"]).float().mean()), "ce_spliced": ce_s, "ce_zero": ce_z,
            "ce_recovered": _recovered(ce_z, ce_s, ce_clean),
            "ce_recovered_ci95": _recovered_ci95(a["ctx_zero"], a["ctx_spliced"], tot["ctx_clean"]),
        })
    ce_all, ce_all_zero = tot["ce_all"] / m, tot["ce_all_zero"] / m
    fvus = [r["fvu"] for r in rows]
    first = next(iter(layers.values())).cfg
    return {
        "schema_version": SCHEMA_VERSION,
        "model": model.summary.name,
        "tokens": acc[rows[0]["layer"]]["n"],
        "ce_clean": ce_clean,
        "layers": rows,
        "all_layers": {"layers": list(layers), "ce_spliced": ce_all, "ce_zero": ce_all_zero,
                       "ce_recovered": _recovered(ce_all_zero, ce_all, ce_clean),
                       "ce_recovered_ci95": _recovered_ci95(tot["ctx_all_zero"], tot["ctx_all"], tot["ctx_clean"])},
        "summary": {"median_fvu": statistics.median(fvus), "max_fvu": max(fvus),
                    "mean_l0": statistics.fmean(r["l0"] for r in rows),
                    "mean_dead_frac": statistics.fmean(r["dead_frac"] for r in rows),
                    "min_ce_recovered": min(r["ce_recovered"] for r in rows)},
        "settings": {"skip_first": skip_first, "exclude_special": exclude_special, "sink_ratio": sink_ratio,
                     "special_positions": acc[rows[0]["layer"]]["n_all"] - acc[rows[0]["layer"]]["n"] - tot["sinks"],
                     "sink_positions": tot["sinks"], "contexts": int(tokens.shape[0]), "ctx_len": int(tokens.shape[1]),
                     "batch_size": batch_size, "n_layers_model": model.summary.n_layers, "fast": replay is not None,
                     "transcoders_model": first.model_name},
    }


def _replaced_hooks(layers: Mapping[int, SAE], s: int, keep: Tensor) -> list:
    """Hooks that replace every MLP in ``layers`` by its transcoder reading the run's own
    input (positions from ``s`` on where ``keep [batch, pos - s]`` holds)."""
    seen: dict[int, Tensor] = {}
    hooks = []
    for layer, tc in layers.items():
        def grab(t: Tensor, hook: Any = None, layer: int = layer) -> None:
            seen[layer] = t[:, s:].detach()

        def put(t: Tensor, hook: Any = None, layer: int = layer, tc: SAE = tc) -> Tensor:
            x = seen.pop(layer)
            t = t.clone()
            t[:, s:] = torch.where(keep[..., None], tc.decode(tc.encode(x), x).to(t.dtype), t[:, s:])
            return t

        hooks += [(tc.cfg.hook_name, grab), (tc.cfg.hook_name_out, put)]
    return hooks


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _replay_matches(replay: _BlockReplay, clean: Tensor) -> bool:
    """Whether replaying the last block reproduces the clean logits (checked once)."""
    try:
        got = replay.logits(len(replay.blocks) - 1, [])
    except Exception:  # noqa: BLE001 - any failure means: use full passes
        return False
    return got.shape == clean.shape and bool(torch.allclose(got.float(), clean.float(), rtol=1e-4, atol=1e-4))


def evaluate_transcoders_on_corpus(model: Model, tset: TranscoderSet | Mapping[int, SAE], corpus: str | None = None, *,
                                   n_tokens: int = EVAL_TOKENS, context_len: int = StoreConfig.context_len,
                                   batch_size: int = 8, exclude_special: bool = True,
                                   sink_ratio: float | None = SINK_RATIO, progress: ProgressArg = False) -> dict[str, Any]:
    """``evaluate_transcoders`` on the held-out split of ``corpus`` (``activations.get_corpus``;
    default the embedded corpus, whose train split sets are trained on): ``n_tokens //
    context_len`` contexts (at least one) of ``context_len`` tokens. ``settings["corpus"]``
    names the text."""
    if n_tokens <= 0:
        raise MechscopeError(f"--tokens must be positive, got {n_tokens}.")
    n_ctx = max(1, n_tokens // context_len)
    ctx = list(itertools.islice(pack_contexts(model.tokenizer, get_corpus(corpus, split="heldout"), context_len), n_ctx))
    if not ctx:
        raise MechscopeError("the held-out corpus yields no full context; use a larger corpus or a smaller --context-len.")
    r = evaluate_transcoders(model, tset, torch.tensor(ctx), batch_size=batch_size, exclude_special=exclude_special,
                             sink_ratio=sink_ratio, progress=progress)
    r["settings"]["corpus"] = (corpus or "embedded") + " (held-out split)"
    return r


def save_eval(d: dict[str, Any], path: str | Path) -> Path:
    """Write ``d`` as JSON to ``path`` atomically (a temporary file renamed); an undefined
    figure (NaN) is written as null."""
    return write_json(path, json_safe(d), indent=2)
