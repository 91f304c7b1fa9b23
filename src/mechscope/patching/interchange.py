"""Interchange interventions (Geiger et al.): run the model on a base input while one
activation, at one (hook, positions[, head]), is taken from the run on a source
(counterfactual) input; if the patched run gives the answer the source input should get,
that activation carries the information the two inputs differ in.

Works on any loaded ``Model`` through the bridge's hook names (``mechscope.models.hooks``):
the residual stream entering each block (``resid_pre``; ``ln_final.hook_in`` after the last
block) or one head's output (``attn.hook_z``, the head's attention-weighted values, which
its ``W_O`` maps into the residual stream).

- ``patched_logits``: logits [n, pos, vocab] of base runs patched at one site;
- ``interchange_accuracy``: the interchange-intervention accuracy of every (site, position):
  the share of pairs whose patched run's top token at ``answer_pos`` is ``expected``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch

from mechscope.errors import MechscopeError
from mechscope.models.hooks import attn_z, check_hook_name, resid_into
from mechscope.models.tokens import ids_outside

InterchangeSite = Literal["resid", "head"]


@dataclass(frozen=True)
class Site:
    """Where to patch: a hook name and, for per-head hooks ([batch, pos, heads, d]), a head."""

    hook: str
    head: int | None = None

    @property
    def label(self) -> str:
        return self.hook if self.head is None else f"{self.hook}[{self.head}]"


def residual_sites(n_layers: int) -> list[Site]:
    """The residual stream entering each block and leaving the last one (n_layers + 1 sites)."""
    return [Site(resid_into(layer, n_layers)) for layer in range(n_layers + 1)]


def head_sites(n_layers: int, n_heads: int, head: int | None = None) -> list[Site]:
    """Every head's output (``attn.hook_z``), layer by layer; only ``head`` when given."""
    heads = range(n_heads) if head is None else [head]
    return [Site(attn_z(layer), h) for layer in range(n_layers) for h in heads]


def sites_for(model, site: InterchangeSite, head: int | None = None) -> list[Site]:
    L, H = model.summary.n_layers, model.summary.n_heads
    if site == "resid":
        if head is not None:
            raise MechscopeError(f"--head {head} applies to --site head only (a residual site has no heads); drop it or "
                                 "pass --site head.")
        return residual_sites(L)
    if site == "head":
        if head is not None and not 0 <= head < H:
            raise MechscopeError(f"The model has {H} heads per layer; pass --head between 0 and {H - 1}.")
        return head_sites(L, H, head)
    raise MechscopeError(f"Unknown interchange site '{site}'; choose resid or head.")


def _check_pair(base: torch.Tensor, source: torch.Tensor) -> None:
    if not isinstance(base, torch.Tensor) or not isinstance(source, torch.Tensor):
        raise MechscopeError(f"Base and source inputs must be torch tensors of token ids [n, pos]; got {type(base).__name__} and "
                             f"{type(source).__name__} (wrap lists in torch.tensor).")
    if base.dtype.is_floating_point or source.dtype.is_floating_point or base.dtype == torch.bool:
        raise MechscopeError(f"Base and source inputs must be integer token ids; got {base.dtype} and {source.dtype}.")
    if base.dim() != 2 or base.shape != source.shape:
        raise MechscopeError(
            f"Base and source inputs must be token tensors of one shape [n, pos]; got {tuple(base.shape)} and "
            f"{tuple(source.shape)} (a counterfactual must have as many tokens as its base)."
        )


def _check_fits(model, base: torch.Tensor) -> None:
    """Refuse inputs longer than the model's learned positions (``context_overrun``)."""
    from mechscope.models.load import context_overrun

    if (n_ctx := context_overrun(model, base.shape[1])) is not None:
        raise MechscopeError(f"The inputs have {base.shape[1]} tokens, more than the model's context of {n_ctx}; "
                             "pass shorter base and source inputs.")


def _check_positions(positions: Sequence[int], n_pos: int) -> list[int]:
    try:
        ints = [operator.index(p) for p in positions]
    except TypeError:
        raise MechscopeError(f"Positions must be integers (token indices); got {list(positions)}.") from None
    out = [p + n_pos if p < 0 else p for p in ints]
    if not out or any(not 0 <= p < n_pos for p in out):
        raise MechscopeError(f"Positions must be between {-n_pos} and {n_pos - 1} for inputs of {n_pos} tokens; got {list(positions)}.")
    return out


