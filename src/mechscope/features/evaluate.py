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
``evaluate_sae`` of its transcoder on the same tokens): positions before ``skip_first`` (the
attention sink at position 0) are never spliced or zeroed and are left out of the statistics;
cross-entropies are means over the predictions made from positions ``max(skip_first, 1) - 1``
on. Forward passes run with split attention inputs off (``plain_attention``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from mechscope.activations import StoreConfig, get_corpus, pack_contexts
from mechscope.errors import MechscopeError
from mechscope.features.transcoder_set import TranscoderSet
from mechscope.models.load import plain_attention
from mechscope.sae.io import check_sae_fits
from mechscope.sae.model import SAE

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
    return (zero - spliced) / (zero - clean) if zero != clean else math.nan


@torch.no_grad()
def evaluate_transcoders(
    model: Any,
    tset: TranscoderSet | Mapping[int, SAE],
    tokens: Tensor,
    *,
    batch_size: int = 8,
    skip_first: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Evaluate ``tset`` (a ``TranscoderSet`` or ``{layer: transcoder}``) on ``tokens``
    ``[n_contexts, ctx_len]`` (module docstring for the metrics and baselines).

    Returns a JSON-ready dict: ``schema_version``, ``model``, ``tokens`` (positions scored per
    layer), ``ce_clean``, ``layers`` (one dict per layer: ``layer``, ``architecture``,
    ``d_sae``, ``k``, ``fvu``, ``mse``, ``l0``, ``dead_frac``, ``ce_spliced``, ``ce_zero``,
    ``ce_recovered``), ``all_layers`` (``layers``, ``ce_spliced``, ``ce_zero``,
    ``ce_recovered``), ``summary`` (``median_fvu``, ``max_fvu``, ``mean_l0``,
    ``mean_dead_frac``, ``min_ce_recovered``) and ``settings``. Per batch it runs
    ``2 * n_layers + 3`` forward passes. ``progress`` gets the number of contexts done.
    """
    layers = _as_layers(tset)
    if tokens.dim() != 2 or tokens.shape[0] == 0 or not 0 <= skip_first < tokens.shape[1]:
        raise MechscopeError(f"tokens must be [n_contexts, ctx_len] with ctx_len > skip_first={skip_first}; got {list(tokens.shape)}.")
    dev = model.device
    for tc in layers.values():
        check_sae_fits(tc, model)
    layers = {layer: tc.to(dev) for layer, tc in layers.items()}
    bridge = model.bridge
    s = skip_first
    lo = max(s, 1) - 1
    acc = {layer: {"n": 0, "l0": 0.0, "mse": 0.0, "ce_spliced": 0.0, "ce_zero": 0.0,
                   "fired": torch.zeros(tc.cfg.d_sae, dtype=torch.bool, device=dev),
                   "y_sum": torch.zeros(tc.cfg.out_dim, dtype=torch.float64, device=dev),
                   "y_sq": torch.zeros((), dtype=torch.float64, device=dev)} for layer, tc in layers.items()}
    tot = {"ce_clean": 0.0, "ce_all": 0.0, "ce_all_zero": 0.0, "ce_n": 0}

    def replace(rows: Tensor) -> Callable:
        def hook(t: Tensor, hook: Any = None) -> Tensor:
            t = t.clone()
            t[:, s:] = rows.to(t.dtype)
            return t
        return hook

    def zero(t: Tensor, hook: Any = None) -> Tensor:
        t = t.clone()
        t[:, s:] = 0
        return t

    with plain_attention(model):
        for start in range(0, tokens.shape[0], batch_size):
            toks = tokens[start : start + batch_size].to(dev)
            cache: dict[str, Tensor] = {}

            def grab(name: str) -> Callable:
                def hook(t: Tensor, hook: Any = None) -> None:
                    cache[name] = t.detach().clone()
                return hook

            names = [h for tc in layers.values() for h in (tc.cfg.hook_name, tc.cfg.hook_name_out)]
            clean = bridge.run_with_hooks(toks, fwd_hooks=[(h, grab(h)) for h in names])
            ce_clean = _ce(clean, toks)[:, lo:]
            tot["ce_clean"] += float(ce_clean.sum())
            tot["ce_n"] += ce_clean.numel()
            for layer, tc in layers.items():
                a = acc[layer]
                x, y = cache[tc.cfg.hook_name][:, s:], cache[tc.cfg.hook_name_out][:, s:]
                f = tc.encode(x)
                y_hat = tc.decode(f, x)
                yf = y.flatten(0, 1).double()
                a["n"] += yf.shape[0]
                a["l0"] += float((f > 0).sum())
                a["mse"] += float((y.float() - y_hat.float()).pow(2).sum())
                a["fired"] |= (f > 0).flatten(0, 1).any(0)
                a["y_sum"] += yf.sum(0)
                a["y_sq"] += yf.pow(2).sum()
                spliced = bridge.run_with_hooks(toks, fwd_hooks=[(tc.cfg.hook_name_out, replace(y_hat))])
                zeroed = bridge.run_with_hooks(toks, fwd_hooks=[(tc.cfg.hook_name_out, zero)])
                a["ce_spliced"] += float(_ce(spliced, toks)[:, lo:].sum())
                a["ce_zero"] += float(_ce(zeroed, toks)[:, lo:].sum())
            tot["ce_all"] += float(_ce(_run_replaced(bridge, layers, toks, s), toks)[:, lo:].sum())
            zeroed = bridge.run_with_hooks(toks, fwd_hooks=[(tc.cfg.hook_name_out, zero) for tc in layers.values()])
            tot["ce_all_zero"] += float(_ce(zeroed, toks)[:, lo:].sum())
            if progress is not None:
                progress(toks.shape[0])
    m = tot["ce_n"]
    ce_clean = tot["ce_clean"] / m
    rows = []
    for layer, tc in layers.items():
        a = acc[layer]
        n = a["n"]
        var = float(a["y_sq"] / n - (a["y_sum"] / n).pow(2).sum())
        ce_s, ce_z = a["ce_spliced"] / m, a["ce_zero"] / m
        rows.append({
            "layer": layer, "architecture": tc.cfg.architecture, "d_sae": tc.cfg.d_sae, "k": tc.cfg.k,
            "fvu": (a["mse"] / n) / var if var > 0 else math.nan, "mse": a["mse"] / n, "l0": a["l0"] / n,
            "dead_frac": float((~a["fired"]).float().mean()), "ce_spliced": ce_s, "ce_zero": ce_z,
            "ce_recovered": _recovered(ce_z, ce_s, ce_clean),
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
                       "ce_recovered": _recovered(ce_all_zero, ce_all, ce_clean)},
        "summary": {"median_fvu": statistics.median(fvus), "max_fvu": max(fvus),
                    "mean_l0": statistics.fmean(r["l0"] for r in rows),
                    "mean_dead_frac": statistics.fmean(r["dead_frac"] for r in rows),
                    "min_ce_recovered": min(r["ce_recovered"] for r in rows)},
        "settings": {"skip_first": skip_first, "contexts": int(tokens.shape[0]), "ctx_len": int(tokens.shape[1]),
                     "batch_size": batch_size, "n_layers_model": model.summary.n_layers,
                     "transcoders_model": first.model_name},
    }


def _run_replaced(bridge: Any, layers: Mapping[int, SAE], toks: Tensor, s: int) -> Tensor:
    """Logits with every MLP in ``layers`` replaced by its transcoder reading the run's own
    input (positions from ``s`` on)."""
    seen: dict[int, Tensor] = {}
    hooks = []
    for layer, tc in layers.items():
        def grab(t: Tensor, hook: Any = None, layer: int = layer) -> None:
            seen[layer] = t[:, s:].detach()

        def put(t: Tensor, hook: Any = None, layer: int = layer, tc: SAE = tc) -> Tensor:
            x = seen.pop(layer)
            t = t.clone()
            t[:, s:] = tc.decode(tc.encode(x), x).to(t.dtype)
            return t

        hooks += [(tc.cfg.hook_name, grab), (tc.cfg.hook_name_out, put)]
    return bridge.run_with_hooks(toks, fwd_hooks=hooks)


def evaluate_transcoders_on_corpus(model: Any, tset: TranscoderSet | Mapping[int, SAE], corpus: str | None = None, *,
                                   n_tokens: int = 16_384, context_len: int = StoreConfig.context_len,
                                   batch_size: int = 8, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
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
    r = evaluate_transcoders(model, tset, torch.tensor(ctx), batch_size=batch_size, progress=progress)
    r["settings"]["corpus"] = (corpus or "embedded") + " (held-out split)"
    return r


def save_eval(d: dict[str, Any], path: str | Path) -> Path:
    """Write ``d`` as JSON to ``path`` atomically (a temporary file renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(d, indent=2))
    os.replace(tmp, path)
    return path
