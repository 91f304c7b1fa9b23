"""Labelled circuits: each head node's role from the head taxonomy, and where it looks.

For every attention head in a circuit (and every head among the top components):

1. **Role**: the head's scores from ``mechscope.heads`` (the categories of
   ``heads.result.CATEGORIES``: previous-token, duplicate-token, induction (attention shares on
   repeated random tokens, BOS excluded) and copying (the eigenvalue score of the full OV
   circuit)). A category counts when the head's score reaches the category's threshold
   (``THRESHOLDS``); the role is the counting category the head exceeds by the largest factor
   (score / threshold), so a rare, specific pattern (an induction share of 0.6, twice its
   threshold) outranks the eigenvalue copying score that a quarter of a model's heads have near
   1. Other counting categories are listed as ``also``. No category counts: no role.
2. **Where it attends** on the task's example clean prompt (``batch.clean[0]``), from the final
   scored position: the two keys with the most attention, each named by what it is in the
   task when possible: the answer token (for IOI the indirect object), the distractor (the
   ``wrong`` token: for IOI the subject), the first position (where heads park attention), the
   query token itself, else the token string.

Head scores are computed once per model by ``role_scores``: the steps of ``heads.head_scores``
the roles read (the pattern scores on ``n`` repeated random-token sequences, the copying scores
of the OV circuits), with the same functions and, under ``HEADS_CONFIG``, the same settings as
a default ``mechscope heads`` run, so the numbers are the ones that run prints; the parts the
roles do not use (real text, ICL, mean ablation, composition: about three quarters of its time)
are left out. They are cached as a ``mechscope heads`` result folder (``heads.json`` + ``heads.safetensors``, never pickle) under
``$MECHSCOPE_CACHE/heads/`` (default ``~/.cache/mechscope/heads/``), in a folder named by a
hash of the model's identity (name, source, architecture, shape, dtype and a fingerprint of
its weights) and the settings; ``identity.json`` beside it is checked on every read, so a
different model or different settings never reuse a file. An existing ``mechscope heads``
folder can be passed instead (``heads=``).

``attention_patterns`` gives the attention matrices of a list of heads on the same prompt (the
report's heatmaps), at most ``max_heads`` of them by |node score|, rounded to keep the JSON
small.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import torch

from mechscope.errors import MechscopeError
from mechscope.graph.names import parse_node
from mechscope.heads import HeadsConfig, HeadsResult, copying, patterns, sequences
from mechscope.heads.result import CATEGORIES
from mechscope.heads.weights import head_weights
from mechscope.progress import ProgressArg, as_progress

if TYPE_CHECKING:
    from mechscope.models import Model

CACHE_FORMAT = 1

HEADS_CONFIG = HeadsConfig()
"""Settings of the role scores: ``mechscope heads``'s defaults, of which ``role_scores`` reads
``n``, ``seq_len``, ``seed``, ``copy_tokens`` and ``example_len``."""
ROLE_SETTINGS = ("n", "seq_len", "seed", "copy_tokens", "example_len")

ROLES: dict[str, str] = {cat: score for cat, score in CATEGORIES.items() if score != "ablation"}
"""Role -> the ``heads`` score it is read from (the causal induction score is left out: it is
measured for the top induction heads only, in nats)."""

THRESHOLDS: dict[str, float] = {"previous-token": 0.3, "duplicate-token": 0.3, "induction": 0.3, "copying": 0.9}
"""A head counts in a category at or above these scores. Pattern scores are attention shares
(uniform attention over BOS + R + R, |R| = 20, gives 0.077 previous-token and 0.034
duplicate-token and induction shares); copying is sum(lambda) / sum(|lambda|) in [-1, 1]. On the embedded
SmolLM2-135M: 25 heads of 270 reach the previous-token threshold, 9 duplicate-token, 14
induction and 64 copying."""

ROLE_NAMES = {"previous-token": "previous-token head", "duplicate-token": "duplicate-token head",
              "induction": "induction head", "copying": "copying head"}


# ---- head scores, cached ------------------------------------------------------------------
def default_heads_config(model: Model) -> HeadsConfig:
    """``HEADS_CONFIG``, with shorter sequences for models whose context is below 41 tokens."""
    n_ctx = int(model.summary.n_ctx)
    if n_ctx >= 2 * HEADS_CONFIG.seq_len + 1:
        return HEADS_CONFIG
    seq = max(2, (n_ctx - 1) // 2)
    return replace(HEADS_CONFIG, seq_len=seq, example_len=min(HEADS_CONFIG.example_len, seq))


def role_settings(cfg: HeadsConfig) -> dict[str, Any]:
    """The settings ``role_scores`` reads (what its cache entry is keyed by)."""
    return {k: getattr(cfg, k) for k in ROLE_SETTINGS}


@torch.no_grad()
def role_scores(model: Model, cfg: HeadsConfig | None = None, progress: ProgressArg = False) -> HeadsResult:
    """The head scores the roles read, computed as ``heads.head_scores`` computes them (steps 1
    and 3 of its docstring): previous-token, duplicate-token and induction shares and the BOS mass
    on ``cfg.n`` repeated random-token sequences, the eigenvalue and top-1 copying scores, and
    the example patterns. A ``HeadsResult`` without text, ICL, ablation or composition parts."""
    cfg = cfg or default_heads_config(model)
    say = as_progress(progress).note
    patterns.check_heads_visible(model)
    if cfg.n < 1:
        raise MechscopeError("The number of repeated sequences for head scores must be at least 1.")
    rep = sequences.repeated_random(model, cfg.n, cfg.seq_len, cfg.seed)
    say("attention patterns on repeated random tokens")
    scores: dict[str, torch.Tensor] = dict(patterns.pattern_scores(model, rep))
    say("copying scores (OV circuits)")
    w = head_weights(model)
    scores["copying_eigen"] = copying.eigen_copying(w)
    scores["copying_top1"] = copying.top1_copying(w, copying.copying_tokens(model, cfg.copy_tokens, cfg.seed))
    ex = sequences.repeated_random(model, 1, min(cfg.example_len, cfg.seq_len), cfg.seed + 1)[0]
    return HeadsResult(model=model.summary.to_dict(), settings=role_settings(cfg), scores=scores, composition={},
                       icl={}, ablation={}, example_tokens=model.to_str_tokens(ex),
                       example_patterns=patterns.example_patterns(model, ex),
                       extra={"computed_by": "mechscope.circuits.labels.role_scores (the scores head roles read)"})


def cache_root() -> Path:
    """``$MECHSCOPE_CACHE/heads``, else ``$XDG_CACHE_HOME/mechscope/heads``, else
    ``~/.cache/mechscope/heads``."""
    if os.environ.get("MECHSCOPE_CACHE"):
        return Path(os.environ["MECHSCOPE_CACHE"]).expanduser() / "heads"
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "mechscope" / "heads"


@torch.no_grad()
def weights_fingerprint(model: Model, n: int = 4096) -> str:
    """A short hash of strided samples of the first, middle and last parameter tensors: two
    checkpoints with the same name and shape get different cache entries."""
    params = list(model.bridge.parameters())
    h = hashlib.sha256()
    for p in (params[0], params[len(params) // 2], params[-1]) if params else ():
        flat = p.detach().flatten()
        step = max(1, flat.numel() // n)
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step][:n].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(model: Model) -> dict[str, Any]:
    """What makes two loaded models the same for head scores (the device is not part of it)."""
    s = model.summary.to_dict()
    s.pop("device", None)
    return {**s, "weights": weights_fingerprint(model)}


def _identity(model: Any, cfg: HeadsConfig) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "model": model_identity(model), "settings": role_settings(cfg)}


def _slug(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
    return keep.strip("-.")[:48] or "model"


def cache_path(model: Model, cfg: HeadsConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    """The cache folder of ``model``'s head scores under settings ``cfg``."""
    cfg = cfg or default_heads_config(model)
    ident = _identity(model, cfg)
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / f"{_slug(model.summary.name)}-{key}"


