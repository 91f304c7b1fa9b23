"""Describe units: read their exemplars from a ``UnitStore``, explain, score, write descriptions.

    from mechscope.explain import UnitDB
    from mechscope.explain.describe import DescribeConfig, describe
    from mechscope.explain.explainers import BaselineExplainer
    from mechscope.explain.scoring import ModelSimulator
    db = UnitDB("units.db")
    res = describe(db, db.units("mlp", layer=5), BaselineExplainer(), ModelSimulator(model), DescribeConfig())

Two passes over the chosen units, each a resumable, idempotent unit of work:

1. Explain: the units the store does not list as ``described(explainer.name, settings_key)``
   are explained ``chunk`` at a time (a chunk is what a concurrent explainer sends at once) from
   their ``train`` exemplars, and each chunk's descriptions are stored as soon as they are
   written. With several candidates per unit (``n_samples``) and a simulator, the candidate
   with the best simulation score on the *train* exemplars is kept (the others are listed in
   the provenance); the held-out scores below stay unbiased by that choice.
2. Score: every description of these units by this explainer and settings that lacks one of
   the asked scores (or its ``*_shuffled`` control) is scored on the held-out exemplars, with
   its own text and with its shuffle partner's (``scoring.shuffle_partners`` over the units
   described with these settings in this selection), and the scores are merged into it.

A killed run continues where it stopped: pass 1 skips what the store lists as described, pass 2
skips what already has its scores, and the store's writes are idempotent, so nothing is
described twice. The selection is sorted before ``limit`` applies, so a repeated run with the
same ``limit`` works on the same units. Units are independent, so shards (by layer or unit
range) can run as separate processes on one database file, or on many machines.

This module imports no torch: the CLI reads ``DescribeConfig``'s defaults when it starts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Sequence

from mechscope.errors import MechscopeError, check_config
from mechscope.explain.types import Description, Exemplar, UnitRef, UnitStore
from mechscope.progress import SILENT, PhaseHandle, Progress, ProgressArg, as_progress
from mechscope.results import json_safe

if TYPE_CHECKING:
    from mechscope.explain.scoring import Simulator


@dataclass
class DescribeConfig:
    """How ``describe`` runs."""

    scorers: tuple[str, ...] = ("simulation",)
    """Any of ``simulation``, ``detection``, ``fuzzing``; empty = no scoring."""
    n_samples: int = 1
    """Candidate descriptions per unit (the best by train simulation score is kept)."""
    limit: int | None = None
    """Describe only the first ``limit`` units of the sorted selection."""
    chunk: int = 32
    """Units explained (and stored) together."""
    max_heldout: int = 24
    """Held-out exemplars scored per unit: up to half of them ``top``, the rest quantile/random (0 = all)."""
    seed: int = 0
    """Seed of the shuffle partners and of the fuzzing marks."""

    def __post_init__(self) -> None:
        from mechscope.explain.scoring import SCORERS

        self.scorers = tuple(self.scorers)
        bad = [s for s in self.scorers if s not in SCORERS]
        if bad:
            raise MechscopeError(f"Unknown scorer {bad[0]!r}; choose among {', '.join(SCORERS)} (comma-separated) or none.")
        if self.n_samples < 1:
            raise MechscopeError(f"--samples must be at least 1, got {self.n_samples}.")
        if self.chunk < 1:
            raise MechscopeError(f"chunk must be at least 1, got {self.chunk}.")
        if self.limit is not None and self.limit < 1:
            raise MechscopeError("--limit must be at least 1 (or left out for every unit).")


@dataclass
class DescribeResult:
    """What one ``describe`` call did."""

    explainer: str
    settings_key: str
    units: int
    """Units in the selection (after ``limit``)."""
    described: int
    """Descriptions written by this call (pass 1)."""
    already_described: int
    scored: int
    """Descriptions scored by this call (pass 2)."""
    no_exemplars: int
    """Units skipped for want of train exemplars."""
    seconds_explain: float
    seconds_score: float
    summary: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Score name -> ``scoring.control_summary`` over the selection's descriptions."""
    note: str = ""
    """Why the summary is empty where that is not obvious, or which units failed (one sentence), else ''."""
    failed: dict[str, str] = field(default_factory=dict)
    """Unit key -> why it could not be described (``explainers.base.UnitFailed``); a rerun retries them."""

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def pick_heldout(exemplars: list[Exemplar], n: int) -> list[Exemplar]:
    """Up to ``n`` held-out exemplars (0 = all): the top ones by activation for half, then quantile/random in stored order."""
    from mechscope.explain.scoring import heldout

    pool = heldout(exemplars)
    if n <= 0 or len(pool) <= n:
        return pool
    top = sorted((e for e in pool if e.kind == "top"), key=lambda e: -e.act)[: n // 2]
    rest = [e for e in pool if e.kind != "top"][: n - len(top)]
    return top + rest


def _bar(total: int, desc: str, progress: Progress) -> PhaseHandle:
    """A phase of ``total`` units; none when there is nothing to do."""
    return progress.phase(desc, total=total, unit="unit") if total else SILENT.phase(desc)


def _own_descriptions(store: UnitStore, units: Sequence[UnitRef], explainer: str, key: str) -> dict[UnitRef, Description]:
    """Each unit's latest description by ``explainer`` with settings key ``key``, made from the unit's current exemplars."""
    from mechscope.explain.db import settings_key

    out: dict[UnitRef, Description] = {}
    for u in units:
        mine = [d for d in store.descriptions(u, explainer) if settings_key(d.settings) == key and not d.stale]
        if mine:
            out[u] = max(mine, key=lambda d: d.id or 0)
    return out


CHECK_UNITS = 8
"""Units whose held-out windows ``describe`` checks against the simulator's context up front."""


def _check_simulator(store: UnitStore, simulator: Simulator, todo: list[UnitRef], cfg: DescribeConfig) -> None:
    """Refuse, before any unit is described, a simulator too short for the scoring prompts of the
    first ``CHECK_UNITS`` units to describe (where it has a ``check_prompts``: the in-process
    ``ModelSimulator``); the exemplar windows of one database all have one length. With nothing
    to describe, the scoring pass refuses at its first prompt, before it stores anything."""
    check = getattr(simulator, "check_prompts", None)
    if check is not None and todo:
        check([e.tokens for u in todo[:CHECK_UNITS] for e in pick_heldout(store.exemplars(u), cfg.max_heldout)], cfg.scorers)


def describe(store: UnitStore, units: Sequence[UnitRef], explainer: Any, simulator: Simulator | None = None,
             cfg: DescribeConfig | None = None, progress: ProgressArg = False,
             on_chunk: Callable[[int], None] | None = None) -> DescribeResult:
    """Explain and score ``units`` (see the module docstring); ``simulator`` may be None only without scorers.

    ``on_chunk(n_done)`` is called after every stored chunk (tests use it to kill a run midway)."""
    import mechscope
    from mechscope.explain.scoring import score, score_counts, shuffle_partners, simulation_score

    check_config(cfg, DescribeConfig, "describe")
    cfg = cfg or DescribeConfig()
    p = as_progress(progress)
    if cfg.scorers and simulator is None:
        raise MechscopeError("Scoring needs a simulator model; pass one, or --scorer none.")
    selection = sorted(set(units))[: cfg.limit] if cfg.limit else sorted(set(units))
    key = explainer.settings_key
    done = store.described(explainer.name, key)
    todo = [u for u in selection if u not in done]
    sim_name = getattr(simulator, "name", type(simulator).__name__) if simulator is not None else ""
    if cfg.scorers and simulator is not None:
        _check_simulator(store, simulator, todo, cfg)

    # Pass 1: explain, a chunk at a time, each chunk stored when written.
    t0 = time.perf_counter()
    written = missing = 0
    failed: dict[str, str] = {}
    with _bar(len(todo), f"describe ({explainer.name})", p) as bar:
        for i in range(0, len(todo), cfg.chunk):
            chunk = todo[i:i + cfg.chunk]
            items = []
            for u in chunk:
                record = store.unit(u)
                train = [e for e in store.exemplars(u, split="train") if e.kind != "bottom"]
                if record is None or not train:
                    missing += 1
                    continue
                items.append((record, train))
            candidates = _explain_each(explainer, items, cfg.n_samples) if items else []
            errors = [c for c in candidates if isinstance(c, Exception)]
            if errors and len(errors) == len(candidates):  # every unit failed: the setup, not a unit
                raise errors[0]
            for (record, train), texts in zip(items, candidates):
                if isinstance(texts, Exception):
                    failed[record.unit.key] = str(texts)
                    continue
                texts = [t for t in texts if t] or ["(no description)"]
                train_scores: list[float] = []
                if len(texts) > 1 and simulator is not None:
                    train_scores = [simulation_score(simulator, t, train) for t in texts]
                    ranked = sorted(zip(texts, train_scores), key=lambda p: -(p[1] if math.isfinite(p[1]) else -2.0))
                    texts, train_scores = [t for t, _ in ranked], [s for _, s in ranked]
                provenance: dict[str, Any] = {
                    "mechscope": mechscope.__version__, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "seed": cfg.seed, "n_train_exemplars": len(train)}
                if sim_name:
                    provenance["simulator"] = sim_name
                if len(texts) > 1:
                    provenance["candidates"] = texts
                    if train_scores:
                        provenance["candidates_train_simulation"] = json_safe(train_scores)
                store.put_description(Description(
                    unit=record.unit, text=texts[0], explainer=explainer.name, explainer_model=explainer.model_name,
                    settings=explainer.full_settings, provenance=provenance))
                written += 1
            bar.advance(len(chunk))
            if on_chunk is not None:
                on_chunk(written)
    t_explain = time.perf_counter() - t0

    # Pass 2: score every description of the selection that lacks a score (own and shuffled).
    t0 = time.perf_counter()
    scored = 0
    mine = _own_descriptions(store, selection, explainer.name, key)
    if cfg.scorers:
        partners = shuffle_partners(mine, cfg.seed)

        def lacking(u: UnitRef, have: dict[str, float]) -> bool:
            return any(f"{s}_n" not in have or (u in partners and have[f"{s}_n"] > 0 and f"{s}_shuffled" not in have)
                       for s in cfg.scorers)

        need = [u for u, d in mine.items() if lacking(u, d.scores)]
        with _bar(len(need), f"score ({', '.join(cfg.scorers)})", p) as bar:
            for n, u in enumerate(need):
                d = mine[u]
                record = store.unit(u)
                held = pick_heldout(store.exemplars(u), cfg.max_heldout)
                assert simulator is not None  # scorers without a simulator were refused at the top
                scores = score(simulator, d.text, record, held, cfg.scorers, cfg.seed)
                if u in partners:
                    other = mine[partners[u]].text
                    scores |= {f"{k}_shuffled": v for k, v in score(simulator, other, record, held, cfg.scorers, cfg.seed).items()}
                scores |= score_counts(record, held, cfg.scorers, cfg.seed)
                store.update_scores(d.id, scores)  # type: ignore[arg-type]
                d.scores.update(scores)
                scored += 1
                bar.advance()
                if on_chunk is not None and (n + 1) % cfg.chunk == 0:
                    on_chunk(written + n + 1)
    t_score = time.perf_counter() - t0

    from mechscope.explain.scoring import control_summary

    summary = {}
    for s in cfg.scorers:
        for name in ([s] + ([f"{s}_auc"] if s != "simulation" else [])):
            summary[name] = control_summary(mine.values(), name)
    note = ""
    if cfg.scorers and len(mine) == 1:
        note = ("the shuffled control needs at least 2 described units (each is scored with another's description), "
                "so the summary is empty; describe more units, e.g. a whole layer.")
    made = sorted({(str(d.provenance.get("simulator", "")), str(d.provenance.get("seed", ""))) for d in mine.values()
                   if d.scores and d.provenance.get("simulator")})
    if cfg.scorers and len(made) > 1:  # an earlier run scored part of the selection with another simulator or seed
        mixed = ("the selection's scores come from " + ", ".join(f"simulator {m} seed {sd}" for m, sd in made)
                 + ", which are not comparable; score every unit with one setting (describe into a new --db).")
        note = f"{note} {mixed}".strip()
    if failed:
        first, why = next(iter(failed.items()))
        note = (f"{len(failed):,} unit(s) could not be described and were left undescribed (first: {first}: {why.rstrip('.')}); "
                "the others are stored, and running the same command again retries only the failed ones."
                + (f" {note}" if note else ""))
    return DescribeResult(explainer=explainer.name, settings_key=key, units=len(selection), described=written,
                          already_described=len(selection) - len(todo), scored=scored, no_exemplars=missing,
                          seconds_explain=t_explain, seconds_score=t_score, summary=summary, note=note, failed=failed)


def _explain_each(explainer: Any, items: list, n_samples: int) -> list:
    """``explainer.explain_each`` (each unit's descriptions or its ``UnitFailed``), or
    ``explain_many`` for an explainer written against the older interface (no per-unit failures)."""
    each = getattr(explainer, "explain_each", None)
    return each(items, n_samples) if each is not None else explainer.explain_many(items, n_samples)