def source_cache(model, source: torch.Tensor, sites: Sequence[Site]) -> dict[str, torch.Tensor]:
    """The source run's activation at every site's hook."""
    wanted = {check_hook_name(model, s.hook) for s in sites}
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(source.to(model.device), names_filter=lambda n: n in wanted)
    return {k: cache[k].detach() for k in wanted}


def _replace(site: Site, src: torch.Tensor, pos: torch.Tensor):
    """Hook replacing, in row i, position pos[i] (all positions where pos[i] == -1) by ``src``'s."""
    def hook(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        act = act.clone()
        rows = torch.arange(act.shape[0], device=act.device)
        every = pos < 0
        if every.any():
            if site.head is None:
                act[every] = src[every].to(act.dtype)
            else:
                act[every, :, site.head] = src[every, :, site.head].to(act.dtype)
        some = ~every
        if some.any():
            r, p = rows[some], pos[some]
            if site.head is None:
                act[r, p] = src[r, p].to(act.dtype)
            else:
                act[r, p, site.head] = src[r, p, site.head].to(act.dtype)
        return act
    return hook


def _check_head(model, site: Site, act: torch.Tensor, n_pos: int) -> None:
    if site.hook.endswith(("hook_pattern", "hook_attn_scores")) or act.dim() < 3 or act.shape[1] != n_pos:
        raise MechscopeError(f"Hook '{site.hook}' gives activations of shape {tuple(act.shape)}, not [batch, position, ...]; "
                             "patch a per-position hook such as blocks.0.hook_resid_pre or blocks.0.attn.hook_z.")
    if site.head is not None and (act.dim() != 4 or not 0 <= site.head < act.shape[2]):
        raise MechscopeError(f"Hook '{site.hook}' has no head {site.head} (its activation is {tuple(act.shape)}); "
                             "pass a per-head hook such as blocks.0.attn.hook_z and a head index below the number of heads.")


def patched_logits(model, base: torch.Tensor, source: torch.Tensor, site: Site,
                   positions: Sequence[int] | None = None) -> torch.Tensor:
    """Logits [n, pos, vocab] of ``base`` [n, pos] with ``site`` at ``positions`` (every
    position when None) taken from the run on ``source`` [n, pos]."""
    if not isinstance(site, Site):
        raise MechscopeError(f"site must be a Site, got a {type(site).__name__} ({site!r}); wrap a hook name as "
                             f"Site({str(site)!r}) (with head=H for one head).")
    _check_pair(base, source)
    _check_fits(model, base)
    cache = source_cache(model, source, [site])[site.hook]
    _check_head(model, site, cache, base.shape[1])
    ps = list(range(base.shape[1])) if positions is None else _check_positions(positions, base.shape[1])
    return _run_positions(model, base, cache, site, ps)


def _run_positions(model, base: torch.Tensor, src: torch.Tensor, site: Site, positions: list[int]) -> torch.Tensor:
    """``base`` with ``site`` at all of ``positions`` (together) from ``src``."""
    keep = torch.zeros(base.shape[1], dtype=torch.bool, device=src.device)
    keep[positions] = True

    def hook(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        act = act.clone()
        if site.head is None:
            act[:, keep] = src[:, keep].to(act.dtype)
        else:
            act[:, keep, site.head] = src[:, keep, site.head].to(act.dtype)
        return act

    with torch.no_grad():
        return model.bridge.run_with_hooks(base.to(model.device), fwd_hooks=[(site.hook, hook)])


@dataclass
class InterchangeResult:
    """Interchange-intervention accuracy of every (site, position)."""

    sites: list[str]
    positions: list[int]
    accuracy: torch.Tensor  # [site, position]
    n: int
    answer_pos: int
    base_accuracy: float
    """share of pairs whose unpatched base run already gives the expected (source) answer"""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"sites": self.sites, "positions": self.positions, "accuracy": self.accuracy.tolist(), "n": self.n,
                "answer_pos": self.answer_pos, "base_accuracy": self.base_accuracy, **self.extra}


def interchange_accuracy(model, base: torch.Tensor, source: torch.Tensor, expected: torch.Tensor, *,
                         site: InterchangeSite = "resid", head: int | None = None,
                         sites: Sequence[Site] | None = None, positions: Sequence[int] | None = None,
                         answer_pos: int = -1, batch: int = 2048) -> InterchangeResult:
    """For every site (default: ``sites_for(model, site, head)``) and position (default:
    all), the share of the n pairs (``base`` [n, pos], ``source`` [n, pos], ``expected`` [n]
    token ids) whose base run, patched there from the source run, predicts ``expected`` at
    ``answer_pos``. Positions are patched one at a time; runs are batched over positions."""
    from mechscope.models import require_model

    require_model(model, "interchange_accuracy")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise MechscopeError(f"batch must be a whole number of at least 1 (runs per forward pass, e.g. 2048); got {batch!r}.")
    if head is not None and (sites is not None or site != "head"):
        where = "explicit sites (give Site(hook, head) instead)" if sites is not None else f"site '{site}' (a residual site has no heads)"
        raise MechscopeError(f"head={head} applies to site='head' only, not to {where}; drop head or pass site='head'.")
    if sites is not None:
        if isinstance(sites, (str, Site)) or not isinstance(sites, Sequence):
            raise MechscopeError(f"sites must be a list of Site(hook, head=None), got a {type(sites).__name__}; e.g. "
                                 "sites=[Site('blocks.0.hook_resid_pre')].")
        if not sites:
            raise MechscopeError("sites is empty, so there is nothing to patch; pass at least one Site, or leave sites out "
                                 "for every site of --site.")
        if wrong := [x for x in sites if not isinstance(x, Site)]:
            raise MechscopeError(f"sites must hold Site objects, got a {type(wrong[0]).__name__} ({wrong[0]!r}); wrap hook names "
                                 f"as Site(hook), e.g. Site({str(wrong[0])!r}).")
    _check_pair(base, source)
    n, n_pos = base.shape
    if n == 0:
        raise MechscopeError("No input pairs to patch; pass at least one base/source pair.")
    if not isinstance(expected, torch.Tensor):
        raise MechscopeError(f"expected must be a torch tensor of {n} token ids, one per pair; got {type(expected).__name__} "
                             "(wrap lists in torch.tensor).")
    if expected.dtype.is_floating_point or expected.dtype == torch.bool or expected.is_complex():
        raise MechscopeError(f"expected must hold integer token ids, got {expected.dtype}; e.g. torch.tensor(ids).")
    if expected.shape != (n,):
        raise MechscopeError(f"Need one expected answer per pair: {n} pairs but expected has shape "
                             f"{tuple(getattr(expected, 'shape', ()))}.")
    vocab = model.summary.d_vocab
    for name, t in (("base", base), ("source", source), ("expected", expected)):
        if (span := ids_outside(t, vocab)) is not None:
            raise MechscopeError(f"The {name} token ids must lie in [0, {vocab}) for this model's vocabulary; "
                                 f"got ids from {span[0]} to {span[1]}.")
    _check_fits(model, base)
    given = answer_pos
    try:
        answer_pos = operator.index(answer_pos)
    except TypeError:
        answer_pos = n_pos  # out of range: refused below with what was given
    if isinstance(given, bool) or not -n_pos <= answer_pos < n_pos:
        raise MechscopeError(f"answer_pos must be an integer between {-n_pos} and {n_pos - 1} for inputs of {n_pos} tokens; "
                             f"got {given!r}.")
    sites = list(sites) if sites is not None else sites_for(model, site, head)
    ps = _check_positions(positions if positions is not None else range(n_pos), n_pos)
    dev = model.device
    cache = source_cache(model, source, sites)
    expected = expected.to(dev)
    with torch.no_grad():
        base_pred = model(base)[:, answer_pos].argmax(-1)
    acc = torch.zeros(len(sites), len(ps))
    per = max(1, batch // n)
    for si, s in enumerate(sites):
        src = cache[s.hook]
        _check_head(model, s, src, n_pos)
        for c0 in range(0, len(ps), per):
            chunk = ps[c0 : c0 + per]
            k = len(chunk)
            pos = torch.tensor(chunk, device=dev).repeat_interleave(n)  # [k*n]
            srck = src.repeat(k, *([1] * (src.dim() - 1)))
            with torch.no_grad():
                logits = model.bridge.run_with_hooks(base.to(dev).repeat(k, 1), fwd_hooks=[(s.hook, _replace(s, srck, pos))])
            hit = (logits[:, answer_pos].argmax(-1) == expected.repeat(k)).float().view(k, n)
            acc[si, c0 : c0 + k] = hit.mean(1).cpu()
    return InterchangeResult([s.label for s in sites], ps, acc, n, answer_pos,
                             float((base_pred == expected).float().mean()))
