"""Feature dashboards: what makes each SAE feature fire and what it writes, from one pass.

Algorithm (Bricken et al. 2023, "Towards Monosemanticity", feature visualisations; the layout of
SAE dashboards since):

1. Pack a text corpus into contexts of ``ctx_len`` tokens, as the activation store does
   (``mechscope.activations.pack_contexts``).
2. For each batch of contexts, run the model only up to the SAE's hook (the store's
   ``Harvester``: a hook captures the activation and stops the forward pass), encode with the
   SAE and keep the selected features' activations f [batch, pos, F].
3. Update streaming statistics for all F features at once (``FeatureStats``): top-k contexts
   with a token window around each maximum, uniform samples per histogram bin (for quantile
   groups), a log-spaced histogram and the firing density. Memory does not grow with the corpus.
4. Output logits per feature: the decoder direction read straight through the unembedding,
   ``(d * gamma) @ W_U`` with ``d = W_dec[f]`` (centred first when the final norm is a
   LayerNorm) and ``gamma`` the final norm's weight. This is the feature's direct effect on the
   logits up to the norm's input-dependent scale: the convention of SAE dashboards, where
   TransformerLens folds gamma into W_U. Top positive and negative tokens.

The first ``skip_first`` positions of each context are left out of the statistics: they have
no left context and often an outlying residual norm (attention sink).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import Tensor

from mechscope.brief import brief_repr
from mechscope.errors import MechscopeError, check_config
from mechscope.progress import ProgressArg, as_progress
from mechscope.results import json_safe, read_result_json, write_result_json
from mechscope.sae.config import DashboardConfig
from mechscope.sae.feature_stats import FeatureStats
from mechscope.sae.io import check_sae_fits

if TYPE_CHECKING:
    from mechscope.models import Model

SCHEMA_VERSION = 1


@dataclass
class FeatureDashboard:
    """One feature's dashboard data. Examples are dicts ``{value, context, position, tokens,
    acts, centre}``: a token window, per-token activations, and the index of the token whose
    activation is ``value``."""

    feature: int
    density: float
    n_firing: int
    max_act: float
    mean_act: float
    """Mean activation over firing tokens."""
    hist: list[int]
    """Counts per bin: [zero, underflow, log bins..., overflow] (see ``DashboardResult.hist_bins``)."""
    top: list[dict]
    quantiles: list[dict]
    """Groups ``{lo, hi, n_tokens, samples}`` from low to high activation."""
    logits_pos: list[tuple[str, float]] = field(default_factory=list)
    logits_neg: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class DashboardResult:
    model: dict[str, Any]
    sae: dict[str, Any]
    settings: dict[str, Any]
    n_tokens: int
    n_contexts: int
    hist_bins: list[tuple[float, float]]
    """(lo, hi) of every histogram bin; bin 0 counts activations <= 0."""
    features: list[FeatureDashboard]
    seconds: float = 0.0

    def __repr__(self) -> str:  # a notebook's last line: one short line, not every tensor
        return brief_repr(self)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema_version"] = SCHEMA_VERSION
        d["hist_bins"] = json_safe(self.hist_bins)
        return d

    def save(self, out_dir: str | Path) -> Path:
        return write_result_json(out_dir, "dashboard.json", self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> "DashboardResult":
        d, _ = read_result_json(path, "dashboard.json", SCHEMA_VERSION, "mechscope sae dashboard")
        d.pop("schema_version")
        d["hist_bins"] = [(lo, math.inf if hi is None else hi) for lo, hi in d["hist_bins"]]
        d["features"] = [FeatureDashboard(**{**f, "logits_pos": [tuple(x) for x in f["logits_pos"]],
                                              "logits_neg": [tuple(x) for x in f["logits_neg"]]}) for f in d["features"]]
        return cls(**d)


# ------------------------------------------------------------------------ corpus and model
def corpus_contexts(tokenizer, texts: Iterable[str], n_tokens: int, ctx_len: int) -> Tensor:
    """Token ids [n_contexts, ctx_len] covering ``n_tokens``, packed as the activation store packs
    them (documents separated by ``<|endoftext|>``/EOS, no padding); raises when the corpus is
    too short for one context."""
    from mechscope.activations import pack_contexts

    n_ctx = max(1, math.ceil(n_tokens / ctx_len))
    ctxs = list(itertools.islice(pack_contexts(tokenizer, texts, ctx_len), n_ctx))
    if not ctxs:
        raise MechscopeError(f"The corpus holds fewer tokens than one context of {ctx_len}; use a smaller context length or more text.")
    return torch.tensor(ctxs)


def _harvester(model, hook_name: str, batch: int, ctx_len: int):
    """The activation store's runner: stops the forward pass at the hook, plain attention unless
    the hook needs the split modes."""
    from mechscope.activations import Harvester, StoreConfig

    ctx_len = max(ctx_len, 2)
    cfg = StoreConfig(hooks=[hook_name], context_len=ctx_len, batch_size=batch, skip_first=0,
                      buffer_tokens=max(32768, 2 * ctx_len), shuffle=False)
    return Harvester(model, cfg)


def acts_at_hook(model, hook_name: str, tokens: Tensor, harvester=None) -> Tensor:
    """Activations [batch, pos, d] at ``hook_name`` (per-head hooks flattened), running the model
    only up to that hook."""
    B, L = tokens.shape
    h = harvester or _harvester(model, hook_name, B, L)
    return h.run(tokens, skip_first=0)[hook_name].view(B, L, -1)


def output_logits(model: Model, directions: Tensor) -> Tensor:
    """Direct logit effect [F, d_vocab] of residual directions [F, d_model]: ``(d * gamma) @ W_U``,
    centring d first under a LayerNorm (see the module docstring)."""
    b = model.bridge
    W_U = b.W_U.detach()  # [d_model, d_vocab]
    d = directions.to(W_U.dtype).to(W_U.device)
    norm = getattr(b.ln_final, "original_component", None)
    if norm is not None and isinstance(norm, torch.nn.LayerNorm):
        d = d - d.mean(-1, keepdim=True)
    w = getattr(norm, "weight", None)
    if w is not None:
        w = w.detach().to(W_U.dtype)
        if "gemma" in type(norm).__name__.lower():  # Gemma's RMSNorm scales by (1 + weight)
            w = 1 + w
        d = d * w
    return d @ W_U


def parse_features(spec: str, d_sae: int) -> list[int]:
    """'0-99', '3,17,40-45' -> sorted unique indices, each checked against d_sae."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("-"):
            raise MechscopeError(f"Feature list '{spec}': {part!r} is negative; features count from 0 (0..{d_sae - 1}).")
        try:
            a, _, b = part.partition("-")
            lo, hi = int(a), int(b or a)
        except ValueError:
            raise MechscopeError(f"Cannot read {part!r} in the feature list '{spec}'; write indices and ranges like "
                                 "'0-99' or '3,17,40-45'.") from None
        if hi < lo:
            raise MechscopeError(f"Feature list '{spec}': the range {part!r} runs backwards; write it low-high.")
        if hi >= d_sae:  # checked before the range is built: a huge one would fill the memory first
            raise MechscopeError(f"Feature indices must lie in 0..{d_sae - 1} (got {hi} in '{spec}').")
        out.update(range(lo, hi + 1))
    if not out:
        raise MechscopeError(f"The feature list '{spec}' names no feature; give indices like '0-99' or '3,17,40-45'.")
    return sorted(out)