def _read_cached(folder: Path, ident: dict[str, Any]) -> HeadsResult | None:
    try:
        stored = json.loads((folder / "identity.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if stored != json.loads(json.dumps(ident)):
        return None
    try:
        return HeadsResult.load(folder)
    except (MechscopeError, OSError, KeyError, ValueError):
        return None


def cached_head_scores(model: Model, cfg: HeadsConfig | None = None, cache_dir: str | Path | None = None,
                       progress: ProgressArg = False) -> tuple[HeadsResult, Path, bool]:
    """(head scores of ``model``, their cache folder, whether they came from the cache):
    read from the cache when its identity matches, else computed with ``role_scores`` and
    written there (atomically: a folder renamed into place)."""
    cfg = cfg or default_heads_config(model)
    folder = cache_path(model, cfg, cache_dir)
    ident = _identity(model, cfg)
    hit = _read_cached(folder, ident)
    if hit is not None:
        return hit, folder, True
    p = as_progress(progress)
    p.note(f"head scores of {model.summary.name} for the circuit labels (cached in {folder})")
    res = role_scores(model, cfg, progress=p)
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        res.save(tmp)
        (tmp / "identity.json").write_text(json.dumps(ident, indent=1, sort_keys=True))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as exc:  # an unwritable cache costs a recomputation next time, not this run
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"warning: could not cache head scores in {folder} ({exc.strerror or exc}); set MECHSCOPE_CACHE "
              "to a writable folder", file=sys.stderr)
    return res, folder, False


def _explicit_heads(heads: str | Path | HeadsResult, model: Model) -> tuple[HeadsResult, str]:
    res = heads if isinstance(heads, HeadsResult) else HeadsResult.load(heads)
    want = (model.summary.n_layers, model.summary.n_heads)
    got = (int(res.model.get("n_layers", -1)), int(res.model.get("n_heads", -1)))
    if got != want or any(tuple(res.scores[s].shape) != want for s in ROLES.values() if s in res.scores):
        raise MechscopeError(
            f"The head scores given ({res.model.get('name')}, {got[0]} layers x {got[1]} heads) are not for "
            f"{model.summary.name} ({want[0]} layers x {want[1]} heads); pass a `mechscope heads` folder of this model."
        )
    missing = [s for s in ROLES.values() if s not in res.scores]
    if missing:
        raise MechscopeError(f"The head scores given lack {', '.join(missing)}; rerun `mechscope heads`.")
    return res, "given" if isinstance(heads, HeadsResult) else str(heads)


# ---- roles ---------------------------------------------------------------------------------
def head_role(scores: dict[str, float], thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """{'role', 'role_score', 'also'} from one head's category scores (see module docstring)."""
    th = thresholds or THRESHOLDS
    counting = [(scores[c] / th[c], c) for c in ROLES if c in th and scores.get(c) is not None
                and scores[c] == scores[c] and scores[c] >= th[c]]
    counting.sort(key=lambda x: (-x[0], list(ROLES).index(x[1])))
    if not counting:
        return {"role": None, "role_score": None, "also": []}
    role = counting[0][1]
    return {"role": role, "role_score": scores[role], "also": [{"role": c, "score": scores[c]} for _, c in counting[1:]]}


def _is_head(name: str) -> bool:
    n = parse_node(name)
    return n.kind == "head" and n.port is None


def _head_index(name: str) -> tuple[int, int]:
    """(layer, head) of a head name ``a{l}.h{h}``."""
    n = parse_node(name)
    if n.kind != "head" or n.port is not None:
        raise MechscopeError(f"'{name}' is not an attention head (heads are named like a3.h1).")
    assert n.layer is not None and n.head is not None  # every head node has both
    return n.layer, n.head


def circuit_heads(res: Any, extra_top: int = 20) -> list[str]:
    """The heads in the circuit and among the top ``extra_top`` components, by |node score|."""
    ns = res.node_scores()
    heads = {n for n in res.circuit_nodes() if _is_head(n)}
    heads |= {c["name"] for c in res.top_components(extra_top) if _is_head(c["name"])}
    return sorted(heads, key=lambda n: (-abs(ns.get(n, 0.0)), _head_index(n)))


# ---- attention on the example prompt --------------------------------------------------------
def _example(model: Any, batch: Any) -> tuple[torch.Tensor, int, int, int]:
    """(tokens [pos] of the first clean prompt, final scored position, answer id, wrong id)."""
    L = int(batch.lengths[0])
    toks = batch.clean[0, :L].cpu()
    k = int(batch.positions[0].argmax())
    q = int(batch.positions[0, k])
    return toks, q, int(batch.answers[0, k]), int(batch.wrongs[0, k])


@torch.no_grad()
def _patterns(model: Any, toks: torch.Tensor) -> torch.Tensor:
    from mechscope.heads.patterns import example_patterns

    return example_patterns(model, toks)  # [L, H, pos, pos]


def attention_patterns(model: Model, batch: Any, heads: Iterable[str], node_scores: dict[str, float] | None = None,
                       max_heads: int = 24, digits: int = 3) -> dict[str, Any]:
    """Attention patterns [q][k] of ``heads`` on the first clean prompt of ``batch`` (the
    report's ``example``): at most ``max_heads`` heads, the largest |node score| first when
    ``node_scores`` is given, values rounded to ``digits`` decimals."""
    heads = list(dict.fromkeys(heads))
    if node_scores is not None:
        heads.sort(key=lambda n: -abs(node_scores.get(n, 0.0)))
    shown = heads[:max_heads]
    toks, q, _, _ = _example(model, batch)
    att: dict[str, list[list[float]]] = {}
    if shown:
        pats = _patterns(model, toks)
        for h in shown:
            l, i = _head_index(h)
            att[h] = [[round(float(v), digits) for v in row] for row in pats[l, i].tolist()]
    return {"prompt": batch.clean_text[0] if batch.clean_text else "", "tokens": model.to_str_tokens(toks),
            "attention": att, "query_position": q, "n_heads": len(heads)}


def _describe_key(j: int, tok_id: int, tok: str, q: int, answer: int, wrong: int) -> tuple[str, str]:
    """(kind, words) for key position ``j``."""
    if tok_id == answer:
        return "answer", f"the answer token '{tok}'"
    if tok_id == wrong and wrong != answer:
        return "distractor", f"the distractor '{tok}'"
    if j == 0:
        return "first", f"the first token '{tok}'"
    if j == q:
        return "self", f"itself '{tok}'"
    return "token", f"'{tok}' at {j}"


def _text(name: str, role: dict[str, Any], scores: dict[str, float | None], attends: list[dict],
          th: dict[str, float]) -> str:
    if role["role"]:
        also = "".join(f"; also {a['role']} {a['score']:.2f}" for a in role["also"])
        what = f"{ROLE_NAMES[role['role']]} ({role['role_score']:.2f}{also})"
    else:
        finite = {c: v for c, v in scores.items() if v is not None and v == v}
        best = max(finite, key=lambda c: finite[c] / th.get(c, 1.0)) if finite else None
        if best:
            v = finite[best]
            shown = f"{v:.2f}" if round(v, 2) < th[best] else f"{v:.4f}"
            what = f"no role (closest: {best} {shown} < {th[best]:g})"
        else:
            what = "no role"
    if attends:
        groups: dict[str, list[float]] = {}  # the same answer/distractor at two positions reads as one
        for x in [attends[0]] + [x for x in attends[1:] if x["weight"] >= 0.1]:
            groups.setdefault(x["what"], []).append(x["weight"])
        what += ", attends to " + " and ".join(f"{k} ({' + '.join(f'{w:.2f}' for w in ws)})" for k, ws in groups.items())
    return f"{name}: {what}"


def label_heads(model: Model, res: Any, batch: Any, cache_dir: str | Path | None = None, progress: ProgressArg = True,
                heads: str | Path | HeadsResult | None = None, cfg: HeadsConfig | None = None,
                thresholds: dict[str, float] | None = None, top_k: int = 2) -> dict[str, dict]:
    """Role and attention label of every head node of circuit ``res`` (see module docstring).

    Args:
        model: the loaded model the circuit is for.
        res: a ``CircuitResult``.
        batch: the task's ``TaskBatch``; its first clean prompt is the example.
        cache_dir: folder of cached head scores (default ``cache_root()``).
        heads: a ``mechscope heads`` result folder (or ``heads.json``, or a ``HeadsResult``) to
            read the scores from instead of the cache.
        cfg: settings of the head scores when they are computed (default ``HEADS_CONFIG``).
        thresholds: per-category thresholds (default ``THRESHOLDS``).

    Returns:
        ``{head name: {"role", "role_score", "also", "scores", "attends", "node_score",
        "in_circuit", "text"}}`` and one ``"_meta"`` entry (where the scores came from, the
        thresholds, the example prompt's query position and answer/distractor tokens).
    """
    th = {**THRESHOLDS, **(thresholds or {})}
    if any(v <= 0 for v in th.values()):
        raise MechscopeError("Role thresholds must be positive.")
    if heads is not None:
        hr, source = _explicit_heads(heads, model)
        cached = None
    else:
        hr, folder, cached = cached_head_scores(model, cfg, cache_dir, progress)
        source = str(folder)
    names = circuit_heads(res)
    ns = res.node_scores()
    in_circuit = res.circuit_nodes()
    toks, q, answer, wrong = _example(model, batch)
    str_toks = model.to_str_tokens(toks)
    pats = _patterns(model, toks) if names else None
    out: dict[str, dict] = {}
    for name in names:
        assert pats is not None  # computed whenever there are names
        l, h = _head_index(name)
        scores = {c: _finite(hr.scores[s][l, h]) for c, s in ROLES.items() if s in hr.scores}
        role = head_role({c: v for c, v in scores.items() if v is not None}, th)
        row = pats[l, h, q]
        w, idx = row.topk(min(top_k, q + 1))
        attends = []
        for wj, j in zip(w.tolist(), idx.tolist()):
            kind, what = _describe_key(j, int(toks[j]), str_toks[j], q, answer, wrong)
            attends.append({"pos": j, "token": str_toks[j], "weight": round(wj, 3), "kind": kind, "what": what})
        out[name] = {**role, "scores": {c: None if v is None else round(v, 4) for c, v in scores.items()},
                     "attends": attends, "node_score": ns.get(name, 0.0), "in_circuit": name in in_circuit,
                     "text": _text(name, role, scores, attends, th)}
        if role["role_score"] is not None:
            out[name]["role_score"] = round(role["role_score"], 4)
            out[name]["also"] = [{"role": a["role"], "score": round(a["score"], 4)} for a in role["also"]]
    out["_meta"] = {
        "heads_source": source, "from_cache": cached, "heads_settings": hr.settings,
        "roles": dict(ROLES), "thresholds": th,
        "rule": "role = the category whose score exceeds its threshold by the largest factor (score / threshold)",
        "query_position": q, "query_token": str_toks[q] if q < len(str_toks) else "",
        "answer": model.to_str_tokens([answer])[0],
        "distractor": model.to_str_tokens([wrong])[0] if wrong != answer else None,
    }
    return out


def _finite(x: Any) -> float | None:
    v = float(x)
    return v if v == v and abs(v) != float("inf") else None


__all__ = ["HEADS_CONFIG", "ROLES", "THRESHOLDS", "attention_patterns", "cache_path", "cache_root", "cached_head_scores",
           "circuit_heads", "head_role", "label_heads", "model_identity"]