# ------------------------------------------------------------------------ the pass
@torch.no_grad()
def feature_dashboards(model: Model, sae, cfg: DashboardConfig | None = None, tokens: Tensor | None = None,
                       texts: Iterable[str] | None = None, progress: ProgressArg = False) -> DashboardResult:
    """Dashboards for ``cfg.features`` of ``sae`` on ``model``, from one pass over ``tokens``
    [n_contexts, ctx_len] (or the contexts cut from ``texts``, or from the corpus ``cfg.corpus``)."""
    check_config(cfg, DashboardConfig, "feature_dashboards")
    cfg = cfg or DashboardConfig()
    t0 = time.perf_counter()
    sc = sae.cfg
    feats = cfg.features if cfg.features is not None else list(range(min(100, sc.d_sae)))
    if not feats or min(feats) < 0 or max(feats) >= sc.d_sae:
        raise MechscopeError(f"Feature indices must lie in 0..{sc.d_sae - 1}.")
    if tokens is None:
        if texts is None:
            texts = _corpus(cfg.corpus, cfg.seed)
        tokens = corpus_contexts(model.tokenizer, texts, cfg.n_tokens, cfg.ctx_len)
    tokens = tokens.long()
    hook = sc.hook_name
    check_sae_fits(sae, model)
    sel = torch.tensor(feats, device=sae.device)
    stats = FeatureStats(len(feats), cfg.stats_config(), device=sae.device)
    harvester = _harvester(model, hook, cfg.batch_size, cfg.ctx_len)
    bar = as_progress(progress).phase("dashboard pass", total=len(tokens), unit="ctx")
    for i in range(0, len(tokens), cfg.batch_size):
        tb = tokens[i: i + cfg.batch_size]
        x = acts_at_hook(model, hook, tb, harvester)  # [B, L, d_in]
        f = sae.encode(x.to(sae.device))[..., sel]  # [B, L, F]
        s = cfg.skip_first
        stats.update(tb[:, s:].to(sae.device), f[:, s:])
        bar.advance(len(tb))
    bar.close()
    logits = _logits(model, sae, sel, cfg.n_logits)
    vocab = _decoder(model.tokenizer)
    out = []
    for j, feat in enumerate(feats):
        n_fire = int(stats.n_firing[j])
        out.append(FeatureDashboard(
            feature=feat,
            density=n_fire / max(stats.n_tokens, 1),
            n_firing=n_fire,
            max_act=float(stats.max_act[j]),
            mean_act=float(stats.sum_act[j]) / n_fire if n_fire else 0.0,
            hist=stats.hist[j].tolist(),
            top=[_example(e, cfg, vocab) for e in stats.top(j)],
            quantiles=[{**g, "samples": [_example(e, cfg, vocab) for e in g["samples"]]}
                       for g in stats.quantile_groups(j, cfg.n_quantiles)],
            logits_pos=[(vocab(t), v) for t, v in logits[0][j]] if logits else [],
            logits_neg=[(vocab(t), v) for t, v in logits[1][j]] if logits else [],
        ))
    settings = {**asdict(cfg), "features": feats}
    return DashboardResult(model=model.summary.to_dict(), sae=_sae_meta(sae), settings=settings,
                           n_tokens=stats.n_tokens, n_contexts=stats.n_contexts, hist_bins=stats.bin_edges(),
                           features=out, seconds=time.perf_counter() - t0)


def _logits(model: Model, sae, sel: Tensor, n: int):
    """Top-n positive and negative (token id, value) per selected feature, or None when the
    decoder does not write into the residual stream's width."""
    W_dec = sae.W_dec.detach()[sel]  # [F, d_out]
    if W_dec.shape[-1] != model.summary.d_model or n <= 0:
        return None
    tops = []
    for chunk in W_dec.split(256):  # [<=256, d_vocab] logits at a time: bounded memory
        lg = output_logits(model, chunk)
        tops.append((*lg.topk(n, dim=-1), *(-lg).topk(n, dim=-1)))
    pv, pi, nv, ni = (torch.cat(x) for x in zip(*tops))
    pos = [list(zip(i.tolist(), v.tolist())) for i, v in zip(pi, pv)]
    neg = [list(zip(i.tolist(), (-v).tolist())) for i, v in zip(ni, nv)]
    return pos, neg


def _example(e: dict, cfg: DashboardConfig, vocab) -> dict:
    ids, acts = e["token_ids"], e["acts"]
    keep = [i for i, t in enumerate(ids) if t >= 0]
    return {"value": e["value"], "context": e["context"], "position": e["position"] + cfg.skip_first,
            "tokens": [vocab(ids[i]) for i in keep], "acts": [acts[i] for i in keep],
            "centre": cfg.window_left - keep[0]}


def _decoder(tokenizer):
    """Token id -> its text inside running text, leading space included (``token_texts``: a
    SentencePiece '▁Mary' reads ' Mary', where ``decode([i])`` drops the space)."""
    from mechscope.models.tokens import token_texts

    cache: dict[int, str] = {}

    def vocab(i: int) -> str:
        if i not in cache:
            cache[i] = token_texts(tokenizer, [i])[0]
        return cache[i]

    return vocab


def _sae_meta(sae) -> dict[str, Any]:
    c = sae.cfg
    return c.to_dict() if hasattr(c, "to_dict") else dict(vars(c))


def _corpus(spec: str, seed: int) -> Iterable[str]:
    from mechscope.activations.corpus import get_corpus

    return get_corpus(None if spec == "embedded" else spec, seed=seed)
